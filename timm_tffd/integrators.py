"""SFD feature integrators: LI, AI and RI (SFD (Pei et al., IJCAI 2021), section 3.1, eqs. 2 to 4).

An integrator maps student stage features to the shape ``c x h x w`` of the teacher's last-stage feature. It is
trained with the student and dropped afterwards: the exported model is the plain student.

Where the paper's channel counts do not type-check, these modules take the reading that does (departures from the
paper, also listed in docs/sfd.md):

* AI (eq. 3): ``Conv3`` is written ``c_mid x c_mid``, but its input is ``Conv2``'s output (``c_mid / 16`` channels), so
  ``Conv3`` maps ``c_mid / 16 -> c_mid`` (a squeeze-excitation gate). ``c_mid / 16`` is floored, at least 1.
* RI (eq. 4): the ``AAP_i`` convs are written ``c/4 x c/4``, but they read the student's last stage (``c_s``
  channels), so each maps ``c_s -> c/4``. The smoothing conv then reads ``c_s + 3 * (c // 4)`` channels (the paper's
  ``c x c`` holds only when ``c_s = c / 4``) and writes ``c``.
* LI (eq. 2): the three 1x1 convs write ``c // 4``, ``c // 4`` and ``c - 2 * (c // 4)`` channels, so the concatenation
  has exactly ``c`` channels for any ``c`` (``c/4, c/4, c/2`` in the paper).

Convs followed by BN (LI and RI) have no bias. AI ends with ``Conv4`` and no BN, as in the paper.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['LayerwiseIntegration', 'AttentionIntegration', 'ReceptiveFieldIntegration', 'create_integrator',
           'rescale', 'INTEGRATORS']

Size = Tuple[int, int]


def rescale(x: torch.Tensor, size: Size) -> torch.Tensor:
    """SFD's ``Rescale``: average-pool down when the map is at least as large as ``size`` in both dimensions,
    bilinear interpolation otherwise (up, or mixed up/down); identity when the size already matches."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class _Integrator(nn.Module):
    """Common interface: ``forward(features, size=None)`` reads the last ``num_stages`` student features (shallow to
    deep) and returns a ``(B, c, h, w)`` map; ``size`` overrides the ``(h, w)`` given at construction."""
    num_stages: int = 1

    def __init__(self, student_channels: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__()
        student_channels = [int(c) for c in student_channels]
        if len(student_channels) < self.num_stages:
            raise ValueError(
                f'{type(self).__name__} integrates the last {self.num_stages} student stage(s) (SFD, sec. 3.1), '
                f'but the student has {len(student_channels)}: {student_channels}')
        if len(teacher_shape) != 3 or min(teacher_shape) < 1:
            raise ValueError(f'teacher_shape must be (c, h, w) with positive sizes, got {tuple(teacher_shape)}')
        self.student_channels = student_channels[-self.num_stages:]
        self.out_channels, h, w = (int(s) for s in teacher_shape)
        self.size = (h, w)

    def _inputs(self, features: Sequence[torch.Tensor], size: Optional[Size]) -> Tuple[List[torch.Tensor], Size]:
        if len(features) < self.num_stages:
            raise ValueError(f'{type(self).__name__} needs {self.num_stages} student feature map(s), '
                             f'got {len(features)}')
        return list(features[-self.num_stages:]), tuple(size) if size is not None else self.size


class LayerwiseIntegration(_Integrator):
    """LI (eq. 2): rescale the last three stages to ``h x w``, 1x1 convs to ``c/4, c/4, c/2`` channels, concatenate,
    3x3 smoothing conv, BN.

    Args:
        student_channels: Channels of the student stages, shallow to deep (the last three are used).
        teacher_shape: ``(c, h, w)`` of the teacher's last-stage feature.
    """
    num_stages = 3

    def __init__(self, student_channels: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__(student_channels, teacher_shape)
        c = self.out_channels
        quarter = max(c // 4, 1)
        widths = (quarter, quarter, c - 2 * quarter)
        if widths[-1] < 1:
            raise ValueError(f'LI needs a teacher feature with at least 3 channels, got {c}')
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 1, bias=False) for cin, cout in zip(self.student_channels, widths))
        self.smooth = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, features: Sequence[torch.Tensor], size: Optional[Size] = None) -> torch.Tensor:
        features, size = self._inputs(features, size)
        z = torch.cat([conv(rescale(f, size)) for conv, f in zip(self.convs, features)], dim=1)
        return self.bn(self.smooth(z))


class AttentionIntegration(_Integrator):
    """AI (eq. 3): rescale and concatenate the last three stages, ``Conv1`` to ``c_mid``, a squeeze-excitation gate
    ``Sigmoid(Conv3(ReLU(Conv2(GAP(z)))))``, then ``Conv4`` to ``c``; ``c_mid = max((c1 + c2 + c3) // 16, 96)``.

    Args:
        student_channels: Channels of the student stages, shallow to deep (the last three are used).
        teacher_shape: ``(c, h, w)`` of the teacher's last-stage feature.
    """
    num_stages = 3

    def __init__(self, student_channels: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__(student_channels, teacher_shape)
        cin = sum(self.student_channels)
        c_mid = max(cin // 16, 96)
        c_gate = max(c_mid // 16, 1)
        self.conv1 = nn.Conv2d(cin, c_mid, 1)
        self.conv2 = nn.Conv2d(c_mid, c_gate, 1)
        self.conv3 = nn.Conv2d(c_gate, c_mid, 1)  # c_gate -> c_mid: the reading of eq. 3 that type-checks
        self.conv4 = nn.Conv2d(c_mid, self.out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor], size: Optional[Size] = None) -> torch.Tensor:
        features, size = self._inputs(features, size)
        z = self.conv1(torch.cat([rescale(f, size) for f in features], dim=1))
        w = torch.sigmoid(self.conv3(F.relu(self.conv2(z.mean((2, 3), keepdim=True)))))
        return self.conv4(z * w)


class ReceptiveFieldIntegration(_Integrator):
    """RI (eq. 4), the paper's default: adaptive average pooling of the last stage (as it is, before any rescale) to
    ``h/4``, ``h/2`` and ``3h/4`` (same for ``w``; floored, at least 1), each followed by a 1x1 conv to ``c/4``;
    bilinear upsampling to ``h x w``; concatenation with the (rescaled) stage itself; 3x3 smoothing conv; BN.

    Args:
        student_channels: Channels of the student stages, shallow to deep (the last one is used).
        teacher_shape: ``(c, h, w)`` of the teacher's last-stage feature.
    """
    num_stages = 1
    scales = ((1, 4), (1, 2), (3, 4))

    def __init__(self, student_channels: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__(student_channels, teacher_shape)
        cs, c = self.student_channels[0], self.out_channels
        quarter = max(c // 4, 1)
        self.branches = nn.ModuleList(nn.Conv2d(cs, quarter, 1, bias=False) for _ in self.scales)
        self.smooth = nn.Conv2d(cs + len(self.scales) * quarter, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def pool_sizes(self, size: Size) -> List[Size]:
        """Output sizes of the three adaptive average poolings for a target ``size``."""
        return [tuple(max(s * num // den, 1) for s in size) for num, den in self.scales]

    def forward(self, features: Sequence[torch.Tensor], size: Optional[Size] = None) -> torch.Tensor:
        (z,), size = self._inputs(features, size)
        parts = [rescale(z, size)]
        for conv, pooled in zip(self.branches, self.pool_sizes(size)):
            parts.append(rescale(conv(F.adaptive_avg_pool2d(z, pooled)), size))
        return self.bn(self.smooth(torch.cat(parts, dim=1)))


INTEGRATORS = {'li': LayerwiseIntegration, 'ai': AttentionIntegration, 'ri': ReceptiveFieldIntegration}


def create_integrator(name: str, student_channels: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """Create an SFD integrator.

    Args:
        name: ``'li'``, ``'ai'`` or ``'ri'`` (SFD's default is RI).
        student_channels: Channels of the student stages, shallow to deep; LI and AI use the last three, RI the last.
        teacher_shape: ``(c, h, w)`` of the teacher's last-stage feature; ``(h, w)`` is the default output size.
    """
    key = str(name).lower()
    if key not in INTEGRATORS:
        raise ValueError(f'unknown SFD integrator {name!r}; valid: {", ".join(INTEGRATORS)}')
    return INTEGRATORS[key](student_channels, teacher_shape)
