"""timm_tffd.plot on training output folders, and the accuracy benchmark's statistics."""
import csv
import math
import os
import struct
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.accuracy import paired_gain, summarize  # noqa: E402
from timm_tffd.plot import DPI, FIGSIZE, group_runs, read_summary  # noqa: E402
from timm_tffd.plot import main as plot_main  # noqa: E402


def _png_size(path):
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n'
    return struct.unpack('>II', head[16:24])


def _fake_run(root, name, top1):
    run = os.path.join(root, name)
    os.makedirs(run)
    with open(os.path.join(run, 'summary.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5'])
        for e, acc in enumerate(top1):
            w.writerow([e, 2.0 / (e + 1), 1.0, acc, 99.0])
    return run


def test_plot_cli_png(tmp_path):
    pytest.importorskip('matplotlib')
    runs = [_fake_run(tmp_path, 'tffd-seed0', [50, 60, 70]), _fake_run(tmp_path, 'tffd-seed1', [52, 61, 69]),
            _fake_run(tmp_path, 'baseline-seed0', [48, 58, 66])]
    assert list(group_runs(runs)) == ['tffd', 'baseline']
    out = tmp_path / 'curves.png'
    proc = subprocess.run([sys.executable, '-m', 'timm_tffd.plot', *runs, '--out', str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)


def test_plot_cli_writes_into_the_run_folder_or_out(tmp_path, monkeypatch, capsys):
    """By default the curves go into the first run folder, with --out into the folder it names; never into the
    current directory."""
    pytest.importorskip('matplotlib')
    runs = [_fake_run(tmp_path / 'runs', name, [50, 60]) for name in ('tffd-seed0', 'baseline-seed0')]
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    proc = subprocess.run([sys.executable, '-m', 'timm_tffd.plot', *runs], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.join(runs[0], 'curves.png')
    assert _png_size(os.path.join(runs[0], 'curves.png')) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    assert not os.path.exists(os.path.join(runs[1], 'curves.png'))
    monkeypatch.chdir(cwd)
    for option in ('--out', '--output'):
        out = tmp_path / f'plots{option}' / 'new'
        plot_main([*runs, option, str(out)])
        assert sorted(os.listdir(out)) == ['curves.png']
    # --out naming an existing file that is not a .png: one error line
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        plot_main([*runs, '--out', os.path.join(runs[0], 'summary.csv')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'is a file, not a folder' in err and err.count('\n') == 1
    assert os.listdir(cwd) == []


def test_plot_cli_rejects_non_runs(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'timm_tffd.plot', str(tmp_path), '--out', str(tmp_path / 'x.png')],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and 'not a training output folder' in proc.stderr
    assert not (tmp_path / 'x.png').exists()


def test_read_summary(tmp_path):
    run = _fake_run(tmp_path, 'r', [10, 20])
    s = read_summary(run)
    assert list(s['eval_top1']) == [10, 20] and list(s['train_loss']) == [2.0, 1.0]


def test_paired_gain_golden():
    config, base = [91.0, 92.0, 90.5], [90.0, 91.5, 90.0]
    # by hand: d = (1, .5, .5), mean 2/3, sd = sqrt(1/12), t(0.975, 2) = 4.302652729911275
    half = 4.302652729911275 * math.sqrt(1 / 12) / math.sqrt(3)
    g = paired_gain(config, base)
    assert g['gain'] == pytest.approx(2 / 3)
    assert (g['ci_low'], g['ci_high']) == (pytest.approx(2 / 3 - half), pytest.approx(2 / 3 + half))
    stats = pytest.importorskip('scipy.stats')
    ci = stats.ttest_rel(config, base).confidence_interval(0.95)
    assert (g['ci_low'], g['ci_high']) == (pytest.approx(ci.low), pytest.approx(ci.high))
    one = paired_gain([91.0], [90.0])
    assert one['gain'] == 1.0 and math.isnan(one['ci_low'])
    with pytest.raises(ValueError, match='as many runs'):
        paired_gain([1.0], [1.0, 2.0])


def test_summarize_golden():
    s = summarize([90.0, 92.0, 94.0])
    assert s == {'mean': 92.0, 'std': 2.0, 'n': 3}


@pytest.mark.slow
def test_accuracy_benchmark_tiny_end_to_end(tmp_path):
    """The benchmark's whole path on a tiny budget: teacher, baseline, Tf-FD and KD runs, statistics, report, plots."""
    pytest.importorskip('matplotlib')
    from benchmarks.accuracy import main
    main(['--mode', 'tiny', '--embedded', '--configs', 'tffd-inter,kd', '--workers', '0', '--batch-size', '32',
          '--runs', str(tmp_path / 'runs'), '--out', str(tmp_path / 'results')])
    import json
    with open(tmp_path / 'results' / 'accuracy_tiny.json') as f:
        results = json.load(f)
    assert list(results['configs']) == ['baseline', 'tffd-inter', 'kd']
    assert results['teacher_s'] > 0 and results['configs']['kd']['teacher_s'] == results['teacher_s']
    assert f'teacher cifar_resnet20 trained 1 epochs in this run ({results["teacher_s"]:.0f} s)' in results['recipe']
    base = [float(list(csv.DictReader(open(os.path.join(d, 'summary.csv'))))[-1]['eval_top1'])
            for d in results['configs']['baseline']['runs']]
    for name, r in results['configs'].items():
        top1 = [float(list(csv.DictReader(open(os.path.join(d, 'summary.csv'))))[-1]['eval_top1']) for d in r['runs']]
        assert r['top1'] == top1 and r['mean'] == pytest.approx(sum(top1) / len(top1))
        assert r['gain'] == pytest.approx(sum(a - b for a, b in zip(top1, base)) / len(top1))
    for name, r in results['configs'].items():  # the regularizer's share of the loss, from the run's own log
        last = list(csv.DictReader(open(os.path.join(r['runs'][0], 'summary.csv'))))[-1]
        if name == 'baseline':
            assert r['loss_share'] is None
        if name == 'tffd-inter':
            shares = []
            for d in r['runs']:
                row = list(csv.DictReader(open(os.path.join(d, 'summary.csv'))))[-1]
                shares.append((float(row['train_loss']) - float(row['train_base_loss'])) / float(row['train_loss']))
            assert 0 < r['loss_share'] < 1 and r['loss_share'] == pytest.approx(sum(shares) / len(shares))
            assert float(last['train_tffd_inter']) > 0
        if name == 'kd':  # timm's distillation task logs its base loss as train_task_loss
            row = list(csv.DictReader(open(os.path.join(r['runs'][-1], 'summary.csv'))))[-1]
            assert 0 < r['loss_share'] < 1 and float(row['train_kd_loss']) > 0
    table = (tmp_path / 'results' / 'accuracy_tiny.md').read_text()
    assert '| tffd-inter |' in table and '| kd |' in table
    assert f'| {100 * results["configs"]["tffd-inter"]["loss_share"]:.1f}% |' in table
    for png in ('accuracy_tiny_curves.png', 'accuracy_tiny_gain_vs_cost.png'):
        assert _png_size(tmp_path / 'results' / png)[0] > 0


def test_accuracy_configurations_scaled_tffd_rows():
    from benchmarks.accuracy import configurations
    default = configurations('t.pth')
    assert default['tffd-inter+intra'][-4:] == ['--tffd-inter-weight', '0.005', '--tffd-intra-weight', '0.0004']
    assert default['kd'][-2:] == ['--teacher-checkpoint', 't.pth'] and '--sfd' in default['sfd-ri']
    scaled = configurations('t.pth', 10)
    assert list(scaled)[:len(default)] == list(default)  # the reference-weight rows stay
    assert scaled['tffd-inter+intra-x10'][-4:] == ['--tffd-inter-weight', '0.05', '--tffd-intra-weight', '0.004']
    assert scaled['tffd+label-smoothing-x10'][:4] == ['--tffd', 'inter,intra', '--smoothing', '0.1']


def test_accuracy_ablation_variants_are_valid_training_commands():
    """Each ablation variant differs from inter+intra in the one flag it names, and the training script accepts it."""
    from benchmarks.accuracy import ablations
    from train_timm_tffd import parse_args
    variants = ablations(10)
    both = variants['tffd-inter+intra-x10']
    assert both == ['--tffd', 'inter,intra', '--tffd-inter-weight', '0.05', '--tffd-intra-weight', '0.004']
    expected = {'preact': ['--tffd-preact'], 'adjacent': ['--tffd-pairs', 'adjacent'],
                'deep-stages': ['--tffd-stages', '2', '3'], 'detach-salient': ['--tffd-detach-salient']}
    for suffix, flags in expected.items():
        assert variants[f'tffd-inter+intra-x10-{suffix}'] == both + flags
    for name, extra in variants.items():
        args, _ = parse_args(['--model', 'cifar_resnet8', *extra])
        if name != 'baseline':
            assert args.tffd and args.tffd_inter_weight in (0.005, 0.05)
    args, _ = parse_args(['--model', 'cifar_resnet8', *variants['tffd-inter+intra-x10-deep-stages']])
    assert args.tffd_stages == [2, 3] and args.tffd_intra_weight == 0.004
