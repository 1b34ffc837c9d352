"""A training output folder in the layout of timm's ``train.py``: its arguments, summary and checkpoints.

``args.yaml`` and ``summary.csv`` are read as text. Checkpoints are read with timm's loaders and ``weights_only=True``
(tensors, containers and ``argparse.Namespace``): a file holding any other pickled object is refused, never unpickled.
"""
import argparse
import csv
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import yaml
import timm
from timm.models import load_state_dict as timm_load_state_dict
from timm.utils import load_checkpoint_metadata

from ..data.embedded import uses_embedded_data

__all__ = ['TrainingRun', 'read_training_run', 'load_checkpoint', 'load_state_dict', 'resolved_args', 'in_chans',
           'trained_on_embedded_data', 'dataset_name', 'load_run_model']


@dataclass
class TrainingRun:
    """A training output folder: its arguments (args.yaml) and its per-epoch summary (summary.csv).

    Args:
        path: The folder.
        args: The parsed args.yaml.
        summary: One dict per epoch (the last row of an epoch that a resumed run repeated), numbers as floats.
    """
    path: Path
    args: Dict[str, Any]
    summary: List[Dict[str, Any]]

    @property
    def arch(self) -> str:
        return self.args['model']

    @property
    def eval_metric(self) -> str:
        return self.args.get('eval_metric') or 'top1'

    def final(self) -> Dict[str, Any]:
        """The summary row of the last epoch."""
        return self.summary[-1]

    def best(self) -> Dict[str, Any]:
        """The summary row of the best epoch by ``eval_metric`` (the first of equals, like timm's CheckpointSaver)."""
        key = f'eval_{self.eval_metric}'
        pick = min if self.eval_metric == 'loss' else max
        return pick((row for row in self.summary if row[key] is not None), key=lambda row: row[key])

    def methods(self) -> str:
        """The Tf-FD methods of the run as written in args.yaml, or ``'off'``."""
        value = self.args.get('tffd')
        if not value:
            return 'off'
        return ','.join(value) if isinstance(value, (list, tuple)) else str(value)


def _number(text: Optional[str]) -> Union[float, str, None]:
    if text in ('', None):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_training_run(output_dir: Union[str, Path]) -> TrainingRun:
    """Read ``args.yaml`` and ``summary.csv`` of a training output folder.

    Args:
        output_dir: The folder written by the training script.
    """
    path = Path(output_dir)
    if not path.is_dir():
        raise ValueError(f'{path} is not a folder')
    missing = [n for n in ('args.yaml', 'summary.csv') if not (path / n).is_file()]
    if missing:
        raise ValueError(f'{path} is not a training output folder: {" and ".join(missing)} missing '
                         f'(expected the layout of timm train.py: args.yaml, summary.csv, model_best.pth.tar)')
    with open(path / 'args.yaml') as f:
        args = yaml.safe_load(f)
    if not isinstance(args, dict) or not args.get('model'):
        raise ValueError(f'{path / "args.yaml"} does not name a model (no "model" key): not a training output')
    with open(path / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    metric = f'eval_{args.get("eval_metric") or "top1"}'
    needed = {'epoch', 'eval_top1', 'eval_top5', metric}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f'{path / "summary.csv"} has no evaluated epochs (needs columns {sorted(needed)}): '
                         f'publish a run trained with validation')
    # a resumed run may repeat epochs: the last row of an epoch wins
    by_epoch = {int(r['epoch']): {k: _number(v) for k, v in r.items()} for r in rows}
    return TrainingRun(path, args, [by_epoch[e] for e in sorted(by_epoch)])


def _read_safely(read, path: Union[str, Path], **kwargs):
    """Call one of timm's weights-only readers; its refusals and read errors become one ``ValueError``."""
    try:
        return read(str(path), **kwargs)
    except RuntimeError as e:
        if not isinstance(e.__cause__, pickle.UnpicklingError):
            raise ValueError(f'cannot read checkpoint {path}: {e}') from e
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a torch zip file: nothing to list
            unsafe = []
        raise ValueError(f'refusing to load {path}: it contains pickled objects that weights_only loading does not '
                         f'allow ({", ".join(unsafe) or "not a torch checkpoint?"}). Only tensors, containers and '
                         f'argparse.Namespace are accepted; nothing was unpickled.') from e


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A timm training checkpoint (``state_dict``, ``args``, ``task_state``, ...), read by timm's
    ``load_checkpoint_metadata`` (``weights_only=True``, tensors memory-mapped).

    Args:
        path: A ``.pth.tar`` file written by timm's ``CheckpointSaver``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'checkpoint {path} not found')
    if path.suffix == '.safetensors':
        raise ValueError(f'{path} holds weights only: publishing reads a training checkpoint (.pth.tar), which also '
                         f'holds the run\'s arguments and task state')
    checkpoint = _read_safely(load_checkpoint_metadata, path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise ValueError(f'{path} is not a timm training checkpoint (no state_dict)')
    return checkpoint


def load_state_dict(path: Union[str, Path], use_ema: bool = True) -> Dict[str, Any]:
    """The cleaned state dict of a weights file, read by timm's ``load_state_dict`` with ``weights_only=True``.

    Args:
        path: A ``.safetensors`` file or a torch checkpoint (a timm training checkpoint or a bare state dict).
        use_ema: Take a training checkpoint's ``state_dict_ema`` when it has one, else its ``state_dict``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {str(path)!r} not found')
    return _read_safely(timm_load_state_dict, path, use_ema=use_ema, weights_only=True)


def resolved_args(run: TrainingRun, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """args.yaml updated with the checkpoint's ``args``.

    Like timm's train.py, the training script writes args.yaml as parsed, before defaults that depend on the data or
    the model are filled in (``num_classes``, ``in_chans``, ``img_size``, ``mean``, ...); the arguments saved in the
    checkpoint are the resolved ones the model was built with.
    """
    saved = checkpoint.get('args')
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    return {**run.args, **(saved or {})}


def in_chans(args: Dict[str, Any]) -> int:
    """Input channels as timm train.py resolves them: in_chans, else input_size[0], else 3."""
    return args.get('in_chans') or (args.get('input_size') or [3])[0]


def trained_on_embedded_data(args: Dict[str, Any]) -> bool:
    """Whether the run with these arguments trained on the embedded Fashion-MNIST subset."""
    return uses_embedded_data(args.get('data_dir') or args.get('data'), args.get('dataset'))


def dataset_name(args: Dict[str, Any], dataset: Optional[str] = None) -> str:
    """The dataset name of a run: ``dataset`` when given, ``fashion_mnist`` for the embedded subset, else the
    ``dataset`` argument or the name of the data folder."""
    if dataset:
        return dataset
    if trained_on_embedded_data(args):
        return 'fashion_mnist'
    name = args.get('dataset') or Path(args.get('data_dir') or args.get('data') or '').name
    if not name:
        raise ValueError('the run\'s arguments name no dataset: pass dataset (--dataset-name)')
    return name


def _create_model(args: Dict[str, Any], **kwargs) -> nn.Module:
    """The timm model of a run, built from its arguments like timm train.py (without train-only options)."""
    return timm.create_model(
        args['model'],
        num_classes=args.get('num_classes'),
        in_chans=in_chans(args),
        global_pool=args.get('gp'),
        bn_eps=args.get('bn_eps'),
        **(args.get('model_kwargs') or {}),
        **kwargs,
    )


def load_run_model(
        run: TrainingRun,
        checkpoint: str = 'model_best.pth.tar',
        ema: bool = False,
        **kwargs,
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """The run's plain timm model in eval mode with the weights of a checkpoint; returns
    ``(model, checkpoint entries, resolved args)``.

    Args:
        run: The training run.
        checkpoint: Checkpoint file name in the run folder.
        ema: Take the checkpoint's ``state_dict_ema`` (an error when it has none) instead of its ``state_dict``.
        **kwargs: Passed to ``timm.create_model`` (e.g. ``pretrained_cfg_overlay``).
    """
    path = run.path / checkpoint
    state = load_checkpoint(path)
    arch = state.get('arch')
    if arch is not None and arch != run.arch:
        raise ValueError(f'{path} was saved for architecture {arch!r} but args.yaml says {run.arch!r}: the '
                         f'checkpoint does not belong to this run')
    key = 'state_dict_ema' if ema else 'state_dict'
    if state.get(key) is None:
        raise ValueError(f'{path} has no {key}' + (' (the run was trained without model EMA)' if ema else ''))
    args = resolved_args(run, state)
    model = _create_model(args, **kwargs)
    try:
        model.load_state_dict(load_state_dict(path, use_ema=ema))
    except RuntimeError as e:
        raise ValueError(f'the {key} of {path} does not fit {run.arch} as built from the run\'s arguments '
                         f'(num_classes={model.num_classes}, in_chans={in_chans(args)}): {e}') from e
    return model.eval(), state, args
