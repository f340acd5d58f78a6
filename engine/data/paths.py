"""Dataset paths set by config keys, checked before anything is built or trained."""
import os

from engine.errors import ConfigError

# Image files, by extension, wherever a folder of images is read (classification data, inference inputs).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def require_path(path, setting: str, what: str, folder: bool = False):
    """ConfigError naming the config key when a dataset path is unset or does not exist."""
    if not path:
        raise ConfigError(f"config key '{setting}' is not set; set it to the {what}")
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise ConfigError(f"{what} not found: {path} (set by {setting}; change it with {setting}=PATH, or set "
                          "the DATASETS environment variable if the config uses ${DATASETS})")
