"""One gradient buffer per tapped map, shared by every Tf-FD term that reads the map.

Without it, each term's backward returns its own full-size gradient for a map and autograd adds them up: with inter and
intra on a ResNet-50 at 224 px, the first stage's map (16 x 256 x 56 x 56 floats, 51 MB) gets two fresh 51 MB
gradients per step, one from intra and one from inter's pooling, and autograd makes one more pass over 51 MB to add
them to the network's own gradient.

``sink_features(maps)`` passes the maps through one autograd node whose outputs alias them. A term Function that finds
a sink on its input writes or adds its gradient straight into the map's buffer (``GradSink.claim``) and returns
``None`` for it. The node's backward runs after every term's (they consume its outputs) and hands the buffers on, adding
the gradients of the terms that know nothing of the sink (plain autograd ops: EMD, many-to-one, ``F.mse_loss``...).
The result is the same gradient, with one buffer per map instead of one per term.

The sink is skipped when gradients are off and under ``torch.compile`` (the buffers are Python-side state that a
compiled graph must not capture); the terms then return their gradients as usual. Terms are once-differentiable either
way (``create_graph`` backward through them raises).
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .saliency import channels_last_map

__all__ = ['GradSink', 'sink_features', 'sink_slot']

_ATTR = '_tffd_grad_sink'


class GradSink:
    """The gradient buffers of one forward's maps, alive from the first term's backward to the alias node's."""

    def __init__(self, maps: Sequence[torch.Tensor]):
        self.maps = [(tuple(m.shape), m.dtype, m.device, channels_last_map(m)) for m in maps]
        self.grads: List[Optional[torch.Tensor]] = [None] * len(maps)

    def claim(self, index: int) -> Tuple[torch.Tensor, bool]:
        """The gradient buffer of map ``index`` and whether it is fresh (uninitialized: the caller must write every
        element) rather than holding earlier terms' gradients (the caller must add)."""
        grad = self.grads[index]
        if grad is not None:
            return grad, False
        shape, dtype, device, channels_last = self.maps[index]
        if channels_last:  # the map's own layout: NHWC memory, NCHW view
            b, c, h, w = shape
            grad = torch.empty((b, h, w, c), dtype=dtype, device=device).permute(0, 3, 1, 2)
        else:
            grad = torch.empty(shape, dtype=dtype, device=device)
        self.grads[index] = grad
        return grad, True

    def deposit(self, index: int, grad: torch.Tensor):
        """Add a gradient the caller made and gives away (it may become the buffer)."""
        if self.grads[index] is None:
            self.grads[index] = grad
        else:
            self.grads[index].add_(grad)

    def release(self) -> List[Optional[torch.Tensor]]:
        grads, self.grads = self.grads, [None] * len(self.grads)
        return grads


class _SinkAlias(torch.autograd.Function):

    @staticmethod
    def forward(ctx, sink: GradSink, *maps):
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return tuple(m.view_as(m) for m in maps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        out = []
        for buf, grad in zip(ctx.sink.release(), grads):
            if buf is None:
                out.append(grad)
            else:
                out.append(buf if grad is None else buf.add_(grad))
        return (None,) + tuple(out)


def sink_features(maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Aliases of ``maps`` that share one gradient buffer per map among the terms computed on them (see the module
    docstring); ``maps`` itself when there is nothing to share (no gradients, ``torch.compile``)."""
    maps = list(maps)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not any(m.requires_grad for m in maps):
        return maps
    sink = GradSink(maps)
    aliases = list(_SinkAlias.apply(sink, *maps))
    for i, a in enumerate(aliases):
        setattr(a, _ATTR, (sink, i))
    return aliases


def sink_slot(x: torch.Tensor) -> Optional[Tuple[GradSink, int]]:
    """``(sink, index)`` when ``x`` is an output of ``sink_features`` that needs a gradient, else ``None``."""
    slot = getattr(x, _ATTR, None)
    return slot if slot is not None and x.requires_grad else None
