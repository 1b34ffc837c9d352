"""SD / RSD (SFD, Pei et al., IJCAI 2021, eqs. 8 and 9): updates against hand computations, flips, buffers,
optimizer, resume, DDP."""
import copy
import io
import os

import pytest
import torch
import torch.nn as nn
from timm.utils import distribute_bn

from conftest import gloo_group, run_ranks
from timm_tffd.self_distill import SelfDistill, parse_tau


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),    # 0: 3x3 -> flipped
        nn.BatchNorm2d(4),                # 1
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),               # 3: 1x1 -> unchanged by a flip
        nn.Conv2d(4, 4, (3, 1), padding=(1, 0)),  # 4: width 1 -> unchanged
        nn.Conv2d(4, 4, (1, 3), padding=(0, 1)),  # 5: width 3 -> flipped
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),                  # 8
    )


FLIPPED = {'0.weight', '5.weight'}


def _train_a_little(net, epoch):
    """Deterministic stand-in for an epoch of training: moves every parameter and the BN statistics."""
    g = torch.Generator().manual_seed(100 + epoch)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        net[1].running_mean.add_(torch.randn(4, generator=g))
        net[1].running_var.mul_(1.5)
        net[1].num_batches_tracked.add_(7)


def _float_state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def test_tau_schedule():
    sd = SelfDistill(_net(), 'sd', tau='0.995,0.999', num_epochs=5)
    assert [sd.tau_at(e) for e in range(5)] == pytest.approx([0.995, 0.996, 0.997, 0.998, 0.999])
    assert sd.tau_at(9) == pytest.approx(0.999)
    assert SelfDistill(_net(), 'sd', tau=0.99).tau_at(3) == 0.99  # constant: no num_epochs needed


def test_sd_update_by_hand():
    net = _net()
    sd = SelfDistill(net, 'sd', tau=(0.99, 0.999), num_epochs=4)
    _train_a_little(net, 0)
    assert sd.step(0) == {'tau': None, 'flipped': False, 'updated': False}  # eq. 8 starts at t = 2
    snap = _float_state(net)
    _train_a_little(net, 1)
    cur = _float_state(net)
    tracked = net[1].num_batches_tracked.clone()
    info = sd.step(1)
    tau = 0.99 + (0.999 - 0.99) * 1 / 3
    assert info == {'tau': pytest.approx(tau), 'flipped': False, 'updated': True}
    after = net.state_dict()
    for k in cur:  # every parameter and the BN running mean / var
        assert torch.allclose(after[k], tau * cur[k] + (1 - tau) * snap[k], atol=1e-7), k
    assert torch.equal(net[1].num_batches_tracked, tracked)  # integer buffer untouched
    # the next update mixes with the state after this one
    snap2 = _float_state(net)
    _train_a_little(net, 2)
    cur2 = _float_state(net)
    sd.step(2)
    tau2 = 0.99 + (0.999 - 0.99) * 2 / 3
    for k in cur2:
        assert torch.allclose(net.state_dict()[k], tau2 * cur2[k] + (1 - tau2) * snap2[k], atol=1e-7), k


def test_rsd_flips_exactly_the_conv_kernels():
    net = _net()
    sd = SelfDistill(net, 'rsd', tau=0.9, flip_prob=1.0)
    assert set(sd.flip_names) == FLIPPED
    sd.step(0)
    snap = _float_state(net)
    _train_a_little(net, 1)
    cur = _float_state(net)
    assert sd.step(1)['flipped']
    for k in cur:
        prev = snap[k].flip(-1) if k in FLIPPED else snap[k]
        assert torch.allclose(net.state_dict()[k], 0.9 * cur[k] + 0.1 * prev, atol=1e-7), k
    # the flip of a width-3 kernel really changes it (the test above could not pass by accident)
    assert not torch.allclose(snap['0.weight'].flip(-1), snap['0.weight'])


def test_rsd_draws_with_a_fixed_seed():
    def run(seed):
        net = _net()
        sd = SelfDistill(net, 'rsd', tau=0.9, seed=seed)
        flags = []
        sd.step(0)
        for epoch in range(1, 13):
            snap = _float_state(net)
            _train_a_little(net, epoch)
            cur = _float_state(net)
            flipped = sd.step(epoch)['flipped']
            for k in cur:
                prev = snap[k].flip(-1) if flipped and k in FLIPPED else snap[k]
                assert torch.allclose(net.state_dict()[k], 0.9 * cur[k] + 0.1 * prev, atol=1e-6), (epoch, k)
            flags.append(flipped)
        return flags

    flags = run(seed=3)
    assert any(flags) and not all(flags)  # p = 0.5: both outcomes over 12 draws for this seed
    assert run(seed=3) == flags  # reproducible
    assert run(seed=4) != flags


def test_sd_leaves_optimizer_state_and_frozen_parameters_alone():
    net = _net()
    net[8].requires_grad_(False)
    frozen = net[8].weight.detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 4, 4)).sum().backward()
    opt.step()
    sd = SelfDistill(net, 'rsd', tau=0.5, flip_prob=1.0)
    sd.step(0)
    _train_a_little(net, 1)
    with torch.no_grad():
        net[8].weight.copy_(frozen)
    momentum = {id(p): opt.state[p]['momentum_buffer'].clone() for p in opt.state}
    before = copy.deepcopy(opt.state_dict())
    sd.step(1)
    assert all(torch.equal(opt.state[p]['momentum_buffer'], momentum[id(p)]) for p in opt.state)
    assert opt.state_dict()['param_groups'] == before['param_groups']
    assert torch.equal(net[8].weight, frozen)


def test_resume_continues_the_same_trajectory():
    def epochs(net, sd, start, stop):
        for epoch in range(start, stop):
            _train_a_little(net, epoch)
            sd.step(epoch)

    kwargs = dict(mode='rsd', tau=(0.9, 0.99), num_epochs=6, seed=5)
    full = _net()
    epochs(full, SelfDistill(full, **kwargs), 0, 6)

    first = _net()
    sd = SelfDistill(first, **kwargs)
    epochs(first, sd, 0, 3)
    buf = io.BytesIO()
    torch.save({'model': first.state_dict(), 'sd': sd.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _net()
    resumed.load_state_dict(ckpt['model'])
    sd2 = SelfDistill(resumed, **kwargs)
    sd2.load_state_dict(ckpt['sd'])
    assert sd2.last_epoch == 2
    with pytest.raises(ValueError, match='once per epoch'):
        sd2.step(2)
    epochs(resumed, sd2, 3, 6)
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k

    # resume() from the weights alone: the snapshot is the weights saved right after the step
    from_weights = _net()
    from_weights.load_state_dict(ckpt['model'])
    sd3 = SelfDistill(from_weights, **kwargs)
    sd3.resume(2)
    assert sd3.last_epoch == 2
    epochs(from_weights, sd3, 3, 6)
    for k, v in full.state_dict().items():
        assert torch.equal(from_weights.state_dict()[k], v), k


def test_bad_input():
    with pytest.raises(ValueError, match='unknown self-distillation mode'):
        SelfDistill(_net(), 'ema')
    for bad in ('0.999,0.995', '1.2', '0', '0.9,0.95,0.99', 'fast'):
        with pytest.raises(ValueError, match='tau'):
            parse_tau(bad)
    assert parse_tau('0.995, 0.999') == (0.995, 0.999)
    assert parse_tau('0.997') == (0.997, 0.997)
    with pytest.raises(ValueError, match='num_epochs'):
        SelfDistill(_net(), 'sd', tau=(0.995, 0.999))
    with pytest.raises(ValueError, match='flip_prob'):
        SelfDistill(_net(), 'rsd', tau=0.99, flip_prob=1.5)
    net = _net()
    sd = SelfDistill(net, 'sd', tau=0.99)
    sd.step(0)
    state = sd.state_dict()
    state['prev'] = {k: v for k, v in state['prev'].items() if k != '8.bias'}
    with pytest.raises(ValueError, match='does not match'):
        SelfDistill(net, 'sd', tau=0.99).load_state_dict(state)


def _ddp_worker(rank, world_size, init_file, out_dir):
    with gloo_group(rank, world_size, init_file):
        model = nn.parallel.DistributedDataParallel(_net())  # same init on both ranks
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sd = SelfDistill(model, 'rsd', tau=0.9, seed=rank)  # deliberately different seeds per rank
        for epoch in range(8):
            g = torch.Generator().manual_seed(1000 * rank + epoch)  # different data per rank
            model(torch.randn(4, 3, 6, 6, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            distribute_bn(model, world_size, reduce=True)  # as timm's train.py does after every epoch
            sd.step(epoch)
        torch.save({k: v.detach() for k, v in model.module.state_dict().items()},
                   os.path.join(out_dir, f'rank{rank}.pt'))


@pytest.mark.slow
def test_ddp_ranks_apply_the_same_rsd_update(tmp_path):
    # precondition: the two per-rank seeds alone would draw differently in epochs 1..7
    flags = []
    for seed in (0, 1):
        sd = SelfDistill(_net(), 'rsd', tau=0.9, seed=seed)
        flags.append([sd.step(e)['flipped'] for e in range(8)])
    assert flags[0] != flags[1]
    r0, r1 = run_ranks(_ddp_worker, tmp_path)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
