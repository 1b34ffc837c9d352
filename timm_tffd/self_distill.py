"""SD / RSD: the end-of-epoch self-distillation of the parameters of SFD (Pei et al., IJCAI 2021), section 3.3,
eqs. 8 and 9.

After epoch ``t >= 2``: ``theta_t <- tau * theta_t + (1 - tau) * theta'_{t-1}``, where ``theta'_{t-1}`` is the previous
epoch's weights (SD, eq. 8), horizontally flipped with probability 0.5 (RSD, eq. 9). ``tau`` ramps linearly from
0.995 to 0.999 over the epochs (SFD, Table 2).

``SelfDistill`` is a step of the training loop, like timm's EMA update: it composes with any task (plain
classification, Tf-FD, logit KD, SFD) and is given the task's trainable module. What the paper leaves open, and what
this module does:

* ``theta`` is every trainable parameter of the module (the student and, under SFD, its integrator: SFD writes
  one ``theta`` for encoder, integrator and predictor) plus its floating-point persistent buffers (BN running mean and
  variance), mixed with the same ``tau`` as timm's ``ModelEma`` does. Integer buffers (``num_batches_tracked``) and
  frozen parameters are left alone.
* ``theta_{t-1}`` is the state the model started epoch ``t`` from, i.e. after the previous update.
* ``hflip`` mirrors every ``nn.Conv2d`` kernel along its width (kernels of width 1 are unchanged). Linear layers, norms,
  biases, BN statistics (per channel, so unchanged by a mirror) and position embeddings are not flipped.
* Optimizer state (momentum, Adam moments) is not touched: the update moves the weights by ``(1 - tau) <= 0.5%`` of
  the way back, so the moments still describe the current weights; in RSD the flipped copy enters with the same small
  weight, and the weights (and moments) stay in the unflipped frame.
* One flip draw per update for the whole network (a flipped network, not per-tensor flips). The draw is a function
  of ``(seed, epoch)`` and is broadcast from rank 0 under ``torch.distributed``, so every rank applies the same update
  even when each rank was seeded differently.
* After each step the snapshot ``theta_{t-1}`` equals the module's weights, so a checkpoint written after the step
  holds it already: ``resume(epoch)`` rebuilds it from the loaded weights and the run continues the same trajectory
  (the training script does this). ``state_dict`` / ``load_state_dict`` carry the snapshot for loops that checkpoint
  at other moments.
"""
import logging
import random
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['SelfDistill', 'parse_tau', 'SELF_DISTILL_MODES']

_logger = logging.getLogger(__name__)

SELF_DISTILL_MODES = ('sd', 'rsd')


def parse_tau(value: Union[str, float, Sequence[float]]) -> Tuple[float, float]:
    """Parse a tau range: ``'0.995,0.999'``, ``'0.997'`` (constant), a float or a pair. Both ends must lie in
    ``(0, 1]`` with ``start <= end`` (the ramp follows the settling weights: SFD, Table 2)."""
    if isinstance(value, str):
        try:
            parts = [float(v) for v in value.split(',')]
        except ValueError:
            raise ValueError(f'tau must be START,END or a single value, got {value!r}') from None
    elif isinstance(value, (int, float)):
        parts = [float(value)]
    else:
        parts = [float(v) for v in value]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f'tau must be START,END or a single value, got {value!r}')
    start, end = parts
    if not (0 < start <= 1 and 0 < end <= 1):
        raise ValueError(f'tau values must lie in (0, 1], got {start}, {end}')
    if start > end:
        raise ValueError(f'tau must not decrease over training (start <= end), got {start} > {end}')
    return start, end


class SelfDistill:
    """End-of-epoch SD / RSD update of a module's weights.

    Call ``step(epoch)`` once after each training epoch (before validation and checkpointing).

    Args:
        module: The trained module (DDP / compile wrappers are fine: the parameters are shared).
        mode: ``'sd'`` (eq. 8) or ``'rsd'`` (eq. 9, the paper's best).
        tau: ``(start, end)`` or anything ``parse_tau`` reads; linear in the epoch from ``start`` (epoch 0) to ``end``
            (epoch ``num_epochs - 1``). Default 0.995 -> 0.999 (SFD, Table 2).
        num_epochs: Length of the ramp; needed when ``start != end``.
        flip_prob: RSD flip probability (0.5 in the paper).
        seed: Seed of the flip draws; the draw for an epoch depends only on ``(seed, epoch)``.
    """

    def __init__(
            self,
            module: nn.Module,
            mode: str = 'rsd',
            tau: Union[str, float, Sequence[float]] = (0.995, 0.999),
            num_epochs: Optional[int] = None,
            flip_prob: float = 0.5,
            seed: int = 0,
    ):
        if mode not in SELF_DISTILL_MODES:
            raise ValueError(f'unknown self-distillation mode {mode!r}; valid: {", ".join(SELF_DISTILL_MODES)}')
        self.tau = parse_tau(tau)
        if self.tau[0] != self.tau[1] and not (num_epochs and num_epochs > 0):
            raise ValueError(f'a tau ramp {self.tau} needs num_epochs > 0, got {num_epochs}')
        if not 0 <= flip_prob <= 1:
            raise ValueError(f'flip_prob must lie in [0, 1], got {flip_prob}')
        self.module = module
        self.mode = mode
        self.num_epochs = num_epochs
        self.flip_prob = flip_prob
        self.seed = int(seed)
        self.flip_names = frozenset(
            f'{name}.weight' if name else 'weight' for name, m in module.named_modules()
            if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1 and m.weight.requires_grad)
        self.last_epoch: Optional[int] = None
        self.prev: Optional[Dict[str, torch.Tensor]] = None

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors the update mixes, by ``state_dict`` name (looked up on every call: ``.to()`` replaces
        buffers)."""
        params = {id(p) for p in self.module.parameters()}
        out, seen = {}, set()
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) in seen or not t.is_floating_point() or (id(t) in params and not t.requires_grad):
                continue
            seen.add(id(t))
            out[name] = t
        return out

    def tau_at(self, epoch: int) -> float:
        """``tau`` after (0-based) ``epoch``: linear from ``tau[0]`` at epoch 0 to ``tau[1]`` at ``num_epochs - 1``."""
        start, end = self.tau
        if start == end:
            return start
        frac = min(max(epoch / max(self.num_epochs - 1, 1), 0.), 1.)
        return start + (end - start) * frac

    def _draw_flip(self, epoch: int, device: torch.device) -> bool:
        if self.mode != 'rsd':
            return False
        flip = random.Random(f'rsd:{self.seed}:{epoch}').random() < self.flip_prob
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = torch.tensor([float(flip)], device=device)
            dist.broadcast(shared, src=0)  # one draw for every rank
            flip = bool(shared.item())
        return flip

    @torch.no_grad()
    def step(self, epoch: int) -> Dict[str, object]:
        """Apply the update after (0-based) ``epoch`` and keep the result as the next ``theta_{t-1}``.

        The first call only stores the snapshot (eq. 8 starts at ``t = 2``). Returns ``tau``, ``flipped`` and
        ``updated`` for logging.
        """
        if self.last_epoch is not None and epoch <= self.last_epoch:
            raise ValueError(f'self-distillation step for epoch {epoch} requested after epoch {self.last_epoch}; '
                             f'call step() once per epoch, in order')
        info = {'tau': None, 'flipped': False, 'updated': False}
        tensors = self.tensors()
        if self.prev is None:
            self.prev = {name: t.detach().clone() for name, t in tensors.items()}
        else:
            tau = self.tau_at(epoch)
            flip = self._draw_flip(epoch, next(iter(tensors.values())).device)
            for name, t in tensors.items():
                prev = self.prev[name]
                if flip and name in self.flip_names:
                    prev = prev.flip(-1)
                t.mul_(tau).add_(prev.to(t.dtype), alpha=1 - tau)
                self.prev[name].copy_(t)
            info.update(tau=tau, flipped=flip, updated=True)
        self.last_epoch = epoch
        return info

    @torch.no_grad()
    def resume(self, epoch: int):
        """Continue after (0-based) ``epoch`` from weights saved right after that epoch's ``step``: the snapshot is
        the module's current weights (see the module docstring)."""
        self.prev = {name: t.detach().clone() for name, t in self.tensors().items()}
        self.last_epoch = epoch

    def state_dict(self) -> Dict[str, object]:
        return {
            'mode': self.mode, 'tau': self.tau, 'num_epochs': self.num_epochs, 'flip_prob': self.flip_prob,
            'seed': self.seed, 'last_epoch': self.last_epoch, 'prev': self.prev,
        }

    def load_state_dict(self, state: Dict[str, object]):
        """Restore the snapshot and the last epoch; the settings of this object are kept (a warning names any that
        differ from the saved ones)."""
        changed = {k: (state.get(k), getattr(self, k)) for k in ('mode', 'tau', 'num_epochs', 'flip_prob', 'seed')
                   if k in state and _normalize(state[k]) != _normalize(getattr(self, k))}
        if changed:
            _logger.warning(f'self-distillation settings differ from the checkpoint (saved, now): {changed}')
        prev = state.get('prev')
        if prev is not None:
            tensors = self.tensors()
            if set(prev) != set(tensors):
                missing, extra = sorted(set(tensors) - set(prev)), sorted(set(prev) - set(tensors))
                raise ValueError(f'self-distillation snapshot does not match the model: missing {missing[:5]}, '
                                 f'unexpected {extra[:5]}')
            prev = {n: v.detach().to(device=tensors[n].device, dtype=tensors[n].dtype).clone()
                    for n, v in prev.items()}
        self.prev = prev
        self.last_epoch = state.get('last_epoch')


def _normalize(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
