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

The sink is skipped when gradients are off and under ``torch.compile`` (the buffers are Python-side state that a
compiled graph must not capture), and in a ``create_graph`` backward the terms return their gradients through
autograd as usual, so that second-order gradients stay available.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .saliency import channels_last_map

__all__ = ['GradSink', 'sink_features', 'sink_slot', 'backward_slot']

_ATTR = '_tffd_grad_sink'


def _graph_task_id() -> Optional[int]:
    get = getattr(torch._C, '_current_graph_task_id', None)
    return get() if get is not None else None


def _is_compiling(compiler=torch.compiler) -> bool:
    check = getattr(compiler, 'is_compiling', None)  # torch >= 2.3
    if check is None:
        from torch._dynamo import is_compiling as check
    return check()


class GradSink:
    """The gradient buffers of one forward's maps, alive from the first term's backward to the alias node's.

    Buffers belong to one backward pass (autograd graph task): a backward that stopped before the alias node (an
    exception, or a gradient taken with respect to the aliases themselves) leaves buffers behind, and the next pass
    over a retained graph starts from empty ones instead of adding to them.
    """

    def __init__(self, maps: Sequence[torch.Tensor]):
        self.maps = [(tuple(m.shape), m.dtype, m.device, channels_last_map(m)) for m in maps]
        self.grads: List[Optional[torch.Tensor]] = [None] * len(maps)
        self.task: Optional[int] = None

    def _in_current_task(self):
        task = _graph_task_id()
        if task != self.task:
            self.grads = [None] * len(self.grads)
            self.task = task

    def claim(self, index: int) -> Tuple[torch.Tensor, bool]:
        """The gradient buffer of map ``index`` and whether it is fresh (uninitialized: the caller must write every
        element) rather than holding earlier terms' gradients (the caller must add)."""
        self._in_current_task()
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
        self._in_current_task()
        if self.grads[index] is None:
            self.grads[index] = grad
        else:
            self.grads[index].add_(grad)

    def release(self) -> List[Optional[torch.Tensor]]:
        self._in_current_task()
        grads, self.grads = self.grads, [None] * len(self.grads)
        return grads


class _SinkAlias(torch.autograd.Function):

    @staticmethod
    def forward(ctx, sink: GradSink, *maps):
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return tuple(m.view_as(m) for m in maps)

    @staticmethod
    def backward(ctx, *grads):
        out = []
        for buf, grad in zip(ctx.sink.release(), grads):
            if buf is None:
                out.append(grad)
            else:
                out.append(buf if grad is None else buf.add_(grad))
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
    sink = GradSink([maps[i] for i in live])
    out = list(maps)
    for k, (i, alias) in enumerate(zip(live, _SinkAlias.apply(sink, *[maps[i] for i in live]))):
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
