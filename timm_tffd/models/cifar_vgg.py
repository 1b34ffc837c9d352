"""CIFAR VGG with batch norm as defined by the CRD repository (HobbitLong/RepDistiller, models/vgg.py, whose
``vgg8`` / ``vgg13`` are its ``vgg8_bn`` / ``vgg13_bn``): the VGG students and teachers of the SFD CIFAR-100 tables.

Five blocks of 3x3 conv (with bias) - BN - ReLU at widths 64, 128, 256, 512, 512; the first block is the stem at full
resolution, a 2x2 max pool opens blocks 1 to 3, and the network ends with global average pooling and one linear
classifier (no VGG fully connected layers). On 32x32 inputs the maps are 32, 16, 8, 4, 4 pixels: CRD adds a pool
before the last block only for 64x64 inputs, which this module does not reproduce.
CRD checkpoints load through ``checkpoint_filter_fn``.
"""
import re
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, LayerType
from timm.models import generate_default_cfgs, register_model

from ._base import CifarNet, build_cifar_model, cifar_cfg, rename_keys

__all__ = ['CifarVgg', 'checkpoint_filter_fn']

# conv widths of the stem and the four stages (CRD's configurations 'S' and 'B')
_CFGS = {
    'vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class CifarVgg(CifarNet):
    """CIFAR VGG: a conv-BN-ReLU stem block and four conv-BN-ReLU stages.

    Args:
        widths: Conv widths of the stem block and of each of the four stages.
        num_classes: Number of classes.
        in_chans: Number of input channels.
        global_pool: timm global pooling type (CRD: adaptive average).
        drop_rate: Dropout before the classifier (not in CRD).
        act_layer: Activation layer.
        norm_layer: Normalization layer.
    """

    def __init__(
            self,
            widths: Sequence[Sequence[int]] = _CFGS['vgg8'],
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
    ):
        super().__init__(num_classes, in_chans, drop_rate)
        if len(widths) != 5 or not all(len(w) for w in widths):
            raise ValueError(f'widths must give the conv widths of 5 blocks (stem + 4 stages), got {widths}')
        conv = dict(kernel_size=3, bias=True, act_layer=act_layer, norm_layer=norm_layer)  # CRD keeps conv bias

        in_chs = in_chans
        convs = []
        for w in widths[0]:
            convs.append(ConvNormAct(in_chs, w, **conv))
            in_chs = w
        self.stem = nn.Sequential(*convs)
        self.feature_info = [dict(num_chs=in_chs, reduction=1, module='stem')]
        reduction = 1
        for i, stage_widths in enumerate(widths[1:]):
            pooled = i < 3
            reduction *= 2 if pooled else 1
            layers = [('pool', nn.MaxPool2d(kernel_size=2, stride=2) if pooled else nn.Identity())]
            for j, w in enumerate(stage_widths):
                layers.append((str(j), ConvNormAct(in_chs, w, **conv)))
                in_chs = w
            self.add_module(f'layer{i + 1}', nn.Sequential(OrderedDict(layers)))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f'layer{i + 1}'))
        self.norm = nn.Identity()
        self._init_head(in_chs, global_pool)

        self._init_convs()
        nn.init.normal_(self.fc.weight, std=0.01)  # CRD's classifier init
        nn.init.zeros_(self.fc.bias)


def _crd_key(match: re.Match) -> str:
    block, index = int(match[1]), int(match[2])
    prefix = 'stem' if block == 0 else f'layer{block}'
    return f'{prefix}.{index // 3}.{("conv", "bn")[index % 3]}.'  # CRD's blocks are [conv, bn, relu] * k, last relu cut


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: Optional[nn.Module] = None,
) -> Dict[str, torch.Tensor]:
    """Rename a CRD-repository VGG state dict (``block2.3.weight``, ``classifier.bias`` ...) to this model's keys.

    State dicts already in this model's layout pass through unchanged.
    """
    return rename_keys(state_dict, 'classifier.weight', ((r'^block(\d)\.(\d+)\.', _crd_key), (r'^classifier\.', 'fc.')))


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarVgg:
    return build_cifar_model(CifarVgg, variant, pretrained, 5, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    name: cifar_cfg(pool_size=(4, 4), first_conv='stem.0.conv') for name in ('cifar_vgg8', 'cifar_vgg13')})


@register_model
def cifar_vgg8(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-8 with BN (one conv per block), CRD's ``vgg8`` (``vgg8_bn``)."""
    model_args = dict(widths=_CFGS['vgg8'])
    return _create('cifar_vgg8', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_vgg13(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-13 with BN (two convs per block), CRD's ``vgg13`` (``vgg13_bn``)."""
    model_args = dict(widths=_CFGS['vgg13'])
    return _create('cifar_vgg13', pretrained, **dict(model_args, **kwargs))
