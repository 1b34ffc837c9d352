"""Tests of ``train_timm_tffd.py`` on the embedded Fashion-MNIST subset: tiny models, few samples, CPU.

Golden values (loss composition, lr schedule, EMA, resume and DDP equivalence) are computed here from their
definitions, never by calling the code under test.
"""
import csv
import math
import os
import signal
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
import yaml

from conftest import TINY, load_checkpoint, run_script


def read_summary(path):
    with open(os.path.join(path, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def tffd_weight(epoch, warmup_epochs, decay_start, decay_end):
    """The reference code's linear warm-up, min(1, epoch / warmup) with epochs counted from 1, times the early decay:
    1 until decay_start, falling linearly to 0 at decay_end."""
    warmup = min(1.0, (epoch + 1) / warmup_epochs)
    return warmup * min(1.0, max(0.0, (decay_end - epoch) / (decay_end - decay_start)))


def test_tffd_train_eval(run_train, tmp_path):
    run = run_train(*TINY, '--tffd', 'inter,intra', '--tffd-inter-weight', '0.5', '--tffd-intra-weight', '0.25',
                    '--tffd-warmup-epochs', '4', '--tffd-early-decay', '0', '4', '--tffd-stages', '2', '3', '4',
                    '--experiment', 'tffd')
    out = run.output_dir
    assert sorted(os.listdir(out)) == ['args.yaml', 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar',
                                       'model_best.pth.tar', 'summary.csv']
    rows = read_summary(out)
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_base_loss', 'train_tffd', 'train_tffd_inter',
                             'train_tffd_intra', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    base_lr = 0.1 * 32 / 256  # timm: lr_base * global batch / lr_base_size
    for epoch, row in enumerate(rows):
        r = {k: float(v) for k, v in row.items()}
        assert r['epoch'] == epoch
        # Every batch's loss is base + w(epoch) * sum(lambda * term), so the epoch means obey the same identity.
        expected = r['train_base_loss'] + tffd_weight(epoch, 4, 0, 4) * (
            0.5 * r['train_tffd_inter'] + 0.25 * r['train_tffd_intra'])
        assert r['train_loss'] == pytest.approx(expected, rel=1e-5)
        assert r['train_loss'] == pytest.approx(r['train_base_loss'] + r['train_tffd'], rel=1e-5)
        assert r['train_tffd_inter'] > 0 and r['train_tffd_intra'] > 0
        assert 0 <= r['eval_top1'] <= r['eval_top5'] <= 100
        # cosine over 2 epochs without warmup: the lr of epoch e is base * (1 + cos(pi * e / 2)) / 2
        assert r['lr'] == pytest.approx(base_lr * (1 + math.cos(math.pi * epoch / 2)) / 2)

    saved = yaml.safe_load(open(os.path.join(out, 'args.yaml')))
    assert saved['tffd'] == 'inter,intra' and saved['tffd_inter_weight'] == 0.5 and saved['tffd_intra_weight'] == 0.25
    for key in ('tffd_warmup_epochs', 'tffd_early_decay', 'tffd_stages', 'tffd_saliency', 'tffd_pairs',
                'tffd_preact'):
        assert key in saved
    ckpt = load_checkpoint(os.path.join(out, 'last.pth.tar'))
    assert ckpt['epoch'] == 1 and ckpt['metric'] == float(rows[1]['eval_top1'])
    plain = timm.create_model('test_resnet', in_chans=1, num_classes=10)
    assert list(ckpt['state_dict']) == list(plain.state_dict())  # a plain timm model, loadable without timm_tffd
    plain.load_state_dict(ckpt['state_dict'])
    config = ckpt['task_state']['tffd']['config']
    assert config['methods'] == ['inter', 'intra'] and config['stages'] == [2, 3, 4] and config['decay'] == [0, 4]
    assert config['weights'] == {'inter': 0.5, 'intra': 0.25} and config['warmup_epochs'] == 4
    assert ckpt['task_state']['tffd']['epoch'] == 1


def _save_initial(tmp_path, model_name, **kwargs):
    """Random initial weights for ``--initial-checkpoint``, drawn here with their own seed."""
    torch.manual_seed(123)
    model = timm.create_model(model_name, in_chans=1, num_classes=10, **kwargs)
    path = tmp_path / f'{model_name}-init.pth'
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_model_ema(run_train, tmp_path):
    # One step per epoch. timm's ModelEmaV3 copies the weights on its first update (decay 0 at step 1) and then
    # follows ema = d * ema + (1 - d) * weights, so after epoch 1: ema = d * weights_after_epoch0 + (1 - d) * weights.
    init, init_state = _save_initial(tmp_path, 'test_resnet')
    run = run_train(*TINY, '--max-train-samples', '32', '--model-ema', '--model-ema-decay', '0.75',
                    '--initial-checkpoint', init, '--tffd', 'inter,intra', '--experiment', 'ema')
    first = load_checkpoint(os.path.join(run.output_dir, 'checkpoint-0.pth.tar'))
    last = load_checkpoint(os.path.join(run.output_dir, 'last.pth.tar'))
    params = [n for n, _ in timm.create_model('test_resnet', in_chans=1, num_classes=10).named_parameters()]
    for name in params:
        assert torch.equal(first['state_dict_ema'][name], first['state_dict'][name])
        expected = 0.75 * first['state_dict'][name] + 0.25 * last['state_dict'][name]
        torch.testing.assert_close(last['state_dict_ema'][name], expected, rtol=1e-5, atol=1e-6)
    # one small step away from the given initial weights
    moved = [n for n in params if not torch.equal(first['state_dict'][n], init_state[n])]
    assert len(moved) > len(params) // 2
    assert all(torch.allclose(first['state_dict'][n], init_state[n], atol=0.05) for n in params)
    # the summary reports the EMA model's evaluation, as timm's train.py does
    assert last['metric'] == float(read_summary(run.output_dir)[1]['eval_top1'])


def test_yaml_config(run_train, tmp_path, caplog):
    # A timm-style args.yaml: supported keys, unsupported ones at timm's defaults, a key of an older timm that is
    # off, and a command-line flag that overrides the file.
    config = tmp_path / 'args.yaml'
    config.write_text(textwrap.dedent('''\
        model: test_resnet
        batch_size: 32
        epochs: 3
        warmup_epochs: 0
        workers: 0
        smoothing: 0.0
        tffd: inter
        tffd_pairs: adjacent
        opt: adamw
        weight_decay: 0.05
        max_train_samples: 64
        max_val_samples: 32
        vflip: 0.0
        clip_grad: null
        color_jitter_prob: null
        apex_amp: false
        '''))
    run = run_train('-c', config, '--epochs', '1', '--experiment', 'cfg')
    saved = yaml.safe_load(open(os.path.join(run.output_dir, 'args.yaml')))
    assert (saved['model'], saved['epochs'], saved['tffd'], saved['tffd_pairs'], saved['smoothing']) == (
        'test_resnet', 1, 'inter', 'adjacent', 0.0)
    assert len(read_summary(run.output_dir)) == 1
    assert run.task.tffd_loss.config.options['pairs'] == 'adjacent'
    groups = load_checkpoint(os.path.join(run.output_dir, 'last.pth.tar'))['optimizer']['param_groups']
    assert all('betas' in g for g in groups) and sorted({g['weight_decay'] for g in groups}) == [0.0, 0.05]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING' and 'config' in r.getMessage()]
    assert len(warnings) == 1 and 'apex_amp' in warnings[0] and 'vflip' not in warnings[0], warnings
    # the run's own args.yaml reproduces it
    import train_timm_tffd
    caplog.clear()
    _, again = train_timm_tffd.parse_args(['-c', os.path.join(run.output_dir, 'args.yaml')])
    assert yaml.safe_load(again) == saved
    assert not [r for r in caplog.records if r.levelname == 'WARNING']  # the script's own args.yaml: no warning


@pytest.mark.parametrize('line, message', [
    ('no_such_setting: 3', 'no_such_setting=3 is not an argument'),  # unknown and not off
    ('lr: true', 'lr: True is not a valid value'),  # would be lr 1.0 if set as a default
    ('epochs: 2.5', "argument --epochs: invalid int value: '2.5'"),
    ('lr: [0.1]', 'lr: expected one value'),
    ('dataset: null', 'dataset: null is not allowed'),
    ('tffd_stages: [one]', "argument --tffd-stages: invalid int value: 'one'"),
    ('clip_mode: clip', "argument --clip-mode: invalid choice: 'clip'"),
    ('amp: 1', 'amp: expected true or false'),
    ('model_kwargs: [1, 2]', 'model_kwargs: expected a mapping'),
])
def test_yaml_config_goes_through_the_command_line_checks(tmp_path, capsys, line, message):
    import train_timm_tffd
    config = tmp_path / 'bad.yaml'
    config.write_text(f'model: test_resnet\n{line}\n')
    with pytest.raises(SystemExit) as e:
        train_timm_tffd.parse_args(['-c', str(config)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f'config {config}' in err and message in err, err


def test_command_line_overrides_config_values(tmp_path):
    import train_timm_tffd
    config = tmp_path / 'c.yaml'
    config.write_text(f'lr: 0.5\nscale: [0.5, 1.0]\nmodel_kwargs: {{img_size: 32, global_pool: avg}}\namp: true\n'
                      f'data: {tmp_path}\n')
    args, _ = train_timm_tffd.parse_args(['-c', str(config), '--lr', '0.25', '--epochs', '3'])
    assert (args.lr, args.epochs, args.scale, args.amp, args.data) == (0.25, 3, [0.5, 1.0], True, str(tmp_path))
    assert args.model_kwargs == {'img_size': 32, 'global_pool': 'avg'}


class _Terminal:
    """A stdout that says it is a terminal and keeps what is written."""

    def __init__(self):
        self.text = ''

    def write(self, s):
        self.text += s
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_amp_bf16_cpu_and_progress_bar(run_train, monkeypatch):
    seen = []
    autocast = torch.autocast

    class RecordingAutocast(autocast):
        def __init__(self, device_type, dtype=None, **kwargs):
            seen.append((device_type, dtype))
            super().__init__(device_type, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, 'autocast', RecordingAutocast)
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stdout', terminal)
    run = run_train(*TINY, '--epochs', '1', '--amp', '--tffd', 'inter,intra', '--experiment', 'amp')
    assert seen and set(seen) == {('cpu', torch.bfloat16)}
    row = read_summary(run.output_dir)[0]
    assert all(math.isfinite(float(row[k])) for k in ('train_loss', 'train_tffd_inter', 'train_tffd_intra'))
    assert 'Train 0' in terminal.text and 'tffd_inter=' in terminal.text and 'tffd_intra=' in terminal.text


def test_log_wandb(run_train, monkeypatch):
    logged = []

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            logged.append(('init', kwargs['name']))

        @staticmethod
        def log(row):
            logged.append(('log', dict(row)))

    import timm.utils.summary
    monkeypatch.setitem(sys.modules, 'wandb', FakeWandb)
    monkeypatch.setattr(timm.utils.summary, 'wandb', FakeWandb, raising=False)
    # with the regularization and layout flags, which only pass through to timm
    run = run_train(*TINY, '--epochs', '1', '--tffd', 'intra', '--log-wandb', '--channels-last', '--aa',
                    'rand-m9-mstd0.5', '--cutmix', '1.0', '--smoothing', '0.2', '--drop', '0.1', '--drop-path', '0.05',
                    '--drop-block', '0.05', '--experiment', 'wb')
    assert logged[0] == ('init', 'wb')
    assert logged[1][0] == 'log' and {'train_loss', 'train_tffd_intra', 'eval_top1'} <= set(logged[1][1])
    model = run.task.get_trainable_module()
    assert model.drop_rate == 0.1 and model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert type(run.task.criterion).__name__ == 'SoftTargetCrossEntropy'  # cutmix targets


def test_atomic_checkpoint_saver(tmp_path, monkeypatch):
    import shutil
    from timm_tffd.checkpoint import AtomicCheckpointSaver
    model = torch.nn.Linear(4, 2)
    saver = AtomicCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                                  recovery_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(0, metric=1.0)

    def snapshot():
        return {f: (tmp_path / f).read_bytes() for f in sorted(os.listdir(tmp_path))}
    before = snapshot()
    assert sorted(before) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']

    def fail_midway(obj, f, *args, **kwargs):
        with open(f, 'wb') as fh:
            fh.write(b'half')
        raise OSError('disk full')
    with monkeypatch.context() as m:  # the state write fails
        m.setattr(torch, 'save', fail_midway)
        with pytest.raises(OSError):
            saver.save_checkpoint(1, metric=2.0)
    assert snapshot() == before

    saver.can_hardlink = False  # copying last.pth.tar to checkpoint-1.pth.tar fails half-way
    monkeypatch.setattr(shutil, 'copy2', lambda src, dst: fail_midway(None, dst))
    with pytest.raises(OSError):
        saver.save_checkpoint(1, metric=2.0)
    after = snapshot()
    assert sorted(after) == sorted(before)  # no truncated checkpoint-1.pth.tar, no scratch file
    assert after['model_best.pth.tar'] == before['model_best.pth.tar']
    assert load_checkpoint(tmp_path / 'last.pth.tar')['epoch'] == 1  # last was complete before the copy began


_KILL_DURING_SECOND_SAVE = '''
import os, signal, sys
import torch
import train_timm_tffd

real_save, calls = torch.save, []


def save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 2:  # epoch 1's checkpoint: write part of it, then die as a killed process does
        with open(f, 'wb') as fh:
            fh.write(b'half a checkpoint')
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save
train_timm_tffd.main(sys.argv[1:])
'''


def _same_state(a, b, path=''):
    """Exact equality of nested checkpoint entries (tensors bit for bit)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same_state(a[k], b[k], f'{path}/{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f'{path}/{i}')
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_resume_after_kill_during_save(run_train, tmp_path):
    """A run killed while saving epoch 1 keeps epoch 0's checkpoint; resuming from it equals an uninterrupted run.

    Default timm augmentation, mixup, EMA and Tf-FD all draw random numbers or carry state across epochs, so any
    state that the checkpoint or the per-epoch seeding misses makes the resumed run differ. With one checkpoint kept,
    the files left also show that the checkpoint history was restored.
    """
    args = [*TINY, '--tffd', 'inter,intra', '--tffd-warmup-epochs', '2', '--model-ema', '--model-ema-decay', '0.9',
            '--mixup', '0.2', '--reprob', '0.25', '--checkpoint-hist', '1']
    full = run_train(*args, '--experiment', 'full')

    script = tmp_path / 'killed_run.py'
    script.write_text(_KILL_DURING_SECOND_SAVE)
    proc = run_script(str(script), '--output', tmp_path / 'out', *args, '--experiment', 'cut')
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cut = tmp_path / 'out' / 'cut'
    survivor = load_checkpoint(cut / 'last.pth.tar')  # the last good checkpoint is intact
    assert survivor['epoch'] == 0
    # epoch 1's row is written before its checkpoint: the resume from epoch 0 repeats epoch 1 and replaces it
    assert [r['epoch'] for r in read_summary(cut)] == ['0', '1']

    resumed = run_train(*args, '--experiment', 'cut', '--resume', cut / 'last.pth.tar')
    assert resumed.results[0]['epoch'] == 1
    a = load_checkpoint(os.path.join(full.output_dir, 'last.pth.tar'))
    b = load_checkpoint(cut / 'last.pth.tar')
    for key in ('epoch', 'state_dict', 'state_dict_ema', 'optimizer', 'task_state', 'metric'):
        _same_state(a[key], b[key], key)
    assert read_summary(full.output_dir) == read_summary(cut)
    assert sorted(f for f in os.listdir(cut) if f.endswith('.pth.tar')) == sorted(
        f for f in os.listdir(full.output_dir) if f.endswith('.pth.tar'))


_SAVE_RANK_STATE = '''
import os, sys
import torch
from timm.utils import unwrap_model
import train_timm_tffd

out, argv = sys.argv[1], sys.argv[2:]
run = train_timm_tffd.main(argv)
task = run.task
torch.save({'model': unwrap_model(task.get_trainable_module()).state_dict(),
            'ema': task.get_trainable_module(ema=True).module.state_dict()},
           os.path.join(out, f'rank{os.environ["RANK"]}.pt'))
'''


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(run_train, tmp_path):
    """torchrun, 2 CPU processes with gloo, global batch 16 = 2 x 8, against 1 process with batch 16.

    Why the data match: the training set is 16 fixed samples and the global batch is 16, so both runs see all of it
    in every step (one step per epoch); --no-aug makes the inputs deterministic. test_convnext has LayerNorm only:
    BatchNorm's statistics over half batches would differ from the full batch (and SyncBatchNorm does not run on
    CPU). DDP averages the ranks' gradients, so every term that is a mean over the batch (cross-entropy with label
    smoothing, inter-layer Tf-FD) gives the 1-process gradient up to float rounding. Intra-layer Tf-FD is not such a
    mean: each rank ranks its channels by saliency on its own 8 samples, so its pairs can differ from the ranking on
    all 16. Hence the tolerance: the 2-rank weights may differ from the 1-process weights by at most twice the whole
    effect of intra on the 1-process run (its run with inter alone), plus rounding; and that bound must be far
    below how far training moved the weights, or the test would prove nothing.
    """
    init, init_state = _save_initial(tmp_path, 'test_convnext')
    common = ['--model', 'test_convnext', '--no-aug', '--max-train-samples', '16', '--max-val-samples', '32',
              '--epochs', '3', '--warmup-epochs', '0', '--lr', '0.1', '-j', '0', '--initial-checkpoint', init,
              '--tffd-warmup-epochs', '0', '--model-ema', '--model-ema-decay', '0.5', '--log-interval', '1']
    script = tmp_path / 'ddp_run.py'
    script.write_text(_SAVE_RANK_STATE)
    proc = run_script('-m torch.distributed.run', '--standalone', '--nproc_per_node', '2', script, tmp_path,
                      '--output', tmp_path / 'out', *common, '-b', '8', '--tffd', 'inter,intra', '--experiment', 'ddp')
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    _same_state(rank0, rank1)  # DDP keeps the ranks' weights and EMA weights bit-identical

    one = run_train(*common, '-b', '16', '--tffd', 'inter,intra', '--experiment', 'one')
    one_inter = run_train(*common, '-b', '16', '--tffd', 'inter', '--experiment', 'one-inter')
    state = one.task.get_trainable_module().state_dict()
    intra_effect = _max_diff(state, one_inter.task.get_trainable_module().state_dict())
    moved = _max_diff(state, init_state)
    tolerance = 2 * intra_effect + 1e-5
    assert tolerance < 0.05 * moved
    assert _max_diff(rank0['model'], state) <= tolerance
    assert _max_diff(rank0['ema'], one.task.get_trainable_module(ema=True).module.state_dict()) <= tolerance

    ddp_rows, one_rows = read_summary(tmp_path / 'out' / 'ddp'), read_summary(one.output_dir)
    assert len(ddp_rows) == 3 and 'train_tffd_intra' in ddp_rows[0]
    # The first step runs on the same initial weights: the batch means agree up to rounding.
    for key in ('train_base_loss', 'train_tffd_inter'):
        assert float(ddp_rows[0][key]) == pytest.approx(float(one_rows[0][key]), rel=1e-5)


@pytest.mark.parametrize('argv, message', [
    (['/no/such/dir'], "data dir '/no/such/dir' does not exist"),
    (['--dataset', 'foo/bar', '--data-dir', '.'], "unknown dataset type 'foo'"),
    (['--dataset', 'imagenet', '--data-dir', '.'], "unknown dataset 'imagenet'"),
    (['--dataset', 'torch/fashion_mnist'], 'needs a data dir'),
    (['--model', 'no_such_model'], "unknown model 'no_such_model'"),
    (['--tffd', 'inter,nope'], "unknown Tf-FD method 'nope'"),
    (['--tffd', 'inter', '--tffd-saliency', 'l1'], '--tffd-saliency needs intra in --tffd'),
    (['--tffd-intra-weight', '0.1'], '--tffd-intra-weight: Tf-FD options, which need --tffd'),
    (['--tffd', 'inter', '--tffd-early-decay', '5', '2'], 'decay must be (start, end) epochs with 0 <= start < end'),
    (['-j', '-1'], '--workers must be >= 0, got -1'),
    (['--grad-accum-steps', '0'], '--grad-accum-steps must be >= 1, got 0'),
    (['--aug-splits', '1'], '--aug-splits must be 0 (off) or >= 2'),
    (['--jsd-loss'], '--jsd-loss needs --aug-splits 2 or more'),
    (['--tffd', 'inter', '--torchscript'], '--torchscript cannot keep the Tf-FD / SFD feature taps'),
    (['--model-kwargs', 'img_size'], "argument --model-kwargs: expected KEY=VALUE, got 'img_size'"),
    (['--amp', '--model-dtype', 'bfloat16'], '--amp needs a float32 model'),
    (['--model', 'vit_tiny_patch16_224', '--img-size', '32'],
     'cannot take inputs of size (1, 32, 32)'),
    (['--model', 'vit_tiny_patch16_224'], 'add --model-kwargs img_size=32'),
    (['--sync-bn'], "--sync-bn cannot be used with --device cpu"),
    (['--resume', 'missing.pth.tar'], "--resume: no checkpoint file at 'missing.pth.tar'"),
    # found while building the run, after the model or data exist
    (['--dataset', 'torch/no_such_set', '--data-dir', '.'], "cannot load split 'train' of torch/no_such_set"),
    (['--model', 'test_convnext', '--tffd', 'inter', '--tffd-preact'], 'pre-activation features need'),
    (['--tffd', 'intra', '--tffd-stages', '9'], 'stage index 9 is out of range'),
    (['--model', 'test_convnext', '--drop-block', '0.1'], 'does not accept an option given by --drop-block'),
    (['--opt', 'no_such_opt'], '--opt no_such_opt'),
    (['--max-train-samples', '8'], 'smaller than one batch of 32'),
])
def test_bad_input(run_train, tmp_path, capsys, argv, message):
    base = ['--model', 'test_resnet', '-b', '32', '-j', '0', '--epochs', '1', '--max-train-samples', '64']
    with pytest.raises(SystemExit) as e:
        run_train(*base, *argv, '--experiment', 'bad')
    code = e.value.code
    text = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None)
    assert message in text and text.count('error') == 1, text
    assert not os.path.exists(tmp_path / 'out' / 'bad')


def test_run_failing_in_first_epoch_leaves_no_folder(run_train, tmp_path):
    # A learning rate this large overflows the features after the first update; the log-interval check stops the run.
    with pytest.raises(SystemExit, match=r'training diverged in epoch 0 at step 1: non-finite loss'):
        run_train(*TINY, '--tffd', 'inter', '--lr', '1e30', '--experiment', 'diverged')
    assert not os.path.exists(tmp_path / 'out' / 'diverged')


def _write_idx(path, array):
    """An uncompressed IDX file (unsigned bytes): zero, zero, 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_torch_dataset_and_local_pretrained(run_train, tmp_path):
    # torchvision's FashionMNIST reads the four IDX files from <root>/FashionMNIST/raw; write small ones here.
    from timm_tffd.data.embedded import EMBEDDED_PATH
    data = np.load(EMBEDDED_PATH)
    raw = tmp_path / 'data' / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for prefix, split, n in (('train', 'train', 64), ('t10k', 'val', 32)):
        _write_idx(raw / f'{prefix}-images-idx3-ubyte', data[f'{split}_images'][:n])
        _write_idx(raw / f'{prefix}-labels-idx1-ubyte', data[f'{split}_labels'][:n])
    # --pretrained through timm's local-dir: hub layout (config.json + model.safetensors), no download
    from timm.models import save_for_hf
    torch.manual_seed(7)
    pretrained = timm.create_model('test_resnet', in_chans=1, num_classes=10)
    save_for_hf(pretrained, tmp_path / 'weights', model_args=dict(in_chans=1, num_classes=10))

    # --lr-base 0 gives lr 0: the weights must stay the pretrained ones while BN statistics and the rest run.
    run = run_train('--dataset', 'torch/fashion_mnist', '--data-dir', tmp_path / 'data', '--val-split', 'test',
                    '--model', f'local-dir:{tmp_path / "weights"}', '--pretrained', '--in-chans', '1',
                    '--num-classes', '10', '--img-size', '32', '--mean', '0.2868', '--std', '0.3543', '-b', '32',
                    '-j', '0', '--epochs', '1', '--warmup-epochs', '0', '--lr-base', '0', '--tffd', 'inter,intra',
                    '--experiment', 'torchds')
    rows = read_summary(run.output_dir)
    assert len(rows) == 1 and float(rows[0]['lr']) == 0
    trained = dict(run.task.get_trainable_module().named_parameters())
    for name, param in pretrained.named_parameters():
        assert torch.equal(trained[name], param), name


def test_hfds_dataset(run_train, tmp_path, monkeypatch):
    datasets = pytest.importorskip('datasets')  # Hugging Face datasets: an optional dependency of timm's hfds/
    import io
    from PIL import Image
    from timm_tffd.data.embedded import EMBEDDED_PATH
    data = np.load(EMBEDDED_PATH)

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format='PNG')
        return {'bytes': buf.getvalue(), 'path': None}

    # A local dataset in the hub's parquet layout; hfds/<path> loads it like hfds/<org>/<name> from the hub.
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(num_classes=10)})
    (tmp_path / 'fmnist' / 'data').mkdir(parents=True)
    for split, key, n in (('train', 'train', 64), ('validation', 'val', 32)):
        table = datasets.Dataset.from_dict(
            {'image': [png(x) for x in data[f'{key}_images'][:n]], 'label': data[f'{key}_labels'][:n].tolist()},
            features=features)
        table.to_parquet(str(tmp_path / 'fmnist' / 'data' / f'{split}-00000-of-00001.parquet'))
    monkeypatch.chdir(tmp_path)
    run = run_train('--dataset', 'hfds/fmnist', '--data-dir', tmp_path / 'hf-cache', '--model', 'test_resnet',
                    '--in-chans', '1', '--num-classes', '10', '--img-size', '32', '-b', '32', '-j', '0',
                    '--epochs', '1', '--warmup-epochs', '0', '--tffd', 'inter,intra', '--experiment', 'hfds')
    rows = read_summary(run.output_dir)
    assert len(rows) == 1 and math.isfinite(float(rows[0]['train_tffd_intra']))
    assert run.results[0]['validation'] is not None


@pytest.mark.slow
def test_torchcompile(run_train):
    # The eager backend runs the graph dynamo captures (Tf-FD's feature taps included) without inductor's code
    # generation, which takes minutes on a CPU: the compiled run must train exactly like the plain one.
    args = [*TINY, '--tffd', 'inter,intra', '--model-ema']
    compiled = run_train(*args, '--torchcompile', 'eager', '--experiment', 'compiled')
    plain = run_train(*args, '--experiment', 'plain')
    assert type(compiled.task.get_eval_model()).__name__ == 'OptimizedModule'
    a = compiled.task.get_trainable_module(ema=True).module.state_dict()
    b = plain.task.get_trainable_module(ema=True).module.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert read_summary(compiled.output_dir)[1]['train_tffd_intra'] == read_summary(plain.output_dir)[1][
        'train_tffd_intra']


def test_without_tffd_is_timm_training(run_train):
    plain = run_train(*TINY, '--experiment', 'plain')
    assert type(plain.task).__name__ == 'ClassificationTask'
    assert list(read_summary(plain.output_dir)[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5',
                                                       'lr']
    # Tf-FD with zero weights taps the features in the same forward pass but must not change the training at all.
    zero = run_train(*TINY, '--tffd', 'inter,intra', '--tffd-inter-weight', '0', '--tffd-intra-weight', '0',
                     '--experiment', 'zero')
    a, b = plain.task.get_trainable_module().state_dict(), zero.task.get_trainable_module().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_timm_defaults():
    import train_timm_tffd
    from timm_tffd.train_compat import TIMM_TRAIN_ARGS
    args, _ = train_timm_tffd.parse_args([])
    # a few of timm train.py's documented defaults, stated here independently of the table
    assert (args.model, args.batch_size, args.opt, args.lr, args.lr_base, args.weight_decay, args.sched, args.epochs,
            args.warmup_epochs, args.smoothing, args.model_ema_decay, args.seed) == (
        'resnet50', 128, 'sgd', None, 0.1, 2e-5, 'cosine', 300, 5, 0.1, 0.9998, 42)
    # every train.py argument keeps timm's default, but the device (picked at run time) and the data-loading
    # processes (timm's 4, capped at the CPUs this process may use)
    assert args.workers == min(4, len(os.sched_getaffinity(0)))
    differ = [k for k, (_, default) in TIMM_TRAIN_ARGS.items() if getattr(args, k) != default]
    assert set(differ) <= {'device', 'workers'}


def test_loss_meter_means_and_first_non_finite_step():
    from timm_tffd.loss_meter import LossMeter
    meter = LossMeter()
    meter.update({'loss': torch.tensor(2.), 'tffd_inter': torch.tensor(1.), 'output': torch.zeros(3)}, 2)
    meter.update({'loss': torch.tensor(5.), 'tffd_inter': torch.tensor(3.)}, 1)
    assert meter.averages() == {'loss': 3.0, 'tffd_inter': pytest.approx(5 / 3)} and meter.nonfinite() is None
    meter.update({'loss': torch.tensor(1.), 'tffd_inter': torch.tensor(float('nan'))}, 1)
    meter.update({'loss': torch.tensor(float('inf')), 'tffd_inter': torch.tensor(1.)}, 1)
    assert meter.nonfinite() == (2, ['loss', 'tffd_inter'])  # the first bad update, and every entry it spoiled
    meter.reset()
    assert meter.nonfinite() is None and meter.averages() == {}


@pytest.mark.parametrize('extra', [[], ['--tffd', 'inter,intra', '--tffd-warmup-epochs', '0']])
def test_diverged_run_stops_without_a_non_finite_checkpoint(run_train, tmp_path, extra):
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, '--max-train-samples', '320', '--lr', '1e6', *extra, '--experiment', 'nan')
    message = str(e.value.code)
    assert message.startswith('error: training diverged in epoch 0 at step 2: non-finite loss'), message
    assert ('tapped features not finite at stage(s) 1:layer1' in message) == bool(extra), message
    out = tmp_path / 'out' / 'nan'
    saved = sorted(out.glob('*.pth.tar')) if out.exists() else []
    if saved:
        assert 'the last good checkpoint is' in message
    for path in saved:  # whatever was saved is finite
        state = load_checkpoint(path)['state_dict']
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    rows = read_summary(out) if saved else []
    assert len(rows) == len({p.name for p in saved if p.name.startswith('checkpoint-')})
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())


def test_non_finite_validation_stops_before_the_checkpoint(run_train, tmp_path):
    with pytest.raises(SystemExit) as e:  # two steps: finite training loss, huge weights, NaN validation loss
        run_train(*TINY, '--lr', '1e6', '--experiment', 'nan')
    assert str(e.value.code).startswith('error: training diverged in epoch 0: non-finite validation metrics (loss nan')
    assert not (tmp_path / 'out' / 'nan').exists()
