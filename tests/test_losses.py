"""Golden values for the functional Tf-FD losses, computed independently with NumPy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from timm_tffd import inter_layer_loss, intra_layer_loss, inter_layer_pairs
from timm_tffd.losses.saliency import SALIENCY, bn_scale_saliency
from timm_tffd.losses.intra import intra_stage_loss, salience_order


def _features(seed=0, shapes=((2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


LAYOUTS = ('contiguous', 'channels_last', 'token_view')


def _as_layout(f, layout):
    """The same values as ``f`` in another memory layout: channels last, or the NCHW view of a ViT's token tensor
    (a prefix token in front, as ``FeatureTaps`` makes them). A leaf for ``token_view`` is the token tensor."""
    if layout == 'contiguous':
        return f
    if layout == 'channels_last':
        return f.contiguous(memory_format=torch.channels_last)
    n, c, h, w = f.shape
    tokens = torch.cat([torch.full((n, 1, c), 7., dtype=f.dtype), f.permute(0, 2, 3, 1).reshape(n, h * w, c)], 1)
    view = tokens[:, 1:].unflatten(1, (h, w)).permute(0, 3, 1, 2)
    assert view.stride(1) == 1 and torch.equal(view, f)
    return view


def _np_pool(a, size):
    n, c, h, w = a.shape
    kh, kw = h // size[0], w // size[1]
    return a.reshape(n, c, size[0], kh, size[1], kw).mean(axis=(3, 5))


def _np_inter(feats, pairs):
    arrs = [f.numpy() for f in feats]
    losses = []
    for s, t in pairs:
        a, b = arrs[s], arrs[t]
        size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
        a, b = _np_pool(a, size), _np_pool(b, size)
        c = min(a.shape[1], b.shape[1])
        losses.append(((a[:, :c] - b[:, :c]) ** 2).mean())
    return float(np.mean(losses))


@pytest.mark.parametrize('pairs,direction,expected_pairs', [
    ('all', 'top-down', [(0, 1), (0, 2), (1, 2)]),
    ('adjacent', 'top-down', [(0, 1), (1, 2)]),
    ('all', 'bottom-up', [(1, 0), (2, 0), (2, 1)]),
    ('adjacent', 'bidirectional', [(0, 1), (1, 2), (1, 0), (2, 1)]),
])
def test_inter_golden(pairs, direction, expected_pairs):
    feats = _features()
    assert sorted(inter_layer_pairs(3, pairs, direction)) == sorted(expected_pairs)
    got = inter_layer_loss(feats, pairs, direction).item()
    assert got == pytest.approx(_np_inter(feats, expected_pairs), rel=1e-10)


def test_inter_hand_example():
    # 1 channel, 2x2 shallow map pooled to 1x1 = mean 2.5; deep map value 0.5 -> (2.5 - 0.5)^2 = 4
    shallow = torch.tensor([[[[1., 2.], [3., 4.]]]])
    deep = torch.tensor([[[[0.5]], [[9.]]]])  # 2 channels: only the first is compared
    assert inter_layer_loss([shallow, deep]).item() == pytest.approx(4.0)


def test_inter_gradients_only_reach_student_side():
    feats = [f.clone().requires_grad_() for f in _features()]
    inter_layer_loss(feats).backward()
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0  # shallow sides of some pair
    assert feats[2].grad is None  # the deepest map is only ever a target
    feats = [f.clone().requires_grad_() for f in _features()]
    inter_layer_loss(feats, direction='bottom-up').backward()
    assert feats[0].grad is None and feats[2].grad.abs().sum() > 0


# maps 1-4 and 5-6 are runs of equal shape (as an isotropic model's blocks), which take the O(L) path
RUN_SHAPES = ((2, 4, 8, 8), (2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 4), (2, 5, 2, 2), (2, 5, 2, 2))


def _torch_pairwise(feats, pairs):
    """The definition, pair by pair, with autograd: the reference for the run path's gradients."""
    total = 0.
    for s, t in pairs:
        size = (min(feats[s].shape[2], feats[t].shape[2]), min(feats[s].shape[3], feats[t].shape[3]))
        a, b = F.adaptive_avg_pool2d(feats[s], size), F.adaptive_avg_pool2d(feats[t].detach(), size)
        c = min(a.shape[1], b.shape[1])
        total = total + F.mse_loss(a[:, :c], b[:, :c])
    return total / len(pairs)


def _torch_intra(feats, detach_salient=False):
    """The definition with autograd: pairs by indexing, the mean squared error, the mean over stages. Channels are
    ranked by the library's ``norm`` saliency (tested against the reference code's formula on its own), equal scores in
    index order, so that both sides pair the same channels."""
    total = 0.
    for f in feats:
        with torch.no_grad():
            order = SALIENCY['norm'](f).argsort(descending=True, stable=True)
        half = f.shape[1] // 2
        salient = f[:, order[:half]]
        total = total + F.mse_loss(f[:, order[half:2 * half]], salient.detach() if detach_salient else salient)
    return total / len(feats)


@pytest.mark.parametrize('direction', ['top-down', 'bottom-up', 'bidirectional'])
@pytest.mark.parametrize('layout', LAYOUTS)
def test_inter_equal_shape_runs_match_pairwise(direction, layout):
    from timm_tffd.losses.inter import equal_shape_runs
    feats = _features(3, RUN_SHAPES)
    assert equal_shape_runs(feats) == [(1, 5), (5, 7)]
    pairs = inter_layer_pairs(len(feats), 'all', direction)
    laid_out = [_as_layout(f, layout) for f in feats]
    assert inter_layer_loss(laid_out, 'all', direction).item() == pytest.approx(_np_inter(feats, pairs), rel=1e-10)
    got = [_as_layout(f, layout).clone().requires_grad_() for f in feats]
    want = [f.clone().requires_grad_() for f in feats]
    inter_layer_loss(got, 'all', direction).backward()
    _torch_pairwise(want, pairs).backward()
    for g, w in zip(got, want):
        if w.grad is None:  # a map that is only ever a target
            assert g.grad is None
        else:
            torch.testing.assert_close(g.grad, w.grad, rtol=1e-10, atol=1e-12)


def _check_against_pairwise(feats, pairs, direction, rtol=1e-12):
    """Value and gradient of every map of ``inter_layer_loss`` against ``_torch_pairwise``."""
    got = [f.clone().requires_grad_() for f in feats]
    want = [f.clone().requires_grad_() for f in feats]
    value = inter_layer_loss(got, pairs, direction)
    expected = _torch_pairwise(want, inter_layer_pairs(len(feats), pairs, direction))
    torch.testing.assert_close(value, expected, rtol=rtol, atol=0)
    value.backward()
    expected.backward()
    for g, w in zip(got, want):
        if w.grad is None:  # a map that is only ever a target
            assert g.grad is None
        else:
            torch.testing.assert_close(g.grad, w.grad, rtol=rtol, atol=1e-15)


# Spatial chains where some ratios are not integers: adaptive pooling does not compose, so a size must never be pooled
# from an adaptively pooled map (19 -> 10 -> 5 is not 19 -> 5, nor 15 -> 10 -> 5 the exact 15 -> 5).
CHAINS = {
    '19-10-5': (19, 10, 5),
    '15-10-5': (15, 10, 5),
    '12-6-4-3': (12, 6, 4, 3),  # exact 12 -> 6 -> 3 and 12 -> 4 beside adaptive 6 -> 4 and 4 -> 3
    'rect-19x12-10x6-5x3': ((19, 12), (10, 6), (5, 3)),
}


@pytest.mark.parametrize('pairs,direction', [('all', 'top-down'), ('all', 'bottom-up'), ('all', 'bidirectional'),
                                             ('adjacent', 'top-down')])
@pytest.mark.parametrize('chain', list(CHAINS))
def test_inter_pooling_chains_match_adaptive_pooling_of_each_map(chain, pairs, direction):
    sizes = [s if isinstance(s, tuple) else (s, s) for s in CHAINS[chain]]
    feats = _features(7, [(2, 3 + i, h, w) for i, (h, w) in enumerate(sizes)])
    _check_against_pairwise(feats, pairs, direction)


@pytest.mark.parametrize('direction', ['top-down', 'bidirectional'])
def test_inter_resnet18_at_152px_matches_adaptive_pooling_of_each_map(direction):
    # stage maps of 38, 19, 10 and 5 pixels: 38 -> 19 and 10 -> 5 are exact, the rest adaptive
    import timm
    torch.manual_seed(0)
    model = timm.create_model('resnet18').eval()
    with torch.no_grad():
        _, maps = model.forward_intermediates(torch.randn(2, 3, 152, 152), indices=[1, 2, 3, 4])
    assert [m.shape[-1] for m in maps] == [38, 19, 10, 5]
    _check_against_pairwise([m.double() for m in maps], 'all', direction)


@pytest.mark.parametrize('shapes', [((2, 4, 8, 8), (2, 6, 4, 4)), ((2, 5, 4, 4),) * 3])  # pooled pair / equal run
@pytest.mark.parametrize('layout', LAYOUTS)
def test_inter_float16_differences_above_256_stay_finite(shapes, layout):
    # float16 outside autocast: a difference above 256 squares past float16's 65504
    feats = [300 * f for f in _features(8, shapes)]
    ref = [f.clone().requires_grad_() for f in feats]
    expected = _torch_pairwise(ref, inter_layer_pairs(len(feats)))
    expected.backward()
    assert expected.item() > 65504
    leaves = [f.half().requires_grad_() for f in feats]
    got = inter_layer_loss([_as_layout(f, layout) for f in leaves])
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-3)
    got.backward()
    for leaf, r in zip(leaves, ref):
        if r.grad is None:
            assert leaf.grad is None
        else:
            assert leaf.grad.dtype == torch.float16 and torch.isfinite(leaf.grad).all()
            torch.testing.assert_close(leaf.grad.double(), r.grad, rtol=1e-2, atol=1e-3)


def test_inter_run_value_is_stable_in_float32():
    # nearly equal maps with a large common part: expanding the squares would cancel catastrophically in float32
    g = torch.Generator().manual_seed(0)
    base = 100. + torch.randn(4, 8, 6, 6, generator=g, dtype=torch.float64)
    feats = [base + 0.01 * torch.randn(base.shape, generator=g, dtype=torch.float64) for _ in range(6)]
    want = _np_inter(feats, inter_layer_pairs(6))
    got = inter_layer_loss([f.float() for f in feats]).item()
    assert got == pytest.approx(want, rel=1e-4)


def test_inter_run_low_precision_gradients_keep_dtype():
    feats = [f.bfloat16().requires_grad_() for f in _features(4, ((2, 3, 4, 4),) * 4)]
    loss = inter_layer_loss(feats)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(f.grad.dtype == torch.bfloat16 for f in feats[:3]) and feats[3].grad is None


def _np_intra_stage(f, detach_note=None):
    # reference saliency: F.normalize over (H, W), averaged over (N, H, W)
    score = F.normalize(f, p=2, dim=(2, 3)).mean([0, 2, 3]).numpy()
    order = np.argsort(-score, kind='stable')
    half = f.shape[1] // 2
    a = f.numpy()
    top, bottom = a[:, order[:half]], a[:, order[half:2 * half]]
    return float(((top - bottom) ** 2).mean())


@pytest.mark.slow
def test_salience_order_eager_and_compiled():
    """The ranking that pairs intra's channels, eager (stable argsort) and compiled (counting): highest score first,
    equal scores in index order, NaN as +inf. Golden: numpy's stable sort of the negated scores."""
    compiled = torch.compile(salience_order, fullgraph=True, backend='inductor')
    g = torch.Generator().manual_seed(0)
    for c in (1, 2, 9, 384):
        scores = torch.randn(c, generator=g, dtype=torch.float64)
        if c >= 9:  # dead channels score 0; infinities; NaN
            scores[::3] = 0.
            scores[1], scores[4], scores[5], scores[7] = float('nan'), float('inf'), float('nan'), -float('inf')
        golden = np.argsort(-np.nan_to_num(scores.numpy(), nan=np.inf, posinf=np.inf, neginf=-np.inf), kind='stable')
        np.testing.assert_array_equal(salience_order(scores).numpy(), golden)
        np.testing.assert_array_equal(compiled(scores).numpy(), golden)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_intra_golden_with_odd_channels(layout):
    feats = _features(1, ((2, 5, 4, 4), (3, 8, 2, 2)))  # C = 5: the least salient channel is left out
    expected = np.mean([_np_intra_stage(f) for f in feats])
    assert intra_layer_loss([_as_layout(f, layout) for f in feats]).item() == pytest.approx(expected, rel=1e-10)


def test_intra_hand_example():
    # channel scores: normalized maps' means; channel 1 (constant 1s) scores 0.5, channel 0 ([1,0,0,0]) 0.25
    f = torch.tensor([[[[1., 0.], [0., 0.]], [[1., 1.], [1., 1.]]]])
    # salient = channel 1, redundant = channel 0: mse = (0 + 1 + 1 + 1) / 4
    assert intra_layer_loss([f]).item() == pytest.approx(0.75)


def test_intra_gradients_and_detach():
    f = _features(2, ((2, 6, 4, 4),))[0]
    score = F.normalize(f, p=2, dim=(2, 3)).mean([0, 2, 3])
    salient = score.argsort(descending=True, stable=True)[:3]
    x = f.clone().requires_grad_()
    intra_layer_loss([x]).backward()
    assert (x.grad[:, salient].abs().sum((0, 2, 3)) > 0).all()  # reference final code: both halves learn
    x = f.clone().requires_grad_()
    intra_layer_loss([x], detach_salient=True).backward()
    assert x.grad[:, salient].abs().sum() == 0
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize('layout', LAYOUTS)
def test_saliency_metrics_golden(layout):
    f = _features(3, ((3, 4, 5, 5),))[0]
    a = f.numpy()
    f = _as_layout(f, layout)
    np.testing.assert_allclose(SALIENCY['norm'](f).numpy(), F.normalize(f, p=2, dim=(2, 3)).mean([0, 2, 3]).numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(SALIENCY['l1'](f).numpy(), np.abs(a).sum((2, 3)).mean(0), rtol=1e-12)
    np.testing.assert_allclose(SALIENCY['l2'](f).numpy(), np.sqrt((a ** 2).sum((2, 3))).mean(0), rtol=1e-12)
    ranks = np.array([[np.linalg.matrix_rank(a[n, c]) for c in range(4)] for n in range(3)]).mean(0)
    low_rank = f.contiguous()
    low_rank[:, 1] = torch.ones(5, 1, dtype=f.dtype) @ torch.arange(5., dtype=f.dtype)[None]  # rank-1 maps
    ranks[1] = 1
    np.testing.assert_allclose(SALIENCY['hrank'](low_rank).numpy(), ranks)
    entropy = []
    for c in range(4):
        v = a[:, c].ravel()
        counts, _ = np.histogram(v, bins=10, range=(v.min(), v.max()))
        p = counts / v.size
        p = p[p > 0]
        entropy.append(-(p * np.log(p)).sum())
    np.testing.assert_allclose(SALIENCY['entropy'](f).numpy(), entropy, rtol=1e-5)


def test_bn_saliency_picks_closing_bn():
    import timm
    model = timm.create_model('test_resnet')
    fn = bn_scale_saliency(model, 'layer2', model.feature_info[2]['num_chs'])
    block = model.layer2[-1]
    closing_bn = block.bn3 if hasattr(block, 'bn3') else block.bn2
    assert fn.bn is closing_bn
    torch.nn.init.uniform_(fn.bn.weight, -1, 1)
    assert torch.equal(fn(torch.zeros(1)), fn.bn.weight.detach().abs())


def test_functional_errors():
    feats = _features()
    with pytest.raises(ValueError, match='at least two stages'):
        inter_layer_loss(feats[:1])
    with pytest.raises(ValueError, match='unknown inter-layer pairs'):
        inter_layer_loss(feats, pairs='some')
    with pytest.raises(ValueError, match='unknown inter-layer direction'):
        inter_layer_loss(feats, direction='sideways')
    with pytest.raises(ValueError, match='unknown saliency'):
        intra_layer_loss(feats, saliency='magic')
    with pytest.raises(ValueError, match='wrap'):
        intra_layer_loss(feats, saliency='bn')
    with pytest.raises(ValueError, match='at least 2 channels'):
        intra_layer_loss([torch.randn(2, 1, 4, 4)])


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('channels', [6, 7])
def test_paired_channel_mse_gradients_match_autograd(layout, channels):
    from timm_tffd.losses.intra import paired_channel_mse
    f = _as_layout(torch.randn(5, channels, 3, 3, dtype=torch.float64), layout).requires_grad_()
    expected_value = F.mse_loss(f[:, [1, 5, 2]], f[:, [4, 0, 6 if channels == 7 else 3]])
    assert paired_channel_mse(f, torch.tensor([4, 0, 6 if channels == 7 else 3]), torch.tensor([1, 5, 2])).item() \
        == pytest.approx(expected_value.item(), rel=1e-12)
    # with 7 channels, channel 3 is left out
    salient, redundant = torch.tensor([4, 0, 6 if channels == 7 else 3]), torch.tensor([1, 5, 2])
    # numerical Jacobian only without the stop-gradient (which it cannot see)
    assert torch.autograd.gradcheck(lambda x: paired_channel_mse(x, salient, redundant), (f,))
    for detach in (False, True):
        ref_salient = f[:, salient].detach() if detach else f[:, salient]
        expected = torch.autograd.grad(F.mse_loss(f[:, redundant], ref_salient), f)[0]
        got = torch.autograd.grad(paired_channel_mse(f, salient, redundant, detach), f)[0]
        torch.testing.assert_close(got, expected)
        if channels == 7:
            assert (got[:, 3] == 0).all()
        if detach:
            assert (got[:, salient] == 0).all()


@pytest.mark.parametrize('layout', LAYOUTS + ('strided',))
def test_channel_gather_matches_advanced_indexing(layout):
    """``intra._channels`` (index_select, a gather along a channels-last map's channels, or advanced indexing) picks
    exactly ``f[:, index]``, half the channels or all of them in another order, float32 and float16, with the result's
    values whatever its strides."""
    from timm_tffd.losses.intra import _channels
    for dtype in (torch.float32, torch.float16):
        base = torch.randn(3, 10, 4, 6).to(dtype)
        f = base[:, :, :, ::2] if layout == 'strided' else _as_layout(base, layout)
        for index in (torch.tensor([7, 2, 9, 0, 4]), torch.randperm(10, generator=torch.Generator().manual_seed(1))):
            got = _channels(f, index)
            assert got.shape == (3, len(index)) + f.shape[2:] and got.dtype == dtype
            assert torch.equal(got, f[:, index])
            assert torch.equal(got, torch.stack([f[:, int(i)] for i in index], 1))


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('channels', [6, 7])
def test_partner_mse_equals_paired_channel_mse(layout, channels):
    """The same arguments, value and gradients as autograd through both indexed halves, with both halves learning and
    with the salient half detached, and with a channel left out (7 channels)."""
    from timm_tffd.losses.intra import paired_channel_mse, partner_mse
    f = _as_layout(torch.randn(5, channels, 3, 3, dtype=torch.float64), layout).requires_grad_()
    salient, redundant = torch.tensor([4, 0, 6 if channels == 7 else 3]), torch.tensor([1, 5, 2])
    for detach in (False, True):
        want = paired_channel_mse(f, salient, redundant, detach)
        got = partner_mse(f, salient, redundant, detach)
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        want_grad = torch.autograd.grad(want, f)[0]
        torch.testing.assert_close(torch.autograd.grad(got, f)[0], want_grad, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda x: partner_mse(x, salient, redundant), (f,))
    half = f.detach().half().requires_grad_()
    half_loss = partner_mse(half, salient, redundant, True)
    assert half_loss.dtype == torch.float32 and half_loss.item() == pytest.approx(want.item(), rel=1e-2)
    half_grad = torch.autograd.grad(half_loss, half)[0]
    assert half_grad.dtype == torch.float16
    torch.testing.assert_close(half_grad.double(), want_grad, rtol=1e-2, atol=1e-3)  # the salient half: 0


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('channels', [6, 7])
def test_partner_sum_equals_paired_channel_mse(layout, channels):
    """The compiled channels-last form: from the whole salience order, the same value and gradients as autograd
    through both indexed halves, both halves learning and the salient half detached, a channel left out (7), and the
    gradients of a float16 map in float16."""
    from timm_tffd.losses.intra import _partner_sum, paired_channel_mse
    f = _as_layout(torch.randn(5, channels, 3, 3, dtype=torch.float64), layout).requires_grad_()
    ranked = torch.tensor([4, 0, 6, 1, 5, 2, 3] if channels == 7 else [4, 0, 3, 1, 5, 2])
    salient, redundant = ranked[:3], ranked[3:6]
    for detach in (False, True):
        want = paired_channel_mse(f, salient, redundant, detach)
        got = _partner_sum(f, ranked, 3, detach)
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        want_grad = torch.autograd.grad(want, f)[0]
        torch.testing.assert_close(torch.autograd.grad(got, f)[0], want_grad, rtol=1e-12, atol=0)
    half = f.detach().half().requires_grad_()
    half_loss = _partner_sum(half, ranked, 3, True)
    assert half_loss.dtype == torch.float32 and half_loss.item() == pytest.approx(want.item(), rel=1e-2)
    half_grad = torch.autograd.grad(half_loss, half)[0]
    assert half_grad.dtype == torch.float16
    torch.testing.assert_close(half_grad.double(), want_grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('channels', [6, 7])
@pytest.mark.parametrize('detach_salient', [False, True])
def test_recomputed_intra_stage_equals_definition(layout, channels, detach_salient):
    """``intra_stage_loss`` as a wrapped model computes it (``recompute=True``: the pairing and the salient mask built
    from the saliency order, then ``partner_mse``) against the definition by indexing and autograd."""
    f = _as_layout(torch.randn(4, channels, 5, 3, dtype=torch.float64), layout).requires_grad_()
    got = intra_stage_loss(f, 'norm', detach_salient, recompute=True)
    want = _torch_intra([f], detach_salient)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, f)[0], torch.autograd.grad(want, f)[0], rtol=1e-12, atol=0)


def test_partner_mse_second_order_gradients():
    from timm_tffd.losses.intra import partner_mse
    f = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    salient, redundant = torch.tensor([1, 3]), torch.tensor([2, 0])  # channel 4 left out
    for detach in (False, True):
        assert torch.autograd.gradgradcheck(lambda x: partner_mse(x, salient, redundant, detach), (f,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_partner_mse_float16_gradient_on_cuda():
    """A float16 map's gradient is computed in float32 and rounded once. Here the scale, 2 / n times a small upstream
    gradient, is below float16's smallest subnormal (1.45e-8), while the gradient itself is in float16's range: a
    multiply by the scale rounded to float16 first would give zeros."""
    from timm_tffd.losses.intra import partner_mse
    f = torch.randn(6, 64, 60, 60, generator=torch.Generator().manual_seed(0)).mul_(3000.).cuda()
    salient, redundant = torch.arange(0, 64, 2, device='cuda'), torch.arange(1, 64, 2, device='cuda')
    ref = f.double().requires_grad_()
    want = torch.autograd.grad(partner_mse(ref, salient, redundant) * 0.005, ref)[0]
    half = f.half().requires_grad_()
    got = torch.autograd.grad(partner_mse(half, salient, redundant) * 0.005, half)[0]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-7)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('kernel', [(2, 2), (1, 2), (2, 1), (4, 4), (3, 3), (2, 3)])
def test_block_mean_equals_average_pooling(layout, kernel):
    """Inter's pooling (a matrix product eager on the CPU in float32 for blocks up to 2 x 2, else ``avg_pool2d``)
    against block means in float64 (numpy), values and gradients, in every map layout, and under bfloat16 autocast
    (where a matrix product would otherwise run in bfloat16)."""
    from timm_tffd.losses.inter import block_mean
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 12, 12, generator=g)
    upstream = torch.randn(3, 5, 12 // kernel[0], 12 // kernel[1], generator=g)
    size = (12 // kernel[0], 12 // kernel[1])
    want = torch.from_numpy(_np_pool(base.double().numpy(), size))
    # d sum(upstream * mean) / df: each value gets its block's upstream gradient over the block size
    want_grad = upstream.double().repeat_interleave(kernel[0], 2).repeat_interleave(kernel[1], 3) / (
        kernel[0] * kernel[1])
    for autocast in (False, True):
        f = _as_layout(base.clone(), layout).requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            got = block_mean(f, kernel)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        grad = torch.autograd.grad((got * upstream).sum(), f)[0]
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=1e-7)


def test_block_mean_takes_the_product_where_it_should(monkeypatch):
    """Eager on the CPU, a contiguous float32 map at most 128 wide pooled by blocks up to 2 x 2 takes the matrix
    product; larger blocks, wider maps, other layouts and dtypes take ``avg_pool2d``."""
    from timm_tffd.losses import inter
    real, calls = F.avg_pool2d, []

    def counted(x, kernel, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, kernel, *args, **kwargs)
    monkeypatch.setattr(F, 'avg_pool2d', counted)
    x = torch.randn(2, 3, 8, 12)
    for kernel in ((2, 2), (1, 2), (2, 1)):
        inter.block_mean(x, kernel)
    inter.block_mean(torch.randn(1, 2, 4, 128), (2, 2))
    assert calls == []
    for f, kernel in ((x, (4, 4)), (x, (1, 3)), (torch.randn(1, 2, 4, 130), (2, 2)), (x.double(), (2, 2)),
                      (x.contiguous(memory_format=torch.channels_last), (2, 2)), (x[..., :10], (2, 2))):
        inter.block_mean(f, kernel)
    assert len(calls) == 6


def test_inter_pooling_composes_for_non_integer_ratios():
    # 7x7 -> 3x3 is not an integer ratio: adaptive pooling is used, matching F.adaptive_avg_pool2d
    a, b = torch.randn(2, 3, 7, 7, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = F.mse_loss(F.adaptive_avg_pool2d(a, 3), b[:, :3])
    torch.testing.assert_close(inter_layer_loss([a, b]), expected)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_intra_float16_maps_with_large_values_stay_finite(layout):
    # AMP's float16 maps: differences of a few hundred square past float16's 65504
    f = _features(6, ((2, 6, 4, 4),))[0]
    f += torch.tensor([0., 3., 1., 5., 2., 4.], dtype=f.dtype)[:, None, None]  # well-separated saliencies
    f = (300 * f).half().requires_grad_()
    expected = _np_intra_stage(f.detach().double())
    got = intra_layer_loss([_as_layout(f, layout)])
    assert torch.isfinite(got) and got.item() == pytest.approx(expected, rel=1e-3)
    assert expected > 65504
    got.backward()
    ref = f.detach().double().requires_grad_()
    _torch_intra([ref]).backward()
    assert f.grad.dtype == torch.float16 and torch.isfinite(f.grad).all()
    torch.testing.assert_close(f.grad.double(), ref.grad, rtol=1e-2, atol=1e-3)


def _leaves(shapes, layout, seed=0):
    """Float64 leaves and differentiable views of them in ``layout`` (see ``_as_layout``)."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    return leaves, [_as_layout(f, layout) for f in leaves]


TERM_SHAPES = {
    'cnn': ((3, 4, 8, 8), (3, 7, 4, 4), (3, 8, 2, 2)),  # odd channel count: a channel left out of intra
    'isotropic': ((3, 6, 4, 4),) * 4 + ((3, 5, 2, 2),),  # an equal-shape run (inter's O(L) path) and a rest pair
}


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shapes', list(TERM_SHAPES))
@pytest.mark.parametrize('detach_salient', [False, True])
@pytest.mark.parametrize('frozen_first', [False, True])
def test_terms_gradients_equal_plain_autograd(layout, shapes, detach_salient, frozen_first):
    """inter + intra beside a plain autograd term on the same maps, against the definitions with plain autograd."""
    def loss(maps, reference):
        if frozen_first:  # e.g. a frozen first stage: a map that needs no gradient
            maps = [maps[0].detach()] + maps[1:]
        if reference:
            inter = _torch_pairwise(maps, inter_layer_pairs(len(maps)))
            intra = _torch_intra(maps, detach_salient)
        else:
            inter, intra = inter_layer_loss(maps), intra_layer_loss(maps, detach_salient=detach_salient)
        return 0.7 * inter + 0.3 * intra + sum((m * m.detach().sin()).mean() for m in maps)

    leaves, maps = _leaves(TERM_SHAPES[shapes], layout)
    expected = torch.autograd.grad(loss(maps, True), leaves[frozen_first:])
    leaves, maps = _leaves(TERM_SHAPES[shapes], layout)
    got = torch.autograd.grad(loss(maps, False), leaves[frozen_first:])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_second_order_gradients_through_the_terms(layout):
    """A gradient penalty on the Tf-FD terms: create_graph backward, then backward again. Reference: the same terms
    written with plain autograd ops (pool by avg_pool2d, pairs by indexing)."""
    def reference(maps):
        f0, f1, f2 = maps
        inter = (F.mse_loss(F.avg_pool2d(f0, 2), f1[:, :4].detach()) + F.mse_loss(F.avg_pool2d(f0, 4),
                 f2[:, :4].detach()) + F.mse_loss(F.avg_pool2d(f1, 2)[:, :7], f2[:, :7].detach())) / 3
        intra = 0.
        for f in maps:
            with torch.no_grad():
                order = SALIENCY['norm'](f).argsort(descending=True, stable=True)
            half = f.shape[1] // 2
            intra = intra + F.mse_loss(f[:, order[half:2 * half]], f[:, order[:half]])
        return inter + intra / 3

    def penalty_grad(fn):
        leaves, maps = _leaves(TERM_SHAPES['cnn'], layout)
        grads = torch.autograd.grad(fn(maps), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)

    expected = penalty_grad(reference)
    got = penalty_grad(lambda m: inter_layer_loss(m) + intra_layer_loss(m))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('family', ['resnet', 'swin', 'vit'])
def test_wrapped_model_terms_equal_plain_autograd(family):
    """On the maps a wrapped model taps (NCHW stage outputs, Swin's permuted NHWC maps, a ViT's token views without
    the class token), the terms and the parameter gradients they give equal the definitions with plain autograd."""
    import timm_tffd
    from test_wrap import _create
    model, x = _create(family)
    model = timm_tffd.wrap(model, 'inter,intra')
    model.train()
    timm_tffd.get_tffd_state(model).keep_features = True
    model(x)
    stash = timm_tffd.get_tffd_state(model).take()
    feats = stash.features
    params = [p for p in model.parameters() if p.requires_grad]
    inter, intra = stash.terms['inter'], stash.terms['intra']
    ref_inter, ref_intra = _torch_pairwise(feats, inter_layer_pairs(len(feats))), _torch_intra(feats)
    torch.testing.assert_close(inter, ref_inter)
    torch.testing.assert_close(intra, ref_intra)
    got = torch.autograd.grad(inter + intra, params, retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(ref_inter + ref_intra, params, allow_unused=True)
    assert sum(e is not None for e in expected) > 0
    for e, g in zip(expected, got):
        assert (e is None) == (g is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('pairs,direction', [('all', 'top-down'), ('all', 'bidirectional'), ('adjacent', 'bottom-up')])
@pytest.mark.parametrize('size', [32, 37])  # 37: sizes 19/10/5/3, where pooling ahead by the reductions' ratio fails
@pytest.mark.parametrize('preact', [False, True])
def test_terms_computed_at_tap_time_equal_plain_autograd(pairs, direction, size, preact):
    """A ResNet is tapped with hooks and its terms are computed stage by stage as the forward runs (pairs at their
    later stage, students pooled ahead, intra's differences recomputed in the backward): same terms and parameter
    gradients as the definitions on the tapped maps."""
    import timm
    import timm_tffd
    torch.manual_seed(0)
    model = timm_tffd.wrap(timm.create_model('test_resnet', num_classes=5), 'inter,intra', pairs=pairs,
                           direction=direction, preact=preact).train()
    state = timm_tffd.get_tffd_state(model)
    assert state.taps.mode == ('preact' if preact else 'hooks') and set(state.staged) == {'inter', 'intra'}
    assert state.methods['intra'].recompute is not preact  # a pre-activation copy is not kept by the network
    state.keep_features = True
    model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)))
    stash = state.take()
    feats = stash.features
    params = [p for p in model.parameters() if p.requires_grad]
    ref_inter = _torch_pairwise(feats, inter_layer_pairs(len(feats), pairs, direction))
    ref_intra = _torch_intra(feats)
    torch.testing.assert_close(stash.terms['inter'], ref_inter, rtol=1e-6, atol=0)
    torch.testing.assert_close(stash.terms['intra'], ref_intra, rtol=1e-6, atol=0)
    got = torch.autograd.grad(stash.terms['inter'] + stash.terms['intra'], params, retain_graph=True,
                              allow_unused=True)
    expected = torch.autograd.grad(ref_inter + ref_intra, params, allow_unused=True)
    scale = max(float(e.abs().max()) for e in expected if e is not None)
    for e, g in zip(expected, got):
        assert (e is None) == (g is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * scale)
