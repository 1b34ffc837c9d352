"""benchmarks/regularization.py: the tiny path end to end, the validation split, and the statistics against values
computed here by hand (closed-form t quantiles), not by the code under test."""
import argparse
import gzip
import json
import math
import os
import statistics
import struct
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import regularization as reg  # noqa: E402
from benchmarks.accuracy import paired_gain  # noqa: E402


def _write_idx(folder, n_train=120, n_test=64, seed=0):
    """Synthetic IDX .gz files laid out like the official Fashion-MNIST ones; image i is filled with its own index
    in its first pixels, so a written PNG can be traced back to its source image."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[:, 0, 0], x[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
        y = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), 'wb') as f:
            f.write(struct.pack('>IIII', 2051, n, 28, 28) + x.tobytes())
        with gzip.open(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), 'wb') as f:
            f.write(struct.pack('>II', 2049, n) + y.tobytes())
    return folder


def _t_quantile(p, df):
    """Student t quantiles in closed form for 1 and 2 degrees of freedom (independent of scipy)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    raise ValueError(df)


def _pngs(folder):
    return {f for _, _, files in os.walk(folder) for f in files if f.endswith('.png')}


# ----------------------------------------------------------------------------------------------- statistics


def test_paired_gain_golden_two_and_three_seeds():
    # three seeds, differences 1, 2, 4: mean 7/3, sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3
    config, base = [81.0, 82.0, 84.0], [80.0, 80.0, 80.0]
    half = _t_quantile(0.975, 2) * math.sqrt(7 / 3) / math.sqrt(3)
    assert _t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)  # the t table's 4.303
    g = paired_gain(config, base)
    assert g['gain'] == pytest.approx(7 / 3)
    assert g['ci_low'] == pytest.approx(7 / 3 - half) and g['ci_high'] == pytest.approx(7 / 3 + half)
    # two seeds, differences 0.5 and 1.5: sd = 1 / sqrt(2), half width 12.706 * 0.5
    g = paired_gain([1.5, 3.5], [1.0, 2.0])
    assert _t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert g['gain'] == pytest.approx(1.0)
    assert g['ci_high'] - g['gain'] == pytest.approx(12.706205 * 0.5, abs=1e-5)


def test_bonferroni_interval_golden():
    assert reg.bonferroni_level(5) == pytest.approx(0.99)
    assert reg.bonferroni_level(15) == pytest.approx(1 - 0.05 / 15)
    g = paired_gain([81.0, 82.0, 84.0], [80.0, 80.0, 80.0], confidence=reg.bonferroni_level(5))
    half = _t_quantile(0.995, 2) * math.sqrt(7 / 3) / math.sqrt(3)
    assert _t_quantile(0.995, 2) == pytest.approx(9.924843, abs=1e-6)  # the t table's 9.925
    assert g['ci_low'] == pytest.approx(7 / 3 - half)


def test_loss_share_and_curve():
    assert reg.loss_share({'train_loss': 0.5, 'train_base_loss': 0.4}) == pytest.approx(0.2)
    assert reg.loss_share({'train_loss': 2.0, 'train_task_loss': 0.5}) == pytest.approx(0.75)  # timm's KD task
    assert reg.loss_share({'train_loss': 0.5}) is None
    runs = [{'epochs': [{'train_loss': 1.0, 'train_base_loss': 0.9}, {'train_loss': 0.1, 'train_base_loss': 0.05}]},
            {'epochs': [{'train_loss': 1.0, 'train_base_loss': 0.7}, {'train_loss': 0.1, 'train_base_loss': 0.03}]}]
    assert reg.share_curve(runs) == pytest.approx([0.2, 0.6])  # (0.1 + 0.3) / 2, (0.5 + 0.7) / 2
    assert reg.share_curve([{'epochs': [{'train_loss': 1.0}]}]) is None


def test_choose_highest_mean_first_on_ties():
    assert reg.choose({0.1: [80, 82], 0.2: [83, 82], 0.4: [81, 81]}) == 0.2
    assert reg.choose({1: [80, 80], 10: [79, 81], 100: [70, 70]}) == 1


def test_table_names_add_the_validated_scale():
    assert not any('-x' in n for n in reg.table_names(1))
    names = reg.table_names(10)
    assert names[:2] == ['tffd-inter+intra', 'tffd-inter+intra-x10'] and 'tffd+label-smoothing-x10' in names
    assert names[-2:] == ['kd', 'sfd-ri']  # the most expensive last
    configs = reg.configurations(10)
    assert all(n in configs for n in names) and configs['baseline'] == []


def _fake_record(out, config, seed, lr, val, test):
    path = os.path.join(out, 'regularization_runs', f'lr{lr:g}', f'{config}-seed{seed}.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(dict(config=config, seed=seed, lr=lr, model=reg.STUDENT, val_top1=val, test_top1=test,
                       train_top1=100., train_loss=0.01, wall_s=100., teacher=None,
                       epochs=[{'train_loss': 0.01, 'eval_top1': val}]), f)


def test_positive_control_decision_on_fixed_records(tmp_path):
    args = argparse.Namespace(mode='testbed', out=str(tmp_path), configs=[], lr=0., tffd_scale=0.)
    stage = reg.Stage(args)
    base = [80.0, 81.0, 82.0, 80.5, 81.5]
    ls = [b + d for b, d in zip(base, [1.0, 1.2, 0.8, 1.1, 0.9])]    # mean +1, sd sqrt(0.025): above 0
    db = [b + d for b, d in zip(base, [1.0, -1.0, 2.0, -2.0, 0.5])]  # mean +0.1, wide: contains 0
    for s in range(5):
        _fake_record(str(tmp_path), 'baseline', s, 0.2, base[s], 0.)
        _fake_record(str(tmp_path), 'dropblock', s, 0.2, db[s], 0.)
    control = stage.control_summary(0.2)
    assert control['holds'] is None  # label smoothing is missing: not decided
    for s in range(5):
        _fake_record(str(tmp_path), 'label-smoothing', s, 0.2, ls[s], 0.)
    control = stage.control_summary(0.2)
    t4 = 2.7764451  # t(0.975, 4), from the t table
    half = t4 * math.sqrt(0.025) / math.sqrt(5)
    assert control['configs']['label-smoothing']['gain'] == pytest.approx(1.0)
    assert control['configs']['label-smoothing']['ci_low'] == pytest.approx(1.0 - half, abs=1e-5)
    sd_db = statistics.stdev([1.0, -1.0, 2.0, -2.0, 0.5])
    assert control['configs']['dropblock']['ci_low'] == pytest.approx(0.1 - t4 * sd_db / math.sqrt(5), abs=1e-5)
    assert control['holds'] is True


# --------------------------------------------------------------------------------------------- the splits


def test_validation_split_disjoint_from_training_and_test(tmp_path):
    split = reg.split_indices(1000, 300, 200, seed=0)
    assert len(split['train']) == 300 and len(split['validation']) == 200
    assert not set(split['train']) & set(split['validation'])
    assert split == reg.split_indices(1000, 300, 200, seed=0)  # fixed: the same subset for every training seed
    with pytest.raises(ValueError):
        reg.split_indices(100, 80, 30)
    wide = reg.split_indices(1000, 300, 200, seed=0, n_wide=400)
    assert {k: wide[k] for k in ('train', 'validation')} == split  # the first two splits do not move
    assert len(wide['validation-wide']) == 400
    assert not set(wide['validation-wide']) & (set(split['train']) | set(split['validation']))

    src = _write_idx(str(tmp_path / 'src'), n_train=120, n_test=40)
    root = reg.prepare_testbed(src, str(tmp_path / 'data'), n_train=50, n_val=30, n_test=0)
    with open(os.path.join(root, 'manifest.json')) as f:
        manifest = json.load(f)
    train, val, test = (_pngs(os.path.join(root, s)) for s in ('train', 'validation', 'test'))
    assert len(train) == 50 and len(val) == 30 and len(test) == 40
    assert not train & val
    assert {int(f[:-4]) for f in train} == set(manifest['train'])
    assert {int(f[:-4]) for f in val} == set(manifest['validation'])
    # every written image is the source image of its name (the index pixels), from the file of its split
    from PIL import Image
    for split_name in ('train', 'validation', 'test'):
        for dirpath, _, files in os.walk(os.path.join(root, split_name)):
            for f in files:
                px = np.asarray(Image.open(os.path.join(dirpath, f)))
                assert int(px[0, 0]) * 256 + int(px[0, 1]) == int(f[:-4])
                assert int(os.path.basename(dirpath)) == int(f[:-4]) % 10  # the label folder
    # validation pixels never appear among the training images (the synthetic images are all distinct)
    train_px = {np.asarray(Image.open(os.path.join(d, f))).tobytes()
                for d, _, fs in os.walk(os.path.join(root, 'train')) for f in fs}
    assert not any(np.asarray(Image.open(os.path.join(d, f))).tobytes() in train_px
                   for d, _, fs in os.walk(os.path.join(root, 'validation')) for f in fs)


# ------------------------------------------------------------------------------------------ end to end


def test_tiny_end_to_end_and_resume(tmp_path):
    """Data, the learning-rate and positive-control phases, the test evaluation, the report; a second call reuses
    every finished run. Four training runs of one epoch on 48 images."""
    src = _write_idx(str(tmp_path / 'src'))
    argv = ['--mode', 'tiny', '--configs', 'label-smoothing', '--fashion-mnist', src, '--data', str(tmp_path / 'data'),
            '--runs', str(tmp_path / 'runs'), '--out', str(tmp_path / 'out'), '--retries', '0']
    result = reg.main(argv)
    assert result['ran'] == 4 and result['plan']['finished'] == result['plan']['runs'] == 4
    assert result['seeds'] == [0, 1] and result['lr']['lr'] == 0.2
    assert set(result['configs']) == {'baseline', 'label-smoothing'}
    row = result['configs']['label-smoothing']
    assert all(k in row for k in ('gain', 'ci_low', 'ci_high')) and row['n'] == 2
    recs = [json.load(open(tmp_path / 'out' / 'regularization_runs_tiny' / 'lr0.2' / f'{c}-seed{s}.json'))
            for c in ('baseline', 'label-smoothing') for s in (0, 1)]
    for r in recs:
        assert len(r['epochs']) == 1 and r['wall_s'] > 0
        # the checkpoint's re-evaluation reproduces the script's own validation top-1: same transform, same weights
        assert r['val_top1_reevaluated'] == pytest.approx(r['val_top1'], abs=1e-6)
        assert 0 <= r['test_top1'] <= 100 and 0 <= r['train_top1'] <= 100
    # the gain is the paired difference of the records' test top-1 (recomputed here)
    d = [recs[2]['test_top1'] - recs[0]['test_top1'], recs[3]['test_top1'] - recs[1]['test_top1']]
    assert row['gain'] == pytest.approx(sum(d) / 2)
    report = json.load(open(tmp_path / 'out' / 'regularization_tiny.json'))
    assert report['configs']['label-smoothing']['gain'] == pytest.approx(row['gain'])
    md = (tmp_path / 'out' / 'regularization_tiny.md').read_text()
    assert '4 of 4 runs' in md and 'label-smoothing' in md
    again = reg.main(argv)
    assert again['ran'] == 0 and again['configs']['label-smoothing']['gain'] == pytest.approx(row['gain'])

    # the decisions read again on the wide validation split: evaluation of the same checkpoints, nothing trained
    wide = reg.main(argv + ['--report-only', '--wide-validation'])
    assert wide['ran'] == 0
    root = tmp_path / 'data' / 'tiny'
    wide_pngs = _pngs(root / 'validation-wide')
    assert len(wide_pngs) == 32 and not wide_pngs & (_pngs(root / 'train') | _pngs(root / 'validation'))
    recs = [json.load(open(tmp_path / 'out' / 'regularization_runs_tiny' / 'lr0.2' / f'{c}-seed{s}.json'))
            for c in ('baseline', 'label-smoothing') for s in (0, 1)]
    assert all(round(r['val_wide_top1'] * 32 / 100, 6) == int(round(r['val_wide_top1'] * 32 / 100)) for r in recs)
    control = wide['wide_validation']['positive_control']['configs']['label-smoothing']
    d = [recs[2]['val_wide_top1'] - recs[0]['val_wide_top1'], recs[3]['val_wide_top1'] - recs[1]['val_wide_top1']]
    assert control['gain'] == pytest.approx(sum(d) / 2) and control['n'] == 2
    assert wide['wide_validation']['evaluated'] == 4
    assert 'wider validation split' in (tmp_path / 'out' / 'regularization_tiny.md').read_text()
    mtime = os.path.getmtime(tmp_path / 'out' / 'regularization_runs_tiny' / 'lr0.2' / 'baseline-seed0.json')
    reg.main(argv + ['--report-only', '--wide-validation'])  # evaluated once: the records are not rewritten
    assert os.path.getmtime(tmp_path / 'out' / 'regularization_runs_tiny' / 'lr0.2' / 'baseline-seed0.json') == mtime
