"""The shared gradient buffer (timm_tffd.losses.sink) changes where gradients are summed, never what they are."""
import sys

import pytest
import torch
import torch.nn as nn

import timm_tffd
from timm_tffd import TfFDLoss, inter_layer_loss, intra_layer_loss, wrap
from timm_tffd.losses import sink as sink_module
from timm_tffd.losses.sink import sink_features, sink_slot

from test_losses import LAYOUTS, _as_layout
from test_wrap import MODELS, _create


def _leaves(shapes, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    leaves, maps = [], []
    for f in base:
        leaf = f.clone().requires_grad_()
        leaves.append(leaf)
        maps.append(_as_layout(leaf, layout))  # a differentiable view of the leaf in the wanted layout
    return leaves, maps


def _terms(maps, order, detach_salient):
    """A weighted sum of Tf-FD terms plus a plain autograd term on the same maps, in the given order."""
    terms = {
        'inter': lambda: 0.7 * inter_layer_loss(maps),
        'intra': lambda: 0.3 * intra_layer_loss(maps, detach_salient=detach_salient),
        'plain': lambda: sum((m * m.detach().sin()).mean() for m in maps),  # autograd only, knows nothing of the sink
    }
    return sum(terms[name]() for name in order)


SHAPES = {
    'cnn': ((3, 4, 8, 8), (3, 7, 4, 4), (3, 8, 2, 2)),  # odd channel count: a channel left out of intra
    'isotropic': ((3, 6, 4, 4),) * 4 + ((3, 5, 2, 2),),  # an equal-shape run (inter's O(L) path) and a rest pair
}


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shapes', list(SHAPES))
@pytest.mark.parametrize('order', [('inter', 'intra', 'plain'), ('plain', 'intra', 'inter'), ('intra', 'inter')])
@pytest.mark.parametrize('detach_salient', [False, True])
def test_sink_gradients_equal_plain_autograd(layout, shapes, order, detach_salient):
    leaves, maps = _leaves(SHAPES[shapes], layout)
    expected = torch.autograd.grad(_terms(maps, order, detach_salient), leaves)

    leaves, maps = _leaves(SHAPES[shapes], layout)
    shared = sink_features(maps)
    assert all(a is not m and sink_slot(a) is not None for a, m in zip(shared, maps))
    got = torch.autograd.grad(_terms(shared, order, detach_salient), leaves)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_sink_buffers_keep_the_map_layout_and_are_released(layout, monkeypatch):
    _, maps = _leaves(SHAPES['cnn'], layout)
    shared = sink_features(maps)
    sink = sink_slot(shared[0])[0]
    seen = []
    release = sink.release

    def spy():
        grads = release()
        seen.extend(grads)
        return grads
    monkeypatch.setattr(sink, 'release', spy)
    (inter_layer_loss(shared) + intra_layer_loss(shared)).backward()
    assert [g is not None for g in seen] == [True, True, True]  # every map got its terms' gradient in one buffer
    for (whole, view), m in zip(seen, maps):
        assert view.shape == m.shape and view.stride() == m.stride()
        if layout == 'token_view':  # the whole token tensor, class-token rows zero, the map a view of it
            assert whole.shape == m._base.shape and view._base is whole and view.storage_offset() == m.shape[1]
            assert (whole[:, 0] == 0).all()
        else:
            assert whole is view
    assert sink.grads == [None, None, None]


def test_sink_survives_a_second_backward_with_retained_graph():
    leaves, maps = _leaves(SHAPES['cnn'], 'contiguous')
    once = torch.autograd.grad(inter_layer_loss(maps) + intra_layer_loss(maps), leaves)
    leaves, maps = _leaves(SHAPES['cnn'], 'contiguous')
    shared = sink_features(maps)
    loss = inter_layer_loss(shared) + intra_layer_loss(shared)
    loss.backward(retain_graph=True)
    loss.backward()
    for leaf, g in zip(leaves, once):
        torch.testing.assert_close(leaf.grad, 2 * g, rtol=1e-12, atol=1e-14)


def test_sink_is_skipped_without_gradients_and_under_compile(monkeypatch):
    _, maps = _leaves(SHAPES['cnn'], 'contiguous')
    with torch.no_grad():
        assert sink_features(maps) == maps
    detached = [m.detach() for m in maps]
    assert all(a is m for a, m in zip(sink_features(detached), detached))
    monkeypatch.setattr(sink_module.torch.compiler, 'is_compiling', lambda: True)
    assert all(a is m for a, m in zip(sink_features(maps), maps))


@pytest.mark.parametrize('family, methods', [
    ('resnet', 'inter,intra'), ('resnet', 'inter,intra,emd'), ('swin', 'inter,intra'),
    ('vit', 'inter,intra'), ('vit', 'inter,intra,m2o,emd'),  # m2o: a ViT's blocks keep their width
])
def test_wrapped_model_gradients_unchanged_by_the_sink(family, methods, monkeypatch):
    """Parameter gradients of a whole training step with the shared buffers equal those of plain autograd."""
    def step(use_sink):
        if not use_sink:
            monkeypatch.setattr(sys.modules['timm_tffd.wrap'], 'sink_features', list)
        model, x = _create(family)
        model = wrap(model, methods)
        criterion = TfFDLoss(nn.CrossEntropyLoss(), model, warmup_epochs=0)
        model.train()
        torch.manual_seed(3)
        criterion(model(x), torch.arange(4) % 5).backward()
        monkeypatch.undo()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    expected, got = step(False), step(True)
    assert len(expected) == len(got) > 0
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


class _FailOnce(torch.autograd.Function):
    """A consumer made before the terms: its backward runs after theirs and before the alias node's."""
    failed = False

    @staticmethod
    def forward(ctx, x):
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        if not _FailOnce.failed:
            _FailOnce.failed = True
            raise RuntimeError('interrupted backward')
        return None


def test_interrupted_backward_leaves_nothing_for_the_retry():
    leaves, maps = _leaves(SHAPES['cnn'], 'contiguous')
    expected = torch.autograd.grad(inter_layer_loss(maps) + intra_layer_loss(maps), leaves)
    leaves, maps = _leaves(SHAPES['cnn'], 'contiguous')
    shared = sink_features(maps)
    _FailOnce.failed = False
    loss = _FailOnce.apply(shared[1]) + inter_layer_loss(shared) + intra_layer_loss(shared)
    with pytest.raises(RuntimeError, match='interrupted'):
        loss.backward(retain_graph=True)
    assert any(g is not None for g in sink_slot(shared[0])[0].grads)  # the terms had written their buffers
    loss.backward()
    for leaf, e in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, e, rtol=1e-12, atol=1e-14)


def test_frozen_maps_are_not_aliased(monkeypatch):
    leaves, maps = _leaves(SHAPES['cnn'], 'contiguous')
    maps[0] = maps[0].detach()  # e.g. a frozen first stage
    shared = sink_features(maps)
    assert shared[0] is maps[0] and sink_slot(shared[0]) is None and sink_slot(shared[1]) is not None
    claimed = []
    claim = sink_module.GradSink.claim
    monkeypatch.setattr(sink_module.GradSink, 'claim', lambda self, i: claimed.append(i) or claim(self, i))
    expected = torch.autograd.grad(inter_layer_loss(maps) + intra_layer_loss(maps), leaves[1:])
    got = torch.autograd.grad(inter_layer_loss(shared) + intra_layer_loss(shared), leaves[1:])
    assert sorted(set(claimed)) == [0, 1]  # the sink's own indices: maps 1 and 2, never the frozen one
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_compile_check_falls_back_to_dynamo_where_torch_compiler_lacks_it(monkeypatch):
    import types
    import torch._dynamo
    old_compiler = types.SimpleNamespace()  # torch < 2.3: torch.compiler has no is_compiling
    monkeypatch.setattr(torch._dynamo, 'is_compiling', lambda: True)
    assert sink_module._is_compiling(old_compiler) is True
    monkeypatch.setattr(torch._dynamo, 'is_compiling', lambda: False)
    assert sink_module._is_compiling(old_compiler) is False


@pytest.mark.parametrize('layout', LAYOUTS)
def test_second_order_gradients_through_the_terms(layout):
    """A gradient penalty on the Tf-FD terms: create_graph backward, then backward again. Reference: the same terms
    written with plain autograd ops (pool by avg_pool2d, pairs by indexing)."""
    import torch.nn.functional as F

    def reference(maps):
        f0, f1, f2 = maps
        inter = (F.mse_loss(F.avg_pool2d(f0, 2), f1[:, :4].detach()) + F.mse_loss(F.avg_pool2d(f0, 4), f2[:, :4].detach())
                 + F.mse_loss(F.avg_pool2d(f1, 2)[:, :7], f2[:, :7].detach())) / 3
        intra = 0.
        for f in maps:
            with torch.no_grad():
                order = timm_tffd.losses.saliency.norm_saliency(f).argsort(descending=True)
            half = f.shape[1] // 2
            intra = intra + F.mse_loss(f[:, order[half:2 * half]], f[:, order[:half]])
        return inter + intra / 3

    def penalty_grad(fn, use_sink):
        leaves, maps = _leaves(SHAPES['cnn'], layout)
        used = sink_features(maps) if use_sink else maps
        grads = torch.autograd.grad(fn(used), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)

    expected = penalty_grad(reference, False)
    for use_sink in (False, True):
        got = penalty_grad(lambda m: inter_layer_loss(m) + intra_layer_loss(m), use_sink)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_token_views_alias_the_token_tensor():
    """A ViT's tapped map is a view of its block's tokens minus the class token: the alias takes the token tensor
    itself, so the gradient reaches it without autograd's zero-filled copy of the view (no slice node)."""
    leaves, maps = _leaves(SHAPES['cnn'], 'token_view')
    tokens = [m._base for m in maps]
    shared = sink_features(maps)
    node = shared[0].grad_fn
    assert [fn for fn, _ in node.next_functions] == [t.grad_fn for t in tokens]  # the CatBackward of each token tensor
    for a, m in zip(shared, maps):
        assert torch.equal(a, m) and a.stride() == m.stride() and a.storage_offset() == m.storage_offset()


def test_token_base_only_for_a_whole_grid_without_prefix_tokens():
    from timm_tffd.losses.sink import _token_base
    tokens = torch.randn(2, 10, 6, requires_grad=True) * 1  # 1 prefix token and a 3 x 3 grid
    grid = tokens[:, 1:].unflatten(1, (3, 3)).permute(0, 3, 1, 2)
    assert _token_base(grid) == (tokens, 1)
    assert _token_base(tokens[:, 2:6].unflatten(1, (2, 2)).permute(0, 3, 1, 2)) is None  # part of the grid
    assert _token_base(tokens[:, 1:, :4].unflatten(1, (3, 3)).permute(0, 3, 1, 2)) is None  # part of the channels
    assert _token_base(tokens[:, 1:].unflatten(1, (3, 3)).permute(0, 3, 2, 1)) is None  # transposed grid
    no_prefix = torch.randn(2, 9, 6, requires_grad=True) * 1
    assert _token_base(no_prefix.unflatten(1, (3, 3)).permute(0, 3, 1, 2)) is None  # nothing dropped: nothing to gain
    strided = torch.randn(2, 6, 10, requires_grad=True).transpose(1, 2)  # a token tensor that is not contiguous
    assert _token_base(strided[:, 1:].unflatten(1, (3, 3)).permute(0, 3, 1, 2)) is None
    assert _token_base(grid.detach()) is None and _token_base(torch.randn(2, 6, 3, 3)) is None


def test_token_view_reached_by_plain_autograd_only():
    """No sink-aware term claims the buffer: the plain gradient is placed in a token tensor with zero class rows."""
    def plain(maps):
        return sum((m * m.detach().cos()).sum() for m in maps)
    leaves, maps = _leaves(SHAPES['cnn'], 'token_view')
    expected = torch.autograd.grad(plain(maps), leaves)
    leaves, maps = _leaves(SHAPES['cnn'], 'token_view')
    got = torch.autograd.grad(plain(sink_features(maps)), leaves)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
