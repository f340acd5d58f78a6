import importlib
import logging
import os
import runpy
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from backbones.norms import FrozenBatchNorm2d
from detection.conversion.detectron2_model import zoo_config_file

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Detectron2 is not on the package index: a source snapshot of it sits beside the repository (its README).
DETECTRON2_PEER = REPO.parent / "shared" / "peers" / "detectron2"

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


def import_detectron2():
    """The `detectron2` package: an importable one first, else the source snapshot at ../shared/peers/detectron2
    (put first on sys.path for the rest of the session); skip, naming both places, when neither is there.
    Detectron2's model zoo looks its configs up with pkg_resources inside the installed package
    (detectron2/model_zoo/configs); a source snapshot keeps them at its root, so the lookup is pointed there
    (detection.conversion.detectron2_model.zoo_config_file finds either). Our adapters are registered."""
    try:
        import detectron2
    except ImportError:
        if not (DETECTRON2_PEER / "detectron2" / "__init__.py").is_file():
            pytest.skip(f"Detectron2 is neither importable nor at {DETECTRON2_PEER} (a source snapshot; "
                        "../shared/peers/README.md)")
        sys.path.insert(0, str(DETECTRON2_PEER))
        import detectron2
    _point_model_zoo_at(zoo_config_file)
    import backbones.adapters

    backbones.adapters.register_detectron2()
    return detectron2


def _point_model_zoo_at(find):
    """detectron2.model_zoo imports pkg_resources (gone from setuptools 81) to look configs up inside the
    installed package; give it a stand-in where there is none, and look configs up with `find`."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_filename = lambda package, resource: str(
            Path(importlib.import_module(package).__file__).parent / resource)
        sys.modules["pkg_resources"] = stand_in
    from detectron2 import model_zoo
    from detectron2.model_zoo import model_zoo as zoo

    model_zoo.get_config_file = zoo.get_config_file = lambda name: str(find(name))


@pytest.fixture(scope="session")
def detectron2():
    return import_detectron2()


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
