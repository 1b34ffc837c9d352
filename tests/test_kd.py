"""Tf-FD + logit KD: timm's LogitDistillationTask with the Tf-FD terms, a few training steps with a tiny teacher."""
import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn

from timm_tffd import DynamicLabelSmoothingCrossEntropy, TfFDConfig, TfFDLogitDistillationTask

STUDENT_STAGES = [1, 2, 3]  # test_resnet's layer1..layer3: 32 -> 48 -> 192 channels, so m2o applies


def _models(num_classes=5):
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=num_classes)
    torch.manual_seed(1)
    teacher = timm.create_model('test_resnet', num_classes=num_classes)
    return student, teacher


def _kd_term(student_logits, teacher_logits, temperature):
    """T^2 * mean over the batch of KL(p_teacher || p_student) at temperature T, written out."""
    p_t = torch.softmax(teacher_logits / temperature, -1)
    log_p_s = torch.log_softmax(student_logits / temperature, -1)
    return temperature ** 2 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()


def test_tffd_kd_steps():
    student, teacher = _models()
    config = TfFDConfig('inter,intra,emd,m2o', weights={'m2o': 0.01}, warmup_epochs=0, stages=STUDENT_STAGES,
                        options=dict(emd_grid=2))
    task = TfFDLogitDistillationTask(student, teacher, nn.CrossEntropyLoss(), tffd=config, distill_loss_weight=0.5,
                                     task_loss_weight=0.7, temperature=4.0, verbose=False)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])
    task.train()
    assert not teacher.training and student.training
    losses = []
    for _ in range(3):
        out = task(x, y)
        assert sorted(out) == ['kd_loss', 'loss', 'output', 'task_loss', 'tffd', 'tffd_emd', 'tffd_inter',
                               'tffd_intra', 'tffd_m2o']
        with torch.no_grad():
            teacher_logits = teacher(x)
        torch.testing.assert_close(out['kd_loss'], _kd_term(out['output'], teacher_logits, 4.0))
        torch.testing.assert_close(out['task_loss'], nn.functional.cross_entropy(out['output'], y))
        tffd = 0.005 * out['tffd_inter'] + 0.0004 * out['tffd_intra'] + 0.005 * out['tffd_emd'] + 0.01 * out['tffd_m2o']
        torch.testing.assert_close(out['tffd'], tffd)
        torch.testing.assert_close(out['loss'], 0.7 * out['task_loss'] + 0.5 * out['kd_loss'] + tffd)
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
        losses.append(out['loss'].item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # BN statistics too


def test_tffd_kd_complementary_weights_and_epoch():
    student, teacher = _models()
    base = DynamicLabelSmoothingCrossEntropy(0.2, schedule='linear', epochs=3)
    task = TfFDLogitDistillationTask(student, teacher, base, tffd=TfFDConfig('inter', warmup_epochs=4),
                                     task_loss_weight=0.3, verbose=False)
    assert (task.task_loss_weight, task.distill_loss_weight) == (0.3, 0.7)
    task.set_epoch(1)  # reaches the Tf-FD warm-up (2 / 4) and the smoothing schedule (0.1)
    assert base.smoothing == pytest.approx(0.1) and task.get_task_state()['tffd']['epoch'] == 1
    task.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    out = task(x, y)
    torch.testing.assert_close(out['task_loss'], nn.functional.cross_entropy(out['output'], y, label_smoothing=0.1))
    # the Tf-FD term is added outside timm's complementary weights
    want = 0.3 * out['task_loss'] + 0.7 * out['kd_loss'] + 0.5 * 0.005 * out['tffd_inter']
    torch.testing.assert_close(out['loss'], want)


def test_teacher_from_checkpoint(tmp_path):
    student, teacher = _models()
    path = tmp_path / 'teacher.safetensors'
    safetensors.torch.save_file(teacher.state_dict(), str(path))
    task = TfFDLogitDistillationTask(student, 'test_resnet', tffd='inter', teacher_pretrained_path=str(path),
                                     verbose=False)
    loaded = task.teacher.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.state_dict().items())
    assert task.get_eval_model() is student


@pytest.mark.parametrize('preact', [False, True])
def test_tffd_feature_distillation(preact):
    """timm's feature KD (projected pooled student features against the teacher's) plus Tf-FD: the terms are those of
    a plain wrapped forward of the same student, the KD term timm's MSE, computed here from the models."""
    from timm.task import FeatureDistillationTask
    from timm_tffd import TfFDFeatureDistillationTask, TfFDLoss, wrap
    student, teacher = _models()
    reference = timm.create_model('test_resnet', num_classes=5)
    reference.load_state_dict(student.state_dict())
    config = TfFDConfig('inter,intra', warmup_epochs=0, preact=preact)
    task = TfFDFeatureDistillationTask(student, teacher, nn.CrossEntropyLoss(), tffd=config, student_feature_dim=192,
                                       teacher_feature_dim=192, distill_loss_weight=0.5, verbose=False)
    assert isinstance(task, FeatureDistillationTask)
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3])
    task.train()
    out = task(x, y)
    wrapped = wrap(reference, config).train()
    logits = wrapped(x)
    expected = TfFDLoss(nn.CrossEntropyLoss(), wrapped).regularization(logits)
    torch.testing.assert_close(out['output'], logits)
    for k in ('tffd', 'tffd_inter', 'tffd_intra'):
        torch.testing.assert_close(out[k], expected[k])
    with torch.no_grad():
        t_feat = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    s_feat = reference.forward_head(reference.forward_features(x), pre_logits=True)
    kd = nn.functional.mse_loss(s_feat, t_feat)
    torch.testing.assert_close(out['kd_loss'], kd, rtol=1e-4, atol=1e-6)
    out['loss'].backward()
    assert all(p.grad is not None for p in student.parameters())
