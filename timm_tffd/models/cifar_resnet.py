"""CIFAR ResNets (He et al. 2016, section 4.2) as defined by the CRD repository (HobbitLong/RepDistiller,
models/resnet.py), the students and teachers of the Tf-FD / TFD / SFD CIFAR-100 tables.

A 3x3 stride-1 stem conv-BN-ReLU, then three stages of ``n = (depth - 2) / 6`` timm ``BasicBlock`` s at strides
1, 2, 2 (32, 16, 8 pixels on CIFAR) and widths ``channels[1:]``, global average pooling and a linear classifier.
Shortcuts are a 1x1 strided conv + BN where the shape changes. Each stage ends with its last block's ``act2``, the
ReLU after the residual add, so ``timm_tffd.FeatureTaps(model, preact=True)`` taps the stage before it (CRD's
``preact`` features). State-dict keys equal the CRD models' (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``fc``), so
CRD checkpoints load as they are, e.g.
``timm.create_model('cifar_resnet56', pretrained=True, pretrained_cfg_overlay=dict(file='ckpt_epoch_240.pth'))``.
"""
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import LayerType, get_act_layer, get_norm_layer
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, make_blocks

from ._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ['CifarResNet']


class CifarResNet(CifarNet):
    """CIFAR ResNet with BasicBlocks (depth ``6n + 2``).

    Args:
        depth: Number of conv + fc layers, ``6n + 2``.
        channels: Stem width, then the width of each of the three stages (CRD's ``num_filters``).
        num_classes: Number of classes.
        in_chans: Number of input channels.
        global_pool: timm global pooling type. CRD uses a fixed 8x8 average pool, which equals ``'avg'`` on 32x32
            inputs.
        drop_rate: Dropout before the classifier (not in CRD).
        drop_path_rate: Stochastic depth, linearly increasing over the blocks (not in CRD).
        drop_block_rate: DropBlock rate; timm's ``make_blocks`` puts it in the third stage (block size 5, gamma
            scale 0.25). Not in CRD.
        zero_init_last: Zero-init each block's last BN weight. Default False as in CRD (timm's ResNet defaults to
            True).
        act_layer: Activation layer.
        norm_layer: Normalization layer.
    """

    def __init__(
            self,
            depth: int = 20,
            channels: Sequence[int] = (16, 16, 32, 64),
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            drop_block_rate: float = 0.,
            zero_init_last: bool = False,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
    ):
        super().__init__(num_classes, in_chans, drop_rate)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f'CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}')
        if len(channels) != 4:
            raise ValueError(f'channels must give the stem width and three stage widths, got {tuple(channels)}')
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        n = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = norm_layer(channels[0])
        self.act1 = act_layer(inplace=True)
        stages, stage_info = make_blocks(
            (BasicBlock,) * 3, tuple(channels[1:]), (n,) * 3, channels[0],
            drop_block_rate=drop_block_rate, drop_path_rate=drop_path_rate,
            act_layer=act_layer, norm_layer=norm_layer,
        )
        for name, stage in stages:
            self.add_module(name, stage)
        # make_blocks counts strides from timm's stride-4 ImageNet stem; this stem keeps full resolution
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module='act1')]
        self.feature_info += [dict(info, reduction=info['reduction'] // 4) for info in stage_info]
        self.norm = nn.Identity()  # post-activation blocks: no final norm
        self._init_head(channels[-1], global_pool)

        self._init_convs()
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, 4, **kwargs)


default_cfgs = generate_default_cfgs({name: cifar_cfg() for name in (
    'cifar_resnet8', 'cifar_resnet14', 'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44', 'cifar_resnet56',
    'cifar_resnet110', 'cifar_resnet8x4', 'cifar_resnet32x4')})


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-8 (widths 16, 16, 32, 64)."""
    model_args = dict(depth=8)
    return _create('cifar_resnet8', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-14 (widths 16, 16, 32, 64)."""
    model_args = dict(depth=14)
    return _create('cifar_resnet14', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (widths 16, 16, 32, 64)."""
    model_args = dict(depth=20)
    return _create('cifar_resnet20', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (widths 16, 16, 32, 64)."""
    model_args = dict(depth=32)
    return _create('cifar_resnet32', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (widths 16, 16, 32, 64)."""
    model_args = dict(depth=44)
    return _create('cifar_resnet44', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (widths 16, 16, 32, 64)."""
    model_args = dict(depth=56)
    return _create('cifar_resnet56', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110 (widths 16, 16, 32, 64)."""
    model_args = dict(depth=110)
    return _create('cifar_resnet110', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-8 with 4x widths (32, 64, 128, 256), CRD's ``resnet8x4``."""
    model_args = dict(depth=8, channels=(32, 64, 128, 256))
    return _create('cifar_resnet8x4', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32 with 4x widths (32, 64, 128, 256), CRD's ``resnet32x4``."""
    model_args = dict(depth=32, channels=(32, 64, 128, 256))
    return _create('cifar_resnet32x4', pretrained, **dict(model_args, **kwargs))
