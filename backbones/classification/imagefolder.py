"""ImageNet-style classification data: one sub-folder per class under a root, and its transforms.

    root/<class_name>/**/<image>.jpg

Classes are the sorted sub-folder names and a class's label is its position in that list, the same
convention as torchvision's ImageFolder, so label files and checkpoints carry over.
"""
import logging
import os

import albumentations as A
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from engine.data.decode import ImageReader
from engine.data.paths import IMAGE_EXTENSIONS
from engine.data.samplers import seed_compose
from engine.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_cls_transform(train, size=224, resize=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.08, 1.0)):
    """The standard ImageNet recipe as an albumentations pipeline ending in a normalised CHW float tensor.

    train: RandomResizedCrop(size, area `scale`, 0.08-1 by default) + horizontal flip (Szegedy et al. 2015,
    as in torchvision).
    eval: shorter side to `resize`, then a centre crop of `size`. `resize=None` keeps the usual 256/224
    ratio, so a model evaluated at another size sees the same fraction of the image as at 224.
    """
    normalize = [A.Normalize(mean=mean, std=std), ToTensorV2()]
    if train:
        return A.Compose([A.RandomResizedCrop(size=(size, size), scale=tuple(scale)), A.HorizontalFlip(p=0.5),
                          *normalize])
    if resize is None:
        resize = int(round(size * 256 / 224))
    if resize < size:
        raise ConfigError(f"build_cls_transform: resize={resize} is smaller than the crop size={size} "
                          "(input.size); resize to at least the crop size")
    return A.Compose([A.SmallestMaxSize(max_size=resize), A.CenterCrop(height=size, width=size), *normalize])


def class_folders(root):
    """The sorted class folder names under `root` (hidden folders are not classes)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: ImageFolder root does not exist or is not a folder")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DatasetError(f"{root}: no class folders; expected {root}/<class_name>/<image>")
    return found


def _find_images(folder, extensions):
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # Hidden entries are tool droppings (.ipynb_checkpoints, macOS "._x.jpg"), never samples.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(extensions))
    return found


class ImageFolder(Dataset):
    """Classification dataset over `root/<class_name>/` folders; items are (CHW float tensor, int label).
    An item may be an index or an `(index, seed)` pair (see engine/data/samplers.py): the seed fixes that
    item's augmentation, whichever process loads it.

    transform: called as `transform(image=HxWx3 uint8 RGB)["image"]`; None uses the eval transform of
        `build_cls_transform`. Seeded items need an albumentations Compose.
    class_names: the class list to label with (pass the training set's `classes` when loading val/test);
        the folder must hold exactly these classes, and labels follow this list's order.
    skip_bad_images: when False an unreadable image raises DatasetError; when True it is logged once,
        counted in `num_skipped` (per process: DataLoader workers keep their own count) and the next
        readable sample (index + 1, wrapping) is returned instead.
    """

    def __init__(self, root, transform=None, class_names=None, skip_bad_images=False,
                 extensions=IMAGE_EXTENSIONS):
        self.root = os.fspath(root)
        found = class_folders(self.root)
        if class_names is not None:
            class_names = list(class_names)
            if len(set(class_names)) != len(class_names):
                raise DatasetError(f"{self.root}: class_names has duplicates: {class_names}")
            missing = sorted(set(class_names) - set(found))
            extra = sorted(set(found) - set(class_names))
            if missing or extra:
                raise DatasetError(f"{self.root}: class folders do not match the given class_names; "
                                   f"missing: {missing}, extra: {extra}")
        self.classes = class_names if class_names is not None else found
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        extensions = tuple(e.lower() for e in extensions)
        self.samples = []
        for name in self.classes:
            folder = os.path.join(self.root, name)
            images = _find_images(folder, extensions)
            if not images:
                raise DatasetError(f"{folder}: class folder has no images with extensions {list(extensions)}; "
                                   "add images or remove the folder")
            self.samples.extend((path, self.class_to_idx[name]) for path in images)
        self.targets = [label for _, label in self.samples]

        self.transform = build_cls_transform(train=False) if transform is None else transform
        self.reader = ImageReader(skip_bad_images)

    @property
    def num_skipped(self):
        """How many distinct unreadable files this process has skipped so far."""
        return self.reader.num_skipped

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"ImageFolder index {index} out of range for {len(self.samples)} samples")
        i, image = self.reader.first_readable(index % len(self.samples), len(self.samples),
                                              lambda j: self.samples[j][0])
        if seed is not None:
            seed_compose(self.transform, seed)
        return self.transform(image=image)["image"], self.samples[i][1]
