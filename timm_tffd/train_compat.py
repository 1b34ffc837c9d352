"""Compatibility with timm's ``train.py``: its arguments and defaults, and ``-c`` configs checked like a command line.

``TIMM_TRAIN_ARGS`` lists every argument of timm's ``train.py`` (huggingface/pytorch-image-models, commit aa4b585,
version 1.0.29.dev0; the script is not part of the pip package) as ``dest: (option strings, default)``: the facts a
compatible script is checked against. A training script declares timm's arguments with ``ArgumentTable.timm`` (timm's
option strings and default, the script's type and help) and its own with ``ArgumentTable.own``.

A YAML config (``-c``, for example an ``args.yaml`` written by timm's ``train.py`` or by this script) is turned into
command-line tokens by ``config_argv`` and parsed before the command line: the same type and choice checks apply to
both, and the command line overrides the config, as in timm.
"""
import argparse
import logging
from typing import Any, Dict, List, Tuple

import yaml

__all__ = ['TIMM_TRAIN_ARGS', 'ArgumentTable', 'config_argv', 'load_config']

_logger = logging.getLogger(__name__)

TIMM_TRAIN_ARGS: Dict[str, Tuple[Tuple[str, ...], Any]] = {
    'data': ((), None),
    'data_dir': (('--data-dir',), None),
    'dataset': (('--dataset',), ''),
    'train_split': (('--train-split',), 'train'),
    'val_split': (('--val-split',), 'validation'),
    'train_num_samples': (('--train-num-samples',), None),
    'val_num_samples': (('--val-num-samples',), None),
    'dataset_download': (('--dataset-download',), False),
    'class_map': (('--class-map',), ''),
    'input_img_mode': (('--input-img-mode',), None),
    'input_key': (('--input-key',), None),
    'target_key': (('--target-key',), None),
    'dataset_trust_remote_code': (('--dataset-trust-remote-code',), False),
    'model': (('--model',), 'resnet50'),
    'pretrained': (('--pretrained',), False),
    'pretrained_path': (('--pretrained-path',), None),
    'initial_checkpoint': (('--initial-checkpoint',), ''),
    'resume': (('--resume',), ''),
    'no_resume_opt': (('--no-resume-opt',), False),
    'num_classes': (('--num-classes',), None),
    'gp': (('--gp',), None),
    'img_size': (('--img-size',), None),
    'in_chans': (('--in-chans',), None),
    'input_size': (('--input-size',), None),
    'crop_pct': (('--crop-pct',), None),
    'mean': (('--mean',), None),
    'std': (('--std',), None),
    'interpolation': (('--interpolation',), ''),
    'batch_size': (('-b', '--batch-size'), 128),
    'validation_batch_size': (('-vb', '--validation-batch-size'), None),
    'channels_last': (('--channels-last',), False),
    'fuser': (('--fuser',), ''),
    'grad_accum_steps': (('--grad-accum-steps',), 1),
    'grad_checkpointing': (('--grad-checkpointing',), False),
    'fast_norm': (('--fast-norm',), False),
    'model_kwargs': (('--model-kwargs',), {}),
    'head_init_scale': (('--head-init-scale',), None),
    'head_init_bias': (('--head-init-bias',), None),
    'torchcompile_mode': (('--torchcompile-mode',), None),
    'torchscript': (('--torchscript',), False),
    'torchcompile': (('--torchcompile',), None),
    'device': (('--device',), 'cuda'),
    'amp': (('--amp',), False),
    'amp_dtype': (('--amp-dtype',), 'float16'),
    'model_dtype': (('--model-dtype',), None),
    'no_ddp_bb': (('--no-ddp-bb',), False),
    'synchronize_step': (('--synchronize-step',), False),
    'local_rank': (('--local_rank',), 0),
    'device_modules': (('--device-modules',), None),
    'opt': (('--opt',), 'sgd'),
    'opt_eps': (('--opt-eps',), None),
    'opt_betas': (('--opt-betas',), None),
    'momentum': (('--momentum',), 0.9),
    'weight_decay': (('--weight-decay',), 2e-05),
    'clip_grad': (('--clip-grad',), None),
    'clip_mode': (('--clip-mode',), 'norm'),
    'layer_decay': (('--layer-decay',), None),
    'layer_decay_min_scale': (('--layer-decay-min-scale',), 0),
    'layer_decay_no_opt_scale': (('--layer-decay-no-opt-scale',), None),
    'opt_kwargs': (('--opt-kwargs',), {}),
    'sched': (('--sched',), 'cosine'),
    'sched_on_updates': (('--sched-on-updates',), False),
    'lr': (('--lr',), None),
    'lr_base': (('--lr-base',), 0.1),
    'lr_base_size': (('--lr-base-size',), 256),
    'lr_base_scale': (('--lr-base-scale',), ''),
    'lr_noise': (('--lr-noise',), None),
    'lr_noise_pct': (('--lr-noise-pct',), 0.67),
    'lr_noise_std': (('--lr-noise-std',), 1.0),
    'lr_cycle_mul': (('--lr-cycle-mul',), 1.0),
    'lr_cycle_decay': (('--lr-cycle-decay',), 0.5),
    'lr_cycle_limit': (('--lr-cycle-limit',), 1),
    'lr_k_decay': (('--lr-k-decay',), 1.0),
    'warmup_lr': (('--warmup-lr',), 1e-05),
    'min_lr': (('--min-lr',), 0),
    'epochs': (('--epochs',), 300),
    'epoch_repeats': (('--epoch-repeats',), 0.0),
    'start_epoch': (('--start-epoch',), None),
    'decay_milestones': (('--decay-milestones',), [90, 180, 270]),
    'decay_epochs': (('--decay-epochs',), 90),
    'warmup_epochs': (('--warmup-epochs',), 5),
    'warmup_prefix': (('--warmup-prefix',), False),
    'cooldown_epochs': (('--cooldown-epochs',), 0),
    'patience_epochs': (('--patience-epochs',), 10),
    'decay_rate': (('--decay-rate', '--dr'), 0.1),
    'no_aug': (('--no-aug',), False),
    'train_crop_mode': (('--train-crop-mode',), None),
    'scale': (('--scale',), [0.08, 1.0]),
    'ratio': (('--ratio',), [0.75, 1.3333333333333333]),
    'hflip': (('--hflip',), 0.5),
    'vflip': (('--vflip',), 0.0),
    'color_jitter': (('--color-jitter',), 0.4),
    'color_jitter_prob': (('--color-jitter-prob',), None),
    'grayscale_prob': (('--grayscale-prob',), None),
    'gaussian_blur_prob': (('--gaussian-blur-prob',), None),
    'aa': (('--aa',), None),
    'aug_repeats': (('--aug-repeats',), 0),
    'aug_splits': (('--aug-splits',), 0),
    'jsd_loss': (('--jsd-loss',), False),
    'bce_loss': (('--bce-loss',), False),
    'bce_sum': (('--bce-sum',), False),
    'bce_target_thresh': (('--bce-target-thresh',), None),
    'bce_pos_weight': (('--bce-pos-weight',), None),
    'reprob': (('--reprob',), 0.0),
    'remode': (('--remode',), 'pixel'),
    'recount': (('--recount',), 1),
    'resplit': (('--resplit',), False),
    'mixup': (('--mixup',), 0.0),
    'cutmix': (('--cutmix',), 0.0),
    'cutmix_minmax': (('--cutmix-minmax',), None),
    'mixup_prob': (('--mixup-prob',), 1.0),
    'mixup_switch_prob': (('--mixup-switch-prob',), 0.5),
    'mixup_mode': (('--mixup-mode',), 'batch'),
    'mixup_off_epoch': (('--mixup-off-epoch',), 0),
    'smoothing': (('--smoothing',), 0.1),
    'train_interpolation': (('--train-interpolation',), 'random'),
    'drop': (('--drop',), 0.0),
    'drop_connect': (('--drop-connect',), None),
    'drop_path': (('--drop-path',), None),
    'drop_block': (('--drop-block',), None),
    'bn_momentum': (('--bn-momentum',), None),
    'bn_eps': (('--bn-eps',), None),
    'sync_bn': (('--sync-bn',), False),
    'dist_bn': (('--dist-bn',), 'reduce'),
    'split_bn': (('--split-bn',), False),
    'model_ema': (('--model-ema',), False),
    'model_ema_force_cpu': (('--model-ema-force-cpu',), False),
    'model_ema_decay': (('--model-ema-decay',), 0.9998),
    'model_ema_warmup': (('--model-ema-warmup',), False),
    'seed': (('--seed',), 42),
    'worker_seeding': (('--worker-seeding',), 'all'),
    'log_interval': (('--log-interval',), 50),
    'val_interval': (('--val-interval',), 1),
    'recovery_interval': (('--recovery-interval',), 0),
    'checkpoint_hist': (('--checkpoint-hist',), 10),
    'workers': (('-j', '--workers'), 4),
    'save_images': (('--save-images',), False),
    'pin_mem': (('--pin-mem',), False),
    'no_prefetcher': (('--no-prefetcher',), False),
    'output': (('--output',), ''),
    'experiment': (('--experiment',), ''),
    'eval_metric': (('--eval-metric',), 'top1'),
    'tta': (('--tta',), 0),
    'use_multi_epochs_loader': (('--use-multi-epochs-loader',), False),
    'log_wandb': (('--log-wandb',), False),
    'wandb_project': (('--wandb-project',), None),
    'wandb_tags': (('--wandb-tags',), []),
    'wandb_resume_id': (('--wandb-resume-id',), ''),
    'train_img_sizes': (('--train-img-sizes',), None),
    'train_batch_sizes': (('--train-batch-sizes',), None),
    'train_size_probs': (('--train-size-probs',), None),
    'train_size_schedule': (('--train-size-schedule',), 'constant'),
    'train_size_schedule_spread': (('--train-size-schedule-spread',), 0.65),
    'train_size_random_mix': (('--train-size-random-mix',), 0.1),
    'train_batches_per_epoch': (('--train-batches-per-epoch', '--train-steps-per-epoch'), None),
    'variable_batch_loss_scale': (('--variable-batch-loss-scale',), 'none'),
    'naflex_loader': (('--naflex-loader',), False),
    'naflex_train_seq_lens': (('--naflex-train-seq-lens',), [128, 256, 576, 784, 1024]),
    'naflex_max_seq_len': (('--naflex-max-seq-len',), 576),
    'naflex_patch_sizes': (('--naflex-patch-sizes',), None),
    'naflex_patch_size_probs': (('--naflex-patch-size-probs',), None),
    'naflex_loss_scale': (('--naflex-loss-scale',), 'linear'),
    'naflex_patchify_channels_first': (('--naflex-patchify-channels-first',), False),
    'kd_model_name': (('--kd-model-name',), None),
    'kd_distill_type': (('--kd-distill-type',), 'logit'),
    'kd_loss_type': (('--kd-loss-type',), 'kl'),
    'distill_loss_weight': (('--distill-loss-weight',), None),
    'task_loss_weight': (('--task-loss-weight',), None),
    'kd_temperature': (('--kd-temperature',), 4.0),
    'kd_student_feature_dim': (('--kd-student-feature-dim',), None),
    'kd_teacher_feature_dim': (('--kd-teacher-feature-dim',), None),
    'kd_token_distill_type': (('--kd-token-distill-type',), 'soft'),

}


class ArgumentTable:
    """Declares a script's arguments and keeps each one's ``argparse.Action`` by ``dest``, which ``config_argv`` needs
    to put a ``-c`` config through the same checks as the command line."""

    def __init__(self):
        self.actions: Dict[str, argparse.Action] = {}

    def timm(self, group, dest: str, *aliases: str, **kwargs) -> argparse.Action:
        """Add timm ``train.py``'s argument ``dest`` with timm's option strings and default.

        Args:
            group: The parser or argument group.
            dest: The argument's name in timm's namespace, e.g. ``'batch_size'``.
            *aliases: Extra option strings of this script (e.g. ``'--teacher'`` for ``--kd-model-name``).
            **kwargs: ``add_argument`` keywords (type, help, action, ...); ``default`` overrides timm's.
        """
        options, default = TIMM_TRAIN_ARGS[dest]
        kwargs.setdefault('default', default)
        if options:
            action = group.add_argument(*aliases, *options, dest=dest, **kwargs)
        else:  # the positional data dir
            action = group.add_argument(dest, **kwargs)
        self.actions[dest] = action
        return action

    def own(self, group, *flags: str, **kwargs) -> argparse.Action:
        """Add an argument of this script (not one of timm's)."""
        action = group.add_argument(*flags, **kwargs)
        if action.dest in TIMM_TRAIN_ARGS:
            raise ValueError(f'{flags} reuses the name of timm train.py\'s argument {action.dest!r}')
        self.actions[action.dest] = action
        return action


def _is_off(value) -> bool:
    return value is None or value is False or (not isinstance(value, bool) and value in (0, '', [], {}))


def _tokens(key: str, value, action: argparse.Action) -> List[str]:
    """The command-line tokens that set ``action`` to ``value`` (read from YAML); argparse then applies its type and
    choice checks to them exactly as to a command line."""
    flag = next((o for o in action.option_strings if o.startswith('--')), action.option_strings[0])
    if action.nargs == 0:  # store_true and the like
        if not isinstance(value, bool):
            raise ValueError(f'{key}: expected true or false, got {value!r}')
        if value != action.const:
            raise ValueError(f'{key}: {value!r} cannot be set (the flag {flag} only sets {action.const!r})')
        return [flag]
    if value is None:
        raise ValueError(f'{key}: null is not allowed (the default is {action.default!r}; leave the key out for it)')
    if isinstance(action.default, dict) or isinstance(value, dict):  # KEY=VALUE arguments (--model-kwargs)
        if not (isinstance(action.default, dict) and isinstance(value, dict)):
            raise ValueError(f'{key}: expected {"a mapping" if isinstance(action.default, dict) else "a value"}, '
                             f'got {value!r}')
        return [flag] + [f'{k}={v!r}' for k, v in value.items()]
    values = value if isinstance(value, list) else [value]
    if action.nargs in (None, '?') and isinstance(value, list):
        raise ValueError(f'{key}: expected one value, got the list {value!r}')
    for v in values:
        if isinstance(v, bool) or isinstance(v, (list, dict)) or v is None:
            raise ValueError(f'{key}: {v!r} is not a valid value')
    return [flag] + [str(v) for v in values]


def config_argv(
        cfg: Dict[str, Any], actions: Dict[str, argparse.Action], path: str) -> Tuple[List[str], Dict[str, Any]]:
    """Turn a YAML config (``-c``) into command-line tokens, so it goes through argparse's type and choice checks.

    Keys equal to the argument's default are left out. A key that is not an argument of the script (another timm
    version's setting, or a typo) is ignored with a warning when its value is off (None, False, 0, empty) and is an
    error otherwise. Returns ``(tokens, positional)``: the tokens to parse before the command line (which thus
    overrides the config, as in timm) and the positional arguments' values, to set as defaults.

    Raises:
        ValueError: Naming every key that has no valid command-line form.
    """
    tokens, positional, unknown_off, errors = [], {}, [], []
    for key, value in cfg.items():
        action = actions.get(key)
        if action is None:
            if _is_off(value):
                unknown_off.append(key)
            else:
                errors.append(f'{key}={value!r} is not an argument of this script nor of timm\'s train.py')
            continue
        if value == action.default and type(value) is type(action.default):
            continue
        if not action.option_strings:
            if value is not None and not isinstance(value, str):
                errors.append(f'{key}: expected a path, got {value!r}')
            positional[key] = value
            continue
        try:
            tokens += _tokens(key, value, action)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError(f'config {path}: ' + '; '.join(errors))
    if unknown_off:
        _logger.warning(f'config {path}: ignoring keys that are not arguments of this script nor of timm\'s train.py '
                        f'(all are off): {", ".join(unknown_off)}')
    return tokens, positional


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML mapping of argument names (``dest``) to values, such as an ``args.yaml`` of timm's ``train.py`` or
    of this script."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f'config {path} must be a YAML mapping of argument names to values')
    return cfg
