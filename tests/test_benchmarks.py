"""The step-cost benchmark's configurations build and train on tiny models (its timings are not tested)."""
import os
import sys

import pytest
import timm
import torch

import timm_tffd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import overhead  # noqa: E402


def test_four_taps_picks_evenly_spaced_blocks():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, embed_dim=16, num_heads=1, depth=12)
    task = overhead.CONFIGS['inter+intra-4taps'](vit)
    assert timm_tffd.get_tffd_state(task.trainable_module).taps.indices == [2, 5, 8, 11]
    resnet = timm.create_model('test_resnet')
    task = overhead.CONFIGS['inter+intra-4taps'](resnet)
    assert timm_tffd.get_tffd_state(task.trainable_module).taps.indices == timm_tffd.resolve_stages(resnet) == [1, 2, 3, 4]


@pytest.mark.parametrize('config', ['baseline', 'inter+intra', 'inter+intra-4taps', 'm2o', 'emd-grid7'])
def test_overhead_step_runs(config):
    step = overhead.make_step('resnet18', config, batch_size=2, img_size=224)  # emd-grid7 needs 7x7 maps
    losses = [step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
