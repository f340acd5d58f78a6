"""The project's own exception types.

Every message names the key, file or annotation at fault and says what to do about it.

ToolkitError is a plain Exception, not a ValueError: a stop (TrainingInterrupted, SIGTERM or Ctrl-C after a
checkpoint) and a failed run (TrainingError: a NaN loss, a dead worker, another rank's failure) are not bad
values, and an `except ValueError` written around some parsing must not swallow them. The errors that do
describe bad input (ConfigError, DatasetError, CheckpointError, ExportError) are also ValueErrors, so that
callers which already catch ValueError for bad input keep working.
"""


class ToolkitError(Exception):
    """Base class: anything the toolkit reports as one line instead of a traceback (tools catch this)."""


class ConfigError(ToolkitError, ValueError):
    """A config file, key, value or command-line override is wrong."""


class DatasetError(ToolkitError, ValueError):
    """A dataset, image or annotation is missing or malformed."""


class CheckpointError(ToolkitError, ValueError):
    """A weights file is missing, corrupt, unsafe or does not fit the model."""


class ExportError(ToolkitError, ValueError):
    """A model cannot be exported, or the exported file does not give the eager model's detections."""


class TrainingError(ToolkitError):
    """Training cannot go on: a loss or an input became NaN or infinite, a data loader worker or another
    process of the run failed."""


class TrainingInterrupted(ToolkitError):
    """SIGTERM or Ctrl-C stopped training after a checkpoint of the current iteration was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
