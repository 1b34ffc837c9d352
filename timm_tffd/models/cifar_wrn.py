"""CIFAR Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) as defined by the CRD repository (HobbitLong/RepDistiller,
models/wrn.py): WRN-16-2, WRN-40-1 and WRN-40-2 of the Tf-FD / TFD / SFD CIFAR-100 tables.

A 3x3 stem conv (16 channels, no BN or ReLU: the blocks are pre-activation), three stages of ``n = (depth - 4) / 6``
timm ``PreActBasic`` blocks (BN-ReLU-conv-BN-ReLU-conv) at strides 1, 2, 2 and widths 16k, 32k, 64k, a final BN-ReLU
(``norm``), global average pooling and a linear classifier. Where the width changes, the shortcut is a 1x1 strided
conv of the block's pre-activated input. Stage features are the blocks' residual sums (before the next BN), like
CRD's ``is_feat`` features; ``forward_intermediates(norm=True)`` applies the final BN-ReLU to the last one.
CRD checkpoints load through ``checkpoint_filter_fn``.
"""
from functools import partial
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.layers import LayerType, calculate_drop_path_rates, create_conv2d, get_norm_act_layer
from timm.models import generate_default_cfgs, register_model
from timm.models.resnetv2 import DownsampleConv, PreActBasic

from ._base import CifarNet, build_cifar_model, cifar_cfg, rename_keys

__all__ = ['CifarWideResNet', 'checkpoint_filter_fn']


class CifarWideResNet(CifarNet):
    """CIFAR Wide ResNet WRN-depth-widen_factor (depth ``6n + 4``).

    Args:
        depth: ``6n + 4`` for n blocks per stage (the WRN paper's depth).
        widen_factor: Width multiplier k; the stages have 16k, 32k, 64k channels.
        num_classes: Number of classes.
        in_chans: Number of input channels.
        global_pool: timm global pooling type. CRD uses a fixed 8x8 average pool, which equals ``'avg'`` on 32x32
            inputs.
        drop_rate: Dropout before the classifier. CRD's (and the WRN paper's) dropout between the two convs of each
            block is not implemented; CRD trains with it off.
        drop_path_rate: Stochastic depth, linearly increasing over the blocks (not in CRD).
        act_layer: Activation layer.
        norm_layer: Normalization layer (combined with ``act_layer`` into timm's norm-act layer).
    """

    def __init__(
            self,
            depth: int = 16,
            widen_factor: int = 2,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
    ):
        super().__init__(num_classes, in_chans, drop_rate)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f'WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}')
        if widen_factor < 1:
            raise ValueError(f'widen_factor must be >= 1, got {widen_factor}')
        n = (depth - 4) // 6
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        conv_layer = partial(create_conv2d, bias=False)
        dpr = calculate_drop_path_rates(drop_path_rate, 3 * n)

        self.stem = nn.Conv2d(in_chans, 16, kernel_size=3, padding=1, bias=False)
        self.feature_info = [dict(num_chs=16, reduction=1, module='stem')]
        in_chs, reduction = 16, 1
        for i, out_chs in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                blocks.append(PreActBasic(
                    in_chs, out_chs, stride=stride if j == 0 else 1, conv_layer=conv_layer,
                    norm_layer=norm_act_layer, proj_layer=DownsampleConv, drop_path_rate=dpr[i * n + j],
                ))
                in_chs = out_chs
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{i + 1}'))
        self.norm = norm_act_layer(in_chs)
        self._init_head(in_chs, global_pool)

        self._init_convs()
        nn.init.zeros_(self.fc.bias)  # CRD zeroes the classifier bias and keeps PyTorch's default weight init


# CRD's wrn.py names -> this module's (applied in order)
_CRD_RENAMES = (
    (r'^conv1\.', 'stem.'),
    (r'^block(\d)\.layer\.', r'layer\1.'),
    (r'\.bn(\d)\.', r'.norm\1.'),
    (r'\.convShortcut\.', '.downsample.conv.'),
    (r'^bn1\.', 'norm.'),
)


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: Optional[nn.Module] = None,
) -> Dict[str, torch.Tensor]:
    """Rename a CRD-repository WRN state dict (``block1.layer.0.bn1.weight`` ...) to this model's keys.

    State dicts already in this model's layout pass through unchanged.
    """
    return rename_keys(state_dict, 'conv1.weight', _CRD_RENAMES)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarWideResNet:
    return build_cifar_model(CifarWideResNet, variant, pretrained, 4, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    name: cifar_cfg(first_conv='stem') for name in ('cifar_wrn_16_2', 'cifar_wrn_40_1', 'cifar_wrn_40_2')})


@register_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-16-2 (stage widths 32, 64, 128)."""
    model_args = dict(depth=16, widen_factor=2)
    return _create('cifar_wrn_16_2', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-40-1 (stage widths 16, 32, 64)."""
    model_args = dict(depth=40, widen_factor=1)
    return _create('cifar_wrn_40_1', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-40-2 (stage widths 32, 64, 128)."""
    model_args = dict(depth=40, widen_factor=2)
    return _create('cifar_wrn_40_2', pretrained, **dict(model_args, **kwargs))
