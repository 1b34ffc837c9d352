"""Every argument of timm's train.py works in ``train_timm_tffd.py``, as it does in timm.

The facts are ``timm_tffd.train_compat.TIMM_TRAIN_ARGS`` (timm's 172 arguments, option strings and defaults) and the
nine example commands of timm's documentation (``hfdocs/source/training_script.mdx``), each run here with ``--tffd
inter,intra`` added and the data dir removed, at tiny scale on the embedded data. The behavioural tests check what an
option does against a computation made here, independently of the script.
"""
import argparse
import contextlib
import math
import os

import pytest
import torch
import torch.nn as nn

from conftest import TINY, load_checkpoint, run_script
from timm_tffd.train_compat import TIMM_TRAIN_ARGS

# A value for each timm argument whose default is None (or an empty list), to give on the command line.
_EXAMPLES = {
    'data_dir': '.', 'train_num_samples': '10', 'val_num_samples': '10', 'input_img_mode': 'RGB', 'input_key': 'img',
    'target_key': 'label', 'pretrained_path': 'w.safetensors', 'num_classes': '10', 'gp': 'avg', 'img_size': '32',
    'in_chans': '1', 'input_size': ['1', '32', '32'], 'crop_pct': '0.9', 'mean': ['0.5'], 'std': ['0.5'],
    'validation_batch_size': '8', 'head_init_scale': '0.1', 'head_init_bias': '0', 'torchcompile_mode': 'default',
    'torchcompile': 'inductor', 'model_dtype': 'bfloat16', 'device_modules': ['os'], 'opt_eps': '1e-8',
    'opt_betas': ['0.9', '0.99'], 'clip_grad': '1.0', 'layer_decay': '0.7', 'layer_decay_no_opt_scale': '0.01',
    'lr': '0.1', 'lr_noise': ['0.4', '0.9'], 'start_epoch': '1', 'train_crop_mode': 'rrc', 'color_jitter_prob': '0.5',
    'grayscale_prob': '0.1', 'gaussian_blur_prob': '0.1', 'aa': 'rand-m9-mstd0.5', 'bce_target_thresh': '0.2',
    'bce_pos_weight': '2', 'cutmix_minmax': ['0.2', '0.8'], 'drop_connect': '0.1', 'drop_path': '0.1',
    'drop_block': '0.1', 'bn_momentum': '0.01', 'bn_eps': '1e-3', 'wandb_project': 'p', 'wandb_tags': ['a', 'b'],
    'train_img_sizes': ['32', '48'], 'train_batch_sizes': ['16', '8'], 'train_size_probs': ['0.5', '0.5'],
    'train_batches_per_epoch': '4', 'naflex_patch_sizes': ['8', '16'], 'naflex_patch_size_probs': ['0.5', '0.5'],
    'kd_model_name': 'resnet18', 'distill_loss_weight': '0.5', 'task_loss_weight': '0.5',
    'kd_student_feature_dim': '64', 'kd_teacher_feature_dim': '64', 'data': '.',
}


def _parser():
    import train_timm_tffd
    return train_timm_tffd._build_parsers()


@pytest.mark.parametrize('dest', list(TIMM_TRAIN_ARGS))
def test_every_timm_train_argument_is_accepted(dest):
    """timm's option strings, timm's default (but -j and --device), and a value on the command line is taken."""
    _, parser, table = _parser()
    options, default = TIMM_TRAIN_ARGS[dest]
    action = table.actions[dest]
    assert set(options) <= set(action.option_strings)
    if dest not in ('device', 'workers'):
        assert parser.get_default(dest) == default
    if isinstance(default, bool):
        tokens = [options[0]]
    elif dest in _EXAMPLES or default is None or default == []:
        value = _EXAMPLES[dest]
        tokens = [*options[:1], *(value if isinstance(value, list) else [value])]
    elif isinstance(default, dict):
        tokens = [options[0], 'a=1']
    elif isinstance(default, list):
        tokens = [options[0], *map(str, default)]
    else:
        tokens = [options[0], str(default)]
    args = parser.parse_args(tokens)
    value = getattr(args, dest)
    if isinstance(default, bool):
        assert value is True
    elif isinstance(default, dict):
        assert value == {'a': 1}
    else:
        assert value is not None and value != [] and value == parser.parse_args(tokens[:1] + tokens[1:]).__dict__[dest]


def test_timm_abbreviations_resolve_as_in_timm():
    """argparse takes unique prefixes; those in timm's documentation (--jsd, --dr) and --smooth must still work.
    The prefixes this script's own flags make ambiguous are listed: they may only shrink."""
    _, parser, table = _parser()
    args = parser.parse_args(['--jsd', '--dr', '0.5', '--smooth', '0.2', '--aug-splits', '3'])
    assert (args.jsd_loss, args.decay_rate, args.smoothing) == (True, 0.5, 0.2)
    timm = {o: d for d, (opts, _) in TIMM_TRAIN_ARGS.items() for o in opts if o.startswith('--')}
    ours = {o: a.dest for a in table.actions.values() for o in a.option_strings if o.startswith('--')}
    ambiguous = set()
    for option in timm:
        for n in range(3, len(option)):
            prefix = option[:n]
            if prefix in timm or prefix in ours or len({d for o, d in timm.items() if o.startswith(prefix)}) != 1:
                continue
            if len({d for o, d in ours.items() if o.startswith(prefix)}) != 1:
                ambiguous.add(prefix)
    assert ambiguous <= {'--pa', '--se', '--sm', '--smo', '--smoo', '--smoot', '--smoothi', '--smoothin'}, ambiguous


# timm's documented example commands (hfdocs/source/training_script.mdx, timm commit aa4b585), data dir removed
DOC_COMMANDS = {
    'seresnet34': '--model seresnet34 --sched cosine --epochs 150 --warmup-epochs 5 --lr 0.4 --reprob 0.5 '
                  '--remode pixel --batch-size 256 --amp -j 4',
    'efficientnet_b2': '--model efficientnet_b2 -b 128 --sched step --epochs 450 --decay-epochs 2.4 --decay-rate .97 '
                       '--opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.3 '
                       '--drop-path 0.2 --model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5 --remode pixel '
                       '--reprob 0.2 --amp --lr .016',
    'mixnet_xl': '--model mixnet_xl -b 128 --sched step --epochs 450 --decay-epochs 2.4 --decay-rate .969 '
                 '--opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.3 --drop-path 0.2 '
                 '--model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5 --remode pixel --reprob 0.3 --amp '
                 '--lr .016 --dist-bn reduce',
    'seresnext26t': '--model seresnext26t_32x4d --lr 0.1 --warmup-epochs 5 --epochs 160 --weight-decay 1e-4 '
                    '--sched cosine --reprob 0.4 --remode pixel -b 112',
    'efficientnet_b0': '--model efficientnet_b0 -b 384 --sched step --epochs 450 --decay-epochs 2.4 --decay-rate .97 '
                       '--opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.2 '
                       '--drop-path 0.2 --model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5 --remode pixel '
                       '--reprob 0.2 --amp --lr .048',
    'resnet50_augmix_jsd': '-b 64 --model resnet50 --sched cosine --epochs 200 --lr 0.05 --amp --remode pixel '
                           '--reprob 0.6 --aug-splits 3 --aa rand-m9-mstd0.5-inc1 --resplit --split-bn --jsd '
                           '--dist-bn reduce',
    'efficientnet_es': '--model efficientnet_es -b 128 --sched step --epochs 450 --decay-epochs 2.4 --decay-rate .97 '
                       '--opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.2 '
                       '--drop-path 0.2  --aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --amp --lr .064',
    'mobilenetv3_large_100': '--model mobilenetv3_large_100 -b 512 --sched step --epochs 600 --decay-epochs 2.4 '
                             '--decay-rate .973 --opt rmsproptf --opt-eps .001 -j 7 --warmup-lr 1e-6 '
                             '--weight-decay 1e-5 --drop 0.2 --drop-path 0.2 --model-ema --model-ema-decay 0.9999 '
                             '--aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --amp --lr .064 --lr-noise 0.42 0.9',
    'resnext50': '--model resnext50_32x4d --lr 0.6 --warmup-epochs 5 --epochs 240 --weight-decay 1e-4 --sched cosine '
                 '--reprob 0.4 --recount 3 --remode pixel --aa rand-m7-mstd0.5-inc1 -b 192 -j 6 --amp '
                 '--dist-bn reduce',
}
_SMALL = ['-b', '8', '-j', '0', '--epochs', '1', '--max-train-samples', '8', '--max-val-samples', '8',
          '--log-interval', '1']


@pytest.mark.parametrize('name', list(DOC_COMMANDS))
def test_timm_documented_commands_run_with_tffd(run_train, name):
    run = run_train(*DOC_COMMANDS[name].split(), '--tffd', 'inter,intra', *_SMALL, '--experiment', name)
    train = run.results[-1]['train']
    assert all(math.isfinite(v) for v in train.values()) and train['tffd_inter'] > 0 and train['tffd_intra'] > 0
    assert os.path.isfile(os.path.join(run.output_dir, 'last.pth.tar'))


def test_augmix_jsd_split_bn_with_tffd(run_train):
    """--aug-splits 3: each batch is 3 views of 8 images; the JSD loss, split BN layers and Tf-FD on all 24."""
    from timm.data import AugMixDataset
    from timm.layers import SplitBatchNorm2d
    from timm.loss import JsdCrossEntropy
    import train_timm_tffd
    seen = {}
    real = train_timm_tffd._create_loaders

    def spy(*args, **kwargs):
        loaders = real(*args, **kwargs)
        seen['dataset'] = loaders[0].dataset
        return loaders
    train_timm_tffd._create_loaders = spy
    try:
        run = run_train(*DOC_COMMANDS['resnet50_augmix_jsd'].split(), '--model', 'test_resnet', '--tffd',
                        'inter,intra', *_SMALL, '--experiment', 'augmix')
    finally:
        train_timm_tffd._create_loaders = real
    assert isinstance(seen['dataset'], AugMixDataset) and seen['dataset'].num_splits == 3
    assert isinstance(run.task.criterion, JsdCrossEntropy)
    assert any(isinstance(m, SplitBatchNorm2d) for m in run.task.get_trainable_module().modules())


def test_rand_augment_posterize_to_zero_bits():
    """timm's '-inc1' RandAugment policies posterize to 0 bits at magnitude 10 (reached with mstd noise): the pinned
    Pillow must take it (Pillow 13 raises, which would stop timm's documented AugMix recipe mid-epoch)."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    op = AugmentOp('PosterizeIncreasing', prob=1., magnitude=10)
    out = op(Image.new('L', (8, 8), color=200))
    assert max(out.getdata()) == 0  # no bit kept: black


def _clip_setup(mode, value):
    import train_timm_tffd
    from timm.task import ClassificationTask
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    args = argparse.Namespace(clip_grad=value, clip_mode=mode)
    loop = train_timm_tffd._Loop(args, torch.device('cpu'), None, None)
    x, y = torch.randn(4, 6) * 10, torch.tensor([0, 1, 2, 0])
    reference = [g.clone() for g in torch.autograd.grad(task(x, y)['loss'], list(model.parameters()))]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.)  # lr 0: the step leaves the gradients to inspect
    train_timm_tffd._backward(task, task(x, y)['loss'], optimizer, loop, need_update=True, second_order=False)
    return reference, [p.grad for p in model.parameters()]


def test_clip_grad_norm_value_and_agc():
    raw, clipped = _clip_setup('norm', 0.5)
    raw_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    assert raw_norm > 1
    for r, c in zip(raw, clipped):  # every gradient scaled by the same factor 0.5 / total norm
        torch.testing.assert_close(c, r * (0.5 / raw_norm), rtol=1e-5, atol=1e-7)
    raw, clipped = _clip_setup('value', 0.01)
    for r, c in zip(raw, clipped):
        torch.testing.assert_close(c, r.clamp(-0.01, 0.01))
    raw, clipped = _clip_setup('agc', 0.01)
    assert all(torch.equal(r, c) for r, c in zip(raw[-2:], clipped[-2:]))  # agc leaves the classifier alone
    assert any(not torch.equal(r, c) for r, c in zip(raw[:-2], clipped[:-2]))


class _Loader(list):
    """Fixed batches, like a loader without a sampler."""


def test_grad_accumulation_equals_one_large_batch():
    """5 batches of 2 with --grad-accum-steps 2 give 3 updates: batches (0,1), (2,3) and (4,) alone; on a BN-free
    model each update equals an SGD step on the concatenated batch, computed here by hand."""
    import train_timm_tffd
    from timm.task import ClassificationTask
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    batches = _Loader((torch.randn(2, 6), torch.randint(0, 3, (2,))) for _ in range(5))
    args = argparse.Namespace(grad_accum_steps=2, prefetcher=True, channels_last=False, clip_grad=None,
                              distributed=False, world_size=1, log_interval=1, rank=0, naflex_loader=False,
                              train_img_sizes=None, synchronize_step=False, save_images=False, recovery_interval=0,
                              mixup_off_epoch=0)
    loop = train_timm_tffd._Loop(args, torch.device('cpu'), contextlib.nullcontext, None)
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    class Schedule:
        updates = []

        def step_update(self, num_updates, metric=None):
            self.updates.append(num_updates)
    schedule = Schedule()
    train_timm_tffd.train_one_epoch(3, task, batches, optimizer, schedule, loop)
    assert schedule.updates == [10, 11, 12]  # epoch 3 of 3 updates each: updates 9..11 done -> 10, 11, 12

    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for group in ((0, 1), (2, 3), (4,)):
        x = torch.cat([batches[i][0] for i in group])
        y = torch.cat([batches[i][1] for i in group])
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_layer_decay_groups_match_timm(run_train):
    """--layer-decay on a Tf-FD run: the optimizer's groups are timm's for the plain model."""
    import timm
    from timm.optim import create_optimizer_v2
    run = run_train(*TINY, '--epochs', '1', '--tffd', 'inter,intra', '--opt', 'adamw', '--layer-decay', '0.6',
                    '--layer-decay-min-scale', '0.1', '--weight-decay', '0.05', '--lr', '0.01', '--experiment', 'ld')
    saved = load_checkpoint(os.path.join(run.output_dir, 'last.pth.tar'))['optimizer']['param_groups']
    plain = timm.create_model('test_resnet', in_chans=1, num_classes=10)
    expected = create_optimizer_v2(plain, 'adamw', lr=0.01, weight_decay=0.05, layer_decay=0.6,
                                   layer_decay_min_scale=0.1).param_groups
    assert len(saved) == len(expected) > 2
    assert sorted((g['lr_scale'], g['weight_decay'], len(g['params'])) for g in saved) == sorted(
        (g['lr_scale'], g['weight_decay'], len(g['params'])) for g in expected)
    assert len({g['lr_scale'] for g in saved}) > 2


def test_mixup_off_epoch_and_no_prefetcher(run_train):
    """Mixup is on before --mixup-off-epoch and off from it on, with timm's prefetcher (FastCollateMixup) and with
    --no-prefetcher (Mixup in the loop)."""
    import train_timm_tffd
    states = []
    real = train_timm_tffd._train_steps

    def spy(epoch, task, loader, optimizer, lr_scheduler, loop, meter, bar):
        mixer = loop.mixup_fn if loop.mixup_fn is not None else loader
        states.append((type(mixer).__name__, mixer.mixup_enabled))
        return real(epoch, task, loader, optimizer, lr_scheduler, loop, meter, bar)
    train_timm_tffd._train_steps = spy
    try:
        for extra in ([], ['--no-prefetcher']):
            run_train(*TINY, '--epochs', '3', '--mixup', '0.5', '--mixup-off-epoch', '2', *extra,
                      '--experiment', f'mix{len(extra)}')
    finally:
        train_timm_tffd._train_steps = real
    assert states == [('PrefetchLoader', True)] * 2 + [('PrefetchLoader', False)] + [('Mixup', True)] * 2 + [
        ('Mixup', False)]


def test_pretrained_path_head_init_and_grad_checkpointing(run_train, tmp_path):
    """--pretrained-path loads the file's backbone weights (classifier re-initialized, as timm adapts it);
    --head-init-scale / --head-init-bias set the new classifier; --grad-checkpointing trains with Tf-FD."""
    import timm
    from safetensors.torch import save_file
    source = timm.create_model('test_resnet', in_chans=1, num_classes=5)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.)
    path = tmp_path / 'w.safetensors'
    save_file(source.state_dict(), str(path))
    run = run_train(*TINY, '--epochs', '1', '--lr', '1e-12', '--pretrained', '--pretrained-path', path,
                    '--head-init-scale', '0', '--head-init-bias', '0.25', '--grad-checkpointing', '--tffd',
                    'inter,intra', '--experiment', 'pre')
    model = run.task.get_trainable_module()
    trained, loaded = model.state_dict(), source.state_dict()
    backbone = [k for k in loaded if k.endswith('weight') and not k.startswith('fc.') and 'bn' not in k]
    assert len(backbone) > 3
    for k in backbone:  # lr 1e-12: the loaded weights, untouched
        torch.testing.assert_close(trained[k], loaded[k], rtol=0, atol=1e-6)
    head = model.get_classifier()
    assert head.out_features == 10
    torch.testing.assert_close(head.weight, torch.zeros_like(head.weight), rtol=0, atol=1e-6)
    torch.testing.assert_close(head.bias, torch.full_like(head.bias, 0.25), rtol=0, atol=1e-6)
    assert model.grad_checkpointing


@pytest.mark.parametrize('preact', [False, True])
def test_grad_checkpointing_gives_the_same_tffd_terms(preact):
    import timm
    from timm_tffd import TfFDLoss, wrap
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = wrap(timm.create_model('test_resnet', num_classes=10), 'inter,intra', preact=preact, warmup_epochs=0)
        model.set_grad_checkpointing(checkpointing)
        loss_fn = TfFDLoss(nn.CrossEntropyLoss(), model)
        x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3, 4])
        output = model(x)
        terms = loss_fn.regularization(output)
        loss = nn.functional.cross_entropy(output, y) + terms['tffd']
        loss.backward()
        results.append((terms, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    assert a['tffd'].requires_grad and b['tffd'].requires_grad
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_val_interval_eval_metric_recovery_and_images(run_train):
    run = run_train(*TINY, '--epochs', '3', '--val-interval', '2', '--eval-metric', 'loss', '--recovery-interval',
                    '1', '--save-images', '--experiment', 'vi')
    rows = open(os.path.join(run.output_dir, 'summary.csv')).read().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['1', '2']  # validated after epoch 1 (of 2) and the last
    assert [r['validation'] is None for r in run.results] == [True, False, False]
    files = os.listdir(run.output_dir)
    assert any(f.startswith('recovery-') for f in files) and any(f.startswith('train-batch-') for f in files)
    best = load_checkpoint(os.path.join(run.output_dir, 'model_best.pth.tar'))
    losses = {r['epoch']: r['validation']['loss'] for r in run.results if r['validation']}
    assert best['epoch'] == min(losses, key=losses.get)  # the lowest validation loss is best


def test_variable_resolution_batches_with_tffd(run_train):
    run = run_train(*TINY, '--epochs', '1', '--train-img-sizes', '32', '48', '--train-batch-sizes', '16', '8',
                    '--variable-batch-loss-scale', 'linear', '--tffd', 'inter,intra', '--experiment', 'vr')
    assert math.isfinite(run.results[0]['train']['tffd_inter'])


_RUNTIME = [
    ['--model-dtype', 'bfloat16', '--tffd', 'inter,intra'],
    ['--torchscript'],
    ['--fast-norm', '--model', 'test_vit', '--model-kwargs', 'img_size=32'],
    ['--start-epoch', '1'],
    ['--device-modules', 'json', '--model-ema', '--model-ema-force-cpu', '--synchronize-step', '--no-ddp-bb',
     '--log-wandb', '--wandb-tags', 'a', '--fuser', 'te', '--drop-connect', '0.1', '--epoch-repeats', '2'],
    ['--aa', 'rand-m9-mstd0.5', '--train-interpolation', 'bicubic', '--crop-pct', '0.9', '-vb', '16', '--pin-mem',
     '--use-multi-epochs-loader', '-j', '1'],
]


@pytest.mark.parametrize('extra', _RUNTIME)
def test_runtime_options_train(run_train, extra):
    run = run_train(*TINY, *extra, '--experiment', 'rt')
    assert run.results and all(math.isfinite(v) for v in run.results[-1]['train'].values())
    if '--start-epoch' in extra:
        assert [r['epoch'] for r in run.results] == [1]


@pytest.mark.parametrize('tffd', [[], ['--tffd', 'inter,intra']])
@pytest.mark.parametrize('kind', ['feature', 'token'])
def test_timm_feature_and_token_distillation(run_train, tmp_path, kind, tffd):
    import timm
    from safetensors.torch import save_file
    if kind == 'feature':
        student, teacher, extra = 'test_resnet', 'test_resnet', []
    else:
        student, teacher, extra = 'deit_tiny_distilled_patch16_224', 'test_resnet', [
            '--model-kwargs', 'img_size=32', 'depth=2']
    weights = tmp_path / 't.safetensors'
    save_file(timm.create_model(teacher, in_chans=1, num_classes=10).state_dict(), str(weights))
    run = run_train(*TINY, '--epochs', '1', '--model', student, *extra, '--teacher', teacher,
                    '--teacher-checkpoint', weights, '--kd-distill-type', kind, *tffd, '--experiment', kind)
    name = {'feature': 'FeatureDistillationTask', 'token': 'TokenDistillationTask'}[kind]
    assert type(run.task).__name__ == ('TfFD' if tffd else '') + name
    train = run.results[0]['train']
    assert math.isfinite(train['loss']) and (train['tffd_inter'] > 0 if tffd else 'tffd' not in train)


def test_naflex_loader(run_train):
    run = run_train(*TINY, '--epochs', '1', '--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=32',
                    'depth=1', 'num_heads=2', '--naflex-loader', '--naflex-train-seq-lens', '16', '32',
                    '--naflex-max-seq-len', '16', '--in-chans', '3', '--input-img-mode', 'RGB', '--mean', '0.5', '0.5',
                    '0.5', '--std', '0.5', '0.5', '0.5', '--experiment', 'naflex')
    assert math.isfinite(run.results[0]['train']['loss']) and run.results[0]['validation']['top1'] >= 0


def test_aug_repeats_needs_distributed_training(run_train):
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, '--aug-repeats', '3', '--experiment', 'ra')
    assert 'distributed' in str(e.value.code)


_DDP_ACCUMULATE = '''
import os, sys
import torch
import timm.task
import train_timm_tffd

calls = []
real_no_sync = timm.task.TrainingTask.no_sync
timm.task.TrainingTask.no_sync = lambda self: calls.append(1) or real_no_sync(self)
real_loaders = train_timm_tffd._create_loaders
samplers = []
def spy(*a, **k):
    loaders = real_loaders(*a, **k)
    samplers.append(type(loaders[0].sampler).__name__)
    return loaders
train_timm_tffd._create_loaders = spy
out, argv = sys.argv[1], sys.argv[2:]
run = train_timm_tffd.main(argv)
module = run.task.get_trainable_module()
torch.save({'model': module.state_dict(), 'no_sync': torch.tensor(len(calls)), 'sampler': samplers[0],
            'returned': type(module).__name__}, os.path.join(out, f'rank{os.environ["RANK"]}.pt'))
'''


@pytest.mark.slow
def test_ddp_grad_accumulation_and_repeated_augmentation(run_train, tmp_path):
    """torchrun, 2 ranks x batch 4 x 2 accumulation steps against 1 process with batch 16, on a LayerNorm model
    with inter-layer Tf-FD (a batch mean): equal weights; DDP skips the gradient sync on the first micro-batch of
    each update. Then --aug-repeats on 2 ranks uses timm's RepeatAugSampler. The task returned to each rank is
    unwrapped from DDP (its process group is gone). Every rank's output is teed into the launcher's (``--tee 3``), so a
    failure shows both ranks."""
    common = ['--model', 'test_convnext', '--no-aug', '--max-train-samples', '16', '--max-val-samples', '16',
              '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.1', '-j', '0', '--tffd', 'inter',
              '--tffd-warmup-epochs', '0', '--log-interval', '1', '--seed', '3']
    script = tmp_path / 'ddp_run.py'
    script.write_text(_DDP_ACCUMULATE)
    proc = run_script('-m torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--tee', '3', script,
                      tmp_path, '--output', tmp_path / 'out', *common, '-b', '4', '--grad-accum-steps', '2',
                      '--experiment', 'ddp')
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert int(rank0['no_sync']) == 2  # 2 batches per epoch and rank: 1 unsynced micro-batch per update, 2 epochs
    assert rank0['returned'] == rank1['returned'] == 'ConvNeXt'  # the timm model itself, no longer inside DDP
    one = run_train(*common, '-b', '16', '--experiment', 'one')
    state = one.task.get_trainable_module().state_dict()
    for k, v in state.items():
        torch.testing.assert_close(rank0['model'][k], v, rtol=1e-4, atol=1e-5)

    proc = run_script('-m torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--tee', '3', script,
                      tmp_path, '--output', tmp_path / 'out', *common, '-b', '4', '--aug-repeats', '3',
                      '--experiment', 'ra')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / 'rank0.pt', weights_only=True)['sampler'] == 'RepeatAugSampler'


def test_timm_args_yaml_loads_unchanged(tmp_path, caplog):
    """An args.yaml as timm's train.py writes it (every argument; here at timm's defaults, with a data dir and a few
    changed values) loads without a warning and gives those values."""
    import yaml
    import train_timm_tffd
    cfg = {dest: default for dest, (_, default) in TIMM_TRAIN_ARGS.items()}
    cfg.update(data=str(tmp_path), model='test_resnet', lr=0.05, clip_grad=1.0, aug_repeats=3, remode='const',
               lr_noise=[0.4, 0.9], model_kwargs={'zero_init_last': False}, device='cpu')
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(cfg))
    caplog.set_level('WARNING')
    args, _ = train_timm_tffd.parse_args(['-c', str(path)])
    assert not [r for r in caplog.records if r.levelname == 'WARNING']
    for key in ('data', 'model', 'lr', 'clip_grad', 'aug_repeats', 'remode', 'lr_noise', 'model_kwargs', 'workers'):
        assert getattr(args, key) == cfg[key], key
