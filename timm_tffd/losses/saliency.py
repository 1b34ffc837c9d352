"""Channel saliency metrics for intra-layer Tf-FD (the Tf-FD supplementary, "More analysis of feature salience
metrics").

Each metric maps an NCHW feature to one score per channel (higher = more salient). Scores only rank channels, so
they are computed without gradient and recomputed every batch.

* ``norm`` (default): the reference code's ``F.normalize(f, p=2, dim=(2, 3)).mean([0, 2, 3])``: each channel map is
  divided by its own l2 norm, then averaged over batch and space.
* ``l1`` / ``l2``: the l_p norm of each channel map, averaged over the batch.
* ``entropy``: entropy of the histogram of the channel's values over batch and space (10 bins between the channel's
  min and max), after Filter Grafting (Meng et al., CVPR 2020).
* ``hrank``: mean matrix rank of the channel's H x W maps over the batch (HRank, Lin et al., CVPR 2020). It runs a
  batched SVD every step: the most expensive metric by far.
* ``bn``: |gamma| of the BatchNorm that produces the map (Network Slimming, Liu et al., ICCV 2017). It needs the
  model, so it is resolved by ``wrap()``; see ``bn_scale_saliency``.
"""
from typing import Callable, Dict

import torch
import torch.nn as nn

from ..features import closing_block

__all__ = ['SALIENCY', 'get_saliency', 'bn_scale_saliency', 'BNScaleSaliency']

_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16 maps (their squares overflow or round away), else the maps' own dtype: the dtype
    the Tf-FD terms sum squares in."""
    return torch.promote_types(dtype, torch.float32)


def channels_last_map(f: torch.Tensor) -> bool:
    """Whether an NCHW map is laid out channels last (channel stride 1), as the token views of ViT-family models."""
    return f.stride(1) == 1 and f.shape[1] > 1


def _spatial_l2(f: torch.Tensor) -> torch.Tensor:
    """``||f[b, c]||_2`` over H, W. On channels-last maps (the token views of ViT-family models) ``vector_norm``
    reduces over strided dims several times slower than squaring and summing, so that form is used there (not in
    float16, where the squares could overflow)."""
    if channels_last_map(f) and f.dtype != torch.float16:
        return f.square().sum((2, 3)).sqrt_()
    return torch.linalg.vector_norm(f, dim=(2, 3))


def norm_saliency(f: torch.Tensor) -> torch.Tensor:
    # == F.normalize(f, p=2, dim=(2, 3)).mean((0, 2, 3)) without materializing the normalized map
    hw = f.shape[-1] * f.shape[-2]
    return (f.sum((2, 3)) / _spatial_l2(f).clamp_min(_EPS)).mean(0) / hw


def l1_saliency(f: torch.Tensor) -> torch.Tensor:
    return f.abs().sum((2, 3)).mean(0)


def l2_saliency(f: torch.Tensor) -> torch.Tensor:
    return _spatial_l2(f).mean(0)


def entropy_saliency(f: torch.Tensor, bins: int = 10) -> torch.Tensor:
    c = f.shape[1]
    v = f.detach().transpose(0, 1).reshape(c, -1).float()
    lo = v.amin(1, keepdim=True)
    span = (v.amax(1, keepdim=True) - lo).clamp_min(_EPS)
    idx = ((v - lo) / span * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(c, bins, device=f.device).scatter_add_(1, idx, torch.ones_like(v))
    p = counts / v.shape[1]
    return -(p * p.clamp_min(_EPS).log()).sum(1)


def hrank_saliency(f: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_rank(f.detach().float()).float().mean(0)


SALIENCY: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'norm': norm_saliency,
    'l1': l1_saliency,
    'l2': l2_saliency,
    'entropy': entropy_saliency,
    'hrank': hrank_saliency,
}
MODEL_SALIENCY = ('bn',)


def get_saliency(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a feature-only saliency function by name."""
    if name in MODEL_SALIENCY:
        raise ValueError(f'saliency {name!r} reads the model\'s BatchNorm weights: use timm_tffd.wrap(..., '
                         f'saliency={name!r}) or pass bn_scale_saliency(bn) as a callable')
    if name not in SALIENCY:
        raise ValueError(f'unknown saliency {name!r}; choose from {", ".join(list(SALIENCY) + list(MODEL_SALIENCY))}')
    return SALIENCY[name]


class BNScaleSaliency:
    """|gamma| of a BatchNorm layer as channel saliency (a callable object, so deep copies follow the model)."""

    def __init__(self, bn: nn.Module):
        self.bn = bn

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        return self.bn.weight.detach().abs()


def bn_scale_saliency(model: nn.Module, module_name: str, num_channels: int) -> BNScaleSaliency:
    """The BatchNorm that produces the map of ``module_name``, as a saliency callable.

    For a ResNet-style stage it is the closing block's BN (see ``timm_tffd.features.closing_block``), whose output is
    added to the shortcut before the stage's closing ReLU. Otherwise it is the last affine BN with ``num_channels``
    channels inside the module that is not on a shortcut (``downsample`` / ``shortcut`` branches are skipped).

    Args:
        model: The model.
        module_name: Name of the module whose output map is ranked (a ``feature_info`` module).
        num_channels: Channels of that map.
    """
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # and timm's BatchNormAct2d
    closing = closing_block(model, module_name)
    bn = closing.norm if closing is not None else None
    if isinstance(bn, batch_norms) and bn.num_features == num_channels:
        return BNScaleSaliency(bn)
    module = model.get_submodule(module_name)
    candidates = [m for n, m in module.named_modules()
                  if isinstance(m, batch_norms) and m.affine and m.num_features == num_channels
                  and not any(part in ('downsample', 'shortcut') for part in n.split('.'))]
    if not candidates:
        raise ValueError(f'saliency "bn" needs a BatchNorm with {num_channels} channels producing the map of '
                         f'{module_name} ({type(module).__name__}); none found, choose another saliency')
    return BNScaleSaliency(candidates[-1])
