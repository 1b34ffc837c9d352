"""``SFDTask``: Self-boosting Feature Distillation (SFD, Pei et al., IJCAI 2021) as a timm ``TrainingTask``.

``loss = base(logits, y) + sfd_weight * L_distill(integrator(student stages), teacher feature)`` (eq. 10), plus the
Tf-FD terms when the student is wrapped. SFD's end-of-epoch self-distillation (SD / RSD) is ``SelfDistill``, a
separate step that composes with this task as with any other.

The integrator trains inside ``SFDTrainableModule`` with the student (so DDP and the optimizer see it) but is not part
of the exported model: ``get_eval_model`` and the checkpoint's ``state_dict`` are the plain timm student, and the
integrator, the empirical margin and the SD snapshot travel in the checkpoint's ``task_state``.
"""
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher, TrainingTask, resolve_classification_loss
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils.model import unwrap_model

from .criterion import TfFDLoss
from .features import FeatureTaps, resolve_stages
from .integrators import INTEGRATORS, create_integrator
from .losses.margin import MarginL2Loss
from .task import TfFDSetting, TfFDTaskMixin, wrap_student
from .teacher import SFDTeacher, create_teacher
from .wrap import get_tffd_state, is_wrapped, tapped_features

__all__ = ['SFDTask', 'SFDTrainableModule', 'MAX_UPSAMPLE']

_logger = logging.getLogger(__name__)

# The largest upsampling an integrator may apply to its finest student input. 4x is the paper's own largest rescale
# (RI upsamples its h/4 branch to h); beyond it the integrated map would be mostly interpolation.
MAX_UPSAMPLE = 4


class SFDTrainableModule(FeatureDistillationTrainableModule):
    """Student + integrator: everything SFD optimizes. DDP wraps this module; the exported model is ``student``.

    Reuses timm's ``FeatureDistillationTrainableModule`` for the optimizer hooks (``no_weight_decay``,
    ``group_matcher``); its ``projection`` stays ``None``.

    Args:
        student: The timm student, optionally Tf-FD wrapped (then the stage features are read from the Tf-FD taps of
            the same forward pass).
        integrator: An SFD integrator.
        stages: ``feature_info`` indices the integrator reads, shallow to deep.
    """

    def __init__(self, student: nn.Module, integrator: nn.Module, stages: Sequence[int]):
        super().__init__(student, projection=None)
        self.integrator = integrator
        self.stages = list(stages)
        self._taps = FeatureTaps(student, self.stages)
        self._tffd_positions = None
        if is_wrapped(student):
            tapped = get_tffd_state(student).taps.indices
            missing = [s for s in self.stages if s not in tapped]
            if missing:
                raise ValueError(
                    f'SFD reads student stages {self.stages} from the Tf-FD taps of the same forward pass, but Tf-FD '
                    f'taps {tapped}; wrap the student with stages that include {missing}')
            self._tffd_positions = [tapped.index(s) for s in self.stages]
            get_tffd_state(student).keep_features = True  # read by tapped_features after each forward

    def forward(
            self,
            input: torch.Tensor,
            size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, integrated feature)``; ``size`` is the teacher map's ``(h, w)``."""
        if self.training and self._tffd_positions is not None:
            logits = self.student(input)
            feats = tapped_features(self.student)  # the stage maps of the same Tf-FD forward
            feats = [feats[p] for p in self._tffd_positions]
        else:
            logits, feats = self._taps.forward(self.student, input)
        return logits, self.integrator(feats, size)


def _student_norm(student: nn.Module, key: str, value: Optional[Sequence[float]]) -> torch.Tensor:
    value = value if value is not None else unwrap_model(student).pretrained_cfg[key]
    return torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1)


class SFDTask(TfFDTaskMixin, TrainingTask):
    """SFD feature distillation from a teacher, optionally on a Tf-FD wrapped student.

    Args:
        student_model: The timm student; wrapped with Tf-FD here when ``tffd`` is given, or already wrapped.
        teacher: A timm / ``hf-hub:`` model name, an ``nn.Module`` or a ``DistillationTeacher``. Any architecture with
            ``feature_info`` (heterogeneous pairs work).
        teacher_checkpoint: Weights for a teacher given by name (file or ``hf-hub:``), checked by
            ``load_teacher_checkpoint``.
        integrator: ``'ri'`` (the paper's default), ``'li'`` or ``'ai'``.
        sfd_weight: Weight of the distillation loss; 3 in SFD.
        normalizer: Divisor of the batch-mean eq. 10 sum (see ``margin_l2_loss``).
        teacher_stage: ``feature_info`` index of the distilled teacher stage (the last one in SFD).
        criterion: Base classification loss; ``None`` creates one from ``criterion_kwargs`` like timm's tasks.
        criterion_kwargs: Arguments for ``timm.loss.create_classification_loss``.
        tffd: Tf-FD on the student: method names or a ``TfFDConfig`` (``None``: none, or the wrap's settings for an
            already wrapped student).
        check_finite: See ``TfFDLoss``.
        student_mean: Normalization mean of the student's input pipeline; default the student's ``pretrained_cfg``.
        student_std: Normalization std of the student's input pipeline.
        teacher_mean: Normalization mean the teacher was trained with; default its ``pretrained_cfg``.
        teacher_std: Normalization std the teacher was trained with.
        device: Device for task tensors and new modules.
        dtype: Dtype for task tensors and new modules.
        verbose: Log the configuration.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher: Union[str, nn.Module, DistillationTeacher],
            teacher_checkpoint: Optional[str] = None,
            integrator: str = 'ri',
            sfd_weight: float = 3.,
            normalizer: float = 1000.,
            teacher_stage: int = -1,
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            tffd: TfFDSetting = None,
            check_finite: bool = False,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            teacher_mean: Optional[Sequence[float]] = None,
            teacher_std: Optional[Sequence[float]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if isinstance(student_model, nn.parallel.DistributedDataParallel):
            raise ValueError('pass the plain student; SFDTask.prepare_distributed() wraps it in DDP')
        if teacher is None:
            raise ValueError('SFD needs a teacher; for SD / RSD without one, use timm_tffd.SelfDistill with any task')
        if not sfd_weight >= 0:
            raise ValueError(f'sfd_weight must be >= 0, got {sfd_weight}')
        student = student_model
        if tffd is not None or is_wrapped(student):
            student = wrap_student(student, tffd)

        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.tffd_loss = TfFDLoss(self.criterion, student, check_finite) if is_wrapped(student) else None

        if not isinstance(teacher, DistillationTeacher):
            plain = unwrap_model(student)
            teacher = create_teacher(
                teacher, teacher_checkpoint, num_classes=getattr(plain, 'num_classes', None),
                in_chans=getattr(plain, 'in_chans', 3), mean=teacher_mean, std=teacher_std,
                device=self.device, dtype=self.dtype)
        elif teacher_checkpoint is not None or teacher_mean is not None or teacher_std is not None:
            raise ValueError('teacher_checkpoint / teacher_mean / teacher_std apply to a teacher created here, '
                             'not to a DistillationTeacher')
        self.teacher = SFDTeacher(teacher, stage=teacher_stage)
        self.integrator_name = str(integrator).lower()
        if self.integrator_name not in INTEGRATORS:
            raise ValueError(f'unknown SFD integrator {integrator!r}; valid: {", ".join(INTEGRATORS)}')
        stages = self._student_stages(student, INTEGRATORS[self.integrator_name].num_stages)
        self._check_reach(student, stages)
        info = student.feature_info
        input_size = unwrap_model(student).pretrained_cfg.get('input_size', (3, 224, 224))
        nominal = [max(math.ceil(s / self.teacher.reduction), 1) for s in input_size[-2:]]
        integrator_module = create_integrator(
            self.integrator_name, [info[i]['num_chs'] for i in stages], (self.teacher.channels, *nominal))
        integrator_module.to(device=self.device, dtype=self.dtype)
        self.register_buffer('student_mean', _student_norm(student, 'mean', student_mean).to(self.device),
                             persistent=False)
        self.register_buffer('student_std', _student_norm(student, 'std', student_std).to(self.device),
                             persistent=False)
        self.sfd_weight = sfd_weight
        self.sfd_loss = MarginL2Loss(normalizer)
        self.trainable_module = SFDTrainableModule(student, integrator_module, stages)

        if self.verbose:
            t = self.teacher
            _logger.info(f'SFDTask: integrator={self.integrator_name} on student stages {stages}, teacher stage '
                         f'{t.module_name} ({t.channels} ch, margin={t.margin_kind}), weight={sfd_weight}')
            if self.tffd_loss is not None:
                self._log_tffd('SFDTask')

    @staticmethod
    def _student_stages(student: nn.Module, num_stages: int) -> List[int]:
        stages = resolve_stages(student)
        if len(stages) < num_stages:
            raise ValueError(
                f'the SFD integrator reads the last {num_stages} student stages, but {type(student).__name__} has '
                f'{len(stages)} ({[student.feature_info[i]["module"] for i in stages]}); use RI, which reads one')
        return stages[-num_stages:]

    def _check_reach(self, student: nn.Module, stages: Sequence[int]):
        finest = min(student.feature_info[i]['reduction'] for i in stages)
        if finest > MAX_UPSAMPLE * self.teacher.reduction:
            raise ValueError(
                f'the teacher map {self.teacher.module_name} (stride {self.teacher.reduction}) cannot be reached from '
                f'the student stages the integrator reads (finest stride {finest}): they would be upsampled '
                f'{finest // self.teacher.reduction}x, more than {MAX_UPSAMPLE}x, so the integrated map would be '
                f'mostly interpolation. Distill a coarser teacher stage (teacher_stage) or use LI/AI, which read '
                f'finer student stages.')

    def train(self, mode: bool = True) -> 'SFDTask':
        """Set the training mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'SFDTask':
        """Wrap student + integrator in DDP; the teacher stays unwrapped and frozen."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.teacher.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student (eval), student + integrator (train) and the teacher's feature path."""
        self.eval_model = torch.compile(self.trainable_module.student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.teacher.compile(backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The plain student (through DDP / EMA wrappers): what is validated and exported."""
        resolved = super().get_eval_model(module=module, ema=ema)
        current = resolved
        while current is not None:
            if isinstance(current, SFDTrainableModule):
                return current.student
            current = getattr(current, 'module', None)
        return resolved

    def get_clip_parameters(self, exclude_head: bool = False):
        trainable = unwrap_model(self.trainable_module)
        parameters = list(trainable.student.parameters())
        if exclude_head:
            parameters = parameters[:-2]
        parameters.extend(trainable.integrator.parameters())
        return parameters

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """``sfd``: the integrator weights (and the empirical margin); ``tffd``: the Tf-FD config and epoch. The EMA
        task state holds only the EMA integrator."""
        state = super().get_task_state(module=module, ema=ema)
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return state
        sfd = {'integrator': self.integrator_name, 'integrator_state': unwrap_model(module).integrator.state_dict()}
        if not ema and self.teacher.empirical is not None:
            sfd['empirical_margin'] = self.teacher.empirical.state_dict()
        state['sfd'] = sfd
        return state

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        super().load_task_state(state, strict=strict, module=module, ema=ema)
        if not state:
            return
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            raise RuntimeError('Cannot load EMA task state before setup_ema().' if ema else
                               'Cannot load task state without a trainable module.')
        sfd = state.get('sfd', {})
        if 'integrator_state' not in sfd:
            _logger.warning('the checkpoint has no SFD integrator state: the integrator starts from scratch')
        elif sfd.get('integrator') != self.integrator_name:
            raise ValueError(f'the checkpoint was trained with the {sfd.get("integrator")!r} integrator, this '
                             f'task uses {self.integrator_name!r}')
        else:
            unwrap_model(module).integrator.load_state_dict(sfd['integrator_state'], strict=strict)
        if not ema and 'empirical_margin' in sfd and self.teacher.empirical is not None:
            self.teacher.empirical.load_state_dict(sfd['empirical_margin'])

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return ``loss``, ``output``, ``base_loss``, ``sfd`` and, for a wrapped student in training mode,
        ``tffd`` and the ``tffd_*`` terms."""
        teacher_feature, margin = self.teacher(
            input, self.student_mean, self.student_std, update_margin=self.training)
        output, integrated = self.trainable_module(input, tuple(teacher_feature.shape[-2:]))
        if self.tffd_loss is not None and self.training:
            result = self.tffd_loss.compute(output, target)
        else:
            base = self.criterion(output, target)
            result = {'loss': base, 'base_loss': base}
        sfd = self.sfd_loss(integrated, teacher_feature, margin)
        result['loss'] = result['loss'] + self.sfd_weight * sfd
        result['sfd'] = sfd
        result['output'] = output
        return result
