"""Dynamic label smoothing: schedule golden values, the loss against PyTorch / timm, composition with TfFDLoss."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from timm_tffd import DynamicLabelSmoothingCrossEntropy, TfFDLoss, wrap


def _logits(seed=0, batch=6, classes=5):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(batch, classes, generator=g, dtype=torch.float64), \
        torch.randint(0, classes, (batch,), generator=g)


# hand-computed: start 0.2, end 0.0, 5 epochs (0..4); cos(pi / 4) = 0.70711, so the cosine values are 0.2 * 0.85355
# and 0.2 * 0.14645; fractional epochs are allowed and anything past the last epoch keeps the end value
SCHEDULES = {
    'linear': {0: 0.2, 0.5: 0.175, 1: 0.15, 2: 0.1, 3: 0.05, 4: 0.0, 10: 0.0},
    'cosine': {0: 0.2, 1: 0.170711, 2: 0.1, 3: 0.029289, 4: 0.0, 10: 0.0},
}


@pytest.mark.parametrize('schedule', list(SCHEDULES))
def test_schedule_golden(schedule):
    logits, target = _logits()
    loss = DynamicLabelSmoothingCrossEntropy(0.2, schedule=schedule, epochs=5)
    for epoch, value in SCHEDULES[schedule].items():
        loss.set_epoch(epoch)
        assert loss.smoothing == pytest.approx(value, abs=1e-6)
        want = F.cross_entropy(logits, target, label_smoothing=value)
        assert loss(logits, target).item() == pytest.approx(want.item(), rel=1e-5)


def test_increasing_schedule_and_constant():
    loss = DynamicLabelSmoothingCrossEntropy(0.0, smoothing_end=0.3, schedule='linear', epochs=4)
    assert [loss.set_epoch(e) or round(loss.smoothing, 6) for e in range(4)] == [0.0, 0.1, 0.2, 0.3]
    logits, target = _logits(1)
    constant = DynamicLabelSmoothingCrossEntropy(0.1, schedule='constant')
    constant.set_epoch(50)
    want = timm.loss.LabelSmoothingCrossEntropy(0.1)(logits, target)
    assert constant(logits, target).item() == pytest.approx(want.item(), rel=1e-12)


def test_adaptive_golden():
    logits, target = _logits(2)
    z = logits.numpy()
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    p_target = np.exp(logp[np.arange(len(z)), target.numpy()])
    eps = 0.3 * p_target  # confident samples get the most smoothing
    nll = -logp[np.arange(len(z)), target.numpy()]
    want = ((1 - eps) * nll + eps * -logp.mean(1)).mean()
    loss = DynamicLabelSmoothingCrossEntropy(0.3, schedule='adaptive')
    assert loss(logits, target).item() == pytest.approx(want, rel=1e-10)
    # the per-sample value is a constant for the gradient
    logits.requires_grad_()
    loss(logits, target).backward()
    ref = logits.detach().clone().requires_grad_()
    eps_t = torch.from_numpy(eps)
    logp_t = F.log_softmax(ref, -1)
    ((1 - eps_t) * -logp_t.gather(1, target[:, None]).squeeze(1) - eps_t * logp_t.mean(1)).mean().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


@pytest.mark.parametrize('schedule', ['linear', 'adaptive'])
def test_soft_targets(schedule):
    logits, target = _logits(3)
    g = torch.Generator().manual_seed(4)
    soft = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), -1)  # e.g. a Mixup target
    loss = DynamicLabelSmoothingCrossEntropy(0.2, schedule=schedule, epochs=3 if schedule == 'linear' else None)
    loss.set_epoch(1)
    if schedule == 'linear':
        eps = torch.full((6, 1), 0.1, dtype=torch.float64)
    else:
        eps = 0.2 * (torch.softmax(logits, -1) * soft).sum(-1, keepdim=True)
    want = SoftTargetCrossEntropy()(logits, (1 - eps) * soft + eps / 5)
    assert loss(logits, soft).item() == pytest.approx(want.item(), rel=1e-10)


def test_composes_with_tffd_loss():
    torch.manual_seed(0)
    model = wrap(timm.create_model('test_resnet', num_classes=5), 'inter', warmup_epochs=0)
    base = DynamicLabelSmoothingCrossEntropy(0.2, schedule='linear', epochs=3)
    criterion = TfFDLoss(base, model)
    criterion.set_epoch(1)
    assert base.epoch == 1 and base.smoothing == pytest.approx(0.1)
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    out = model(x)
    result = criterion.compute(out, y)
    want = F.cross_entropy(out, y, label_smoothing=0.1)
    torch.testing.assert_close(result['base_loss'], want)


@pytest.mark.parametrize('kwargs,match', [
    (dict(schedule='step'), "unknown label smoothing schedule 'step'"),
    (dict(smoothing=1.0, schedule='constant'), r'smoothing must be in \[0, 1\)'),
    (dict(smoothing=-0.1, schedule='constant'), r'smoothing must be in \[0, 1\)'),
    (dict(smoothing=float('nan'), schedule='constant'), r'smoothing must be in \[0, 1\)'),
    (dict(smoothing_end=1.0, epochs=10), r'smoothing_end must be in \[0, 1\)'),
    (dict(smoothing_end=-0.5, schedule='cosine', epochs=10), r'smoothing_end must be in \[0, 1\)'),
    (dict(schedule='linear'), 'needs epochs >= 1'),
    (dict(schedule='cosine', epochs=0), 'needs epochs >= 1'),
    (dict(schedule='constant', smoothing_end=0.0), 'smoothing_end applies to the linear and cosine'),
    (dict(schedule='adaptive', smoothing_end=0.2), 'smoothing_end applies to the linear and cosine'),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLabelSmoothingCrossEntropy(**kwargs)
