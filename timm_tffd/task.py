"""timm ``TrainingTask`` that trains a classifier with Tf-FD, and the Tf-FD part shared by every task.

``TfFDTask`` plugs into timm's task machinery unchanged: ``prepare_distributed`` (DDP), ``compile``, ``setup_ema`` /
``update_ema``, and ``get_checkpoint_state`` (the saved ``state_dict`` is the plain timm model; ``task_state['tffd']``
holds the Tf-FD configuration and epoch, in the same schema for every task).
"""
import logging
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask

from .config import TfFDConfig
from .criterion import TfFDLoss
from .wrap import is_wrapped, wrap

__all__ = ['TfFDTask', 'TfFDTaskMixin', 'wrap_student']

_logger = logging.getLogger(__name__)

TfFDSetting = Union[None, str, Sequence[str], TfFDConfig]


def wrap_student(model: nn.Module, tffd: TfFDSetting) -> nn.Module:
    """``model`` with Tf-FD: wrapped here from ``tffd`` (method names or a ``TfFDConfig``), or already wrapped (then
    ``tffd`` must be ``None``)."""
    if is_wrapped(model):
        if tffd is not None:
            raise ValueError('the model is already wrapped with Tf-FD; pass tffd=None (its settings are the wrap\'s)')
        return model
    return wrap(model, tffd if tffd is not None else TfFDConfig())


class TfFDTaskMixin:
    """Tf-FD epoch, logging and checkpoint state for a timm task with a ``tffd_loss`` (``TfFDLoss`` or ``None``).

    Put it before the timm task class: ``class MyTask(TfFDTaskMixin, ClassificationTask)``; the task sets
    ``self.tffd_loss`` in its constructor.
    """

    def set_epoch(self, epoch: float):
        """Set the epoch read by the Tf-FD weight schedule and an epoch-aware base loss (call before every epoch)."""
        tffd_loss = getattr(self, 'tffd_loss', None)
        if tffd_loss is not None:
            tffd_loss.set_epoch(epoch)
        elif hasattr(self.criterion, 'set_epoch'):
            self.criterion.set_epoch(epoch)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        state = dict(super().get_task_state(module=module, ema=ema))
        tffd_loss = getattr(self, 'tffd_loss', None)
        if not ema and tffd_loss is not None:
            state['tffd'] = tffd_loss.task_state()
        return state

    def load_task_state(self, state, strict: bool = True, module: Optional[nn.Module] = None, ema: bool = False):
        super().load_task_state(state, strict=strict, module=module, ema=ema)
        tffd_loss = getattr(self, 'tffd_loss', None)
        if not ema and state and 'tffd' in state and tffd_loss is not None:
            tffd_loss.load_task_state(state['tffd'])

    def _log_tffd(self, name: str):
        config = self.tffd_loss.config
        _logger.info(f'{name}: Tf-FD {dict(config.weights)}, stages {self.tffd_loss.state.taps.modules}, '
                     f'warmup_epochs={config.warmup_epochs}, decay={config.decay}, preact={config.preact}')


class TfFDTask(TfFDTaskMixin, ClassificationTask):
    """Classification with Teacher-free Feature Distillation.

    Args:
        model: A timm model; wrapped here unless already wrapped.
        criterion: The base classification loss; ``None`` creates one from ``criterion_kwargs`` like
            ``ClassificationTask``.
        tffd: Method names (``'inter,intra'``) or a ``TfFDConfig``; ``None`` for an already wrapped model, or the
            default config.
        check_finite: See ``TfFDLoss``.
        criterion_kwargs, device, dtype, verbose: As in ``ClassificationTask``.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[nn.Module] = None,
            tffd: TfFDSetting = None,
            check_finite: bool = False,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        model = wrap_student(model, tffd)
        super().__init__(model, criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype,
                         verbose=False)
        self.tffd_loss = TfFDLoss(self.criterion, model, check_finite)
        if verbose:
            self._log_tffd('TfFDTask')

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        result = self.tffd_loss.compute(output, target)
        result['output'] = output
        return result
