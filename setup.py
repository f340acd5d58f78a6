from setuptools import find_packages, setup

setup(
    name="resnet-det",
    version="0.1.0",
    description="ResNet backbones with FPN, Faster R-CNN and Mask R-CNN, trained and evaluated on COCO",
    python_requires=">=3.10",
    packages=find_packages(include=["backbones*", "detection*", "segmentation*", "engine*"]),
    # Ranges for people who import the library; an upper bound wherever the next major release has not been
    # tested. The exact versions the suite runs with are in constraints.txt (docs/getting_started.md, Install).
    install_requires=[
        "torch>=2.1,<3",
        "torchvision>=0.16,<1",
        "numpy<3",
        "pycocotools>=2.0.7,<3",
        "albumentations>=1.4,<3",
        "opencv-python-headless>=4.8,<6",  # 4.x and 5.x both tested
        "pyyaml>=6.0,<7",
        "tqdm<5",
        "tensorboard<3",
        "matplotlib<4",
        "faster-coco-eval>=1.6,<2",
        "scikit-learn<2",  # the handwritten digits of tools/degradation.py
    ],
    extras_require={
        "test": ["pytest>=7,<10", "pytest-timeout<3", "hypothesis<7", "timm>=0.9,<2",
                 "onnx>=1.17,<2", "onnxruntime>=1.20,<2", "onnxscript>=0.3,<1",
                 # Detectron2's pure-Python dependencies (../shared/peers/README.md): the interop tests run
                 # its models from the source snapshot beside the repository.
                 "fvcore<0.2", "iopath<0.2", "yacs<0.2", "omegaconf>=2.1,<2.4", "hydra-core<2", "termcolor<4",
                 "tabulate<1", "cloudpickle<4",
                 # What mmengine 0.10, mmcv-lite 2.1 and mmdet 3.3 need, less opencv-python: the Makefile
                 # installs those three with --no-deps (their opencv-python would be a second cv2 beside
                 # opencv-python-headless).
                 "addict<3", "yapf<1", "rich<16", "shapely<3", "terminaltables<4", "six<2"],
        # tools/export.py --format onnx (torch.onnx.export(dynamo=True) needs onnxscript)
        "export": ["onnx>=1.17,<2", "onnxruntime>=1.20,<2", "onnxscript>=0.3,<1"],
    },
)
