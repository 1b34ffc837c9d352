"""The training script with a teacher (logit KD, SFD), SD / RSD, the SFR methods and dynamic label smoothing."""
import os
import re

import pytest
import timm

from conftest import TINY, load_checkpoint, run_script
from test_train import _KILL_DURING_SECOND_SAVE, _same_state, read_summary

STUDENT = ['--model', 'cifar_resnet8']


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory):
    """A small teacher trained once by the script itself on the embedded data (heterogeneous: resnet20 -> 8)."""
    import train_timm_tffd
    out = tmp_path_factory.mktemp('teacher')
    run = train_timm_tffd.main([*TINY, '--model', 'cifar_resnet20', '--output', str(out), '--experiment', 't'])
    return os.path.join(run.output_dir, 'last.pth.tar')


def _rows(run):
    return [{k: float(v) for k, v in r.items()} for r in read_summary(run.output_dir)]


@pytest.mark.slow
def test_sfd_rsd_tffd_end_to_end_and_exact_resume(run_train, tmp_path, teacher_ckpt):
    args = [*TINY, *STUDENT, '--teacher', 'cifar_resnet20', '--teacher-checkpoint', teacher_ckpt, '--sfd', 'ri',
            '--self-distill', 'rsd', '--sd-tau', '0.99,0.995', '--tffd', 'inter,intra', '--tffd-warmup-epochs', '0',
            '--checkpoint-hist', '1']
    full = run_train(*args, '--experiment', 'full')
    for r in _rows(full):  # every term is a mean over the epoch's steps, so the weighted sum holds for the means
        expected = r['train_base_loss'] + 3 * r['train_sfd'] + 0.005 * r['train_tffd_inter'] \
            + 0.0004 * r['train_tffd_intra']
        assert r['train_loss'] == pytest.approx(expected, rel=1e-5)
        assert r['train_sfd'] > 0
    ckpt = load_checkpoint(os.path.join(full.output_dir, 'last.pth.tar'))
    plain = timm.create_model('cifar_resnet8', num_classes=10, in_chans=1)
    assert list(ckpt['state_dict']) == list(plain.state_dict())  # neither integrator nor teacher in the model
    plain.load_state_dict(ckpt['state_dict'])
    task_state = ckpt['task_state']
    assert any('integrator' in k for k in _flat_keys(task_state)), sorted(_flat_keys(task_state))[:10]
    assert task_state['tffd']['config']['methods'] == ['inter', 'intra']

    # killed while writing epoch 1's checkpoint, then resumed: integrator and margin restored, SD snapshot rebuilt
    # from the weights, and epoch 1 (an RSD update) gives the same checkpoint
    script = tmp_path / 'killed_run.py'
    script.write_text(_KILL_DURING_SECOND_SAVE)
    proc = run_script(str(script), '--output', tmp_path / 'out', *args, '--experiment', 'cut')
    assert proc.returncode < 0, proc.stderr[-2000:]
    cut = tmp_path / 'out' / 'cut'
    resumed = run_train(*args, '--experiment', 'cut', '--resume', cut / 'last.pth.tar')
    assert resumed.results[0]['epoch'] == 1
    b = load_checkpoint(cut / 'last.pth.tar')
    for key in ('epoch', 'state_dict', 'optimizer', 'task_state'):
        _same_state(ckpt[key], b[key], key)


def _flat_keys(d, prefix=''):
    for k, v in d.items():
        name = f'{prefix}.{k}' if prefix else str(k)
        yield name
        if isinstance(v, dict):
            yield from _flat_keys(v, name)


def test_logit_kd_with_tffd(run_train, teacher_ckpt):
    run = run_train(*TINY, *STUDENT, '--teacher', 'cifar_resnet20', '--teacher-checkpoint', teacher_ckpt,
                    '--kd-temperature', '2', '--distill-loss-weight', '0.5', '--task-loss-weight', '0.8',
                    '--tffd', 'inter,intra', '--tffd-warmup-epochs', '0', '--experiment', 'kd')
    for r in _rows(run):  # timm's weighting of task and KD terms, plus the Tf-FD terms
        expected = 0.8 * r['train_task_loss'] + 0.5 * r['train_kd_loss'] + 0.005 * r['train_tffd_inter'] \
            + 0.0004 * r['train_tffd_intra']
        assert r['train_loss'] == pytest.approx(expected, rel=1e-5)
        assert r['train_kd_loss'] > 0


def test_sfr_methods_with_dynamic_smoothing(run_train):
    run = run_train(*TINY, *STUDENT, '--tffd', 'inter,intra,emd,m2o', '--tffd-emd-grid', '4', '--tffd-m2o-weight',
                    '0.01', '--tffd-warmup-epochs', '0', '--smoothing', '0.2', '--smoothing-schedule', 'linear',
                    '--smoothing-end', '0', '--experiment', 'sfr')
    for r in _rows(run):
        expected = r['train_base_loss'] + 0.005 * (r['train_tffd_inter'] + r['train_tffd_emd']) \
            + 0.0004 * r['train_tffd_intra'] + 0.01 * r['train_tffd_m2o']
        assert r['train_loss'] == pytest.approx(expected, rel=1e-5)
    # linear from 0.2 at the first epoch to 0.0 at the last (epoch 1 of 2): the loop reached the loss
    assert run.task.criterion.smoothing == pytest.approx(0.0)


def test_self_distill_composes_with_any_task(run_train, teacher_ckpt, caplog):
    from timm.task import ClassificationTask, LogitDistillationTask
    caplog.set_level('INFO')
    run = run_train(*TINY, *STUDENT, '--self-distill', 'sd', '--sd-tau', '0.9', '--experiment', 'sd')
    assert type(run.task) is ClassificationTask and 'train_sfd' not in read_summary(run.output_dir)[0]
    assert "self-distillation {'tau': 0.9, 'flipped': False, 'updated': True}" in caplog.text
    run = run_train(*TINY, *STUDENT, '--teacher', 'cifar_resnet20', '--teacher-checkpoint', teacher_ckpt,
                    '--self-distill', 'rsd', '--experiment', 'kd-rsd')
    assert type(run.task) is LogitDistillationTask and 'train_kd_loss' in read_summary(run.output_dir)[0]


@pytest.mark.parametrize('argv, message', [
    (['--self-distill', 'wsd'], "invalid choice: 'wsd'"),
    (['--self-distill', 'rsd', '--sd-tau', '0.999,0.99'], '--sd-tau: tau must not decrease'),
    (['--self-distill', 'rsd', '--sd-tau', '1.5'], '--sd-tau'),
    (['--sfd', 'ri'], '--sfd need a teacher'),
    (['--teacher', 'cifar_resnet20', '--teacher-checkpoint', '/no/such/file', '--sfd'], 'not found'),
    (['--teacher', 'cifar_resnet8', '--teacher-checkpoint', 'TEACHER'], 'does not fit the teacher architecture'),
    (['--teacher', 'cifar_resnet20', '--teacher-checkpoint', 'TEACHER', '--num-classes', '12'], '10-class classifier'),
    (['--smoothing-schedule', 'wobble'], "invalid choice: 'wobble'"),
    (['--smoothing-schedule', 'linear', '--smoothing-end', '1.0'], r'--smoothing-end must be in \[0, 1\)'),
    (['--smoothing-schedule', 'cosine', '--smoothing', '-0.1'], r'--smoothing must be in \[0, 1\)'),
    (['--smoothing-end', '0.0'], '--smoothing-end needs --smoothing-schedule'),
    (['--tffd', 'inter', '--tffd-emd-grid', '4'], '--tffd-emd-grid needs emd in --tffd'),
    (['--tffd', 'emd', '--tffd-emd-grid', '64'], 'EMD grid 64 is larger than'),
    (['--tffd', 'm2o', '--tffd-m2o-weight', '-1'], "--tffd: Tf-FD weight for 'm2o' must be >= 0"),
    (['--pad-crop', '4', '--no-aug'], '--pad-crop is a training augmentation'),
])
def test_bad_input(run_train, tmp_path, capsys, teacher_ckpt, argv, message):
    argv = [teacher_ckpt if a == 'TEACHER' else a for a in argv]
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, *STUDENT, *argv, '--experiment', 'bad')
    assert e.value.code != 0
    text = str(e.value.code) + capsys.readouterr().err
    assert re.search(message, text), text[-500:]
    assert not os.path.exists(tmp_path / 'out' / 'bad')


def test_pad_crop_cifar_augmentation(run_train):
    """--pad-crop puts a padded random crop in front of timm's train transform (the CIFAR recipe)."""
    from torchvision import transforms
    import train_timm_tffd
    captured = {}
    real = train_timm_tffd._create_loaders

    def spy(*args, **kwargs):
        loaders = real(*args, **kwargs)
        captured['transform'] = loaders[0].dataset.transform
        return loaders
    train_timm_tffd._create_loaders = spy
    try:
        run_train(*TINY, *STUDENT, '--pad-crop', '4', '--scale', '1', '1', '--ratio', '1', '1', '--color-jitter', '0',
                  '--experiment', 'padcrop')
    finally:
        train_timm_tffd._create_loaders = real
    first = captured['transform'].transforms[0]
    assert isinstance(first, transforms.RandomCrop) and first.padding == 4 and tuple(first.size) == (32, 32)
    names = [type(t).__name__ for t in captured['transform'].transforms]
    assert any('Flip' in n for n in names), names
    jitter = [t for t in captured['transform'].transforms if isinstance(t, transforms.ColorJitter)]
    assert all(j.brightness is None and j.contrast is None and j.saturation is None for j in jitter)  # identity
