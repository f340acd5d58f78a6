"""engine.cli: our errors become one line, also when raised inside a DataLoader worker process."""
import signal

import pytest
from torch.utils.data import DataLoader, Dataset

from engine.cli import run
from engine.errors import CheckpointError, ConfigError, DatasetError, ExportError, TrainingError, TrainingInterrupted


class Broken(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DatasetError(f"/data/img_{i}.jpg: cannot decode the image")


@pytest.mark.parametrize("workers", [0, 1])
def test_error_from_a_loader_worker_is_one_line(capsys, workers):
    def main(argv):
        next(iter(DataLoader(Broken(), num_workers=workers)))

    assert run(main) == 2
    err = capsys.readouterr().err
    assert err == "error: /data/img_0.jpg: cannot decode the image\n"


def test_a_stop_is_no_value_error_and_exits_with_the_signal_status(capsys):
    """An `except ValueError` around some parsing must not swallow SIGTERM/Ctrl-C (TrainingInterrupted) or
    a failed run (TrainingError); the errors about bad input stay ValueErrors for callers that catch those."""
    def main(argv):
        try:
            raise TrainingInterrupted("SIGTERM at iteration 3 of 10; checkpoint x.pth saved", signal.SIGTERM)
        except ValueError:
            return 0

    assert run(main) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "stopped: SIGTERM at iteration 3 of 10; checkpoint x.pth saved\n"
    assert not issubclass(TrainingInterrupted, ValueError) and not issubclass(TrainingError, ValueError)
    assert all(issubclass(e, ValueError) for e in (ConfigError, DatasetError, CheckpointError, ExportError))


@pytest.mark.parametrize("error", [TrainingError, ConfigError, CheckpointError])
def test_our_errors_exit_with_status_2_and_one_line(capsys, error):
    def main(argv):
        raise error("iteration 5: loss is not finite")

    assert run(main) == 2
    assert capsys.readouterr().err == "error: iteration 5: loss is not finite\n"
