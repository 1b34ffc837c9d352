"""SFD's distillation loss (SFD (Pei et al., IJCAI 2021), eq. 10) and its per-channel margin (Overhaul, Heo et al.
2019).

The teacher's pre-ReLU feature ``Y`` is clamped at a negative per-channel margin ``m``: ``t = max(Y, m)``. The
partial L2 then skips the positions where the student is already below a non-positive target (``s <= t <= 0``) and
is the squared error everywhere else.

The margin is the expectation of the negative responses, ``E[x | x < 0]``, per channel. Two estimates:

* ``bn_margin``: from the BN that precedes the teacher's final ReLU, assuming ``x ~ N(beta, gamma^2)``, as in the
  Overhaul reference code (BN-ReLU teachers such as ResNets);
* ``EmpiricalMargin``: the running mean of the negative teacher responses over the training batches seen (any other
  teacher).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .saliency import accumulation_dtype

__all__ = ['bn_margin', 'gaussian_margin', 'margin_l2_loss', 'MarginL2Loss', 'EmpiricalMargin']

# Below this probability of a negative response the conditional mean is numerically unreliable; the Overhaul reference
# code then uses -3 std instead.
_MIN_NEG_PROB = 1e-3


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[x | x < 0]`` for ``x ~ N(mean, std^2)``, elementwise: ``mean - std * pdf(mean/std) / cdf(-mean/std)``, or
    ``-3 * std`` where ``cdf(-mean/std) < 0.001`` (Overhaul). A zero ``std`` is clamped so the result stays finite."""
    m = mean.detach().double()
    s = std.detach().double().abs().clamp_min(1e-12)
    a = m / s
    neg_prob = torch.special.ndtr(-a)
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    margin = torch.where(neg_prob > _MIN_NEG_PROB, m - s * pdf / neg_prob.clamp_min(_MIN_NEG_PROB), -3 * s)
    return margin.to(mean.dtype if mean.is_floating_point() else torch.float32)


def bn_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Overhaul margin of the channels of a BN followed by ReLU: the BN output is modelled as ``N(beta, |gamma|^2)``.

    Args:
        bn: The BatchNorm right before the teacher's final ReLU (affine).
    """
    if bn.weight is None or bn.bias is None:
        raise ValueError('the Overhaul margin needs an affine BatchNorm (weight and bias)')
    return gaussian_margin(bn.bias, bn.weight)


def margin_l2_loss(
        student: torch.Tensor,
        teacher: torch.Tensor,
        margin: torch.Tensor,
        normalizer: float = 1000.,
) -> torch.Tensor:
    """SFD (Pei et al., IJCAI 2021), eq. 10: ``sum over (c, h, w) of (t - s)^2``, except 0 where ``s <= t <= 0``,
    with ``t = max(Y, m)``; averaged over the batch and divided by ``normalizer``.

    Args:
        student: Integrated student feature before ReLU, ``(B, C, H, W)``.
        teacher: Teacher's last-stage feature before ReLU, same shape; treated as a constant.
        margin: Per-channel margin ``m`` (``(C,)``, negative).
        normalizer: Constant divisor. SFD gives none; 1000 is the Overhaul reference code's CIFAR value.
    """
    if student.shape != teacher.shape:
        raise ValueError(f'student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} '
                         f'differ in shape')
    dtype = accumulation_dtype(student.dtype)  # sums of many squares: float32 even under autocast
    student = student.to(dtype)
    target = torch.maximum(teacher.detach().to(dtype), margin.to(dtype).view(1, -1, 1, 1))
    keep = (student > target) | (target > 0)  # complement of s <= t <= 0
    sq = (student - target).pow(2) * keep
    return sq.sum() / (student.shape[0] * normalizer)


class MarginL2Loss(nn.Module):
    """Module form of ``margin_l2_loss``.

    Args:
        normalizer: Constant divisor of the batch-mean sum (1000, the Overhaul reference code's CIFAR value).
    """

    def __init__(self, normalizer: float = 1000.):
        super().__init__()
        if not normalizer > 0:
            raise ValueError(f'normalizer must be > 0, got {normalizer}')
        self.normalizer = normalizer

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        return margin_l2_loss(student, teacher, margin, self.normalizer)


class EmpiricalMargin(nn.Module):
    """Per-channel running mean of the negative responses of a feature, ``E[x | x < 0]`` over every sample seen.

    ``update`` accumulates sums in float64; under ``torch.distributed`` the batch sums are all-reduced so every rank
    holds the same margin. A channel with no negative response yet has margin 0.

    Args:
        num_channels: Number of channels.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer('neg_sum', torch.zeros(num_channels, dtype=torch.float64))
        self.register_buffer('neg_count', torch.zeros(num_channels, dtype=torch.float64))

    @torch.no_grad()
    def update(self, feature: torch.Tensor):
        """Accumulate the negative values of a ``(B, C, H, W)`` feature."""
        x = feature.detach().double()
        neg = x.clamp_max(0)
        stats = torch.stack([neg.sum((0, 2, 3)), (x < 0).sum((0, 2, 3)).double()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        self.neg_sum += stats[0]
        self.neg_count += stats[1]

    @property
    def margin(self) -> torch.Tensor:
        return (self.neg_sum / self.neg_count.clamp_min(1)).float()
