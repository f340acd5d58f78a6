"""Weight conversion between our checkpoints and torchvision's, timm's and Detectron2's: key tables and
the tensor edits they need, which build no model. `check` builds the models that verify a conversion: the one
its tensors are for (`verify_conversion`, before every write), and both sides' (tools/convert_weights.py --check)."""
from backbones.weights import from_timm_resnet

from .detectron2 import from_detectron2
from .torchvision import from_torchvision, from_torchvision_detector, to_torchvision

# tools/convert_weights.py: --from FORMAT and --to FORMAT.
CONVERTERS_IN = {"torchvision": from_torchvision, "timm": from_timm_resnet, "detectron2": from_detectron2}
CONVERTERS_OUT = {"torchvision": to_torchvision}

__all__ = ["CONVERTERS_IN", "CONVERTERS_OUT", "from_detectron2", "from_torchvision", "from_torchvision_detector",
           "to_torchvision"]
