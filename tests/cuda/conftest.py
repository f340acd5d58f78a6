"""The CUDA tests: `make test-gpu` (pytest -m cuda) runs them on a machine with a GPU.

Every test in this directory carries the `cuda` mark. Without a CUDA device each one is skipped, with one
line saying why, before any of its fixtures run (so `make test` on a CPU machine spends no time here).
"""
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False (make test-gpu runs these on a GPU machine)"


@pytest.hookimpl(tryfirst=True)  # before `-m cuda` selects by mark
def pytest_collection_modifyitems(config, items):
    available = torch.cuda.is_available()
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cuda)
            if not available:
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    """The GPU the tests run on (skips without one). Tests pass it on as `device={cuda}` to the tools."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return torch.device("cuda")


@pytest.fixture
def float32_exact():
    """float32 convolutions and matrix products in float32, not TF32, for the test: cuDNN allows TF32 by
    default, whose 10-bit mantissa (rounding 2**-11 = 4.9e-4) would swamp float32 rounding (2**-24 = 6e-8)
    in comparisons with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
