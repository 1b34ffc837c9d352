"""The embedded Fashion-MNIST subset: a small real dataset that ships with the package.

``fashion_mnist_small.npz`` (4000 train / 1000 validation 28x28 grayscale images, 10 balanced classes, built by
``make_fashion_mnist.py``) lets the training script and the tests run on a fresh machine without a download. The
dataset behaves like a timm map-style dataset: it returns ``(PIL image, class index)`` and applies the ``transform``
that ``timm.data.create_loader`` assigns.
"""
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch.utils.data
from PIL import Image

__all__ = ['EmbeddedFashionMNIST', 'EMBEDDED_PATH', 'EMBEDDED_DATA_CONFIG', 'embedded_split', 'uses_embedded_data']

EMBEDDED_PATH = os.path.join(os.path.dirname(__file__), 'fashion_mnist_small.npz')

# Defaults the training script uses with the embedded data unless given on the command line. mean / std are those of
# the embedded training split (the full Fashion-MNIST training set gives 0.2860 / 0.3530). The native 28 px images are
# resized to 32 px by default: a multiple of the 32x reduction of most timm CNNs and of the 16 px ViT patch.
EMBEDDED_DATA_CONFIG: Dict[str, object] = dict(
    in_chans=1,
    img_size=32,
    mean=(0.2868,),
    std=(0.3543,),
    num_classes=10,
)

# timm's split synonyms (``timm.data.dataset_factory``), plus 'test': the validation images come from the official
# test split.
_SPLITS = {
    'train': 'train', 'training': 'train',
    'val': 'val', 'valid': 'val', 'validation': 'val', 'eval': 'val', 'evaluation': 'val', 'test': 'val',
}


def uses_embedded_data(data_dir: Optional[str], dataset: Optional[str]) -> bool:
    """Whether a training run uses the embedded subset: it does when given neither a data dir nor a dataset.

    Args:
        data_dir: The run's data root (``--data-dir`` or the positional ``data``), or ``None``.
        dataset: The run's ``--dataset`` (``''`` or ``None`` when not given).
    """
    return not data_dir and not dataset


def embedded_split(split: str) -> str:
    """Map a timm split name (``train``, ``validation``, ...) to ``'train'`` or ``'val'``."""
    if split not in _SPLITS:
        raise ValueError(f'unknown split {split!r} for the embedded Fashion-MNIST data; use one of '
                         f'{", ".join(_SPLITS)}')
    return _SPLITS[split]


class EmbeddedFashionMNIST(torch.utils.data.Dataset):
    """The embedded Fashion-MNIST subset as a timm-style dataset.

    Args:
        split: ``'train'`` or a validation name (``'validation'``, ``'val'``, ``'test'``, ...).
        img_mode: PIL mode of the returned images, ``'L'`` (native) or ``'RGB'`` (gray replicated to 3 channels).
        transform: Applied to the PIL image; ``timm.data.create_loader`` sets it.
        target_transform: Applied to the class index.
        path: The ``.npz`` file; defaults to the one in the package.
    """

    def __init__(
            self,
            split: str = 'train',
            img_mode: str = 'L',
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            path: str = EMBEDDED_PATH,
    ):
        if img_mode not in ('L', 'RGB'):
            raise ValueError(f'img_mode must be "L" or "RGB", got {img_mode!r}')
        key = embedded_split(split)
        with np.load(path) as data:
            self.images = data[f'{key}_images']
            self.targets = data[f'{key}_labels'].astype(np.int64)
            self.classes = [str(c) for c in data['classes']]
        self.split = key
        self.img_mode = img_mode
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        img = Image.fromarray(self.images[index])  # uint8 HxW: mode 'L'
        if self.img_mode != 'L':
            img = img.convert(self.img_mode)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target
