"""One-pass feature taps on timm models, and the block that closes a ResNet-style stage.

Tf-FD (Li, ECCV 2022) needs the logits and a few stage outputs of the *same* forward pass. ``FeatureTaps`` resolves
the stages from ``model.feature_info`` and captures them in one of three ways:

* ``hooks``: forward hooks on the ``feature_info`` modules, whose outputs are the stage maps (for timm's
  ``VisionTransformer``, the blocks' patch tokens viewed as NCHW maps). The default for the families listed in
  ``HOOK_MODELS`` (their hooked maps are the very tensors that ``forward_intermediates`` returns; tested) and for every
  model without ``forward_intermediates``;
* ``intermediates``: timm's ``forward_intermediates(x, indices)`` followed by ``forward_head`` (the default for every
  other model that has it). Token models come back as NCHW maps; for EVA, BEiT, CaiT, ConViT and the
  relative-position ViTs (and ViT, DeiT in this mode) these maps are views of the NLC tokens;
* ``preact``: forward pre-hooks on the activation that closes a ResNet-style stage (see ``closing_block``), which
  sees the stage output before its final ReLU. The ReLUs are in-place, so the hook stores a clone.

With hooks (and pre-hooks) a stage's map is known while the forward is still running: ``on_tap`` computes per-stage
work at that moment (see ``FeatureTaps``), which places its backward where the network's backward reaches that stage
instead of at the start of the backward pass (docs/design.md, "Where the terms are computed").
"""
import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import (
    Beit, Cait, ConVit, ConvNeXt, EfficientNet, Eva, MobileNetV3, RegNet, ResNet, VisionTransformer,
    VisionTransformerRelPos)

from .models import CifarNet

__all__ = ['FeatureTaps', 'resolve_stages', 'closing_block', 'ClosingBlock', 'STEM_MODULES', 'HOOK_MODELS']

# feature_info entries that are the network stem rather than a stage; excluded by default.
STEM_MODULES = ('act1', 'bn1', 'stem', 'conv_stem', 'bn_stem', 'features.norm0', 'stem.norm', 'stem.act')


def _feature_info(model: nn.Module) -> List[dict]:
    info = getattr(model, 'feature_info', None)
    if not info:
        raise ValueError(
            f'{type(model).__name__} has no feature_info: Tf-FD selects stages from timm\'s feature metadata, so it '
            f'needs a timm model (or one that defines feature_info as a list of dicts with num_chs/reduction/module).')
    return list(info)


def resolve_stages(model: nn.Module, stages: Optional[Sequence[int]] = None) -> List[int]:
    """Return sorted ``feature_info`` indices of the stages to tap.

    Args:
        model: A timm model with ``feature_info``.
        stages: ``feature_info`` indices, shallow to deep; negative values count from the end. ``None`` selects every
            entry except a leading stem (an entry whose module is one of ``STEM_MODULES``).
    """
    info = _feature_info(model)
    n = len(info)
    if stages is None:
        start = 1 if n > 1 and info[0]['module'] in STEM_MODULES else 0
        return list(range(start, n))
    out = []
    for s in stages:
        if not isinstance(s, int) or isinstance(s, bool):
            raise ValueError(f'stage indices must be integers, got {s!r}')
        if not -n <= s < n:
            names = ', '.join(f'{i}:{f["module"]}' for i, f in enumerate(info))
            raise ValueError(f'stage index {s} is out of range for {type(model).__name__}, which has {n} '
                             f'feature_info entries ({names})')
        out.append(s % n)
    if len(set(out)) != len(out):
        raise ValueError(f'stage indices must be distinct, got {list(stages)}')
    return sorted(out)


class ClosingBlock(NamedTuple):
    """The last block of a ResNet-style stage and its closing layers.

    Attributes:
        block: The block (``stage[-1]``).
        act: The activation after the residual add (``act3`` in timm's ``Bottleneck``, ``act2`` in ``BasicBlock``).
        norm: The norm before that add on the residual branch (``bn3`` / ``bn2``); ``None`` if the block has none.
    """
    block: nn.Module
    act: nn.Module
    norm: Optional[nn.Module]


# (activation, norm) names that close a ResNet-style block: Bottleneck's, then BasicBlock's
_CLOSING_LAYERS = (('act3', 'bn3'), ('act2', 'bn2'))


def closing_block(model: nn.Module, module_name: str) -> Optional[ClosingBlock]:
    """The closing block of a ResNet-style stage, or ``None`` when the stage is not one.

    A ResNet-style stage is an ``nn.Sequential`` whose last block has an ``act3`` or ``act2`` (timm's ``Bottleneck`` /
    ``BasicBlock``, the CIFAR ResNets of ``timm_tffd.models``).

    Args:
        model: The model.
        module_name: Name of the stage in ``model``, e.g. a ``feature_info`` module such as ``'layer2'``.
    """
    stage = model.get_submodule(module_name)
    if not isinstance(stage, nn.Sequential) or not len(stage):
        return None
    block = stage[-1]
    for act, norm in _CLOSING_LAYERS:
        if hasattr(block, act):
            return ClosingBlock(block, getattr(block, act), getattr(block, norm, None))
    return None


def _closing_act(model: nn.Module, module_name: str) -> nn.Module:
    """The activation whose input is the pre-activation output of ``module_name``: the closing activation of a
    ResNet-style stage, or the stem's activation itself."""
    closing = closing_block(model, module_name)
    if closing is not None:
        return closing.act
    module = model.get_submodule(module_name)
    if module_name.split('.')[-1].startswith('act'):
        return module  # the stem's activation: its input is the pre-activation map
    raise ValueError(
        f'pre-activation features need a ResNet-style stage whose last block ends in act2/act3, but '
        f'{type(model).__name__}.{module_name} ({type(module).__name__}) has none; use post-activation features')


# Token models whose forward_intermediates(output_fmt='NLC') returns the spatial tokens (prefix tokens stripped) on
# the grid patch_embed.dynamic_feat_size reports, the grid their NCHW output is reshaped to. Models with NCHW
# intermediates only (Swin, SAM ViT, ...) or another grid (MViTv2, XCiT, ...) are not listed.
_TOKEN_VIEW_MODELS = (VisionTransformer, Eva, Beit, Cait, ConVit, VisionTransformerRelPos)

# Families whose feature_info modules return the stage maps themselves (NCHW, nothing applied after them; for timm's
# VisionTransformer, its blocks' tokens, viewed as NCHW maps as below), so forward hooks give exactly what
# forward_intermediates gives (tests/test_features.py checks each). Tapped with hooks by
# default, except while gradient checkpointing is on: some of them then run their stages' blocks without calling the
# stage module (timm's checkpoint_seq with flatten=True), so those forwards take forward_intermediates.
HOOK_MODELS: List[type] = [ResNet, ConvNeXt, EfficientNet, MobileNetV3, RegNet, CifarNet, VisionTransformer]


@functools.lru_cache(maxsize=None)
def _run_eagerly(fn: Callable) -> Callable:
    """``fn`` (a model class's ``forward`` or ``forward_features``) with torch.compile off inside it; one wrapper per
    function, made once (making one takes tens of microseconds, calling it under one)."""
    return torch.compiler.disable(fn)


class FeatureTaps:
    """Captures selected stage outputs and the logits in one forward pass.

    Not an ``nn.Module``: it adds nothing to the model's ``state_dict``.

    Args:
        model: The timm model.
        stages: ``feature_info`` indices (see ``resolve_stages``).
        preact: Tap pre-activation stage outputs (ResNet-style stages only).
        mode: ``'intermediates'`` or ``'hooks'``; ``None`` picks ``hooks`` for the families in ``HOOK_MODELS`` and
            for models without ``forward_intermediates``, else ``intermediates``. Ignored with ``preact=True``.

    Attributes:
        indices, modules, channels, reductions: The tapped ``feature_info`` entries, shallow to deep.
        mode: ``'intermediates'``, ``'hooks'`` or ``'preact'``.
        intermediates_fallback: ``hooks`` mode chosen for a ``HOOK_MODELS`` family: a forward with gradient
            checkpointing on runs ``forward_intermediates`` instead.
        token_grid: The features are NCHW views of a token model's NLC tokens (its intermediates, or in ``hooks``
            mode its blocks' outputs).
        on_tap: ``None``, or ``on_tap(position, feature, staged)`` called in the forward as each stage is tapped
            (``hooks`` and ``preact`` modes; ``staged``: what it returned for the stages tapped before); what it returns
            is handed back through ``forward``'s ``staged`` argument.
    """

    def __init__(
            self,
            model: nn.Module,
            stages: Optional[Sequence[int]] = None,
            preact: bool = False,
            mode: Optional[str] = None,
    ):
        info = _feature_info(model)
        self.indices = resolve_stages(model, stages)
        self.modules = [info[i]['module'] for i in self.indices]
        self.channels = [info[i]['num_chs'] for i in self.indices]
        self.reductions = [info[i]['reduction'] for i in self.indices]
        self.preact = preact
        self.intermediates_fallback = False
        if preact:
            mode = 'preact'
        elif mode is None:
            has_intermediates = hasattr(model, 'forward_intermediates')
            mode = 'hooks' if isinstance(model, tuple(HOOK_MODELS)) or not has_intermediates else 'intermediates'
            self.intermediates_fallback = mode == 'hooks' and has_intermediates
        if mode not in ('intermediates', 'hooks', 'preact'):
            raise ValueError(f'unknown feature tap mode {mode!r}')
        self.mode = mode
        self.token_grid = isinstance(model, VisionTransformer if mode == 'hooks' else _TOKEN_VIEW_MODELS) \
            and mode != 'preact'
        self._prefix_tokens = getattr(model, 'num_prefix_tokens', 0)
        self._grid: Optional[Tuple[int, int]] = None
        self.on_tap: Optional[Callable[[int, torch.Tensor, Dict[int, Any]], Any]] = None
        self._buffer = {}
        self._staged: Optional[Dict[int, Any]] = None
        self._active = False
        self._handles = []
        if mode != 'intermediates':
            for pos, name in enumerate(self.modules):
                if mode == 'preact':
                    h = _closing_act(model, name).register_forward_pre_hook(functools.partial(self._pre_hook, pos))
                else:
                    h = model.get_submodule(name).register_forward_hook(functools.partial(self._hook, pos))
                self._handles.append(h)

    def _tap(self, pos: int, feature: torch.Tensor):
        self._buffer[pos] = feature
        if self._staged is not None and self.on_tap is not None:
            self._staged[pos] = self.on_tap(pos, feature, self._staged)

    def _pre_hook(self, pos: int, module: nn.Module, args: Tuple[torch.Tensor, ...]):
        if self._active:
            self._tap(pos, args[0].clone())  # the activation is in-place: keep a copy

    def _hook(self, pos: int, module: nn.Module, args, output):
        if self._active:
            if self.token_grid:  # a ViT block's tokens: the patch tokens as an NCHW view, as in forward_features
                output = self._token_view(output)
            if not torch.is_tensor(output) or output.ndim != 4:
                raise ValueError(f'feature module {self.modules[pos]} returned {type(output).__name__} '
                                 f'{tuple(getattr(output, "shape", ()))}; Tf-FD needs NCHW maps')
            self._tap(pos, output)

    def forward(
            self,
            model: nn.Module,
            x: torch.Tensor,
            staged: Optional[Dict[int, Any]] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run ``model`` once; return ``(logits, features)`` with features shallow to deep.

        Args:
            model: The model the taps were created on.
            x: The input batch.
            staged: A dict that receives ``{position: on_tap(position, feature, staged)}`` for the stages tapped while
                the forward runs (nothing in ``intermediates`` mode, without ``on_tap``, or with the model's gradient
                checkpointing on).
        """
        if self._intermediates(model):
            final, feats = self.forward_features(model, x)
            return model.forward_head(final), feats
        return self._run_hooked(type(model).forward, model, x, staged)

    def _intermediates(self, model: nn.Module) -> bool:
        return self.mode == 'intermediates' or (
            self.intermediates_fallback and getattr(model, 'grad_checkpointing', False))

    def forward_features(
            self,
            model: nn.Module,
            x: torch.Tensor,
            staged: Optional[Dict[int, Any]] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run ``model`` up to its head; return ``(final, features)``: ``final`` is what ``model.forward_features``
        gives (for tasks that apply the head themselves, such as timm's feature distillation). ``staged`` as in
        ``forward``."""
        if not self._intermediates(model):
            return self._run_hooked(type(model).forward_features, model, x, staged)
        if self.token_grid:
            final, feats = model.forward_intermediates(x, indices=self.indices, output_fmt='NLC')
            self._grid = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
            feats = [self._token_view(f, prefix=False) for f in feats]
        else:
            final, feats = model.forward_intermediates(x, indices=self.indices)
        return final, list(feats)

    def _token_view(self, tokens: torch.Tensor, prefix: bool = True) -> torch.Tensor:
        """NLC tokens (with the prefix tokens when ``prefix``) -> an NCHW view of the patch tokens."""
        if prefix:
            tokens = tokens[:, self._prefix_tokens:]
        return tokens.unflatten(1, self._grid).permute(0, 3, 1, 2)

    def _run_hooked(self, fn, model: nn.Module, x: torch.Tensor, staged: Optional[Dict[int, Any]] = None):
        self._buffer.clear()
        if self.token_grid:
            self._grid = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        self._active = True
        # a hook may fire inside a block that gradient checkpointing recomputes in the backward, and the recomputation
        # must save the same tensors as the forward: no work at tap time then (the terms are computed after it)
        self._staged = None if getattr(model, 'grad_checkpointing', False) else staged
        if not torch.compiler.is_compiling():
            # Run eagerly. Under torch.compile that means dynamo left the wrapped forward out (past its recompile limit,
            # or at a graph break) and would compile the network's forward as a frame of its own, where it may reuse a
            # graph compiled for the same class before these hooks existed (module hooks are not guarded): the
            # network runs eagerly with the forward that calls it, so its hooks run.
            fn = _run_eagerly(fn)
        try:
            out = fn(model, x)
        finally:
            self._active = False
            self._staged = None
        missing = [self.modules[i] for i in range(len(self.modules)) if i not in self._buffer]
        if missing:
            raise RuntimeError(f'feature modules {missing} did not run in the forward pass')
        feats = [self._buffer.pop(i) for i in range(len(self.modules))]
        return out, feats

    def remove(self):
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_buffer'] = {}
        state['_staged'] = None
        return state
