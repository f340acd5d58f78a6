import logging
import os
import runpy
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from backbones.norms import FrozenBatchNorm2d

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Two cores: keep intra-op threads at 2 so parallel tests do not oversubscribe. OMP_NUM_THREADS, where set,
# wins: the suite is also run with 1 thread, since results must not depend on the thread count.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on tiny inputs a second thread only adds synchronisation, which on a
    loaded 2-core machine costs seconds per forward pass (up to 40x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (real COCO subsets live in ../shared/data)")
    return SHARED_DATA


def randomize_norms(model, seed=0):
    """Non-trivial BN statistics and affine parameters (BatchNorm's and our FrozenBN's), so a wrong mapping
    of any of them shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


class ToolResult(NamedTuple):
    """What `run_tool` returns: the attribute names of subprocess.CompletedProcess, so that assertions
    written for `subprocess.run(..., capture_output=True, text=True)` read the same."""
    returncode: int
    stdout: str
    stderr: str


def run_tool(capsys, name, *args, cwd=REPO) -> ToolResult:
    """`python tools/NAME ARGS` in this process, minus the interpreter's start-up (seconds of importing torch):
    `main` under engine.cli.run as the tool's `__main__` block calls it, with the working directory at `cwd`
    (default: the repository root) and sys.argv set as a command line would; SystemExit (argparse's usage
    errors, --help) becomes the return code. An exception that is not ours propagates, where a subprocess would exit 1.

    Logging: the tools' setup_logging adds a console handler (only if the root logger has none) and a
    FileHandler for output_dir/log.txt, and never removes them. For the call, console and file handlers
    already on the root logger are set aside, so that this run's log lines reach this call's stderr and only
    this run's log.txt; afterwards the handlers the run added are closed and the root logger is restored,
    so a later in-process run cannot write into this run's log.txt.
    Keep a real subprocess where the process itself is under test: signals, exit of children, the
    environment it is started with, the command line end to end."""
    from engine.cli import run

    path = REPO / "tools" / name
    argv = [str(a) for a in args]
    earlier = capsys.readouterr()  # what the test printed before the call is not the tool's output
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    root.handlers = [h for h in saved_handlers if type(h) not in (logging.StreamHandler, logging.FileHandler)]
    sys.argv = [str(path), *argv]
    os.chdir(cwd)
    try:
        main = runpy.run_path(str(path))["main"]
        try:
            code = run(main, argv)
        except SystemExit as e:  # what the interpreter would make of it
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
    except BaseException:
        sys.stdout.write(earlier.out)  # all of it stays in pytest's report of the failure
        sys.stderr.write(earlier.err)
        raise
    else:
        out, err = capsys.readouterr()
        sys.stdout.write(earlier.out)  # back where it was, for pytest's report
        sys.stderr.write(earlier.err)
        return ToolResult(code, out, err)
    finally:
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        sys.argv = saved_argv
        os.chdir(saved_cwd)


def shapes_splits(root, num_train: int, num_val: int, size) -> Path:
    """Synthetic shapes train and val splits (COCO files and images) under `root`, val from another seed."""
    from detection.data.synthetic import make_coco_split

    make_coco_split(str(root), "train", num_train, seed=0, image_size=size)
    make_coco_split(str(root), "val", num_val, seed=1, image_size=size)
    return Path(root)
