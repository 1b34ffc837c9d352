"""closing_block (the last block of a ResNet-style stage) and its three users, and which token models FeatureTaps
views as NCHW maps."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

import timm_tffd  # noqa: F401  (registers the CIFAR zoo)
from timm_tffd.features import FeatureTaps, closing_block
from timm_tffd.losses.margin import bn_margin
from timm_tffd.losses.saliency import bn_scale_saliency
from timm_tffd.teacher import SFDTeacher, create_teacher

# model name -> (its stages, the closing activation and norm of a stage's last block)
RESNETS = {
    'resnet18': (('layer1', 'layer2', 'layer3', 'layer4'), 'act2', 'bn2'),  # BasicBlock
    'resnet50': (('layer1', 'layer2', 'layer3', 'layer4'), 'act3', 'bn3'),  # Bottleneck
    'cifar_resnet20': (('layer1', 'layer2', 'layer3'), 'act2', 'bn2'),
    'cifar_resnet8x4': (('layer1', 'layer2', 'layer3'), 'act2', 'bn2'),
}


def _create(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=5, **kwargs).eval()


def _randomize_norms(model, seed=1):
    """Trained-looking BN scales, shifts and statistics (timm zero-initialises the closing BN's scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize('name', list(RESNETS))
def test_closing_block_of_resnet_stages(name):
    stages, act, norm = RESNETS[name]
    model = _create(name)
    assert [f['module'] for f in model.feature_info[1:]] == list(stages)
    for stage in stages:
        last = getattr(model, stage)[-1]
        closing = closing_block(model, stage)
        assert closing.block is last
        assert closing.act is getattr(last, act) and isinstance(closing.act, nn.ReLU)
        assert closing.norm is getattr(last, norm) and isinstance(closing.norm, nn.BatchNorm2d)
    assert closing_block(model, model.feature_info[0]['module']) is None  # the stem is no stage


@pytest.mark.parametrize('name,kwargs', [
    ('convnext_atto', {}),
    ('efficientnet_b0', {}),  # its blocks end in bn3 / bn2, but with no closing activation after a residual add
    ('test_vit', dict(img_size=32)),
    ('cifar_wrn_16_2', {}),  # pre-activation blocks
    ('cifar_vgg8', {}),
])
def test_closing_block_is_none_elsewhere(name, kwargs):
    model = _create(name, **kwargs)
    for info in model.feature_info:
        assert closing_block(model, info['module']) is None, info['module']


def test_closing_block_of_empty_stage():
    model = _create('cifar_resnet8')
    model.prune_intermediate_layers([2])  # layer3 becomes an empty Sequential
    assert len(model.layer3) == 0 and closing_block(model, 'layer3') is None
    assert closing_block(model, 'layer2').act is model.layer2[-1].act2


def test_preact_taps_are_the_closing_activation_inputs():
    model = _randomize_norms(_create('cifar_resnet8'))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    taps = FeatureTaps(model, [0, 1, 2], preact=True)
    with torch.no_grad():
        logits, (stem, layer1, layer2) = taps.forward(model, x)
        # by hand: the stem before its ReLU, then each one-block stage's residual sum before act2
        want_stem = model.bn1(model.conv1(x))
        b = model.layer1[0]
        h = torch.relu(want_stem)
        want1 = b.bn2(b.conv2(b.act1(b.bn1(b.conv1(h))))) + h
        b = model.layer2[0]
        h = torch.relu(want1)
        want2 = b.bn2(b.conv2(b.act1(b.bn1(b.conv1(h))))) + b.downsample(h)
        want_logits = model(x)
    for got, want in ((stem, want_stem), (layer1, want1), (layer2, want2)):
        assert (want < 0).any()
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(logits, want_logits)
    taps.remove()


@pytest.mark.parametrize('name', ['resnet50', 'cifar_resnet20'])
def test_bn_saliency_reads_the_closing_bn(name):
    _, _, norm = RESNETS[name]
    model = _create(name)
    for info in model.feature_info[1:]:
        fn = bn_scale_saliency(model, info['module'], info['num_chs'])
        assert fn.bn is getattr(getattr(model, info['module'])[-1], norm)


def test_bn_saliency_elsewhere_reads_the_last_bn_of_the_stage():
    model = _create('efficientnet_b0')
    info = model.feature_info[2]
    assert info['module'] == 'blocks.2'
    assert bn_scale_saliency(model, 'blocks.2', info['num_chs']).bn is model.blocks[2][-1].bn3


@pytest.mark.parametrize('name', ['resnet50', 'cifar_resnet20'])
def test_sfd_teacher_margin_from_the_closing_bn(name):
    stages, _, norm = RESNETS[name]
    model = _randomize_norms(_create(name))
    teacher = SFDTeacher(create_teacher(model))
    bn = getattr(getattr(model, stages[-1])[-1], norm)
    assert teacher.margin_kind == 'bn' and teacher.module_name == stages[-1]
    torch.testing.assert_close(teacher.bn_margin, bn_margin(bn))


def test_sfd_teacher_without_closing_relu_uses_the_empirical_margin():
    model = _create('resnet18', act_layer='gelu')
    assert closing_block(model, 'layer4') is not None  # a ResNet-style stage, but the margin assumes a ReLU
    assert SFDTeacher(create_teacher(model)).margin_kind == 'empirical'


# token models -> (a tiny instance, whether FeatureTaps views its NLC intermediates as NCHW maps)
TOKEN_MODELS = {
    'vit': (lambda: timm.create_model('test_vit', img_size=32), True),
    'vit-reg': (lambda: timm.create_model('test_vit3', img_size=32), True),
    'deit-distilled': (lambda: timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, depth=2), True),
    'eva': (lambda: timm.create_model('eva02_tiny_patch14_224', img_size=32, patch_size=16, depth=2), True),
    'beit': (lambda: timm.create_model('beit_base_patch16_224', img_size=32, depth=2, embed_dim=32, num_heads=2), True),
    'cait': (lambda: timm.create_model('cait_xxs24_224', img_size=32, depth=2, embed_dim=32, num_heads=2), True),
    'convit': (lambda: timm.create_model('convit_tiny', img_size=32, depth=2, embed_dim=32, num_heads=2), True),
    'vit-relpos': (lambda: timm.create_model('test_vit_relpos', img_size=32), True),
    'swin': (lambda: timm.create_model('swin_tiny_patch4_window7_224', img_size=32, window_size=4, embed_dim=16,
                                       depths=(1, 1), num_heads=(1, 1)), False),
    'mvitv2': (lambda: MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=(1, 2)), (32, 32)), False),
    'xcit': (lambda: timm.create_model('xcit_nano_12_p16_224', img_size=32, depth=2, embed_dim=16, num_heads=2), False),
    'pvt_v2': (lambda: timm.create_model('pvt_v2_b0', embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 1),
                                         mlp_ratios=(2, 2), sr_ratios=(2, 1)), False),
    'twins': (lambda: timm.create_model('twins_svt_small', img_size=32, embed_dims=(8, 16), depths=(1, 1),
                                        num_heads=(1, 1), mlp_ratios=(2, 2), sr_ratios=(2, 1), wss=(2, 2)), False),
}


@pytest.mark.parametrize('family', list(TOKEN_MODELS))
def test_token_models_give_timm_maps(family):
    create, viewed = TOKEN_MODELS[family]
    torch.manual_seed(0)
    model = create().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    taps = FeatureTaps(model)
    assert taps.token_grid == viewed
    with torch.no_grad():
        want_final, want = model.forward_intermediates(x, indices=taps.indices)  # timm's NCHW maps
        outputs = []  # the tapped blocks' own outputs
        hooks = [model.get_submodule(m).register_forward_hook(lambda mod, args, out: outputs.append(out))
                 for m in (taps.modules if viewed else ())]
        logits, got = taps.forward(model, x)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(logits, model.forward_head(want_final))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if viewed:  # views of the block outputs, not copies
        assert len(outputs) == len(got)
        assert all(g.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for g, out in zip(got, outputs))


# the HOOK_MODELS families (tiny instances): tapped with hooks by default
HOOK_FAMILIES = {
    'resnet': lambda: timm.create_model('test_resnet'),
    'resnet-d': lambda: timm.create_model('resnet18d', layers=(1, 1, 1, 1)),
    'convnext': lambda: timm.create_model('test_convnext'),
    'efficientnet': lambda: timm.create_model('test_efficientnet'),
    'mobilenetv3': lambda: timm.create_model('mobilenetv3_small_050'),
    'regnet': lambda: timm.create_model('regnetx_002'),
    'cifar_resnet': lambda: timm.create_model('cifar_resnet8'),
    'cifar_wrn': lambda: timm.create_model('cifar_wrn_16_2'),
    'cifar_vgg': lambda: timm.create_model('cifar_vgg8'),
    'vit': lambda: timm.create_model('test_vit', img_size=32),
    'deit-distilled': lambda: timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, depth=2),
}


@pytest.mark.parametrize('checkpointing', [False, True])
@pytest.mark.parametrize('family', list(HOOK_FAMILIES))
def test_hook_models_give_timm_maps(family, checkpointing):
    """Forward hooks on these families' feature_info modules see the very maps forward_intermediates returns; with
    gradient checkpointing on, the taps run forward_intermediates (some of these models then skip the stage modules)."""
    torch.manual_seed(0)
    model = HOOK_FAMILIES[family]().eval()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    taps = FeatureTaps(model)
    assert taps.mode == 'hooks' and taps.intermediates_fallback
    with torch.no_grad():
        want_final, want = model.forward_intermediates(x, indices=taps.indices)
        logits, got = taps.forward(model, x)
    torch.testing.assert_close(logits, model.forward_head(want_final), rtol=0, atol=0)
    assert len(got) == len(want) == len(taps.indices)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert FeatureTaps(model, mode='intermediates').mode == 'intermediates'  # the mode can still be chosen


def test_on_tap_runs_in_the_forward_in_stage_order():
    model = timm.create_model('test_resnet').train()
    taps = FeatureTaps(model)
    seen = []

    def on_tap(pos, feature, staged):
        seen.append((pos, sorted(staged), [n for n, m in model.named_modules() if m in ran]))
        return pos * 10
    ran = []
    for name in ('layer1', 'layer2', 'layer3', 'layer4', 'fc'):
        model.get_submodule(name).register_forward_pre_hook(lambda mod, args: ran.append(mod))  # started
    taps.on_tap = on_tap
    staged = {}
    taps.forward(model, torch.randn(2, 3, 32, 32), staged)
    assert staged == {0: 0, 1: 10, 2: 20, 3: 30}
    # each call comes right after its stage, before the next stage runs, and sees the earlier stages' results
    assert [(pos, earlier) for pos, earlier, _ in seen] == [(0, []), (1, [0]), (2, [0, 1]), (3, [0, 1, 2])]
    assert [names for _, _, names in seen] == [['layer1'], ['layer1', 'layer2'], ['layer1', 'layer2', 'layer3'],
                                               ['layer1', 'layer2', 'layer3', 'layer4']]
    taps.forward(model, torch.randn(2, 3, 32, 32))  # without a dict nothing is computed
    assert len(seen) == 4
