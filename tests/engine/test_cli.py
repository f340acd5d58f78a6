"""engine.cli: our errors become one line, also when raised inside a DataLoader worker process."""
import pytest
from torch.utils.data import DataLoader, Dataset

from engine.cli import run
from engine.errors import DatasetError


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
