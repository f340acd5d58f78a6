"""engine.pickles: plain data out of pickles from outside, and code refused by name before it runs."""
import collections
import os
import pickle

import numpy as np
import pytest

from engine.errors import CheckpointError, DatasetError
from engine.pickles import restricted_load


@pytest.mark.parametrize("error", [DatasetError, CheckpointError])
def test_code_is_refused_by_name_and_never_runs(tmp_path, error):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": Exploit()}}))
    with pytest.raises(error, match=r"refusing to unpickle (posix|nt|os)\.system") as caught:
        restricted_load(path, error)
    assert str(path) in str(caught.value)
    assert not marker.exists()
    # The same payload with pickle.load would run it: the test's exploit is real.
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_arrays_scalars_and_containers_load(tmp_path, protocol):
    """What weight files hold: nested dicts (ordered or not) of arrays, numpy scalars, strings, flags."""
    weights = collections.OrderedDict(conv1_w=np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                                      res_conv1_bn_s=np.ones(2, np.float32))
    obj = {"model": weights, "__author__": "zoo", "matching_heuristics": True, "step": np.int64(7),
           "shape": (1, 2), "names": ["a", b"b"]}
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    loaded = restricted_load(path, CheckpointError)
    assert list(loaded["model"]) == ["conv1_w", "res_conv1_bn_s"]
    np.testing.assert_array_equal(loaded["model"]["conv1_w"], weights["conv1_w"])
    assert loaded["step"] == 7 and loaded["__author__"] == "zoo" and loaded["names"] == ["a", b"b"]


def test_unreadable_files_are_one_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        restricted_load(tmp_path / "missing.pkl", CheckpointError)
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        restricted_load(tmp_path / "cut.pkl", CheckpointError)
