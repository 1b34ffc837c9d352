#!/usr/bin/env python3
"""Train a timm classifier with Teacher-free Feature Distillation (Tf-FD), argument-compatible with timm's train.py.

    python train_timm_tffd.py /data/imagenet --model resnet50 --tffd inter,intra
    torchrun --nproc_per_node 8 train_timm_tffd.py /data/imagenet --model resnet50 --tffd inter,intra --amp
    python train_timm_tffd.py --model resnet18 --tffd inter,intra    # no data dir: the embedded Fashion-MNIST subset

Without ``--tffd`` it is plain timm training (``timm.task.ClassificationTask``). It supports a subset of train.py's
arguments, with train.py's names and defaults; the others are rejected by name on the command line and checked in a
``-c`` config (see ``timm_tffd.train_compat``). The output folder has train.py's layout: ``args.yaml``,
``summary.csv`` (plus one ``train_<name>`` column per loss term the task reports), ``last.pth.tar``,
``checkpoint-<epoch>.pth.tar`` and ``model_best.pth.tar``, all written atomically.
"""
import argparse
import logging
import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import yaml
from torchvision import transforms
from timm import utils
from timm.data import FastCollateMixup, create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.loss import create_classification_loss
from timm.models import create_model, is_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import (
    ClassificationTask, LogitDistillationTask, TrainingTask, evaluation_sample_limit, load_task_ema_checkpoint,
    resume_task_checkpoint)
from timm.utils import NativeScaler

from timm_tffd import SFDTask, TfFDConfig, TfFDTask, diagnose_nonfinite, is_wrapped
from timm_tffd.kd import TfFDLogitDistillationTask
from timm_tffd.losses.smoothing import SCHEDULES, DynamicLabelSmoothingCrossEntropy
from timm_tffd.self_distill import SELF_DISTILL_MODES, SelfDistill, parse_tau
from timm_tffd.teacher import create_teacher
from timm_tffd.checkpoint import AtomicCheckpointSaver, atomic_write_text
from timm_tffd.data.embedded import EMBEDDED_DATA_CONFIG, EmbeddedFashionMNIST, uses_embedded_data
from timm_tffd.data.subset import SampledSubset
from timm_tffd.loss_meter import LossMeter
from timm_tffd.losses.inter import DIRECTIONS, PAIRS
from timm_tffd.losses.saliency import MODEL_SALIENCY, SALIENCY
from timm_tffd.methods import get_method, list_methods
from timm_tffd.train_compat import add_timm_argument, add_unsupported_arguments, load_config

_logger = logging.getLogger('train')

_DATASET_TYPES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')  # the <type>/ prefixes timm's create_dataset knows
_FOLDER_DATASETS = ('', 'folder', 'imagefolder', 'image_folder', 'tar')  # a folder or .tar at the data dir
_ROOTLESS_TYPES = ('hfds', 'hfids', 'tfds', 'wds')  # their data dir is a cache or may be created on first use
_BAR_REFRESH = 10  # steps between progress-bar refreshes (each reads the running means from the device)


# ------------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------------

# Command-line form of every method option (``wrap()`` keyword -> flag type, choices and help). The flags are
# ``--tffd-<option>``; each method also gets ``--tffd-<method>-weight``. Defaults come from the method registry.
_TFFD_OPTION_FLAGS = {
    'pairs': dict(type=str, choices=PAIRS, help='inter-layer stage pairs: all (reference code, CIFAR) or adjacent '
                                                '(ImageNet, Tf-FD supplementary)'),
    'direction': dict(type=str, choices=DIRECTIONS, help='inter-layer direction (TFD ablation, Li et al., IJCNN 2022)'),
    'saliency': dict(type=str, choices=list(SALIENCY) + list(MODEL_SALIENCY),
                     help='intra-layer channel saliency (norm: the reference code)'),
    'detach_salient': dict(action='store_true', help='intra-layer: no gradient into the salient half'),
    'emd_grid': dict(type=int, metavar='G', help='EMD: pool both maps to a GxG grid of local positions (default: '
                                                 'all positions)'),
    'emd_pairs': dict(type=str, choices=PAIRS, help='EMD stage pairs'),
    'emd_eps': dict(type=float, metavar='EPS', help='EMD: entropic regularization, relative to the mean cost'),
    'emd_iters': dict(type=int, metavar='N', help='EMD: Sinkhorn iterations'),
    'm2o_pairs': dict(type=str, choices=PAIRS, help='many-to-one stage pairs'),
    'm2o_remainder': dict(type=str, choices=('spread', 'drop'),
                          help='many-to-one: deep channels left over when C_deep %% C_shallow != 0'),
}


def _add_tffd_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group('Teacher-free Feature Distillation (not timm arguments)')
    group.add_argument('--tffd', type=str, default=None, metavar='METHODS',
                       help=f'comma-separated Tf-FD methods, e.g. inter,intra (known: {", ".join(list_methods())}); '
                            f'none: plain timm training')
    for m in list_methods():
        method = get_method(m)
        group.add_argument(f'--tffd-{m}-weight', type=float, default=method.default_weight, metavar='W',
                           help=f'{m} loss weight: {method.description} (default: %(default)s)')
    defaults = TfFDConfig.flag_defaults()
    group.add_argument('--tffd-warmup-epochs', type=float, default=defaults['tffd_warmup_epochs'], metavar='N',
                       help='linear warm-up of the Tf-FD weights over N epochs, 0 for none (default: 20, the '
                            'reference code)')
    group.add_argument('--tffd-early-decay', type=float, nargs=2, default=None, metavar=('START', 'END'),
                       help='early decay: the Tf-FD weights fall linearly to 0 between these epochs (default: none)')
    group.add_argument('--tffd-stages', type=int, nargs='+', default=None, metavar='I',
                       help='feature_info indices of the tapped stages (default: all but the stem)')
    group.add_argument('--tffd-preact', action='store_true',
                       help='tap stage outputs before their closing ReLU (ResNet-style stages)')
    for option, spec in _TFFD_OPTION_FLAGS.items():
        spec = dict(spec)
        if spec.get('action') != 'store_true' and 'default:' not in spec['help']:
            spec['help'] += ' (default: %(default)s)'
        group.add_argument(f'--tffd-{option.replace("_", "-")}', default=defaults[f'tffd_{option}'], **spec)


def _add_teacher_arguments(parser: argparse.ArgumentParser):
    add = add_timm_argument
    group = parser.add_argument_group('Teacher: logit KD (timm\'s names) and SFD')
    add(group, 'kd_model_name', '--teacher', type=str, metavar='NAME',
        help='teacher model: a timm name (with --teacher-checkpoint, or timm\'s pretrained weights), hf-hub:org/name or '
             'local-dir:PATH. Alone: logit KD; with --sfd: SFD')
    group.add_argument('--teacher-checkpoint', type=str, default=None, metavar='PATH',
                       help='teacher weights: a .safetensors file, a training checkpoint (read with '
                            'weights_only=True) or hf-hub:org/name (not a timm argument)')
    group.add_argument('--teacher-mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='normalization mean the teacher was trained with (default: the student\'s for a '
                            '--teacher-checkpoint, else the teacher\'s pretrained cfg)')
    group.add_argument('--teacher-std', type=float, nargs='+', default=None, metavar='STD',
                       help='normalization std the teacher was trained with (default: as --teacher-mean)')
    add(group, 'kd_distill_type', type=str, choices=('logit',), help='distillation type (only logit; SFD: --sfd)')
    add(group, 'kd_loss_type', type=str, choices=('kl',), help='logit distillation loss (default: kl)')
    add(group, 'distill_loss_weight', type=float, help='weight of the KD term (see timm\'s LogitDistillationTask)')
    add(group, 'task_loss_weight', type=float, help='weight of the classification term (see timm\'s '
                                                    'LogitDistillationTask)')
    add(group, 'kd_temperature', type=float, help='softmax temperature of logit KD (default: 4)')
    group.add_argument('--sfd', type=str, nargs='?', const='ri', default=None, choices=('li', 'ai', 'ri'),
                       help='SFD feature distillation from the teacher with this integrator (default when given '
                            'without value: ri, the paper\'s default)')
    group.add_argument('--sfd-weight', type=float, default=3.0, metavar='W',
                       help='SFD loss weight (default: 3, as in SFD)')

    group = parser.add_argument_group(
        'Self-distillation SD / RSD (SFD, Pei et al., IJCAI 2021, eqs. 8-9; not timm arguments)')
    group.add_argument('--self-distill', type=str, default=None, choices=SELF_DISTILL_MODES,
                       help='after each epoch, theta <- tau theta + (1 - tau) theta_prev: "sd", or "rsd" (previous '
                            'conv kernels flipped horizontally with p = 0.5)')
    group.add_argument('--sd-tau', type=str, default='0.995,0.999', metavar='START,END',
                       help='tau, ramped linearly over the epochs (default: %(default)s, SFD Table 2)')

    group = parser.add_argument_group('Dynamic label smoothing (not timm arguments)')
    group.add_argument('--smoothing-schedule', type=str, default='constant', choices=SCHEDULES,
                       help='how --smoothing changes over the epochs: constant (timm), linear or cosine to '
                            '--smoothing-end, or adaptive (per sample, smoothing * p(target)) (default: constant)')
    group.add_argument('--smoothing-end', type=float, default=None, metavar='S',
                       help='smoothing at the last epoch for linear / cosine (default: 0)')


def _build_parsers():
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', metavar='FILE',
                               help='YAML config (e.g. an args.yaml of timm\'s train.py or of this script) whose keys '
                                    'set argument defaults')

    parser = argparse.ArgumentParser(
        description='Train a timm model with Teacher-free Feature Distillation (argument-compatible with timm\'s '
                    'train.py; its unsupported arguments are rejected by name).', parents=[config_parser])
    add = add_timm_argument

    group = parser.add_argument_group('Dataset')
    add(parser, 'data', nargs='?', metavar='DIR',
        help='dataset root (as timm, same as --data-dir); none: the embedded Fashion-MNIST subset')
    add(group, 'data_dir', metavar='DIR', help='dataset root')
    add(group, 'dataset', metavar='NAME',
        help='"" (folder or .tar at the data dir) or <type>/<name> with type torch, hfds, hfids, tfds or wds')
    add(group, 'train_split', metavar='NAME', help='training split (default: train)')
    add(group, 'val_split', metavar='NAME', help='validation split, "" for none (default: validation)')
    add(group, 'dataset_download', action='store_true', help='let torch/ datasets download into the data dir')
    add(group, 'input_key', type=str, help='image field of hfds/ datasets (default: reader default, "image")')
    add(group, 'target_key', type=str, help='label field of hfds/ datasets (default: reader default, "label")')
    group.add_argument('--max-train-samples', type=int, default=None, metavar='N',
                       help='train on a fixed random subset of N training samples (seeded by --seed, the same on '
                            'every rank): for smoke tests and quick runs (not a timm argument)')
    group.add_argument('--max-val-samples', type=int, default=None, metavar='N',
                       help='validate on a fixed random subset of N samples (not a timm argument)')

    group = parser.add_argument_group('Model')
    add(group, 'model', type=str, metavar='MODEL', help='timm model name (default: resnet50)')
    add(group, 'pretrained', action='store_true', help='start from the model\'s pretrained weights')
    add(group, 'initial_checkpoint', type=str, metavar='PATH', help='load these weights after creating the model')
    add(group, 'resume', type=str, metavar='PATH',
        help='resume model, optimizer, scheduler, EMA, epoch and Tf-FD state from a checkpoint')
    add(group, 'num_classes', type=int, metavar='N', help='number of classes (default: model default)')
    add(group, 'img_size', type=int, metavar='N', help='image size (default: model default)')
    add(group, 'in_chans', type=int, metavar='N', help='input channels (default: 3)')
    add(group, 'mean', type=float, nargs='+', metavar='MEAN', help='normalization mean (default: model default)')
    add(group, 'std', type=float, nargs='+', metavar='STD', help='normalization std (default: model default)')
    add(group, 'batch_size', type=int, metavar='N', help='batch size per process (default: 128)')
    add(group, 'channels_last', action='store_true', help='channels_last memory layout')
    add(group, 'model_kwargs', nargs='*', action=utils.ParseKwargs, metavar='KEY=VALUE',
        help='extra model constructor arguments, e.g. img_size=32 for a ViT on the embedded data')
    add(group, 'torchcompile', nargs='?', type=str, const='inductor', metavar='BACKEND',
        help='torch.compile the task with this backend (default when given without value: inductor)')

    group = parser.add_argument_group('Device')
    add(group, 'device', type=str, default=None,
        help='device (default: cuda when available, else cpu; timm\'s train.py defaults to cuda)')
    add(group, 'amp', action='store_true', help='mixed precision (autocast; bfloat16 on CPU)')
    add(group, 'amp_dtype', type=str, choices=('float16', 'bfloat16'),
        help='autocast dtype on CUDA (default: float16, with loss scaling)')
    add(group, 'local_rank', type=int, help='set by legacy launchers; the rank is read from the environment')

    group = parser.add_argument_group('Optimizer')
    add(group, 'opt', type=str, metavar='OPTIMIZER', help='timm optimizer name (default: sgd)')
    add(group, 'opt_eps', type=float, metavar='EPSILON', help='optimizer epsilon (default: optimizer default)')
    add(group, 'opt_betas', type=float, nargs='+', metavar='BETA', help='optimizer betas (default: optimizer default)')
    add(group, 'momentum', type=float, metavar='M', help='optimizer momentum (default: 0.9)')
    add(group, 'weight_decay', type=float, help='weight decay (default: 2e-5)')

    group = parser.add_argument_group('Learning rate schedule')
    add(group, 'sched', type=str, metavar='SCHEDULER', help='timm scheduler name (default: cosine)')
    add(group, 'lr', type=float, metavar='LR', help='learning rate (default: --lr-base scaled by the global batch)')
    add(group, 'lr_base', type=float, metavar='LR', help='lr for a global batch of --lr-base-size (default: 0.1)')
    add(group, 'lr_base_size', type=int, metavar='DIV', help='batch size of --lr-base (default: 256)')
    add(group, 'lr_base_scale', type=str, metavar='SCALE',
        help='"linear" or "sqrt" batch scaling of --lr-base (default: sqrt for ada*/lamb, else linear)')
    add(group, 'warmup_lr', type=float, metavar='LR', help='lr at the start of the warmup (default: 1e-5)')
    add(group, 'min_lr', type=float, metavar='LR', help='lower lr bound (default: 0)')
    add(group, 'epochs', type=int, metavar='N', help='epochs to train (default: 300)')
    add(group, 'decay_milestones', type=int, nargs='+', metavar='MILESTONES',
        help='epochs of the multistep lr decays (default: 90 180 270)')
    add(group, 'decay_epochs', type=float, metavar='N', help='epochs between step lr decays (default: 90)')
    add(group, 'warmup_epochs', type=int, metavar='N', help='lr warmup epochs (default: 5)')
    add(group, 'cooldown_epochs', type=int, metavar='N', help='epochs at --min-lr after the schedule (default: 0)')
    add(group, 'decay_rate', type=float, metavar='RATE', help='lr decay factor (default: 0.1)')

    group = parser.add_argument_group('Augmentation and regularization')
    add(group, 'no_aug', action='store_true', help='no training augmentation (resize and center crop only)')
    add(group, 'aa', type=str, metavar='NAME', help='AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5')
    add(group, 'bce_loss', action='store_true', help='binary cross-entropy instead of softmax cross-entropy')
    add(group, 'reprob', type=float, metavar='PCT', help='random erasing probability (default: 0)')
    add(group, 'mixup', type=float, help='mixup alpha, on when > 0 (default: 0)')
    add(group, 'cutmix', type=float, help='cutmix alpha, on when > 0 (default: 0)')
    add(group, 'mixup_prob', type=float, help='probability of mixing a batch (default: 1)')
    add(group, 'mixup_switch_prob', type=float, help='probability of cutmix when both are on (default: 0.5)')
    add(group, 'mixup_mode', type=str, choices=('batch', 'pair', 'elem'), help='mixup granularity (default: batch)')
    add(group, 'scale', type=float, nargs='+', metavar='PCT', help='random-resized-crop area range (default: 0.08 1)')
    add(group, 'ratio', type=float, nargs='+', metavar='RATIO', help='random-resized-crop aspect range (default: 3/4 4/3)')
    add(group, 'hflip', type=float, help='horizontal flip probability (default: 0.5)')
    add(group, 'color_jitter', type=float, metavar='PCT', help='color jitter factor (default: 0.4)')
    group.add_argument('--pad-crop', type=int, default=0, metavar='PIX',
                       help='CIFAR-style augmentation: zero-pad by PIX and randomly crop back, before timm\'s train '
                            'transform; use with --scale 1 1 --ratio 1 1 --color-jitter 0 for the classic pad-4 crop + '
                            'flip (not a timm argument)')
    add(group, 'smoothing', type=float, help='label smoothing (default: 0.1)')
    add(group, 'drop', type=float, metavar='PCT', help='dropout rate (default: 0)')
    add(group, 'drop_path', type=float, metavar='PCT', help='drop path rate (default: model default)')
    add(group, 'drop_block', type=float, metavar='PCT', help='drop block rate (resnet / byobnet families)')

    group = parser.add_argument_group('BatchNorm in distributed training')
    add(group, 'sync_bn', action='store_true', help='SyncBatchNorm (CUDA only)')
    add(group, 'dist_bn', type=str, choices=('reduce', 'broadcast', ''),
        help='after each epoch, average ("reduce") or copy from rank 0 ("broadcast") the BN statistics '
             '(default: reduce)')

    group = parser.add_argument_group('Model EMA')
    add(group, 'model_ema', action='store_true', help='track an exponential moving average of the weights')
    add(group, 'model_ema_decay', type=float, help='EMA decay (default: 0.9998)')
    add(group, 'model_ema_warmup', action='store_true', help='warm up the EMA decay')

    group = parser.add_argument_group('Miscellaneous')
    add(group, 'seed', type=int, metavar='S', help='random seed (default: 42)')
    add(group, 'log_interval', type=int, metavar='N', help='steps between log lines (default: 50)')
    add(group, 'checkpoint_hist', type=int, metavar='N', help='epoch checkpoints to keep (default: 10)')
    add(group, 'workers', type=int, metavar='N', help='data loading processes per rank (default: 4)')
    add(group, 'output', type=str, metavar='PATH', help='output root (default: ./output/train)')
    add(group, 'experiment', type=str, metavar='NAME', help='output sub-folder (default: date-model-size)')
    add(group, 'log_wandb', action='store_true', help='log the summary rows to Weights & Biases')

    _add_tffd_arguments(parser)
    _add_teacher_arguments(parser)
    unsupported = add_unsupported_arguments(parser)
    return config_parser, parser, unsupported


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse a timm-style command line (with an optional ``-c`` YAML config); returns ``(args, args_text)``."""
    config_parser, parser, unsupported = _build_parsers()
    teacher_defaults = {k: parser.get_default(k) for k in _TEACHER_FLAGS}  # before -c sets new defaults
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        try:
            parser.set_defaults(**load_config(args_config.config, parser, unsupported))
        except (OSError, ValueError, yaml.YAMLError) as e:
            parser.error(str(e))
    args = parser.parse_args(remaining)
    del args.config  # like timm's args.yaml, ours holds the arguments the config set, not its path
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    _check_args(args, parser)
    try:
        TfFDConfig.from_args(args)  # the Tf-FD flags are checked where build_task reads them
    except ValueError as e:
        parser.error(f'--tffd: {e}' if args.tffd else str(e))
    _check_teacher_args(args, parser, teacher_defaults)
    return args, args_text


def _check_args(args, parser: argparse.ArgumentParser):
    """Reject bad values and combinations before anything is created."""
    if args.data and args.data_dir and args.data != args.data_dir:
        parser.error(f'two data dirs given: {args.data!r} (positional) and --data-dir {args.data_dir!r}')
    args.data_dir = args.data_dir or args.data
    prefix, sep, name = args.dataset.partition('/')
    prefix = prefix.lower() if sep else ''
    if sep and prefix not in _DATASET_TYPES:
        parser.error(f'unknown dataset type {prefix!r} in --dataset {args.dataset!r}; types: '
                     f'{", ".join(_DATASET_TYPES)}')
    if not sep and args.dataset.lower() not in _FOLDER_DATASETS:
        parser.error(f'unknown dataset {args.dataset!r}: use "" for an image folder or .tar at the data dir, or '
                     f'<type>/<name> with type {", ".join(_DATASET_TYPES)}')
    if args.data_dir:
        if not os.path.exists(args.data_dir) and prefix not in _ROOTLESS_TYPES and not args.dataset_download:
            parser.error(f'data dir {args.data_dir!r} does not exist')
    elif args.dataset and prefix not in _ROOTLESS_TYPES:
        parser.error(f'--dataset {args.dataset!r} needs a data dir; give none (and no --dataset) to train on the '
                     f'embedded Fashion-MNIST subset')
    if ':' not in args.model and not is_model(args.model):
        parser.error(f'unknown model {args.model!r}; see timm.list_models()')
    for flag, path in (('--resume', args.resume), ('--initial-checkpoint', args.initial_checkpoint)):
        if path and not os.path.isfile(path):
            parser.error(f'{flag}: no checkpoint file at {path!r}')
    for flag, value in (('--max-train-samples', args.max_train_samples), ('--max-val-samples', args.max_val_samples)):
        if value is not None and value < 1:
            parser.error(f'{flag} must be >= 1, got {value}')
    if args.pad_crop < 0:
        parser.error(f'--pad-crop must be >= 0, got {args.pad_crop}')
    if args.pad_crop and args.no_aug:
        parser.error('--pad-crop is a training augmentation; it cannot go with --no-aug')
    if args.batch_size < 1 or args.epochs < 1:
        parser.error('--batch-size and --epochs must be >= 1')
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device_type = args.device.split(':')[0]
    if device_type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {args.device} requested but CUDA is not available; use --device cpu')
    if args.sync_bn and device_type != 'cuda':
        parser.error('--sync-bn cannot be used with --device cpu: torch\'s SyncBatchNorm runs on CUDA only')


_TEACHER_FLAGS = ('teacher_checkpoint', 'teacher_mean', 'teacher_std', 'sfd', 'sfd_weight', 'distill_loss_weight',
                  'task_loss_weight', 'kd_temperature')


def _check_teacher_args(args, parser: argparse.ArgumentParser, defaults: Dict[str, object]):
    """Teacher, SFD, SD/RSD and dynamic smoothing flags: valid values and combinations that make sense."""
    if not args.kd_model_name:
        changed = [k for k in _TEACHER_FLAGS if getattr(args, k) != defaults[k]]
        if changed:
            flags = ', '.join('--' + k.replace('_', '-') for k in changed)
            parser.error(f'{flags} need a teacher (--teacher NAME)')
    try:
        args.sd_tau = parse_tau(args.sd_tau)
    except ValueError as e:
        parser.error(f'--sd-tau: {e}')
    if args.smoothing_schedule == 'constant':
        if args.smoothing_end is not None:
            parser.error('--smoothing-end needs --smoothing-schedule linear or cosine')
    else:
        if args.bce_loss:
            parser.error(f'--smoothing-schedule {args.smoothing_schedule} works with softmax cross-entropy, not '
                         f'--bce-loss')
        for flag, value in (('--smoothing', args.smoothing), ('--smoothing-end', args.smoothing_end)):
            if value is not None and not 0 <= value < 1:
                parser.error(f'{flag} must be in [0, 1) for a smoothing schedule, got {value}')


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------

def _create_teacher(args, data_config, device):
    """The frozen teacher (timm's ``DistillationTeacher``), or ``None`` without ``--teacher``."""
    if not args.kd_model_name:
        return None
    mean, std = args.teacher_mean, args.teacher_std
    if args.teacher_checkpoint and mean is None:  # trained by this pipeline: the student's normalization
        mean, std = data_config['mean'], data_config['std']
    return create_teacher(args.kd_model_name, args.teacher_checkpoint, num_classes=args.num_classes,
                          in_chans=data_config['input_size'][0], mean=mean, std=std, device=device)


def build_task(args, model: torch.nn.Module, criterion: torch.nn.Module, device: torch.device,
               data_config: dict) -> TrainingTask:
    """The training task; the one place that decides what a training step computes.

    ===========================  ===============================================================================
    flags                        task
    ===========================  ===============================================================================
    (none)                       timm ``ClassificationTask``
    ``--tffd``                   ``TfFDTask``
    ``--teacher``                timm ``LogitDistillationTask`` (``TfFDLogitDistillationTask`` with ``--tffd``)
    ``--teacher --sfd``          ``SFDTask`` (with Tf-FD terms with ``--tffd``)
    ===========================  ===============================================================================

    ``--self-distill`` adds the SD / RSD step (``build_self_distill``) to any of them. The loop calls
    ``task.set_epoch(epoch)`` (or the criterion's) before each epoch, and saves ``task.get_task_state()`` in every
    checkpoint.
    """
    verbose = utils.is_primary(args)
    tffd = TfFDConfig.from_args(args)
    teacher = _create_teacher(args, data_config, device)
    if args.sfd:
        return SFDTask(
            model, teacher=teacher, integrator=args.sfd, sfd_weight=args.sfd_weight, criterion=criterion, tffd=tffd,
            student_mean=data_config['mean'], student_std=data_config['std'], device=device, verbose=verbose)
    if teacher is not None:
        # timm's KD tasks read the student's normalization from its pretrained cfg: make it the one trained with
        model.pretrained_cfg = dict(model.pretrained_cfg, mean=data_config['mean'], std=data_config['std'])
        kd = dict(loss_type=args.kd_loss_type, distill_loss_weight=args.distill_loss_weight,
                  task_loss_weight=args.task_loss_weight, temperature=args.kd_temperature, device=device,
                  verbose=verbose)
        if tffd:
            return TfFDLogitDistillationTask(model, teacher, criterion, tffd=tffd, **kd)
        return LogitDistillationTask(model, teacher, criterion, **kd)
    if tffd:
        return TfFDTask(model, criterion, tffd=tffd, device=device, verbose=verbose)
    return ClassificationTask(model, criterion, device=device, verbose=verbose)


def build_self_distill(args, task: TrainingTask) -> Optional[SelfDistill]:
    """The SD / RSD end-of-epoch step on the task's trainable module, or ``None`` without ``--self-distill``."""
    if not args.self_distill:
        return None
    return SelfDistill(task.get_trainable_module(), args.self_distill, args.sd_tau, args.epochs, seed=args.seed)


class _SetupError(Exception):
    """Bad input found while building the run: reported as one line, before any output is written."""


def _apply_embedded_defaults(args):
    for key, value in EMBEDDED_DATA_CONFIG.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)


def _create_dataset(args, split: str, is_training: bool, img_mode: str):
    cap = args.max_train_samples if is_training else args.max_val_samples
    try:
        if uses_embedded_data(args.data_dir, args.dataset):
            dataset = EmbeddedFashionMNIST(split, img_mode)
        else:
            dataset = create_dataset(
                args.dataset,
                root=args.data_dir,
                split=split,
                is_training=is_training,
                class_map=args.class_map,
                download=args.dataset_download,
                batch_size=args.batch_size,
                seed=args.seed,
                repeats=args.epoch_repeats if is_training else 0,
                input_img_mode=img_mode,
                input_key=args.input_key,
                target_key=args.target_key,
                num_samples=args.train_num_samples if is_training else args.val_num_samples,
                trust_remote_code=args.dataset_trust_remote_code,
            )
        if cap is not None:
            dataset = SampledSubset(dataset, cap, seed=args.seed)
    except Exception as e:  # timm and torchvision report a bad name or root with many exception types
        embedded = uses_embedded_data(args.data_dir, args.dataset)
        source = 'the embedded data' if embedded else f'{args.dataset or "folder"} at {args.data_dir!r}'
        raise _SetupError(f'cannot load split {split!r} of {source}: {type(e).__name__}: {e}') from e
    return dataset


def _create_model(args, in_chans: int) -> torch.nn.Module:
    try:
        return create_model(
            args.model,
            pretrained=args.pretrained,
            in_chans=in_chans,
            num_classes=args.num_classes,
            drop_rate=args.drop,
            drop_path_rate=args.drop_path,
            drop_block_rate=args.drop_block,
            global_pool=args.gp,
            bn_momentum=args.bn_momentum,
            bn_eps=args.bn_eps,
            checkpoint_path=args.initial_checkpoint,
            **args.model_kwargs,
        )
    except TypeError as e:  # e.g. drop_block_rate, which only the resnet / byobnet families take
        raise _SetupError(f'model {args.model} does not accept an option given by --drop-block, --drop-path or '
                          f'--model-kwargs ({e})') from e
    except (RuntimeError, OSError, ValueError) as e:
        raise _SetupError(f'cannot create model {args.model}: {e}') from e


def _create_loaders(args, data_config, dataset_train, dataset_eval, device, mixup_active: bool):
    """timm's loaders with train.py's settings (prefetcher, FastCollateMixup, train.py's augmentation defaults)."""
    collate_fn = None
    if mixup_active:
        collate_fn = FastCollateMixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing if args.smoothing_schedule == 'constant' else 0.,
            num_classes=args.num_classes)
    common = dict(mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem, device=device,
                  distributed=args.distributed, use_prefetcher=args.prefetcher, num_workers=args.workers)
    loader_train = create_loader(
        dataset_train,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        interpolation=args.train_interpolation if args.train_interpolation and not args.no_aug
        else data_config['interpolation'],
        collate_fn=collate_fn,
        worker_seeding=args.worker_seeding,
        **common,
    )
    if args.pad_crop:  # before timm's transform, which then only flips, converts and normalizes (see --pad-crop)
        loader_train.dataset.transform.transforms.insert(
            0, transforms.RandomCrop(data_config['input_size'][-2:], padding=args.pad_crop))
    if len(loader_train) == 0:
        raise _SetupError(f'the training split ({len(dataset_train)} samples over {args.world_size} process(es)) is '
                          f'smaller than one batch of {args.batch_size} per process; lower --batch-size')
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval,
            input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size,
            is_training=False,
            interpolation=data_config['interpolation'],
            crop_pct=data_config['crop_pct'],
            **common,
        )
    return loader_train, loader_eval


def _resolve_lr(args):
    """timm's rule: without --lr, scale --lr-base by the global batch relative to --lr-base-size."""
    if args.lr:
        return
    global_batch = args.batch_size * args.world_size
    ratio = global_batch / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        ratio = ratio ** 0.5
    args.lr = args.lr_base * ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) from base learning rate ({args.lr_base}) and global batch size '
                     f'({global_batch}) with {args.lr_base_scale} scaling.')


def _epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws its random numbers from (seed, epoch, rank) alone, so a resumed run repeats them."""
    return hash((seed, epoch)) % (2 ** 31)


def _set_loader_epoch(loader, epoch: int):
    for obj in (loader.dataset, getattr(loader, 'sampler', None)):
        if hasattr(obj, 'set_epoch'):
            obj.set_epoch(epoch)


@dataclass
class _Setup:
    """Everything ``_build`` creates for the loop."""
    task: TrainingTask
    eval_model: torch.nn.Module
    loader_train: object
    loader_eval: Optional[object]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Optional[object]  # None with --sched none
    num_epochs: int
    eval_metric: str
    input_size: tuple
    resume_epoch: Optional[int]
    self_distill: Optional[SelfDistill]


@dataclass
class TrainResult:
    """What ``train()`` returns: the task (its model and EMA), the output folder and the per-epoch metrics."""
    task: TrainingTask
    output_dir: Optional[str]
    results: List[dict] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None


# ------------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------------

def _format_terms(values: Dict[str, float]) -> str:
    return '  '.join(f'{k}: {v:#.4g}' for k, v in values.items() if k != 'loss')


def train_one_epoch(epoch, task, loader, optimizer, lr_scheduler, args, amp_autocast, loss_scaler):
    """One pass over ``loader``; returns the epoch means of every scalar the task reports (over all ranks)."""
    task.get_trainable_module().train()
    meter = LossMeter()
    primary = utils.is_primary(args)
    bar, log_context = None, nullcontext()
    if primary and sys.stdout.isatty():
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        bar = tqdm(total=len(loader), desc=f'Train {epoch}', file=sys.stdout, leave=False, dynamic_ncols=True)
        log_context = logging_redirect_tqdm()  # log lines go above the bar instead of through it
    with log_context:
        _train_steps(epoch, task, loader, optimizer, lr_scheduler, args, amp_autocast, loss_scaler, meter, bar)
    if bar is not None:
        bar.close()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    return meter.averages(args.distributed)


def _train_steps(epoch, task, loader, optimizer, lr_scheduler, args, amp_autocast, loss_scaler, meter, bar):
    second_order = getattr(optimizer, 'is_second_order', False)
    num_updates = epoch * len(loader)
    update_time = utils.AverageMeter()
    data_time = utils.AverageMeter()
    primary = utils.is_primary(args)
    optimizer.zero_grad()
    end = time.time()
    for step, (input, target) in enumerate(loader):
        data_time.update(time.time() - end)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            result = task(input, target)
        loss = result['loss']
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, create_graph=second_order)
        else:
            loss.backward(create_graph=second_order)
            optimizer.step()
        optimizer.zero_grad()
        num_updates += 1
        task.update_ema(step=num_updates)
        meter.update(result, input.shape[0])
        update_time.update(time.time() - end)

        last = step == len(loader) - 1
        if step % args.log_interval == 0 or last:
            latest, means = meter.latest(args.distributed), meter.averages(args.distributed)
            _check_diverged(means, meter, epoch, task, input)
            if primary:
                lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
                samples = input.shape[0] * args.world_size
                _logger.info(
                    f'Train: {epoch} [{step:>4d}/{len(loader)} ({100. * (step + 1) / len(loader):>3.0f}%)]  '
                    f'Loss: {latest["loss"]:#.3g} ({means["loss"]:#.3g})  {_format_terms(means)}  '
                    f'Time: {update_time.val:.3f}s, {samples / update_time.val:>7.2f}/s  '
                    f'LR: {lr:.3e}  Data: {data_time.val:.3f} ({data_time.avg:.3f})')
        if bar is not None:
            bar.update()
            if step % _BAR_REFRESH == 0 or last:
                bar.set_postfix(OrderedDict((k, f'{v:.4g}') for k, v in meter.averages().items()))
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        end = time.time()


class _Diverged(FloatingPointError):
    """Non-finite losses or weights: the run stops, and nothing non-finite is saved."""


def _check_diverged(means: Dict[str, float], meter: LossMeter, epoch: int, task: TrainingTask, input: torch.Tensor):
    """Stop on a non-finite epoch mean (read where the loop reads its values anyway, never per step)."""
    if all(math.isfinite(v) for v in means.values()):
        return
    found = meter.nonfinite()  # this rank's first non-finite step, tracked on the device
    where = f'at step {found[0]}' if found else 'on another rank'
    names = found[1] if found else [k for k, v in means.items() if not math.isfinite(v)]
    message = f'training diverged in epoch {epoch} {where}: non-finite {", ".join(names)}'
    model = task.get_eval_model()
    if is_wrapped(model):
        stages = diagnose_nonfinite(model, input)
        message += (f'; tapped features not finite at stage(s) {", ".join(stages)}' if stages else
                    '; the tapped features of the current batch are finite')
    raise _Diverged(message)


def _check_finite_weights(task: TrainingTask, epoch: int):
    """Before a checkpoint: the weights must be finite (one host read per epoch)."""
    params = list(task.get_trainable_module().named_parameters())
    if bool(torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).all()):
        return
    bad = [n for n, p in params if not bool(torch.isfinite(p.detach()).all())]
    raise _Diverged(f'training diverged in epoch {epoch}: non-finite weights in {", ".join(bad[:5])}'
                    f'{" and others" if len(bad) > 5 else ""}')


def validate(model, loader, evaluator, args, amp_autocast, log_suffix: str = '') -> Dict[str, float]:
    """Loss, top-1 and top-5 over the whole split (over all ranks, without the distributed sampler's padding)."""
    model.eval()
    evaluator.reset()
    last_idx = len(loader) - 1
    with torch.inference_mode():
        for step, (input, target) in enumerate(loader):
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            evaluator.update(output, target)
            if utils.is_primary(args) and (step == last_idx or step % args.log_interval == 0):
                running = evaluator.summary()
                _logger.info(f'Test{log_suffix}: [{step:>4d}/{last_idx}]  Loss: {running["loss"]:>7.3f}  '
                             f'Acc@1: {running["top1"]:>7.3f}  Acc@5: {running["top5"]:>7.3f}')
    return evaluator.compute(distributed=args.distributed)


def train(args, args_text: str) -> TrainResult:
    """Build everything from parsed arguments and train; see the module docstring."""
    args.prefetcher = not args.no_prefetcher
    device = utils.init_distributed_device(args)
    primary = utils.is_primary(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on {args.device}.')

    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if device.type == 'cpu' or args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
        if primary:
            _logger.info(f'Mixed precision: autocast to {amp_dtype}.')

    try:
        setup = _build(args, device, loss_scaler)
    except _SetupError as e:
        if args.distributed:
            torch.distributed.destroy_process_group()
        raise SystemExit(f'error: {e}') from None
    return _run(args, args_text, setup, amp_autocast, loss_scaler)


def _build(args, device, loss_scaler) -> _Setup:
    """Model, data, task, optimizer and resume state. Raises ``_SetupError`` on bad input."""
    primary = utils.is_primary(args)
    if uses_embedded_data(args.data_dir, args.dataset):
        _apply_embedded_defaults(args)
        if primary:
            _logger.info('No data dir: training on the embedded Fashion-MNIST subset (4000 train / 1000 val images).')
    # Initialize the weights identically on every rank (timm seeds with seed + rank here and relies on DDP's
    # broadcast, which does not reach an EMA copy made before the DDP wrap).
    utils.random_seed(args.seed, 0)
    in_chans = args.in_chans if args.in_chans is not None else 3
    model = _create_model(args, in_chans)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''  # SyncBatchNorm keeps the statistics in sync already
        model = convert_sync_batchnorm(model)

    img_mode = 'RGB' if data_config['input_size'][0] == 3 else 'L'
    dataset_train = _create_dataset(args, args.train_split, True, img_mode)
    dataset_eval = _create_dataset(args, args.val_split, False, img_mode) if args.val_split else None

    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    loader_train, loader_eval = _create_loaders(args, data_config, dataset_train, dataset_eval, device, mixup_active)
    _resolve_lr(args)

    if args.smoothing_schedule == 'constant':
        criterion = create_classification_loss(
            loss_type='bce' if args.bce_loss else 'ce', smoothing=args.smoothing, soft_targets=mixup_active,
            bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, pos_weight=args.bce_pos_weight)
    else:  # mixup's own smoothing is off then (see _create_loaders): the schedule smooths the mixed targets
        criterion = DynamicLabelSmoothingCrossEntropy(
            args.smoothing, args.smoothing_end, args.smoothing_schedule, epochs=args.epochs)
    try:
        task = build_task(args, model, criterion, device, data_config)
    except (ValueError, OSError) as e:  # stages, taps, saliency or a teacher that do not fit the model
        raise _SetupError(f'{args.model}: {e}') from e
    try:
        optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except (ValueError, AssertionError) as e:
        raise _SetupError(f'--opt {args.opt}: {e}') from e

    resume_epoch = None
    try:
        if args.resume:
            resume_epoch = resume_task_checkpoint(
                task, args.resume, optimizer=optimizer, loss_scaler=loss_scaler, log_info=primary)
        if args.model_ema:
            task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
            if args.resume:
                load_task_ema_checkpoint(task, args.resume)
    except (RuntimeError, KeyError, ValueError) as e:  # another model, or not a training checkpoint
        raise _SetupError(f'cannot resume from {args.resume}: {e}') from e
    self_distill = build_self_distill(args, task)
    if self_distill is not None and resume_epoch:
        self_distill.resume(resume_epoch - 1)  # the checkpoint was written right after that epoch's SD step
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_metric = 'top1' if loader_eval is not None else 'loss'
    try:  # after the resume, as in timm: the schedule starts from the checkpoint's initial lr
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=eval_metric == 'loss'),
            updates_per_epoch=len(loader_train))
    except (ValueError, AssertionError) as e:
        raise _SetupError(f'--sched {args.sched}: {e}') from e
    eval_model = task.get_eval_model()  # taken before the DDP wrap, as timm does: evaluation needs no DDP
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)
    return _Setup(task, eval_model, loader_train, loader_eval, optimizer, lr_scheduler, num_epochs, eval_metric,
                  data_config['input_size'], resume_epoch, self_distill)


def _run(args, args_text, setup: _Setup, amp_autocast, loss_scaler) -> TrainResult:
    """The epoch loop: train, end-of-epoch task hook, BN sync, evaluation, checkpoint, summary row, lr step."""
    task, optimizer, loader_train, loader_eval = setup.task, setup.optimizer, setup.loader_train, setup.loader_eval
    lr_scheduler, eval_metric = setup.lr_scheduler, setup.eval_metric
    primary = utils.is_primary(args)
    start_epoch = setup.resume_epoch or 0
    if lr_scheduler is not None and start_epoch > 0:
        # timm's schedulers are functions of the epoch (or update) count: stepping to it restores them
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * len(loader_train))
        else:
            lr_scheduler.step(start_epoch)
    if primary:
        _logger.info(f'Scheduled epochs: {setup.num_epochs}; starting at epoch {start_epoch}.')
        if args.resume and args.sched == 'plateau':
            _logger.warning('The plateau scheduler\'s metric state is not in checkpoints (timm deprecates it): it '
                            'restarts on resume. Prefer a fixed schedule such as cosine.')

    output_dir, saver, has_wandb = None, None, False
    if primary:  # only now, with every input checked, does the run get a folder
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(setup.input_size[-1])])
        output_dir = os.path.join(args.output or './output/train', exp_name)
    created = output_dir is not None and not os.path.exists(output_dir)
    evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(loader_eval)) if loader_eval else None
    run = TrainResult(task, output_dir)
    saved = False
    try:
        if primary:
            saver = _open_output(args, args_text, setup, output_dir, start_epoch, loss_scaler)
            has_wandb = args.log_wandb and _init_wandb(args, exp_name)

        for epoch in range(start_epoch, setup.num_epochs):
            utils.random_seed(_epoch_seed(args.seed, epoch), args.rank)
            _set_loader_epoch(loader_train, epoch)
            epoch_aware = task if hasattr(task, 'set_epoch') else getattr(task, 'criterion', None)
            if hasattr(epoch_aware, 'set_epoch'):  # Tf-FD weight schedule, dynamic label smoothing
                epoch_aware.set_epoch(epoch)
            train_metrics = train_one_epoch(
                epoch, task, loader_train, optimizer, lr_scheduler, args, amp_autocast, loss_scaler)
            _check_finite_weights(task, epoch)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            if setup.self_distill is not None:  # after the BN sync: every rank mixes the same weights
                update = setup.self_distill.step(epoch)
                if primary:
                    _logger.info(f'Epoch {epoch}: self-distillation {update}')

            eval_metrics = _evaluate(args, setup, evaluator, amp_autocast) if evaluator is not None else None
            if eval_metrics and not all(math.isfinite(v) for v in eval_metrics.values()):
                values = ', '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items())
                raise _Diverged(f'training diverged in epoch {epoch}: non-finite validation metrics ({values})')
            latest_metric = (eval_metrics or train_metrics)[eval_metric]

            if saver is not None:
                run.best_metric, run.best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)
                saved = True
                lrs = [g['lr'] for g in optimizer.param_groups]
                utils.update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'),
                                     lr=sum(lrs) / len(lrs), log_wandb=has_wandb)
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, latest_metric)
            run.results.append(dict(epoch=epoch, train=train_metrics, validation=eval_metrics))
            if primary and eval_metrics:
                _logger.info(f'Epoch {epoch}: {_format_terms(train_metrics)}  train loss {train_metrics["loss"]:.4f}  '
                             f'top-1 {eval_metrics["top1"]:.2f}  top-5 {eval_metrics["top5"]:.2f}')
    except KeyboardInterrupt:
        _logger.warning('Interrupted.')
    except _Diverged as e:
        resume = f'; the last good checkpoint is {os.path.join(output_dir, "last.pth.tar")}' if saved else ''
        raise SystemExit(f'error: {e}. Lower the learning rate (or the loss weights), or train in float32{resume}') \
            from None
    except (ValueError, FloatingPointError) as e:  # an option that does not fit the feature maps
        _logger.debug('training stopped', exc_info=True)
        raise SystemExit(f'error: training stopped: {e}') from None
    finally:
        if created and not saved:
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing resumable: leave no half-made run behind
        if args.distributed:
            torch.distributed.destroy_process_group()

    if primary and run.results:
        final = run.results[-1]
        result = (f'top-1 {final["validation"]["top1"]:.2f}' if final['validation']
                  else f'train loss {final["train"]["loss"]:.4f}')
        _logger.info(f'Final {result} (epoch {final["epoch"]}); best {eval_metric}: {run.best_metric} '
                     f'(epoch {run.best_epoch}); output: {output_dir}')
    return run


def _open_output(args, args_text, setup: _Setup, output_dir: str, start_epoch: int, loss_scaler):
    """Create the output folder's saver and args.yaml; a resumed run keeps its checkpoint history and summary rows."""
    os.makedirs(output_dir, exist_ok=True)
    saver = AtomicCheckpointSaver(
        model=setup.task.get_trainable_module(), optimizer=setup.optimizer, args=args, amp_scaler=loss_scaler,
        checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=setup.eval_metric == 'loss',
        max_history=args.checkpoint_hist, task=setup.task)
    if args.resume:
        saver.load_state_dict_from_checkpoint(args.resume)
    utils.trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
    atomic_write_text(os.path.join(output_dir, 'args.yaml'), args_text)
    return saver


def _evaluate(args, setup: _Setup, evaluator, amp_autocast) -> Dict[str, float]:
    """Validate the model and, with --model-ema, the EMA model, whose metrics are then reported (as timm does)."""
    metrics = validate(setup.eval_model, setup.loader_eval, evaluator, args, amp_autocast)
    task = setup.task
    if task.has_ema():
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size, args.dist_bn == 'reduce')
        metrics = validate(task.get_eval_model(ema=True), setup.loader_eval, evaluator, args, amp_autocast,
                           log_suffix=' (EMA)')
    return metrics


def _init_wandb(args, exp_name: str) -> bool:
    try:
        import wandb
    except ImportError:
        _logger.warning('--log-wandb: the wandb package is not installed (pip install wandb); not logging to wandb.')
        return False
    wandb.init(project=args.wandb_project, name=exp_name, config=args, tags=args.wandb_tags)
    return True


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Command-line entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    args, args_text = parse_args(argv)
    return train(args, args_text)


if __name__ == '__main__':
    utils.setup_default_logging()
    main()
