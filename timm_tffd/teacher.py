"""Teachers for SFD (Pei et al., IJCAI 2021): creation with checked checkpoint loading, and the teacher-side feature
tap with its margin.

``create_teacher`` returns timm's ``DistillationTeacher`` (eval mode, frozen, re-normalizes the student's input when
the two were trained with different mean/std). ``SFDTeacher`` taps the teacher's last-stage feature before its final
ReLU and supplies the per-channel margin of SFD's feature loss (eq. 10, the margin of Overhaul, Heo et al., ICCV 2019):

* ResNet-style last stage (see ``timm_tffd.features.closing_block``) closed by a plain BN and a ReLU: the feature is
  tapped before that ReLU and the margin comes from that BN's statistics (``bn_margin``; like the Overhaul reference
  code it ignores the residual added between the BN and the ReLU);
* any other teacher: the last-stage feature as ``forward_intermediates`` returns it, with the empirical margin (mean of
  its negative responses over the training batches seen).
"""
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import create_model, load_state_dict_from_hf
from timm.task import DistillationTeacher
from timm.utils.model import unwrap_model

from .features import FeatureTaps, closing_block, resolve_stages
from .hub.run import load_state_dict
from .losses.margin import EmpiricalMargin, bn_margin

__all__ = ['create_teacher', 'load_teacher_checkpoint', 'check_teacher_state_dict', 'SFDTeacher']

_logger = logging.getLogger(__name__)

_HUB_PREFIXES = ('hf-hub:', 'local-dir:')


def _classifier_key(model: nn.Module) -> Optional[str]:
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier')
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0] if classifier else None
    return f'{classifier}.weight' if classifier else None


def _family_filter(model: nn.Module, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Apply the model family's ``checkpoint_filter_fn`` (as timm's pretrained loading does) to a state dict whose keys
    do not fit the model, e.g. a CRD-repository WRN / VGG checkpoint for the ``cifar_*`` zoo. A filter that cannot
    read the state dict leaves it as it is, for ``check_teacher_state_dict`` to explain."""
    if set(state_dict) == set(model.state_dict()):
        return state_dict
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is None:
        return state_dict
    try:
        return filter_fn(state_dict, model)
    except (KeyError, ValueError, RuntimeError, AttributeError, TypeError, IndexError):
        return state_dict


def check_teacher_state_dict(model: nn.Module, state_dict: Dict[str, Any], source: str):
    """Raise ``ValueError`` unless ``state_dict`` fits ``model`` exactly, naming the likely cause (another
    architecture, another width, another number of classes).

    Args:
        model: The teacher as created.
        state_dict: Cleaned state dict of the checkpoint.
        source: Where the state dict came from (for the message).
    """
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f'teacher checkpoint {source} does not fit the teacher architecture {arch!r}: {len(missing)} missing '
            f'key(s) {missing[:3]} and {len(unexpected)} unexpected key(s) {unexpected[:3]}. Was it trained with '
            f'another model? Pass that model name as the teacher.')
    head = _classifier_key(model)
    if head in expected and state_dict[head].shape != expected[head].shape:
        raise ValueError(
            f'teacher checkpoint {source} has a {state_dict[head].shape[0]}-class classifier ({head}), but the '
            f'student is trained with num_classes={expected[head].shape[0]}: a teacher must be trained on the same '
            f'label set as the student.')
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f'teacher checkpoint {source} does not fit {arch!r}: {len(wrong)} tensor(s) differ in shape, e.g. {k} is '
            f'{got} in the checkpoint and {want} in the model (another width / in_chans / variant of the model?)')


def load_teacher_checkpoint(model: nn.Module, checkpoint: str, use_ema: bool = True) -> nn.Module:
    """Load teacher weights after checking that they fit (``check_teacher_state_dict``).

    Args:
        model: The teacher, created with the student's ``num_classes`` and ``in_chans``.
        checkpoint: A ``.safetensors`` file, a torch checkpoint (read with ``weights_only=True``; timm training
            checkpoints with ``state_dict`` / ``state_dict_ema`` work), or ``hf-hub:org/name`` (its
            ``model.safetensors``, else ``pytorch_model.bin``). Keys that do not fit go through the family's
            ``checkpoint_filter_fn`` first, so CRD-repository checkpoints of the ``cifar_*`` zoo load as teachers.
        use_ema: Prefer ``state_dict_ema`` when a training checkpoint has one (timm's default).
    """
    if checkpoint.startswith('hf-hub:'):
        state_dict = load_state_dict_from_hf(checkpoint[len('hf-hub:'):], weights_only=True)
    elif os.path.isfile(checkpoint):
        state_dict = load_state_dict(checkpoint, use_ema=use_ema)
    else:
        raise FileNotFoundError(f'teacher checkpoint {checkpoint!r} not found')
    state_dict = _family_filter(model, state_dict)
    check_teacher_state_dict(model, state_dict, checkpoint)
    model.load_state_dict(state_dict)
    return model


def create_teacher(
        name: Union[str, nn.Module],
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        in_chans: int = 3,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        **model_kwargs,
) -> DistillationTeacher:
    """Create a frozen, eval-mode teacher.

    Args:
        name: A timm model name (weights from ``checkpoint``, or timm's pretrained weights), an ``hf-hub:`` /
            ``local-dir:`` name (weights and config from there), or an ``nn.Module`` (used as is).
        checkpoint: Teacher weights: a file or ``hf-hub:org/name`` (see ``load_teacher_checkpoint``). Only with a
            plain timm model name.
        num_classes: The student's number of classes; the teacher's classifier must match it.
        in_chans: Input channels (the student's).
        mean: Normalization mean the teacher was trained with; default: its ``pretrained_cfg``.
        std: Normalization std the teacher was trained with; default: its ``pretrained_cfg``.
        device: Device of the teacher.
        dtype: Dtype of the teacher's weights.
        **model_kwargs: Extra ``timm.create_model`` arguments.
    """
    if isinstance(name, nn.Module):
        if checkpoint is not None:
            raise ValueError('give the teacher either as a module or as a model name with a checkpoint, not both')
        model = name
    elif checkpoint is not None:
        if name.startswith(_HUB_PREFIXES):
            raise ValueError(f'teacher {name!r} brings its own weights; a teacher checkpoint ({checkpoint!r}) goes '
                             f'with a plain timm model name')
        model = create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
        load_teacher_checkpoint(model, checkpoint)
    else:
        model = create_model(name, pretrained=True, in_chans=in_chans, **model_kwargs)
    teacher_classes = getattr(unwrap_model(model), 'num_classes', None)
    if num_classes is not None and teacher_classes is not None and teacher_classes != num_classes:
        raise ValueError(f'teacher {name if isinstance(name, str) else type(model).__name__!r} has '
                         f'{teacher_classes} classes, but the student is trained with num_classes={num_classes}: a '
                         f'teacher must be trained on the same label set as the student.')
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    teacher = DistillationTeacher(model, device=device, dtype=dtype)
    for attr, value in (('mean_kd', mean), ('std_kd', std)):
        if value is not None:
            setattr(teacher, attr, torch.tensor(value, device=device, dtype=dtype).view(1, -1, 1, 1))
    return teacher


def _margin_bn(model: nn.Module, module_name: str) -> Optional[nn.BatchNorm2d]:
    """The BN that gives the Overhaul margin of a stage: the closing BN of a ResNet-style stage when it is an affine
    ``BatchNorm2d`` with no activation of its own and the block closes with a ``ReLU``; ``None`` otherwise.

    Args:
        model: The teacher model.
        module_name: The stage's ``feature_info`` module.
    """
    closing = closing_block(model, module_name)
    if closing is None:
        return None
    bn = closing.norm
    plain_bn = isinstance(bn, nn.BatchNorm2d) and isinstance(getattr(bn, 'act', nn.Identity()), nn.Identity)
    return bn if isinstance(closing.act, nn.ReLU) and plain_bn and bn.affine else None


class SFDTeacher(nn.Module):
    """The teacher side of SFD: one stage's feature (before its final ReLU where the stage ends in BN -> ReLU) and
    the per-channel margin of SFD (Pei et al., IJCAI 2021), eq. 10.

    Args:
        teacher: A ``DistillationTeacher`` (see ``create_teacher``).
        stage: ``feature_info`` index of the distilled stage; -1 (the last stage) in SFD.

    Attributes:
        channels, reduction, module_name: The tapped stage.
        margin_kind: ``'bn'`` (Overhaul, Heo et al., ICCV 2019, from the stage's closing BN) or ``'empirical'``.
    """

    def __init__(self, teacher: DistillationTeacher, stage: int = -1):
        super().__init__()
        if not isinstance(teacher, DistillationTeacher):
            raise TypeError(f'expected a DistillationTeacher (see create_teacher), got {type(teacher).__name__}')
        self.teacher = teacher
        model = teacher.model
        index = resolve_stages(model, [stage])[0]
        info = model.feature_info[index]
        self.channels, self.reduction, self.module_name = info['num_chs'], info['reduction'], info['module']
        bn = _margin_bn(model, self.module_name)
        self.margin_kind = 'bn' if bn is not None else 'empirical'
        self.taps = FeatureTaps(model, [index], preact=bn is not None)
        if bn is not None:
            self.register_buffer('bn_margin', bn_margin(bn), persistent=False)
            self.empirical = None
        else:
            device = next(model.parameters(), torch.empty(0)).device
            self.empirical = EmpiricalMargin(self.channels).to(device)
        self._compiled = None

    def train(self, mode: bool = True) -> 'SFDTeacher':
        super().train(mode)
        self.teacher.eval()  # the teacher always runs in eval mode
        return self

    def _feature(self, x: torch.Tensor) -> torch.Tensor:
        return self.taps.forward(self.teacher.model, x)[1][0]

    def compile(self, **compile_kwargs) -> 'SFDTeacher':
        """Compile the teacher's feature path."""
        self._compiled = torch.compile(self._feature, **compile_kwargs)
        return self

    @torch.no_grad()
    def forward(
            self,
            input: torch.Tensor,
            student_mean: Optional[torch.Tensor] = None,
            student_std: Optional[torch.Tensor] = None,
            update_margin: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(feature, margin)`` for a batch normalized for the student.

        Args:
            input: The student's input batch.
            student_mean: Student normalization mean ``(1, C, 1, 1)``; with ``student_std``, the input is
                re-normalized for the teacher when they differ.
            student_std: Student normalization std.
            update_margin: Accumulate this batch into the empirical margin (training batches only).
        """
        x = self.teacher.normalize_input(input, student_mean, student_std)
        feature = (self._compiled or self._feature)(x)
        if feature.ndim != 4:
            raise ValueError(f'SFD distills a (B, C, H, W) teacher map, but {self.module_name} of '
                             f'{type(self.teacher.model).__name__} gives {tuple(feature.shape)}')
        if self.empirical is None:
            return feature, self.bn_margin
        if update_margin:
            self.empirical.update(feature)
        return feature, self.empirical.margin
