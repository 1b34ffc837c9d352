"""One gradient buffer per tapped map, shared by every Tf-FD term that reads the map.

Without it, each term's backward returns its own full-size gradient for a map and autograd adds them up: with inter and
intra on a ResNet-50 at 224 px, the first stage's map (16 x 256 x 56 x 56 floats, 51 MB) gets two fresh 51 MB
gradients per step, one from intra and one from inter's pooling, and autograd makes one more pass over 51 MB to add
them to the network's own gradient.

``sink_features(maps)`` passes the maps through one autograd node whose outputs alias them. A term Function that finds
a sink on its input writes or adds its gradient straight into the map's buffer (``GradSink.claim``) and returns
``None`` for it. The node's backward runs after every term's (they consume its outputs) and hands the buffers on, adding
the gradients that reached the aliases through plain autograd ops (``F.mse_loss`` where inter compares two maps of
one size, EMD's transport cost, ...). The result is the same gradient up to the order of summation (equal in float32
to rounding), with one buffer per map instead of one per term.

A ViT's tapped maps are views of its blocks' token tensors without the class token (``FeatureTaps``). Autograd
would give each view's gradient back as a fresh zero-filled token tensor with the view's part copied in. The alias of
such a map takes the token tensor itself as input, and its buffer is a token tensor whose class-token rows alone are
zeroed; the terms write the rest through the map-shaped view.

The sink is skipped when gradients are off and under ``torch.compile`` (the buffers are Python-side state that a
compiled graph must not capture), and in a ``create_graph`` backward the terms return their gradients through
autograd as usual, so that second-order gradients stay available.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .saliency import channels_last_map

__all__ = ['GradSink', 'GradLayout', 'sink_features', 'sink_slot', 'backward_slot']

_ATTR = '_tffd_grad_sink'


def _graph_task_id() -> Optional[int]:
    get = getattr(torch._C, '_current_graph_task_id', None)
    return get() if get is not None else None


def _is_compiling(compiler=torch.compiler) -> bool:
    check = getattr(compiler, 'is_compiling', None)  # torch >= 2.3
    if check is None:
        from torch._dynamo import is_compiling as check
    return check()


def _token_base(m: torch.Tensor) -> Optional[Tuple[torch.Tensor, int]]:
    """``(tokens, k)`` when ``m`` is the NCHW grid view of ``tokens[:, k:]`` (k >= 1 prefix tokens dropped) of a
    contiguous ``(B, N, C)`` token tensor, as ``FeatureTaps`` makes from a ViT's ``forward_intermediates``; else None.
    """
    base = m._base
    if base is None or base.dim() != 3 or m.dim() != 4 or not base.requires_grad or not base.is_contiguous():
        return None
    b, n, c = base.shape
    h, w = m.shape[2:]
    k = n - h * w
    if tuple(m.shape[:2]) != (b, c) or k < 1 or m.storage_offset() != base.storage_offset() + k * c:
        return None
    expected = (n * c, 1, w * c, c)
    if any(size > 1 and st != ex for size, st, ex in zip(m.shape, m.stride(), expected)):
        return None
    return base, k


class GradLayout:
    """How to allocate a map's gradient buffer: the map's own shape and memory layout, or, for a token view
    (``_token_base``), the whole token tensor's, with the dropped prefix tokens' rows zeroed. The term Functions write
    into the map-shaped view; autograd receives the whole buffer."""

    def __init__(self, m: torch.Tensor, prefix: int = 0):
        self.shape, self.dtype, self.device = tuple(m.shape), m.dtype, m.device
        self.channels_last = channels_last_map(m)
        self.prefix = prefix

    def new(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(whole, view)``: the buffer handed to autograd and its map-shaped view, uninitialized where the map is."""
        b, c, h, w = self.shape
        if self.prefix:
            whole = torch.empty((b, self.prefix + h * w, c), dtype=self.dtype, device=self.device)
            whole[:, :self.prefix].zero_()  # the prefix tokens get no gradient from the terms
            return whole, whole[:, self.prefix:].unflatten(1, (h, w)).permute(0, 3, 1, 2)
        if self.channels_last:  # the map's own layout: NHWC memory, NCHW view
            whole = torch.empty((b, h, w, c), dtype=self.dtype, device=self.device).permute(0, 3, 1, 2)
        else:
            whole = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return whole, whole


class GradSink:
    """The gradient buffers of one forward's maps, alive from the first term's backward to the alias node's.

    Buffers belong to one backward pass (autograd graph task): a backward that stopped before the alias node (an
    exception, or a gradient taken with respect to the aliases themselves) leaves buffers behind, and the next pass
    over a retained graph starts from empty ones instead of adding to them.
    """

    def __init__(self, layouts: Sequence[GradLayout]):
        self.layouts = list(layouts)
        self.grads: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(layouts)
        self.task: Optional[int] = None

    def _in_current_task(self):
        task = _graph_task_id()
        if task != self.task:
            self.grads = [None] * len(self.grads)
            self.task = task

    def claim(self, index: int) -> Tuple[torch.Tensor, bool]:
        """The gradient buffer of map ``index`` (shaped and laid out like the map) and whether it is fresh
        (uninitialized: the caller must write every element) rather than holding earlier terms' gradients (the caller
        must add)."""
        self._in_current_task()
        if self.grads[index] is not None:
            return self.grads[index][1], False
        self.grads[index] = self.layouts[index].new()
        return self.grads[index][1], True

    def release(self) -> List[Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """``(whole, view)`` of each map's buffer, or None where no term claimed one; the sink is empty after."""
        self._in_current_task()
        grads, self.grads = self.grads, [None] * len(self.grads)
        return grads


class _SinkAlias(torch.autograd.Function):

    @staticmethod
    def forward(ctx, sink: GradSink, *inputs):
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return tuple(x.view_as(x) if not layout.prefix else x[:, layout.prefix:].unflatten(1, layout.shape[2:])
                     .permute(0, 3, 1, 2) for x, layout in zip(inputs, sink.layouts))

    @staticmethod
    def backward(ctx, *grads):
        out = []
        for layout, buf, grad in zip(ctx.sink.layouts, ctx.sink.release(), grads):
            if buf is None and grad is not None and layout.prefix:  # only plain autograd terms reached the view
                buf = layout.new()
                buf[1].copy_(grad)
                grad = None
            if buf is None:
                out.append(grad)
            else:
                if grad is not None:
                    buf[1].add_(grad)
                out.append(buf[0])
        return (None,) + tuple(out)


def sink_features(maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Aliases of the ``maps`` that need a gradient, sharing one gradient buffer per map among the terms computed on
    them (see the module docstring); the other maps as they are. ``maps`` itself when there is nothing to share (no
    gradients, ``torch.compile``). The aliases are internal to one forward: do not take gradients with respect to them
    or hook them (their terms' gradients reach the maps, not the aliases), nor modify them in place."""
    maps = list(maps)
    live = [i for i, m in enumerate(maps) if m.requires_grad]
    if not torch.is_grad_enabled() or _is_compiling() or not live:
        return maps
    inputs, layouts = [], []
    for i in live:
        token = _token_base(maps[i])
        inputs.append(token[0] if token else maps[i])
        layouts.append(GradLayout(maps[i], token[1] if token else 0))
    sink = GradSink(layouts)
    out = list(maps)
    for k, (i, alias) in enumerate(zip(live, _SinkAlias.apply(sink, *inputs))):
        setattr(alias, _ATTR, (sink, k))
        out[i] = alias
    return out


def sink_slot(x: torch.Tensor) -> Optional[Tuple[GradSink, int]]:
    """``(sink, index)`` when ``x`` is an alias made by ``sink_features``, else ``None``."""
    return getattr(x, _ATTR, None)


def backward_slot(slot: Optional[Tuple[GradSink, int]]) -> Optional[Tuple[GradSink, int]]:
    """The slot a term's backward should use: none in a ``create_graph`` backward (gradient mode on), where the term
    returns its gradient through autograd so that it can be differentiated again."""
    return None if slot is None or torch.is_grad_enabled() else slot
