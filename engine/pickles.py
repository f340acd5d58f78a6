"""Reading pickle files that come from outside (CIFAR batches, Caffe2 and Detectron2 weight files) without
running their code.

A pickle can call any importable function while it loads (`os.system` included). `RestrictedUnpickler`
resolves only the globals that rebuild plain data: numpy arrays, their dtypes and scalars, an OrderedDict,
and the bytes encoding of protocol-2 pickles. Anything else is refused by name before it is called.
"""
import io
import pickle
from typing import Type

from engine.errors import ToolkitError

ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
}
# numpy 2 moved numpy.core to numpy._core; old pickles name the old module, which now warns on import.
_MOVED = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numbers, str, bytes, lists, tuples, dicts and numpy arrays; raises `error` naming any
    other global the file asks for."""

    def __init__(self, file, error: Type[ToolkitError], **kwargs):
        super().__init__(file, **kwargs)
        self.error = error

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode  # how protocol-2 pickles written by Python 3 store bytes
        if (module, name) in ALLOWED:
            return super().find_class(_MOVED.get(module, module), name)
        raise self.error(f"refusing to unpickle {module}.{name}: only numpy arrays, bytes, str, numbers, "
                         "lists and dicts are allowed; the file could run code")

    def _latin1_encode(self, text, encoding="utf-8"):
        if encoding not in ("latin1", "latin-1"):
            raise self.error(f"refusing to unpickle _codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")


def restricted_load(path: str, error: Type[ToolkitError], encoding: str = "latin1"):
    """The object pickled in `path`, built by `RestrictedUnpickler`; every failure is one `error` naming
    the file. encoding: how str objects of Python 2 pickles are read ("latin1": as str, which is also what
    numpy arrays pickled by Python 2 need; "bytes": as bytes)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), error, encoding=encoding).load()
    except error as e:
        raise error(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, ImportError) as e:
        raise error(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
