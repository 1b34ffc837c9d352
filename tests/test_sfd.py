"""SFDTask end to end, the teacher side (loading, checks, normalization, pre-ReLU tap, margins), resume, bad input."""
import argparse
import copy
import os

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from scipy import stats
from timm.models import save_for_hf
from timm.task import resume_task_checkpoint
from timm.utils import distribute_bn, unwrap_model

from conftest import gloo_group, run_ranks
from timm_tffd import (
    FeatureTaps, MarginL2Loss, SelfDistill, SFDTask, SFDTeacher, TfFDConfig, create_integrator, create_teacher,
    get_tffd_state, wrap)

NUM_CLASSES = 10


def _model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=kwargs.pop('num_classes', NUM_CLASSES), **kwargs)


def _batch(seed=0, n=4, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _randomize_closing_bn(model):
    """Trained-looking BN before the final ReLU (timm zero-initialises its scale)."""
    bn = model.layer4[-1].bn2
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


# ---------------------------------------------------------------- teacher creation and checked loading


def test_teacher_checkpoint_files(tmp_path):
    source = _model('test_resnet', seed=1)
    safetensors.torch.save_file(source.state_dict(), str(tmp_path / 't.safetensors'))
    torch.save({'state_dict': source.state_dict(), 'epoch': 3, 'args': argparse.Namespace(model='test_resnet')},
               tmp_path / 't.pth.tar')  # a timm training checkpoint
    for path in ('t.safetensors', 't.pth.tar'):
        teacher = create_teacher('test_resnet', str(tmp_path / path), num_classes=NUM_CLASSES)
        for k, v in source.state_dict().items():
            assert torch.equal(teacher.model.state_dict()[k], v), (path, k)
        assert not teacher.model.training
        assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_checkpoint_mismatch(tmp_path, monkeypatch):
    five = str(tmp_path / 'five.safetensors')
    safetensors.torch.save_file(_model('test_resnet', num_classes=5).state_dict(), five)
    with pytest.raises(ValueError, match='5-class classifier.*num_classes=10'):
        create_teacher('test_resnet', five, num_classes=NUM_CLASSES)
    # an hf-hub: checkpoint goes through the same checks (the download itself is timm's)
    requested = []
    monkeypatch.setattr('timm_tffd.teacher.load_state_dict_from_hf', lambda repo, **kw: requested.append(repo) or
                        safetensors.torch.load_file(five))
    with pytest.raises(ValueError, match='5-class classifier'):
        create_teacher('test_resnet', 'hf-hub:org/teacher', num_classes=NUM_CLASSES)
    assert requested == ['org/teacher']
    with pytest.raises(ValueError, match="does not fit the teacher architecture 'test_efficientnet'"):
        create_teacher('test_efficientnet', five, num_classes=5)
    gray = str(tmp_path / 'gray.safetensors')
    safetensors.torch.save_file(_model('test_resnet', in_chans=1).state_dict(), gray)
    with pytest.raises(ValueError, match='differ in shape.*conv1'):
        create_teacher('test_resnet', gray, num_classes=NUM_CLASSES)
    with pytest.raises(FileNotFoundError):
        create_teacher('test_resnet', str(tmp_path / 'missing.pth'), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match='brings its own weights'):
        create_teacher('hf-hub:org/teacher', five, num_classes=5)
    hub_dir = tmp_path / 'hub'
    save_for_hf(_model('test_resnet', num_classes=5), str(hub_dir))
    with pytest.raises(ValueError, match='has 5 classes.*num_classes=10'):
        create_teacher(f'local-dir:{hub_dir}', num_classes=NUM_CLASSES)
    assert create_teacher(f'local-dir:{hub_dir}', num_classes=5).model.num_classes == 5


def test_teacher_normalization():
    teacher = create_teacher(_model('test_efficientnet'))  # ImageNet mean/std
    sfd_teacher = SFDTeacher(teacher)
    seen = []
    teacher.model.conv_stem.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x, _ = _batch()
    student_mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)  # test_resnet's
    student_std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    sfd_teacher(x, student_mean, student_std)
    pixels = x * 0.5 + 0.5
    want = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], want, atol=1e-5)
    # explicit teacher statistics override the pretrained_cfg ones; equal statistics leave the input alone
    same = SFDTeacher(create_teacher(_model('test_efficientnet'), mean=(0.5,) * 3, std=(0.5,) * 3))
    same.teacher.model.conv_stem.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    same(x, student_mean, student_std)
    assert torch.equal(seen[1], x)


# ---------------------------------------------------------------- teacher feature and margin


def test_resnet_teacher_pre_relu_feature_and_bn_margin():
    model = _model('test_resnet', seed=2)
    bn = _randomize_closing_bn(model)
    teacher = SFDTeacher(create_teacher(model))
    assert teacher.margin_kind == 'bn' and teacher.module_name == 'layer4'
    seen = []
    model.layer4[-1].act2.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x, _ = _batch()
    feature, margin = teacher(x)
    with torch.no_grad():
        model(x)
    assert torch.allclose(feature, seen[-1])
    assert (feature < 0).any()  # before the ReLU
    for c in range(3):
        s, m = bn.weight[c].item(), bn.bias[c].item()
        want = stats.truncnorm(a=-float('inf'), b=-m / s, loc=m, scale=s).mean()
        assert margin[c].item() == pytest.approx(want, rel=1e-4)


def test_other_teacher_empirical_margin():
    model = _model('test_efficientnet').eval()
    teacher = SFDTeacher(create_teacher(model))
    assert teacher.margin_kind == 'empirical'
    x, _ = _batch()
    feature, margin = teacher(x, update_margin=False)
    assert torch.equal(margin, torch.zeros(teacher.channels))
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[4])[1][0]
    assert torch.allclose(feature, want)
    _, margin = teacher(x, update_margin=True)
    neg = want.permute(1, 0, 2, 3).reshape(want.shape[1], -1)
    expected = torch.stack([row[row < 0].mean() if (row < 0).any() else torch.tensor(0.) for row in neg])
    assert torch.allclose(margin, expected, atol=1e-6)


# ---------------------------------------------------------------- training


def _train(task, steps, seed=0):
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05, momentum=0.9)
    task.train()
    results = []
    for i in range(steps):
        x, y = _batch(seed + i)
        result = task(x, y)
        opt.zero_grad()
        result['loss'].backward()
        opt.step()
        results.append(result)
    return results


@pytest.mark.parametrize('teacher_name,integrator', [
    ('test_resnet', 'ri'), ('test_efficientnet', 'li'), ('test_convnext', 'ai')])
def test_sfd_task_trains(teacher_name, integrator):
    student, teacher = _model('test_resnet'), _model(teacher_name, seed=3)
    teacher_before = copy.deepcopy(teacher.state_dict())
    task = SFDTask(student, teacher, integrator=integrator, verbose=False)
    integrator_before = copy.deepcopy(task.trainable_module.integrator.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    results = _train(task, 3)
    for r in results:
        assert set(r) == {'loss', 'output', 'base_loss', 'sfd'}
        assert torch.isfinite(r['loss']) and r['sfd'] > 0
        assert torch.allclose(r['loss'], r['base_loss'] + 3 * r['sfd'])  # SFD's weight 3
    assert not task.teacher.teacher.model.training
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    integrator_after = task.trainable_module.integrator.state_dict()
    assert any(not torch.equal(integrator_after[k], v) for k, v in integrator_before.items())
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in student_before.items())
    # the exported model is the plain timm student: no integrator, no teacher
    assert task.get_eval_model() is student
    ckpt = task.get_checkpoint_state()
    assert list(ckpt['state_dict']) == list(timm.create_model('test_resnet').state_dict())
    assert set(ckpt['task_state']['sfd']) == {'integrator', 'integrator_state'} | (
        {'empirical_margin'} if task.teacher.margin_kind == 'empirical' else set())


def test_sfd_with_tffd_and_rsd_in_one_forward():
    student = wrap(_model('test_resnet'), 'inter,intra', warmup_epochs=0)
    task = SFDTask(student, _model('test_resnet', seed=3), verbose=False)
    rsd = SelfDistill(task.get_trainable_module(), 'rsd', num_epochs=3)
    calls = []
    student.layer4.register_forward_hook(lambda *args: calls.append(1))
    r = _train(task, 1)[0]
    assert len(calls) == 1  # Tf-FD and SFD read the same student forward pass
    assert {'loss', 'output', 'base_loss', 'sfd', 'tffd', 'tffd_inter', 'tffd_intra'} <= set(r)
    w = task.tffd_loss.weights
    want = r['base_loss'] + w['inter'] * r['tffd_inter'] + w['intra'] * r['tffd_intra'] + 3 * r['sfd']
    assert torch.allclose(r['loss'], want)
    assert rsd.step(0)['updated'] is False
    _train(task, 1)
    assert rsd.step(1)['tau'] == pytest.approx(0.997)
    assert task.get_task_state()['tffd']['config'] == get_tffd_state(student).config.to_dict()


def test_tffd_given_as_config():
    config = TfFDConfig('inter', warmup_epochs=0, stages=[1, 2, 3, 4])
    task = SFDTask(_model('test_resnet'), _model('test_resnet', seed=3), tffd=config, verbose=False)
    assert task.tffd_loss.config is config
    assert task.get_task_state()['tffd'] == {'config': config.to_dict(), 'epoch': 0.}
    plain = SFDTask(_model('test_resnet'), _model('test_resnet', seed=3), verbose=False)
    assert plain.tffd_loss is None and 'tffd' not in plain.get_task_state()


def test_task_state_round_trip_resumes_exactly(tmp_path):
    teacher = _model('test_efficientnet', seed=3)  # empirical margin: its statistics are task state too

    def make():
        task = SFDTask(_model('test_resnet'), copy.deepcopy(teacher), integrator='ri', tffd='inter',
                       verbose=False)
        return task, SelfDistill(task.get_trainable_module(), 'rsd', num_epochs=4, seed=1)

    task, rsd = make()
    for epoch in range(2):
        task.set_epoch(epoch)
        _train(task, 2, seed=10 * epoch)
        rsd.step(epoch)
    task.setup_ema(decay=0.9)
    ema_state = task.get_task_state(ema=True)
    assert set(ema_state) == {'sfd'} and 'integrator_state' in ema_state['sfd']
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save({**task.get_checkpoint_state(), 'epoch': 1, 'version': 2}, path)

    resumed, resumed_rsd = make()
    assert resume_task_checkpoint(resumed, str(path), log_info=False) == 2
    resumed_rsd.resume(1)
    for a, b in ((task.trainable_module.integrator, resumed.trainable_module.integrator),
                 (task.teacher.empirical, resumed.teacher.empirical)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert resumed.tffd_loss.epoch == 1
    assert resumed_rsd.last_epoch == 1
    assert all(torch.equal(v, resumed_rsd.prev[k]) for k, v in rsd.prev.items())
    for t, r in ((task, rsd), (resumed, resumed_rsd)):  # two more epochs on both: identical results
        for epoch in (2, 3):
            t.set_epoch(epoch)
            _train(t, 2, seed=20 + epoch)
            r.step(epoch)
    for k, v in task.trainable_module.state_dict().items():
        assert torch.equal(resumed.trainable_module.state_dict()[k], v), k


# ---------------------------------------------------------------- bad input


def test_bad_input():
    student = _model('test_resnet')
    with pytest.raises(ValueError, match='cannot be reached'):
        SFDTask(student, _model('test_resnet'), teacher_stage=0, verbose=False)  # stride-2 stem vs stride 32
    with pytest.raises(ValueError, match='unknown SFD integrator'):
        SFDTask(student, _model('test_resnet'), integrator='fpn', verbose=False)
    with pytest.raises(ValueError, match='SFD needs a teacher'):
        SFDTask(student, None, verbose=False)
    with pytest.raises(ValueError, match='num_classes=10'):
        SFDTask(student, _model('test_resnet', num_classes=7), verbose=False)
    wrapped = wrap(_model('test_resnet'), 'inter', stages=[1, 2])
    with pytest.raises(ValueError, match='Tf-FD taps'):
        SFDTask(wrapped, _model('test_resnet'), integrator='ri', verbose=False)


def _ddp_worker(rank, world_size, init_file, out_dir):
    with gloo_group(rank, world_size, init_file):
        student = wrap(_model('test_resnet'), 'inter', warmup_epochs=0)
        task = SFDTask(student, _model('test_efficientnet', seed=3), integrator='ai', verbose=False)
        rsd = SelfDistill(task.get_trainable_module(), 'rsd', num_epochs=3, seed=rank)
        task.prepare_distributed()
        opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
        task.train()
        for epoch in range(3):
            x, y = _batch(seed=100 * rank + epoch)  # different data per rank
            result = task(x, y)
            opt.zero_grad()
            result['loss'].backward()
            opt.step()
            distribute_bn(task.get_trainable_module(), world_size, reduce=True)
            rsd.step(epoch)
        state = {k: v.detach() for k, v in unwrap_model(task.get_trainable_module()).state_dict().items()}
        state['margin'] = task.teacher.empirical.margin
        torch.save(state, os.path.join(out_dir, f'rank{rank}.pt'))


@pytest.mark.slow
def test_ddp_sfd_task_stays_identical_across_ranks(tmp_path):
    # student + integrator in DDP, Tf-FD terms through DDP, empirical margin all-reduced, one RSD draw for all ranks
    r0, r1 = run_ranks(_ddp_worker, tmp_path)
    assert any(k.startswith('integrator.') for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_library_example():
    """The README example: integrator, margin loss and RSD from user code, without SFDTask."""
    epochs = 2
    loader = [_batch(seed) for seed in range(2)]

    student = _model('test_resnet')
    teacher = SFDTeacher(create_teacher(_model('test_resnet', seed=3), num_classes=NUM_CLASSES))
    taps = FeatureTaps(student, stages=[-1])  # RI reads the last stage
    integrator = create_integrator('ri', taps.channels, (teacher.channels, 7, 7))
    sfd_loss = MarginL2Loss()
    trained = torch.nn.ModuleList([student, integrator])
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    rsd = SelfDistill(trained, 'rsd', tau=(0.995, 0.999), num_epochs=epochs)

    for epoch in range(epochs):
        trained.train()
        for x, y in loader:
            t_feat, margin = teacher(x, update_margin=True)  # same input normalization for both here
            logits, feats = taps.forward(student, x)
            z = integrator(feats, size=t_feat.shape[-2:])
            loss = F.cross_entropy(logits, y) + 3 * sfd_loss(z, t_feat, margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rsd.step(epoch)

    assert torch.isfinite(loss) and rsd.last_epoch == 1
