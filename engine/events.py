"""Where a training run reports: `log.txt`, `metrics.jsonl` (one JSON object per logged step or
evaluation), TensorBoard event files and a loss curve, all under the run's output directory."""
import json
import logging
import math
import os
from typing import Dict, List, Optional

logger = logging.getLogger("engine")


def setup_logging(output_dir: str):
    """INFO and above to stderr and to `output_dir/log.txt` (appended, so a resumed run keeps its history;
    a previous run's log.txt in the same process stops receiving).
    In a distributed run only rank 0 does this; the other ranks print warnings and errors, marked with
    their rank, to stderr."""
    from engine import distributed as dist

    root = logging.getLogger()
    if not dist.is_main():
        root.setLevel(logging.WARNING)
        if not any(type(h) is logging.StreamHandler for h in root.handlers):
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter(f"%(asctime)s rank {dist.rank()} %(name)s %(levelname)s: "
                                                   "%(message)s"))
            root.addHandler(console)
        return
    os.makedirs(output_dir, exist_ok=True)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        root.addHandler(console)
    path = os.path.abspath(os.path.join(output_dir, "log.txt"))
    # One run's log.txt at a time: a process that trains twice (the demo: classifier, then detector) must
    # not keep writing the second run into the first one's log.
    for handler in [h for h in root.handlers if getattr(h, "run_log", False) and h.baseFilename != path]:
        root.removeHandler(handler)
        handler.close()
    if not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(fmt)
        handler.run_log = True
        root.addHandler(handler)


class MetricsWriter:
    """Appends records to `metrics.jsonl` and mirrors their numbers to TensorBoard.

    `resume_from`: on a resumed run, records at or after this iteration are dropped from the existing
    file first, so that the iterations redone after the checkpoint are not logged twice.
    `enabled=False` (the ranks other than 0 of a distributed run): records are kept in `history` only.
    """

    def __init__(self, output_dir: str, resume_from: Optional[int] = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.history: List[Dict] = []
        self._file = self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_from is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short when the previous run was killed
                    if record.get("iter", -1) < resume_from:
                        self.history.append(record)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install should not stop training
                logger.warning("tensorboard cannot be imported; event files are not written")
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: Dict, prefix: str = "train"):
        self.history.append(record)
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "iter" in record:
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["iter"])

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_losses(history: List[Dict], path: str, keys: Optional[List[str]] = None):
    """Loss curves (total and each term) over iterations, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    keys = keys or sorted({k for h in train for k in h if k.startswith("loss")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        ax.plot([h["iter"] for h in train if key in h], [h[key] for h in train if key in h],
                label=key, linewidth=2 if key == "loss" else 1)
    ax.set(xlabel="iteration", ylabel="loss", title="training loss")
    if train:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
