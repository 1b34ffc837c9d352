"""``LossMeter``: epoch means of every scalar a training task returns (``loss``, ``base_loss``, ``tffd_inter``, ...).

The training loop logs and writes whatever the task reports, without a list of names: a task that adds a loss term
gets its own log entry and ``summary.csv`` column. Values accumulate as detached tensors on the device, so an update
costs no host synchronization; they are read, and averaged over distributed ranks, only when asked.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['LossMeter']


class LossMeter:
    """Sample-weighted running means of the scalar entries of a task's result dict.

    Non-scalar entries (``output``) are skipped. Every rank must report the same entries, in the same order, since
    the distributed reduction stacks them.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: Dict[str, torch.Tensor] = OrderedDict()
        self.last: Dict[str, torch.Tensor] = OrderedDict()
        self.count = 0
        self.steps = 0
        self.first_nonfinite: Optional[torch.Tensor] = None  # on the device: first step with a non-finite value

    def update(self, result: Dict[str, Any], n: int):
        """Add one batch's result dict, weighted by its batch size ``n``."""
        device: Optional[torch.device] = None
        for name, value in result.items():
            if torch.is_tensor(value):
                if value.numel() != 1:
                    continue
                value = value.detach().float().reshape(())
                device = value.device
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = torch.tensor(float(value), device=device)
            else:
                continue
            self.last[name] = value
            self.sums[name] = self.sums[name] + value * n if name in self.sums else value * n
        if self.last:  # a non-finite value makes its sum non-finite for good; remember the step, on the device
            finite = torch.isfinite(torch.stack(list(self.last.values()))).all()
            if self.first_nonfinite is None:
                self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=finite.device)
            unseen = self.first_nonfinite < 0
            self.first_nonfinite = torch.where(unseen & ~finite, self.steps, self.first_nonfinite)
        self.count += n
        self.steps += 1

    def nonfinite(self) -> Optional[Tuple[int, List[str]]]:
        """``(step, names)`` of the first update since ``reset`` with a non-finite value and the entries whose sums are
        not finite (on this rank), or ``None``. Reads the device: call it where values are read anyway."""
        if self.first_nonfinite is None:
            return None
        step = int(self.first_nonfinite)
        if step < 0:
            return None
        return step, [k for k, v in self.sums.items() if not bool(torch.isfinite(v))]

    def _read(self, values: Dict[str, torch.Tensor], divisor: torch.Tensor, distributed: bool):
        if not values:
            return OrderedDict()
        names = list(values)
        stacked = torch.stack([values[k].to(divisor.device) for k in names] + [divisor])
        if distributed:
            dist.all_reduce(stacked)
        stacked = (stacked[:-1] / stacked[-1]).tolist()
        return OrderedDict(zip(names, stacked))

    def averages(self, distributed: bool = False) -> Dict[str, float]:
        """Means over every sample seen since ``reset`` (over all ranks when ``distributed``)."""
        if not self.sums:
            return OrderedDict()
        device = next(iter(self.sums.values())).device
        return self._read(self.sums, torch.tensor(float(self.count), device=device), distributed)

    def latest(self, distributed: bool = False) -> Dict[str, float]:
        """The last batch's values (averaged over ranks when ``distributed``)."""
        if not self.last:
            return OrderedDict()
        device = next(iter(self.last.values())).device
        return self._read(self.last, torch.tensor(1.0, device=device), distributed)
