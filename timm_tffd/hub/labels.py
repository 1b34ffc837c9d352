"""The class names of a published model (``label_names`` in config.json, as timm's ``pretrained_cfg`` reads them)."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch.nn as nn
from timm.data import ImageNetInfo, infer_imagenet_subset

from ..data.embedded import EMBEDDED_PATH
from .run import trained_on_embedded_data

__all__ = ['resolve_label_names']


def _read_label_names(path: Union[str, Path]) -> List[str]:
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def resolve_label_names(
        args: Dict[str, Any],
        model: nn.Module,
        dataset: str,
        label_names: Optional[Union[str, Path, Sequence[str]]] = None,
) -> Dict[str, Any]:
    """``label_names`` (and, for ImageNet, ``label_descriptions``) of a run's model, for config.json.

    Args:
        args: The run's resolved arguments.
        model: The model (its ``num_classes`` must match the names).
        dataset: The dataset name (ImageNet names are recognized).
        label_names: Class names, or a text file with one per line. Default: the run's ``class_map`` (.txt), the
            classes of the embedded Fashion-MNIST subset, or the ImageNet synsets of an ImageNet subset.
    """
    out = {}
    if label_names is None and args.get('class_map'):
        class_map = Path(args['class_map'])
        if not class_map.exists():  # timm resolves a relative class map against the data folder
            class_map = Path(args.get('data_dir') or '') / class_map
        if class_map.suffix != '.txt':
            raise ValueError(f'class map {class_map} is not a .txt file: pass label_names')
        label_names = class_map
    if isinstance(label_names, (str, Path)):
        label_names = _read_label_names(label_names)
    if label_names is None and trained_on_embedded_data(args):
        with np.load(EMBEDDED_PATH) as data:
            label_names = data['classes'].tolist()
    if label_names is None:
        subset = infer_imagenet_subset(model)
        if subset is None or 'imagenet' not in dataset.lower():
            raise ValueError(f'cannot tell the class names of {dataset!r} ({model.num_classes} classes): pass '
                             f'label_names (--label-names FILE, one name per line)')
        info = ImageNetInfo(subset)
        label_names = info.label_names()
        out['label_descriptions'] = info.label_descriptions(as_dict=True)
    label_names = [str(n) for n in label_names]
    if len(label_names) != model.num_classes:
        raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes')
    out['label_names'] = label_names
    return out
