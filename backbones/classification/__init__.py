"""ImageNet-style classification training of the ResNets: the ImageFolder dataset and its transforms
(`imagefolder`), and the training and evaluation loop that tools/train_cls.py runs (`train`)."""
