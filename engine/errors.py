"""The project's own exception types.

Every message names the key, file or annotation at fault and says what to do about it. They subclass
ValueError so that callers that already catch ValueError keep working.
"""


class ToolkitError(ValueError):
    """Base class: anything the toolkit reports about bad input."""


class ConfigError(ToolkitError):
    """A config file, key, value or command-line override is wrong."""


class DatasetError(ToolkitError):
    """A dataset, image or annotation is missing or malformed."""


class CheckpointError(ToolkitError):
    """A weights file is missing, corrupt, unsafe or does not fit the model."""


class TrainingError(ToolkitError):
    """Training cannot go on: a loss or an input became NaN or infinite."""


class TrainingInterrupted(ToolkitError):
    """SIGTERM or Ctrl-C stopped training after a checkpoint of the current iteration was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class ExportError(ToolkitError):
    """A model cannot be exported, or the exported file does not give the eager model's detections."""
