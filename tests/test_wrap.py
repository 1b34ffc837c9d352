"""wrap() / TfFDLoss / TfFDTask on a broad set of tiny timm models."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import timm_tffd
from timm_tffd import TfFDConfig, TfFDLoss, TfFDTask, inter_layer_loss, intra_layer_loss, unwrap, wrap

# name -> (create_model kwargs, input size): the smallest variant of each family that keeps its structure
MODELS = {
    'resnet': ('test_resnet', {}, 32),
    'resnet-d': ('resnet18d', dict(layers=(1, 1, 1, 1)), 32),
    'convnext': ('test_convnext', {}, 32),
    'efficientnet': ('test_efficientnet', {}, 32),
    'mobilenetv3': ('mobilenetv3_small_050', {}, 32),
    'regnet': ('regnetx_002', {}, 32),
    'densenet': ('densenet121', dict(block_config=(1, 1, 1, 1)), 32),
    'vgg': ('vgg11', dict(mlp_ratio=1 / 64), 32),
    'vit': ('test_vit', dict(img_size=32), 32),
    'deit': ('deit_tiny_patch16_224', dict(img_size=32, depth=3), 32),
    'swin': ('swin_tiny_patch4_window7_224',
             dict(img_size=32, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), 32),
}


def _create(family, num_classes=5):
    name, kwargs, size = MODELS[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    return model, torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('family', list(MODELS))
def test_wrap_any_model(family):
    model, x = _create(family)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)

    wrapped = wrap(model, 'inter,intra', warmup_epochs=0)
    assert wrapped is model and type(wrapped) is type(reference)
    with torch.no_grad():
        assert torch.equal(wrapped(x), expected)  # eval: the class forward, untouched
    assert timm_tffd.get_tffd_state(model).stash is None  # and no Tf-FD work
    assert list(wrapped.state_dict()) == list(state)
    assert all(torch.equal(wrapped.state_dict()[k], v) for k, v in state.items())

    # train: same logits, loss and parameter gradients as plain timm with independently computed terms
    wrapped.train()
    reference.train()
    target = torch.arange(4) % 5
    torch.manual_seed(2)  # same drop-path / dropout draws in both passes
    ref_loss = _reference_loss(reference, x, target, weights=(0.005, 0.0004))
    ref_loss.backward()
    criterion = TfFDLoss(nn.CrossEntropyLoss(), wrapped)
    torch.manual_seed(2)
    out = wrapped(x)
    result = criterion.compute(out, target)
    for key in ('loss', 'tffd_inter', 'tffd_intra'):
        assert torch.isfinite(result[key]) and result[key] > 0, key
    torch.testing.assert_close(result['loss'], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    result['loss'].backward()
    # float32 sums in another order (hooks: the terms' backward runs stage by stage): 1e-5 of the largest gradient
    scale = max(float(q.grad.abs().max()) for q in reference.parameters() if q.grad is not None)
    for (name, p), q in zip(wrapped.named_parameters(), reference.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)

    assert unwrap(wrapped) is model and 'forward' not in vars(model)
    assert not timm_tffd.is_wrapped(model)


def _reference_loss(model, x, target, weights):
    """CE + lambda_inter * inter + lambda_intra * intra on an unwrapped model, written from the reference code's
    definitions (all pairs top-down, adaptive average pooling to the smaller map, first C channels, detached target;
    channels ranked by the mean of their l2-normalized maps, rank k paired with rank k + C // 2)."""
    indices = timm_tffd.resolve_stages(model)
    final, feats = model.forward_intermediates(x, indices=indices)
    logits = model.forward_head(final)
    pairs = []
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            s, t = feats[i], feats[j].detach()
            size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
            c = min(s.shape[1], t.shape[1])
            pairs.append(F.mse_loss(F.adaptive_avg_pool2d(s, size)[:, :c], F.adaptive_avg_pool2d(t, size)[:, :c]))
    inter = torch.stack(pairs).mean()
    stages = []
    for f in feats:
        half = f.shape[1] // 2
        with torch.no_grad():
            order = F.normalize(f.double(), p=2, dim=(2, 3)).mean((0, 2, 3)).argsort(descending=True, stable=True)
        stages.append(F.mse_loss(f[:, order[:half]], f[:, order[half:2 * half]]))
    intra = torch.stack(stages).mean()
    return F.cross_entropy(logits, target) + weights[0] * inter + weights[1] * intra


def test_one_backbone_pass_and_total_loss():
    model, x = _create('resnet')
    reference = copy.deepcopy(model)
    calls = []
    model.layer1.register_forward_hook(lambda *a: calls.append(1))
    wrap(model, 'inter,intra', weights={'inter': 0.5, 'intra': 0.25}, warmup_epochs=4).train()
    crit = TfFDLoss(LabelSmoothingCrossEntropy(0.1), model)
    crit.set_epoch(1)  # warm-up multiplier (1 + 1) / 4
    target = torch.tensor([0, 1, 2, 3])
    out = model(x)
    assert len(calls) == 1
    loss = crit(out, target)
    # independent: plain timm forward_intermediates (train mode, same batch) and the functional losses
    reference.train()
    final, feats = reference.forward_intermediates(x, indices=[1, 2, 3, 4])
    logits = reference.forward_head(final)
    base = LabelSmoothingCrossEntropy(0.1)(logits, target)
    expected = base + 0.5 * (0.5 * inter_layer_loss(feats) + 0.25 * intra_layer_loss(feats))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize('base,target_kind', [
    (nn.CrossEntropyLoss(), 'index'),
    (LabelSmoothingCrossEntropy(0.1), 'index'),
    (SoftTargetCrossEntropy(), 'soft'),
    (BinaryCrossEntropy(smoothing=0.1), 'index'),
])
def test_any_base_loss(base, target_kind):
    model, x = _create('convnext')
    wrap(model, warmup_epochs=0).train()
    target = torch.arange(4) % 5
    if target_kind == 'soft':
        target = torch.softmax(torch.randn(4, 5), -1)  # mixup-style soft targets
    crit = TfFDLoss(base, model)
    out = model(x)
    result = crit.compute(out, target)
    torch.testing.assert_close(result['base_loss'], base(out, target))
    torch.testing.assert_close(result['tffd'], 0.005 * result['tffd_inter'] + 0.0004 * result['tffd_intra'])
    torch.testing.assert_close(result['loss'], result['base_loss'] + result['tffd'])


def test_criterion_needs_fresh_training_forward():
    model, x = _create('resnet')
    wrap(model).train()
    crit = TfFDLoss(nn.CrossEntropyLoss(), model)
    target = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match='fresh training-mode forward'):
        crit(torch.randn(4, 5), target)  # no forward yet
    out = model(x)
    crit(out, target)
    with pytest.raises(RuntimeError, match='never reused'):
        crit(out, target)  # the same forward twice
    model(x)
    with pytest.raises(RuntimeError, match='fresh training-mode forward'):
        crit(out, target)  # logits of an earlier forward
    model.eval()
    with torch.no_grad():
        out = model(x)
    with pytest.raises(RuntimeError, match='fresh training-mode forward'):
        crit(out, target)


def test_tapped_maps_are_kept_only_for_their_readers():
    """By default the stash holds the terms alone (a compiled forward would otherwise have to hand the maps out);
    ``keep_features`` adds the maps, and the readers that need them turn it on."""
    model, x = _create('resnet')
    wrap(model).train()
    state = timm_tffd.get_tffd_state(model)
    model(x)
    assert state.peek().features is None and set(state.peek().terms) == {'inter', 'intra'}
    with pytest.raises(RuntimeError, match='does not keep its tapped maps'):
        timm_tffd.tapped_features(model)
    TfFDLoss(nn.CrossEntropyLoss(), model)
    assert not state.keep_features
    TfFDLoss(nn.CrossEntropyLoss(), model, check_finite=True)
    assert state.keep_features
    model(x)
    feats = timm_tffd.tapped_features(model)
    assert [f.shape[1] for f in feats] == state.taps.channels
    sfd_student, _ = _create('resnet')
    timm_tffd.SFDTask(sfd_student, timm.create_model('test_resnet', num_classes=5), tffd='inter', verbose=False)
    assert timm_tffd.get_tffd_state(sfd_student).keep_features


def test_non_finite_features_are_reported():
    model, x = _create('resnet')
    wrap(model).train()
    crit = TfFDLoss(nn.CrossEntropyLoss(), model, check_finite=True)
    with torch.no_grad():
        model.layer3[0].conv1.weight.fill_(float('inf'))
    with pytest.raises(FloatingPointError, match=r"stage\(s\) \['3:layer3', '4:layer4'\]"):
        crit(model(x), torch.zeros(4, dtype=torch.long))
    assert timm_tffd.diagnose_nonfinite(model, x) == ['3:layer3', '4:layer4']
    # by default nothing is checked in the step: the terms come back non-finite for the loop to find
    result = TfFDLoss(nn.CrossEntropyLoss(), model).compute(model(x), torch.zeros(4, dtype=torch.long))
    assert not torch.isfinite(result['tffd_inter'])


@pytest.mark.parametrize('family', ['resnet', 'vit', 'convnext'])
def test_default_step_reads_no_tensor_value_on_the_host(family, monkeypatch):
    """A default training step (forward, Tf-FD loss, backward, optimizer step) never waits for the device."""
    model, x = _create(family)
    task = TfFDTask(model, nn.CrossEntropyLoss(), verbose=False).train()
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01, momentum=0.9)
    target = torch.arange(4) % 5
    reads = []
    for name in ('__bool__', 'item', 'tolist', '__float__', '__int__', '__index__'):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(2):
        result = task(x, target)
        result['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
    monkeypatch.undo()
    assert reads == []
    assert torch.isfinite(result['loss'])
    # the counter does see a read
    monkeypatch.setattr(torch.Tensor, '__bool__', lambda self: reads.append('__bool__') or True)
    bool(result['loss'] > 0)
    assert reads == ['__bool__']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('family', ['resnet', 'vit', 'convnext'])
@pytest.mark.parametrize('amp', [False, True])
def test_default_step_does_not_synchronize_on_cuda(family, amp):
    """On a GPU a default training step (forward under float16 autocast or not, Tf-FD loss, backward, SGD step) makes
    no operation that waits for the device: ``torch.cuda.set_sync_debug_mode('error')`` raises at any that would."""
    model, x = _create(family)
    model.cuda().to(memory_format=torch.channels_last)
    x, target = x.cuda().contiguous(memory_format=torch.channels_last), (torch.arange(4) % 5).cuda()
    task = TfFDTask(model, nn.CrossEntropyLoss(), verbose=False).train()
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast('cuda', dtype=torch.float16, enabled=amp):
            result = task(x, target)
        result['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
        return result
    step()  # lazy initialization (kernels, the optimizer's state) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        result = step()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert torch.isfinite(result['loss']) and result['tffd'] > 0


def test_schedule():
    s = TfFDConfig(warmup_epochs=20).multiplier
    assert [s(e) for e in (0, 9, 19, 50)] == [pytest.approx(0.05), pytest.approx(0.5), 1.0, 1.0]
    s = TfFDConfig(warmup_epochs=0, decay=(10, 30)).multiplier
    assert [s(e) for e in (0, 10, 20, 30, 40)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    s = TfFDConfig(warmup_epochs=4, decay=(2, 6)).multiplier
    assert s(1) == pytest.approx(0.5 * 1.0) and s(4) == pytest.approx(1.0 * 0.5)


def test_config_round_trip_and_defaults():
    config = TfFDConfig('inter,intra', stages=[1, 3], options=dict(pairs='adjacent'), weights={'intra': 0.1},
                        decay=[5, 9])
    assert config.methods == ('inter', 'intra') and config.stages == (1, 3) and config.decay == (5., 9.)
    assert config.options == dict(pairs='adjacent', direction='top-down', saliency='norm', detach_salient=False)
    assert config.weights == {'inter': 0.005, 'intra': 0.1}
    state = config.to_dict()
    assert state['methods'] == ['inter', 'intra'] and state['stages'] == [1, 3] and state['decay'] == [5., 9.]
    assert TfFDConfig.from_dict(state) == config
    model = wrap(timm.create_model('test_resnet', num_classes=5), config)
    assert timm_tffd.get_tffd_state(model).config is config
    assert TfFDLoss(nn.CrossEntropyLoss(), model).weights == {'inter': 0.005, 'intra': 0.1}


def test_stages_preact_and_hooks():
    model, x = _create('resnet')
    intermediates = copy.deepcopy(model).train()
    _, ref_feats = intermediates.forward_intermediates(x, indices=[2, 4])
    assert timm_tffd.resolve_stages(model, [-1, 2]) == [2, 4]
    hooked = copy.deepcopy(model).train()
    taps = timm_tffd.FeatureTaps(hooked, stages=[2, 4], mode='hooks')
    _, feats = taps.forward(hooked, x)
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b)
    pre_model = copy.deepcopy(model).train()
    taps = timm_tffd.FeatureTaps(pre_model, stages=[2, 4], preact=True)
    _, pre = taps.forward(pre_model, x)
    for a, b in zip(pre, ref_feats):
        assert (a < 0).any() and (b >= 0).all()
        torch.testing.assert_close(torch.relu(a), b)  # the closing ReLU of the post-activation map


def test_task_dict_state_and_ema():
    model, x = _create('resnet')
    config = TfFDConfig('inter', weights={'inter': 0.01}, warmup_epochs=10, options=dict(pairs='adjacent'))
    task = TfFDTask(model, nn.CrossEntropyLoss(), tffd=config, verbose=False)
    task.set_epoch(4)
    task.setup_ema(decay=0.9)
    task.train()
    result = task(x, torch.zeros(4, dtype=torch.long))
    assert set(result) == {'loss', 'output', 'base_loss', 'tffd', 'tffd_inter'}
    torch.testing.assert_close(result['loss'], result['base_loss'] + 0.5 * 0.01 * result['tffd_inter'])
    result['loss'].backward()
    task.update_ema()
    ckpt = task.get_checkpoint_state()
    assert list(ckpt['state_dict']) == list(timm.create_model('test_resnet', num_classes=5).state_dict())
    assert ckpt['task_state']['tffd'] == {'config': config.to_dict(), 'epoch': 4}
    ema_state = task.get_checkpoint_state(ema=True)['state_dict_ema']
    assert list(ema_state) == list(ckpt['state_dict'])
    other = TfFDTask(timm.create_model('test_resnet', num_classes=5), nn.CrossEntropyLoss(),
                     tffd=TfFDConfig.from_dict(ckpt['task_state']['tffd']['config']), verbose=False)
    other.load_checkpoint_state(ckpt['state_dict'], ckpt['task_state'])
    assert other.tffd_loss.epoch == 4 and other.tffd_loss.multiplier == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA'))])  # cuda: inductor's Triton kernels
@pytest.mark.parametrize('family', ['resnet', 'vit', 'convnext'])  # vit: token views and runs of equal-shape maps
def test_task_compiles_without_graph_breaks(family, device):
    """The task compiled as the training script's --torchcompile compiles it (timm's ``task.compile``, inductor),
    plus ``fullgraph=True``: one graph, no break, and the same loss, terms and parameter gradients as eager.
    ``fullgraph=True`` makes any break an error: ``explain`` does not report breaks inside a checkpointed function
    (intra's recomputed forms)."""
    model, x = _create(family)
    model.to(device)
    x = x.to(device)
    task = TfFDTask(model, nn.CrossEntropyLoss(), tffd=TfFDConfig(warmup_epochs=0), verbose=False).train()
    explanation = torch._dynamo.explain(task.trainable_module)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    timm_tffd.get_tffd_state(model).take()  # explain ran one forward

    eager = copy.deepcopy(task).train()
    task.compile(backend='inductor', fullgraph=True)
    target = (torch.arange(4) % 5).to(device)
    got, want = task(x, target), eager(x, target)
    for key in ('loss', 'tffd', 'tffd_inter', 'tffd_intra'):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    got['loss'].backward()
    want['loss'].backward()
    compiled_params = dict(model.named_parameters())  # the compiled module shares them
    for name, p in eager.get_trainable_module().named_parameters():
        torch.testing.assert_close(compiled_params[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_wrapped_forward_left_out_of_compile_still_taps():
    """Past dynamo's recompile limit (shared by every wrapped model: one ``_tffd_forward``; set to 1 here, 8 by
    default) the wrapped forward runs uncompiled. Its network must then run uncompiled too: compiled as a frame of its
    own, it would reuse the graph of the plain model of the same class compiled before, which has no Tf-FD hooks
    (dynamo does not guard module hooks), and the taps would come back empty."""
    torch.compiler.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            plain, x = _create('vit')
            torch.compile(plain.train(), backend='eager')(x)  # a hook-free graph of the ViT class
            other, _ = _create('resnet')
            torch.compile(wrap(other, 'inter').train(), backend='eager')(x)  # the wrapped forward's one graph
            model, _ = _create('vit')
            wrap(model, 'inter,intra', warmup_epochs=0).train()
            reference = copy.deepcopy(model)
            output = torch.compile(model, backend='eager')(x)  # recompile limit: the wrapped forward runs eagerly
            terms = timm_tffd.get_tffd_state(model).take().terms
    finally:
        torch.compiler.reset()
    want_output = reference(x)
    want_terms = timm_tffd.get_tffd_state(reference).take().terms
    torch.testing.assert_close(output, want_output)
    assert set(terms) == {'inter', 'intra'}
    for name in terms:
        torch.testing.assert_close(terms[name], want_terms[name])


class _NoFeatureInfo(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize('call,match', [
    (lambda m: wrap(m, 'inter,magic'), r"unknown Tf-FD method 'magic'; valid methods: inter, intra"),
    (lambda m: wrap(_NoFeatureInfo()), 'has no feature_info'),
    (lambda m: wrap(m, 'inter', stages=[2]), 'at least two stages'),
    (lambda m: wrap(m, stages=[1, 7]), 'stage index 7 is out of range'),
    (lambda m: wrap(m, stages=[1, 1]), 'distinct'),
    (lambda m: wrap(m, 'inter', saliency='l1'), r"belongs to method\(s\) \['intra'\]"),
    (lambda m: wrap(m, sailency='l1'), "unknown Tf-FD option 'sailency'"),
    (lambda m: wrap(m, 'intra', saliency='magic'), 'unknown saliency'),
    (lambda m: wrap(m, weights={'inter': -1.}), 'must be >= 0'),
    (lambda m: wrap(m, weights={'inter': float('nan')}), 'must be >= 0'),
    (lambda m: TfFDLoss(nn.CrossEntropyLoss(), wrap(m, 'inter')), None),
    (lambda m: wrap(m, 'inter', weights={'intra': 1.}), 'not among the selected'),
    (lambda m: TfFDLoss(nn.CrossEntropyLoss(), m), 'not wrapped'),
    (lambda m: wrap(m, decay=(5, 2)), 'start < end'),
    (lambda m: wrap(m, warmup_epochs=-1), 'warmup_epochs must be >= 0'),
    (lambda m: wrap(m, TfFDConfig(), stages=[1, 2]), 'either a TfFDConfig or separate settings'),
    (lambda m: TfFDTask(wrap(m), tffd='inter', verbose=False), 'already wrapped'),
    (lambda m: wrap(wrap(m)), 'already wrapped'),
])
def test_bad_input(call, match):
    model = timm.create_model('test_resnet', num_classes=5)
    if match is None:
        call(model)
        return
    with pytest.raises(ValueError, match=match):
        call(model)


def test_preact_needs_resnet_style_stage():
    model = timm.create_model('test_convnext', num_classes=5)
    with pytest.raises(ValueError, match='pre-activation features need a ResNet-style stage'):
        wrap(model, preact=True)
    assert not timm_tffd.is_wrapped(model)


def test_wrapped_model_saved_whole_loads_back(tmp_path):
    model, x = _create('resnet')
    wrap(model, 'inter,intra', warmup_epochs=0)
    path = tmp_path / 'whole.pt'
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)  # a whole module is a pickle: only for files one made oneself
    assert timm_tffd.is_wrapped(loaded) and timm_tffd.get_tffd_state(loaded).config == timm_tffd.get_tffd_state(
        model).config
    for m in (model, loaded, copy.deepcopy(model)):
        m.train()
        torch.manual_seed(0)
        out = m(x)
        result = TfFDLoss(nn.CrossEntropyLoss(), m).compute(out, torch.arange(4) % 5)
        result['loss'].backward()
        m.zero_grad()
        if m is model:
            want = result['loss'].detach()
        else:
            torch.testing.assert_close(result['loss'].detach(), want)
    assert unwrap(loaded) is loaded and not timm_tffd.is_wrapped(loaded)


def test_terms_backward_runs_when_the_network_backward_reaches_their_stage():
    """Computed as each stage is tapped, a stage's terms sit between that stage and the next in the autograd graph, so
    the backward pass forms their full-size gradients when it reaches the stage, not at its start, where they would
    wait on top of the peak memory (docs/design.md, "Where the terms are computed")."""
    model, x = _create('resnet')
    wrap(model, 'inter,intra', warmup_epochs=0).train()
    state = timm_tffd.get_tffd_state(model)
    parts = {}
    at_tap = state.at_tap

    def recording(pos, feature, earlier):
        parts[pos] = at_tap(pos, feature, earlier)
        return parts[pos]
    state.taps.on_tap = recording
    result = TfFDLoss(nn.CrossEntropyLoss(), model).compute(model(x), torch.arange(4) % 5)
    assert state.peek() is None  # taken by the loss
    events = []
    layer2 = parts[1]['inter'].feature  # the layer2 map as tapped
    layer2.register_hook(lambda g: events.append('layer2 map gradient complete'))
    parts[0]['intra'].grad_fn.register_prehook(lambda g: events.append('layer1 intra'))
    pooled = parts[0]['inter'].student.exact[tuple(layer2.shape[-2:])]  # layer1 pooled to layer2's size
    pooled.grad_fn.register_prehook(lambda g: events.append('layer1 pooled for inter'))
    parts[1]['inter'].losses[(0, 1)].grad_fn.register_prehook(lambda g: events.append('pair layer1-layer2'))
    result['loss'].backward()
    assert events.index('pair layer1-layer2') < events.index('layer2 map gradient complete')
    assert events.index('layer2 map gradient complete') < events.index('layer1 intra')
    assert events.index('layer2 map gradient complete') < events.index('layer1 pooled for inter')
    # the same terms computed after the forward from the maps run first, before the network's backward
    order = []
    model.zero_grad()
    state.keep_features = True
    out = model(x)
    feats = state.peek().features
    late = timm_tffd.intra_layer_loss(feats)
    late.grad_fn.register_prehook(lambda g: order.append('intra after the forward'))
    feats[1].register_hook(lambda g: order.append('layer2 map gradient complete'))
    state.take()
    (F.cross_entropy(out, torch.arange(4) % 5) + late).backward()
    assert order == ['intra after the forward', 'layer2 map gradient complete']


def test_run_gradients_are_formed_when_the_backward_reaches_their_block():
    """A ViT's blocks are one run of equal-shape maps, whose pair sum is built as the blocks are tapped
    (``RunSum``): each block's inter gradient is formed once the network's backward is inside the block above it, not
    all at the start of the backward (docs/design.md, "Runs of equal-shape maps")."""
    model, x = _create('deit')  # 3 blocks
    wrap(model, 'inter', warmup_epochs=0).train()
    state = timm_tffd.get_tffd_state(model)
    events = []
    at_tap = state.staged['inter'].at_tap

    def recording(pos, feature, earlier):
        alias = feature.view_as(feature)  # what inter sees: its gradient is inter's alone
        alias.register_hook(lambda g: events.append(('inter', pos)))
        return {'inter': at_tap(pos, alias, [earlier[p]['inter'] for p in range(pos)])}
    state.taps.on_tap = recording

    def attn_done(i):  # the backward reaches a block's attention after its MLP
        def hook(module, args, out):
            out.register_hook(lambda g: events.append(('attn', i)))
        return hook
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(attn_done(i))
    result = TfFDLoss(nn.CrossEntropyLoss(), model).compute(model(x), torch.arange(4) % 5)
    result['loss'].backward()
    assert sorted(events) == [('attn', 0), ('attn', 1), ('attn', 2), ('inter', 0), ('inter', 1)]  # deepest: a target
    assert events.index(('attn', 1)) < events.index(('inter', 0))
    assert events.index(('attn', 2)) < events.index(('inter', 1))
