from setuptools import find_packages, setup

setup(
    name="resnet-det",
    version="0.1.0",
    description="ResNet backbones with FPN, Faster R-CNN and Mask R-CNN, trained and evaluated on COCO",
    python_requires=">=3.10",
    packages=find_packages(include=["backbones*", "detection*", "segmentation*", "engine*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pycocotools>=2.0.7",
        "albumentations>=1.4",
        "opencv-python-headless>=4.8",
        "pyyaml>=6.0",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "faster-coco-eval>=1.6",
        "scikit-learn",  # the handwritten digits of tools/degradation.py
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "hypothesis", "timm>=0.9",
                 "onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.3"],
        # tools/export.py --format onnx (torch.onnx.export(dynamo=True) needs onnxscript)
        "export": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.3"],
    },
)
