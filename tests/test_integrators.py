"""SFD integrators (Pei et al., IJCAI 2021, eqs. 2 to 4): output shapes on homogeneous and heterogeneous pairs,
layer sizes."""
import pytest
import timm
import torch
import torch.nn.functional as F

from timm_tffd.features import resolve_stages
from timm_tffd.integrators import (
    AttentionIntegration, LayerwiseIntegration, ReceptiveFieldIntegration, create_integrator, rescale)

IMG = 64
# (student, teacher): homogeneous ResNets, then heterogeneous pairs in both directions (CNN <-> ViT included)
PAIRS = [
    ('test_resnet', 'resnet10t'),
    ('test_resnet', 'test_efficientnet'),
    ('test_convnext', 'test_resnet'),
    ('test_efficientnet', 'test_vit'),
]


def _kwargs(name):
    return dict(img_size=IMG) if 'vit' in name else {}


@pytest.fixture(scope='module')
def stage_maps():
    """Stage maps (excluding the stem) of every model in PAIRS at IMG px, computed once."""
    torch.manual_seed(0)
    out = {}
    x = torch.randn(2, 3, IMG, IMG)
    for name in {n for pair in PAIRS for n in pair}:
        model = timm.create_model(name, num_classes=10, **_kwargs(name)).eval()
        with torch.no_grad():
            _, feats = model.forward_intermediates(x, indices=resolve_stages(model))
        out[name] = [f.detach() for f in feats]
    return out


@pytest.mark.parametrize('name', ['li', 'ai', 'ri'])
@pytest.mark.parametrize('student,teacher', PAIRS)
def test_output_shape(stage_maps, name, student, teacher):
    feats, target = stage_maps[student], stage_maps[teacher][-1]
    integrator = create_integrator(name, [f.shape[1] for f in feats], target.shape[1:])
    assert integrator(feats).shape == target.shape
    # an explicit size (another input resolution) overrides the one given at construction
    assert integrator(feats, size=(3, 5)).shape == (*target.shape[:2], 3, 5)


@pytest.mark.parametrize('name', ['li', 'ai', 'ri'])
def test_backward_reaches_parameters_and_features(stage_maps, name):
    feats = [f.clone().requires_grad_() for f in stage_maps['test_resnet']]
    integrator = create_integrator(name, [f.shape[1] for f in feats], (16, 2, 2))
    integrator(feats).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in integrator.parameters())
    used = feats[-integrator.num_stages:]
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in used)
    assert all(f.grad is None for f in feats[:-integrator.num_stages])  # only the last 3 (LI, AI) / 1 (RI) stages


def test_li_layers():
    li = LayerwiseIntegration([32, 48, 192, 96], (64, 4, 4))  # four stages: the last three are used
    assert [c.in_channels for c in li.convs] == [48, 192, 96]
    assert [c.out_channels for c in li.convs] == [16, 16, 32]  # c/4, c/4, c/2
    assert li.smooth.weight.shape == (64, 64, 3, 3)  # c x c x 3 x 3
    assert li.bn.num_features == 64
    odd = LayerwiseIntegration([8, 8, 8], (10, 1, 1))
    assert [c.out_channels for c in odd.convs] == [2, 2, 6]  # sums to c for any c


def test_ai_layers():
    ai = AttentionIntegration([48, 192, 96], (64, 4, 4))  # (48 + 192 + 96) / 16 = 21 < 96: c_mid = 96
    assert ai.conv1.weight.shape == (96, 336, 1, 1)
    assert ai.conv2.weight.shape == (6, 96, 1, 1)
    assert ai.conv3.weight.shape == (96, 6, 1, 1)
    assert ai.conv4.weight.shape == (64, 96, 1, 1)
    wide = AttentionIntegration([512, 1024, 2048], (2048, 7, 7))  # 3584 / 16 = 224 > 96
    assert wide.conv1.out_channels == 224 and wide.conv2.out_channels == 14


def test_ri_layers_and_pool_sizes():
    ri = ReceptiveFieldIntegration([48, 192, 96], (64, 8, 8))  # last stage only: 96 channels
    assert [b.weight.shape for b in ri.branches] == [(16, 96, 1, 1)] * 3  # c_s -> c/4
    assert ri.smooth.weight.shape == (64, 96 + 3 * 16, 3, 3)
    seen = []
    for b in ri.branches:
        b.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    ri([torch.randn(2, 96, 4, 4)])
    assert seen == [(2, 2), (4, 4), (6, 6)]  # h/4, h/2, 3h/4 for h = 8
    seen.clear()
    ri([torch.randn(2, 96, 4, 4)], size=(7, 7))
    assert seen == [(1, 1), (3, 3), (5, 5)]  # floored


def test_rescale():
    x = torch.arange(32.).view(1, 2, 4, 4)
    down = rescale(x, (2, 2))
    assert torch.equal(down, x.view(1, 2, 2, 2, 2, 2).mean((3, 5)))  # 2x2 block means
    assert rescale(x, (4, 4)) is x
    up = rescale(torch.ones(1, 1, 1, 1) * 3, (2, 3))
    assert torch.equal(up, torch.full((1, 1, 2, 3), 3.))
    mixed = rescale(x, (2, 8))  # one side down, one up: bilinear
    assert torch.allclose(mixed, F.interpolate(x, size=(2, 8), mode='bilinear', align_corners=False))


def test_bad_input():
    with pytest.raises(ValueError, match='unknown SFD integrator'):
        create_integrator('fpn', [8, 8, 8], (8, 1, 1))
    with pytest.raises(ValueError, match='last 3 student stage'):
        create_integrator('li', [8, 8], (8, 1, 1))
    with pytest.raises(ValueError, match='teacher_shape'):
        create_integrator('ri', [8], (8, 0, 1))
    assert isinstance(create_integrator('RI', [8], (8, 1, 1)), ReceptiveFieldIntegration)
