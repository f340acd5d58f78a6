"""Timing two implementations of the same work side by side, fairly.

Both sides run in one process on the same inputs: warm-up calls first (allocator caches, lazy
initialisation, oneDNN kernel selection), then timed calls that alternate the order every iteration (AB,
BA, AB, ...) so that slow drift of the machine (thermal state, other processes) falls on both sides
alike. Reported: median, min and max seconds per call, the ratio of medians, and peak memory. On CUDA a
call is timed with events after synchronising, and peak memory is the allocator's high-water mark; on
the CPU it is the process's peak resident memory during one call of that side, measured in a fresh
process so that neither side's caches count against the other.
"""
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Side:
    """One implementation: `setup()` builds its model and inputs and returns the callable to time."""
    name: str
    setup: Callable[[], Callable[[], object]]
    flops: Optional[float] = None  # per call, 2 x multiply-adds, where counted
    images: Optional[int] = None  # images per call, for images per second


@dataclass
class SideResult:
    name: str
    times: List[float]
    peak_memory_mb: Optional[float] = None
    flops: Optional[float] = None
    images: Optional[int] = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def row(self) -> Dict[str, object]:
        row = {"name": self.name, "median_s": self.median, "min_s": min(self.times), "max_s": max(self.times),
               "iters": len(self.times), "peak_memory_mb": self.peak_memory_mb}
        if self.flops:
            row["gflop"] = self.flops / 1e9
            row["gflop_per_s"] = self.flops / 1e9 / self.median
        if self.images:
            row["images_per_s"] = self.images / self.median
        return row


@dataclass
class Report:
    task: str
    settings: Dict[str, object]
    sides: List[SideResult] = field(default_factory=list)
    extra: Dict[str, float] = field(default_factory=dict)  # further figures of the task, printed and saved

    def ratio(self) -> Optional[float]:
        """The peer's median over ours: how many times faster ours is."""
        return self.sides[1].median / self.sides[0].median if len(self.sides) == 2 else None

    def as_dict(self) -> Dict[str, object]:
        return {"task": self.task, "settings": self.settings, "machine": machine(),
                "sides": [s.row() for s in self.sides], "speedup": self.ratio(), **self.extra}

    def table(self) -> str:
        header = f"{'':14}{'median s':>10}{'min s':>9}{'max s':>9}{'peak MB':>9}{'GFLOP/s':>9}{'img/s':>9}"
        lines = [f"{self.task}: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), header]
        for s in self.sides:
            r = s.row()
            mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
            rate = f"{r['gflop_per_s']:.0f}" if "gflop_per_s" in r else "-"
            per_s = f"{r['images_per_s']:.2f}" if "images_per_s" in r else "-"
            lines.append(f"{s.name:14}{r['median_s']:10.3f}{r['min_s']:9.3f}{r['max_s']:9.3f}{mem:>9}{rate:>9}{per_s:>9}")
        if self.ratio():
            lines.append(f"{ratio_phrase(self.sides[0].name, self.sides[1].name, self.ratio())} (ratio of medians)")
        for key, value in self.extra.items():
            line = f"{key}: {value:.3f}"
            if key == "speedup_bound_at_ours_floor":
                line += f" (at its dense floor alone, {ratio_phrase(self.sides[0].name, self.sides[1].name, value)})"
            lines.append(line)
        lines.append(machine_line(machine()))
        return "\n".join(lines)

    def write(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=2)


def ratio_phrase(ours: str, peer: str, ratio: float) -> str:
    """`ratio` (peer's time over ours) in words that say which side is faster: below 1 ours is slower."""
    if f"{ratio:.2f}" == "1.00":
        return f"{ours} is 1.00x: as fast as {peer}, to two digits"
    if ratio > 1:
        return f"{ours} is {ratio:.2f}x faster than {peer}"
    return f"{ours} is {ratio:.2f}x (slower): {peer} is {1 / ratio:.2f}x faster"


def cpu_model() -> str:
    """The CPU's name as the kernel reports it (x86: "model name" in /proc/cpuinfo), else platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, object]:
    # cpu_capability: the instruction set torch's CPU kernels were dispatched for (AVX2, AVX512, ...);
    # the same model name can run different kernels, so results name both.
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: Dict[str, object]) -> str:
    line = (f"machine: {info['cpu_model']} ({info['cpu_capability']}), {info['threads']} threads of "
            f"{info['cores']} cores, torch {info['torch']}")
    return line + (f", {info['gpu']}" if "gpu" in info else "")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events on the stream of the device the calls run on
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_rss_of_call(side: Side, queue):
    """In a fresh process: build the side, call it once to warm up, then the peak resident memory of one
    more call above what the process held before it (ru_maxrss is a high-water mark in KiB on Linux)."""
    fn = side.setup()
    fn()
    before = _rss_mb()
    fn()
    queue.put(max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def cpu_peak_memory(side: Side) -> Optional[float]:
    """Peak MB one call of `side` adds, measured in a spawned process (None where /proc is unavailable)."""
    if not os.path.exists("/proc/self/statm"):
        return None
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_peak_rss_of_call, args=(side, queue))
    process.start()
    try:
        return queue.get(timeout=3600)
    finally:
        process.join()


def compare(task: str, sides: List[Side], iters: int, warmup: int, device: torch.device,
            settings: Optional[Dict[str, object]] = None, measure_memory: bool = True, floor: bool = False) -> Report:
    """Warm up every side, then `iters` timed calls of each, alternating the order; peak memory per side.
    With `floor`, also each side's `dense_floor` and the speedup over the peer that ours' floor allows."""
    calls = [side.setup() for side in sides]
    for _ in range(warmup):
        for fn in calls:
            fn()
    synchronize(device)
    times: List[List[float]] = [[] for _ in sides]
    peaks: List[float] = [0.0 for _ in sides]
    for i in range(iters):
        order = range(len(sides)) if i % 2 == 0 else reversed(range(len(sides)))
        for j in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[j].append(time_call(calls[j], device))
            if device.type == "cuda":
                peaks[j] = max(peaks[j], torch.cuda.max_memory_allocated(device) / 2 ** 20)
    del calls
    results = []
    for j, side in enumerate(sides):
        if device.type == "cuda":
            peak = peaks[j]
        else:
            peak = cpu_peak_memory(side) if measure_memory else None
        results.append(SideResult(side.name, times[j], peak, side.flops, side.images))
    report = Report(task, dict(settings or {}, iters=iters, warmup=warmup, device=str(device)), results)
    if floor:
        floors = [dense_floor(side.setup(), device) for side in sides]
        report.extra = {f"{side.name}_dense_floor_s": f for side, f in zip(sides, floors)}
        if len(sides) == 2:
            report.extra["speedup_bound_at_ours_floor"] = results[1].median / floors[0]
    return report


_DENSE = ("conv2d", "conv_transpose2d", "linear", "mm", "bmm", "addmm", "matmul")


def dense_calls(fn: Callable[[], object]) -> List[tuple]:
    """The convolutions and matrix products one call of `fn` makes, as (function, args, kwargs, backward)
    with every tensor argument replaced by its (shape, stride, dtype, device, requires_grad); `backward`:
    whether autograd recorded the call (its output wants a gradient)."""
    from torch.overrides import TorchFunctionMode

    calls = []

    def spec(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad)
        return a

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if getattr(func, "__name__", "") in _DENSE:
                backward = isinstance(out, torch.Tensor) and out.requires_grad
                calls.append((func, tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}, backward))
            return out

    with Record():
        fn()
    return calls


def dense_floor(fn: Callable[[], object], device: torch.device, iters: int = 3) -> float:
    """Seconds one call of `fn` spends in its convolutions and matrix products alone: each is replayed on
    fresh tensors of the same shapes, strides and dtypes, forward, and backward where its inputs want a
    gradient (as in a training step). This is the floor of any implementation that makes these calls
    with these kernels: nothing else (RoIAlign, NMS, elementwise work, Python) is counted."""
    calls = dense_calls(fn)
    g = torch.Generator(device=device).manual_seed(0)

    def make(a):
        if isinstance(a, tuple) and len(a) == 6 and a[0] == "tensor":
            _, shape, stride, dtype, dev, grad = a
            t = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
            t.copy_(torch.randn(shape, generator=g, device=dev, dtype=dtype) if dtype.is_floating_point
                    else torch.zeros(shape, dtype=dtype, device=dev))
            return t.requires_grad_(grad)
        return a

    prepared = [(func, [make(a) for a in args], {k: make(v) for k, v in kwargs.items()}, backward)
                for func, args, kwargs, backward in calls]

    def replay():
        for func, args, kwargs, backward in prepared:
            with torch.set_grad_enabled(backward):
                out = func(*args, **kwargs)
            if backward:
                out.backward(torch.ones_like(out))
                for a in args:
                    if isinstance(a, torch.Tensor):
                        a.grad = None  # as after zero_grad(set_to_none=True): no accumulation counted
        synchronize(device)

    replay()
    return statistics.median(time_call(replay, device) for _ in range(iters))
