"""Registry of feature self-distillation methods selectable with ``tffd='inter,intra,...'``.

A method is built once per wrapped model from a ``MethodContext`` (the model and its tapped stages) and keyword
options, and returns a callable ``features -> scalar loss``. ``TfFDConfig`` routes each option to the methods whose
builder names it, so ``wrap(model, 'inter,intra', pairs='adjacent', saliency='entropy')`` configures both methods.
"""
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .losses.emd import check_emd_options, emd_layer_loss
from .losses.inter import inter_layer_loss, inter_layer_pairs
from .losses.intra import intra_layer_loss
from .losses.many_to_one import channel_groups, many_to_one_loss
from .losses.saliency import MODEL_SALIENCY, bn_scale_saliency, get_saliency

__all__ = ['MethodContext', 'TfFDMethod', 'register_method', 'get_method', 'list_methods', 'parse_methods']

LossFn = Callable[[List[torch.Tensor]], torch.Tensor]


@dataclass
class MethodContext:
    """What a method builder may read: the model and the tapped stages (shallow to deep)."""
    model: nn.Module
    indices: List[int]
    modules: List[str]
    channels: List[int]
    reductions: List[int]


@dataclass
class TfFDMethod:
    """A registered method.

    Args:
        name: The name used in ``tffd='...'`` and ``--tffd``.
        build: ``build(ctx, **options) -> loss_fn``; its keyword parameters are the method's options.
        default_weight: The loss weight used when none is given.
        description: One line for help texts.
    """
    name: str
    build: Callable[..., LossFn]
    default_weight: float
    description: str = ''

    def options(self) -> Dict[str, object]:
        """Option names and defaults, read from the builder's signature."""
        params = list(inspect.signature(self.build).parameters.values())[1:]
        return {p.name: p.default for p in params}


_METHODS: Dict[str, TfFDMethod] = {}


def register_method(name: str, build: Callable[..., LossFn], default_weight: float, description: str = ''):
    """Register a method so ``wrap()``, ``TfFDLoss`` and the training script can select it by name."""
    if name in _METHODS:
        raise ValueError(f'Tf-FD method {name!r} is already registered')
    _METHODS[name] = TfFDMethod(name, build, default_weight, description)


def list_methods() -> List[str]:
    return list(_METHODS)


def get_method(name: str) -> TfFDMethod:
    if name not in _METHODS:
        raise ValueError(f'unknown Tf-FD method {name!r}; valid methods: {", ".join(_METHODS)}')
    return _METHODS[name]


def parse_methods(tffd) -> List[str]:
    """Parse ``'inter,intra'`` (or a list of names) into validated, de-duplicated method names."""
    names = tffd.split(',') if isinstance(tffd, str) else list(tffd)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f'no Tf-FD method given; valid methods: {", ".join(_METHODS)}')
    for n in names:
        get_method(n)
    if len(set(names)) != len(names):
        raise ValueError(f'Tf-FD method listed twice in {tffd!r}')
    return names


def _check_two_stages(ctx: MethodContext, method: str):
    if len(ctx.indices) < 2:
        raise ValueError(f'{method} needs at least two stages, got {len(ctx.indices)} (stages {ctx.indices}: '
                         f'{ctx.modules})')


class InterLayer:
    """Inter-layer Tf-FD over fixed pairs (see ``timm_tffd.losses.inter``)."""

    def __init__(self, pairs: str, direction: str):
        self.pairs, self.direction = pairs, direction

    def __call__(self, features: List[torch.Tensor]) -> torch.Tensor:
        return inter_layer_loss(features, self.pairs, self.direction)


class IntraLayer:
    """Intra-layer Tf-FD with one saliency function per stage (see ``timm_tffd.losses.intra``)."""

    def __init__(self, saliency, detach_salient: bool):
        self.saliency, self.detach_salient = saliency, detach_salient

    def __call__(self, features: List[torch.Tensor]) -> torch.Tensor:
        return intra_layer_loss(features, self.saliency, self.detach_salient)


def _build_inter(ctx: MethodContext, pairs: str = 'all', direction: str = 'top-down') -> LossFn:
    _check_two_stages(ctx, 'inter-layer Tf-FD')
    inter_layer_pairs(len(ctx.indices), pairs, direction)  # validates the names
    return InterLayer(pairs, direction)


def _build_intra(ctx: MethodContext, saliency: str = 'norm', detach_salient: bool = False) -> LossFn:
    small = [m for m, c in zip(ctx.modules, ctx.channels) if c < 2]
    if small:
        raise ValueError(f'intra-layer Tf-FD needs at least 2 channels per stage; {small} have fewer')
    if saliency in MODEL_SALIENCY:
        fns = [bn_scale_saliency(ctx.model, m, c) for m, c in zip(ctx.modules, ctx.channels)]
        return IntraLayer(fns, detach_salient)
    get_saliency(saliency)  # validates the name
    return IntraLayer(saliency, detach_salient)


# Default weights: the reference code's argparse defaults (lambda_inter = 0.005, lambda_intra = 0.0004), which are
# also alpha and beta of TFD (Li et al., IJCNN 2022). The reference README's example command uses 0.0005 / 0.0008.
register_method('inter', _build_inter, 0.005, 'deep stage outputs supervise shallow ones (l2)')
register_method('intra', _build_intra, 0.0004, 'salient channels supervise redundant ones in the same stage (l2)')


# SFR (Fan, 2021) names EMD-l2 matching and many-to-one distillation without their settings. The pairs default to
# inter's 'all' (the reference code); the solver and remainder defaults are documented in docs/sfr.md.
def _build_emd(
        ctx: MethodContext,
        emd_grid: Optional[int] = None,
        emd_pairs: str = 'all',
        emd_eps: float = 0.02,
        emd_iters: int = 50,
) -> LossFn:
    _check_two_stages(ctx, 'EMD-l2 matching')
    inter_layer_pairs(len(ctx.indices), emd_pairs)  # validates the name
    check_emd_options(emd_grid, emd_eps, emd_iters)
    return functools.partial(emd_layer_loss, pairs=emd_pairs, grid=emd_grid, eps=emd_eps, iters=emd_iters)


def _build_m2o(ctx: MethodContext, m2o_pairs: str = 'all', m2o_remainder: str = 'spread') -> LossFn:
    _check_two_stages(ctx, 'many-to-one distillation')
    narrower = []
    for s, t in inter_layer_pairs(len(ctx.indices), m2o_pairs):
        if ctx.channels[t] < ctx.channels[s]:
            narrower.append(f'{ctx.modules[t]} ({ctx.channels[t]}) for {ctx.modules[s]} ({ctx.channels[s]})')
        else:
            channel_groups(ctx.channels[s], ctx.channels[t], m2o_remainder)  # validates the remainder
    if narrower:
        raise ValueError(f'many-to-one distillation needs at least as many channels in the deep stage as in the '
                         f'shallow one; deep stages with fewer: {", ".join(narrower)}. Choose stages= or m2o_pairs=')
    return functools.partial(many_to_one_loss, pairs=m2o_pairs, remainder=m2o_remainder)


# Default weights: inter's 0.005 for both (SFR gives none); docs/sfr.md explains why equal weights give the three
# l2 terms the same strength.
register_method('emd', _build_emd, 0.005, 'deep local descriptors supervise shallow ones up to a matching (EMD-l2)')
register_method('m2o', _build_m2o, 0.005, 'each shallow channel is supervised by a group of deep channels (l2)')
