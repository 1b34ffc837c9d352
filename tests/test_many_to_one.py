"""Many-to-one channel distillation golden values, gradients and errors; all four methods composed through wrap()."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_tffd import TfFDLoss, get_method, many_to_one_loss, wrap
from timm_tffd.losses.many_to_one import channel_groups


def _features(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _np_pool(a, size):
    n, c, h, w = a.shape
    return a.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def _np_many_to_one(shallow, deep, groups):
    """Mean over shallow channels c of the mean over the deep channels j of group c of mse(s_c, d_j)."""
    s, d = shallow.numpy(), deep.numpy()
    size = min(s.shape[-1], d.shape[-1])
    s, d = _np_pool(s, size), _np_pool(d, size)
    per_channel = []
    for c, group in enumerate(groups):
        per_channel.append(np.mean([((s[:, c] - d[:, j]) ** 2).mean() for j in group]))
    return float(np.mean(per_channel))


# (C_s, C_d, remainder, the deep channels of each shallow channel's group)
GROUPS = [
    (2, 6, 'spread', [[0, 1, 2], [3, 4, 5]]),
    (3, 8, 'spread', [[0, 1, 2], [3, 4, 5], [6, 7]]),
    (3, 8, 'drop', [[0, 1], [2, 3], [4, 5]]),
    (4, 4, 'spread', [[0], [1], [2], [3]]),
]


@pytest.mark.parametrize('c_s,c_d,remainder,groups', GROUPS)
def test_many_to_one_golden(c_s, c_d, remainder, groups):
    assert channel_groups(c_s, c_d, remainder) == [len(g) for g in groups]
    shallow, deep = _features(0, ((2, c_s, 4, 4), (2, c_d, 2, 2)))
    got = many_to_one_loss([shallow, deep], remainder=remainder).item()
    assert got == pytest.approx(_np_many_to_one(shallow, deep, groups), rel=1e-10)


@pytest.mark.parametrize('pairs', ['all', 'adjacent'])
def test_many_to_one_equal_shape_run(pairs):
    # an isotropic model's blocks: one deep channel per group; 'all' takes inter-layer's O(L) path for the run
    feats = _features(2, ((2, 2, 8, 8),) + ((2, 4, 4, 4),) * 4)
    index = [(s, t) for s in range(5) for t in range(s + 1, 5)] if pairs == 'all' else [(s, s + 1) for s in range(4)]
    groups = {0: [[0, 1], [2, 3]]}
    expected = np.mean([_np_many_to_one(feats[s], feats[t], groups.get(s, [[c] for c in range(4)]))
                        for s, t in index])
    got = [f.clone().requires_grad_() for f in feats]
    loss = many_to_one_loss(got, pairs=pairs)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    # gradient of the group-mean form, pair by pair with autograd
    want = [f.clone().requires_grad_() for f in feats]
    ref = 0.
    for s, t in index:
        deep = F.adaptive_avg_pool2d(want[t].detach(), want[s].shape[-1] if s else 4)
        student = F.adaptive_avg_pool2d(want[s], deep.shape[-1])
        target = deep.unflatten(1, (2, 2)).mean(2) if s == 0 else deep
        ref = ref + F.mse_loss(student, target)
    (ref / len(index)).backward()
    for g, w in zip(got[:-1], want[:-1]):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-10, atol=1e-12)
    assert got[-1].grad is None


def test_many_to_one_golden_over_pairs():
    feats = _features(1, ((2, 2, 8, 8), (2, 3, 4, 4), (2, 7, 2, 2)))
    want = {
        'all': [(0, 1, [[0, 1], [2]]), (0, 2, [[0, 1, 2, 3], [4, 5, 6]]), (1, 2, [[0, 1, 2], [3, 4], [5, 6]])],
        'adjacent': [(0, 1, [[0, 1], [2]]), (1, 2, [[0, 1, 2], [3, 4], [5, 6]])],
    }
    for pairs, terms in want.items():
        expected = np.mean([_np_many_to_one(feats[s], feats[t], g) for s, t, g in terms])
        assert many_to_one_loss(feats, pairs=pairs).item() == pytest.approx(expected, rel=1e-10)


def test_many_to_one_hand_example():
    # one shallow value 1 against deep values 0 and 4: ((1 - 0)^2 + (1 - 4)^2) / 2 = 5
    shallow = torch.tensor([[[[1.]]]])
    deep = torch.tensor([[[[0.]], [[4.]]]])
    assert many_to_one_loss([shallow, deep]).item() == pytest.approx(5.)


@pytest.mark.parametrize('c_s,c_d,remainder,groups', GROUPS[1:3])
def test_gradient_equals_group_mean_matching(c_s, c_d, remainder, groups):
    shallow, deep = _features(2, ((2, c_s, 4, 4), (2, c_d, 2, 2)))
    shallow.requires_grad_()
    many_to_one_loss([shallow, deep], remainder=remainder).backward()
    # reference: mse against the group means, built channel by channel
    ref = shallow.detach().clone().requires_grad_()
    group_mean = torch.stack([deep[:, g].mean(1) for g in groups], 1)
    F.mse_loss(F.avg_pool2d(ref, 2), group_mean).backward()
    torch.testing.assert_close(shallow.grad, ref.grad)


def test_gradients_reach_shallow_side_only():
    feats = [f.requires_grad_() for f in _features(3, ((2, 2, 8, 8), (2, 4, 4, 4), (2, 8, 2, 2)))]
    many_to_one_loss(feats).backward()
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0
    assert feats[2].grad is None


def test_many_to_one_bad_input():
    with pytest.raises(ValueError, match='at least as many deep channels as shallow ones, got 2 deep for 3'):
        many_to_one_loss(_features(4, ((1, 3, 4, 4), (1, 2, 2, 2))))
    with pytest.raises(ValueError, match='unknown many-to-one remainder'):
        many_to_one_loss(_features(4, ((1, 2, 4, 4), (1, 3, 2, 2))), remainder='pad')
    model = timm.create_model('test_resnet', num_classes=5)  # layer3 has 192 channels, layer4 only 96
    with pytest.raises(ValueError, match=r'deep stages with fewer: layer4 \(96\) for layer3 \(192\)'):
        wrap(model, 'm2o')
    with pytest.raises(ValueError, match='unknown many-to-one remainder'):
        wrap(model, 'm2o', stages=[1, 2], m2o_remainder='pad')
    with pytest.raises(ValueError, match='many-to-one distillation needs at least two stages'):
        wrap(model, 'm2o', stages=[2])


def test_all_methods_compose():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=5)
    weights = {'emd': 0.1, 'm2o': 0.2}
    wrap(model, 'inter,intra,emd,m2o', stages=[1, 2, 3], weights=weights, warmup_epochs=0, emd_grid=2,
         m2o_pairs='adjacent')  # 32 -> 48 -> 192 channels
    criterion = TfFDLoss(nn.CrossEntropyLoss(), model)
    assert criterion.weights == {'inter': 0.005, 'intra': 0.0004, 'emd': 0.1, 'm2o': 0.2}
    assert get_method('emd').default_weight == 0.005 and get_method('m2o').default_weight == 0.005
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = criterion.compute(model(x), y)
    assert sorted(out) == ['base_loss', 'loss', 'tffd', 'tffd_emd', 'tffd_inter', 'tffd_intra', 'tffd_m2o']
    expected = out['base_loss'] + sum(criterion.weights[m] * out[f'tffd_{m}'] for m in criterion.weights)
    torch.testing.assert_close(out['loss'], expected)
    assert all(out[f'tffd_{m}'] > 0 for m in criterion.weights)
    (out['loss'] - out['base_loss']).backward()  # the Tf-FD part alone: it trains the backbone, not the head
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.conv1[0].weight.grad.abs().sum() > 0
    assert not model.fc.weight.grad.any()
