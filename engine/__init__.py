"""Infrastructure shared by classification and detection: configs, errors, data decoding, training loop.

It is a package of its own because `backbones`, `detection` and `segmentation` all use it and none of
them should depend on another only to reach a config parser or an error type.
"""
from .config import Config, load_config, save_config
from .errors import CheckpointError, ConfigError, DatasetError, ToolkitError

__all__ = ["ToolkitError", "ConfigError", "DatasetError", "CheckpointError", "Config", "load_config", "save_config"]
