"""The cost benchmarks' configurations build and run on tiny models (their timings are not tested)."""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch

import timm_tffd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import ab_terms, overhead, pooling, segments, terms  # noqa: E402
from test_losses import _torch_intra, _torch_pairwise  # noqa: E402


def test_four_taps_picks_evenly_spaced_blocks():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, embed_dim=16, num_heads=1, depth=12)
    task = overhead.CONFIGS['inter+intra-4taps'](vit)
    assert timm_tffd.get_tffd_state(task.trainable_module).taps.indices == [2, 5, 8, 11]
    resnet = timm.create_model('test_resnet')
    task = overhead.CONFIGS['inter+intra-4taps'](resnet)
    indices = timm_tffd.get_tffd_state(task.trainable_module).taps.indices
    assert indices == timm_tffd.resolve_stages(resnet) == [1, 2, 3, 4]


@pytest.mark.parametrize('config', ['baseline', 'inter+intra', 'inter+intra-4taps', 'inter+intra-wrap', 'm2o',
                                    'emd-grid7'])
def test_overhead_step_runs(config):
    step = overhead.make_step('resnet18', config, batch_size=2, img_size=224)  # emd-grid7 needs 7x7 maps
    losses = [step() for _ in range(2)]
    assert all(torch.isfinite(torch.stack(losses)))


def test_overhead_compiled_step_and_floor():
    """A compiled configuration trains (inductor runs on the CPU); the floor's bytes are those of the maps the model
    taps, computed here from timm's own intermediates."""
    step = overhead.make_step('test_resnet', 'inter+intra@compiled', batch_size=2, img_size=32)
    assert all(torch.isfinite(step()) for _ in range(2))
    assert overhead.baseline_of('inter+intra@compiled') == 'baseline@compiled'
    model = timm.create_model('test_resnet')
    _, feats = model.forward_intermediates(torch.zeros(3, 3, 64, 64), indices=timm_tffd.resolve_stages(model))
    assert overhead.tapped_bytes('test_resnet', 3, 64) == 4 * sum(f.numel() for f in feats)
    args = argparse.Namespace(batch_size=3, img_size=64, amp=False, device='cpu')
    # the extra time is the paired estimate, (ratio - 1) x the plain step's median, not the medians' difference (0.2)
    times = {'baseline': {'median_s': 0.5, 'ratio': 1.}, 'inter+intra': {'median_s': 0.7, 'ratio': 1.2}}
    row = overhead.floor_row('test_resnet', times, args)
    floor_s = 4 * 4 * sum(f.numel() for f in feats) / (row['bandwidth_gbs'] * 1e9)
    assert row['floor_ms'] == pytest.approx(floor_s * 1e3)
    assert row['inter+intra']['floor_multiple'] == pytest.approx(0.1 / floor_s)


@pytest.mark.parametrize('model', ['test_resnet', 'test_vit'])
def test_terms_benchmark_maps_and_gradients(model):
    tapped = terms.Tapped(model, batch_size=2, img_size=64)  # no 1x1 maps (those are both layouts at once)
    net = timm.create_model(model, **({'img_size': 64} if 'vit' in model else {}))
    taps = timm_tffd.resolve_stages(net)
    # float64, so that the terms' small gradients stay visible beside the stand-in's
    tapped.leaves = [f.detach().double().requires_grad_() for f in tapped.leaves]
    tapped.upstream = [u.double() for u in tapped.upstream]
    leaves = tapped.leaves
    assert len(leaves) == len(taps) and all(f.shape[0] == 2 for f in leaves)
    maps = tapped.maps(leaves)
    with torch.no_grad():
        _, real = net.forward_intermediates(torch.randn(2, 3, 64, 64), indices=taps)
    assert [m.shape for m in maps] == [r.shape for r in real]
    assert all((f.stride(1) == 1) == (model == 'test_vit') for f in maps)  # token views are channels last
    if model == 'test_vit':  # each leaf is a token tensor with the class token, each map a view of its grid
        assert all(f.shape[1] == 1 + m.shape[2] * m.shape[3] and m.data_ptr() == f[:, 1:].data_ptr()
                   for f, m in zip(leaves, maps))
    else:
        assert all(m is f for f, m in zip(leaves, maps))
    grads = {c: terms.make_step(c, tapped)() for c in terms.CONFIGS}
    for g, u in zip(grads['network'], tapped.upstream):
        assert torch.equal(g, u)
    # the terms' own gradient, by the definitions with plain autograd (adaptive pooling, channel indexing)
    ref_leaves = [f.detach().clone().requires_grad_() for f in leaves]
    ref_maps = tapped.maps(ref_leaves)
    reference = 0.005 * _torch_pairwise(ref_maps, timm_tffd.inter_layer_pairs(len(ref_maps))) \
        + 0.0004 * _torch_intra(ref_maps)
    expected = torch.autograd.grad(reference, ref_leaves)
    for g, u, e in zip(grads['inter+intra'], tapped.upstream, expected):
        assert e.abs().max() > 0
        torch.testing.assert_close(g - u, e, rtol=1e-7, atol=1e-7 * e.abs().max().item())


@pytest.mark.parametrize('tree_step', ['step', 'terms'])
def test_trees_compare_one_step_across_source_trees(tree_step, tmp_path):
    """``--trees``: one worker per source tree, each importing timm_tffd from its own tree."""
    copy = tmp_path / 'copy'
    shutil.copytree(os.path.dirname(timm_tffd.__file__), copy / 'timm_tffd')
    trees = {'here': os.path.dirname(os.path.dirname(timm_tffd.__file__)), 'copy': str(copy)}
    args = argparse.Namespace(batch_size=2, img_size=64, rounds=1, warmup=0, no_memory=False, tree_step=tree_step)
    rows = overhead.run_trees(trees, ['test_resnet'], args)
    assert [(r['model'], r['tree']) for r in rows] == [('test_resnet', 'here'), ('test_resnet', 'copy')]
    assert rows[0]['vs_previous'] == rows[0]['vs_first'] == 1 and rows[0]['diff_s'] == 0
    assert rows[1]['vs_previous'] == rows[1]['vs_first'] > 0
    assert all(r['time_ms'] > 0 and r['cpu_median_s'] > 0 for r in rows)
    assert all((r['step_mb'] is None) == (tree_step == 'terms') for r in rows)  # memory: whole steps only
    if tree_step == 'terms':
        with pytest.raises(RuntimeError, match='did not start from that tree'):
            overhead.TreeWorker(str(tmp_path / 'empty'), 'test_resnet', 'terms', args)


@pytest.mark.parametrize('swap', sorted(ab_terms.SWAPS))
def test_ab_terms_earlier_forms_compute_the_same_terms(swap):
    """The earlier form that ``ab_terms`` swaps in is the same function (values and gradients of the terms, float32:
    the CPU pooling form is float32-only), and a measurement leaves the library's own form in place."""
    tapped = terms.Tapped('test_resnet', batch_size=2, img_size=64)
    owner, attr, earlier = ab_terms.SWAPS[swap]
    current = vars(owner)[attr]

    def terms_and_grads():
        out = tapped.terms(tapped.leaves)
        total = out['inter'] + out['intra']
        return [out['inter'].detach(), out['intra'].detach()] + list(torch.autograd.grad(total, tapped.leaves))

    want = terms_and_grads()
    setattr(owner, attr, earlier)
    try:
        got = terms_and_grads()
    finally:
        setattr(owner, attr, current)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)
    res = ab_terms.measure('test_resnet', swap, argparse.Namespace(batch_size=2, img_size=64, rounds=2, warmup=0))
    assert list(res) == list(ab_terms.RUNS)
    assert vars(owner)[attr] is current


def test_pooling_forms_agree_and_are_timed():
    """``pooling.py``'s forms pool to the same values (its ``max_abs_diff`` against ``avg_pool2d``, checked here
    against an independent block mean), with a time for each pass."""
    assert pooling.parse_shape('2x3x8x12/2') == ((2, 3, 8, 12), (2, 2))
    res = pooling.measure((2, 3, 8, 12), (2, 2), rounds=2, warmup=0)
    assert list(res) == list(pooling.FORMS)
    x = torch.randn(2, 3, 8, 12)
    want = x.view(2, 3, 4, 2, 6, 2).mean((3, 5))
    for name, fn in pooling.FORMS.items():
        torch.testing.assert_close(fn(x, (2, 2)), want, rtol=1e-6, atol=1e-6, msg=name)
        assert res[name]['max_abs_diff'] < 1e-6 and res[name]['forward_ms'] > 0 and res[name]['backward_ms'] > 0


def test_terms_profile_lists_the_operators():
    """``terms.py --profile``: the operator table of the inter+intra step, with input shapes."""
    table = terms.profile('test_resnet', argparse.Namespace(batch_size=2, img_size=64, warmup=0, profile=1),
                          row_limit=-1)
    assert 'Input Shapes' in table and 'aten::index_select' in table  # intra's gathers (contiguous maps)


def test_traffic_counts_the_bytes_each_operator_reads_and_writes():
    x, b, y = torch.randn(1000), torch.randn(1000), torch.empty(1000)  # 4000 bytes each
    index, positions = torch.arange(0, 1000, 2), torch.arange(500)  # 500 int64: 4000 bytes each
    scale = torch.tensor(2.)
    with terms.Traffic() as mode:
        x.view(10, 100).t()  # views move nothing
        torch.ops.aten._unsafe_view(x, [10, 100])  # nor does an operator returning its input's memory
        torch.empty(1000)  # nor an allocation
        half = x.index_select(0, index)  # a gather reads what it writes, and the index
        index[positions]  # gathering from an integer tensor: the same rule
        torch.gather(x.view(10, 100), 1, positions[:50].expand(10, 50))  # an expanded index counts once: 50 int64
        x.sub_(b)  # reads both, writes x
        x * scale.expand(1000)  # an expanded operand counts once
        y.copy_(x)  # reads the source only
        torch.max(x.view(10, 100), 1)  # two outputs: 10 float32 values, 10 int64 indices
        torch.add(x, b, out=y)  # an out= tensor is written, not read
    assert mode.ops == {'aten.index_select.default': [1, 2000 + 4000, 2000],
                        'aten.index.Tensor': [1, 4000 + 4000, 4000], 'aten.gather.default': [1, 2000 + 400, 2000],
                        'aten.sub_.Tensor': [1, 8000, 4000],
                        'aten.mul.Tensor': [1, 4004, 4000],
                        'aten.copy_.default': [1, 4000, 4000], 'aten.max.dim': [1, 4000, 40 + 80],
                        'aten.add.out': [1, 8000, 4000]}
    assert half.numel() == 500


@pytest.mark.parametrize('model,gather', [('test_resnet', 'aten.index_select.default'),
                                          ('test_vit', 'aten.gather.default')])
def test_traffic_of_the_terms(model, gather):
    """``terms.py --traffic``: what the terms add to a step, by operator; the maps' bytes and intra's gathers from the
    model's own maps (a ResNet's contiguous maps gathered by ``index_select``, a ViT's token views by ``gather``)."""
    args = argparse.Namespace(batch_size=2, img_size=64)
    ops = terms.traffic(model, args)
    net = timm.create_model(model, **({'img_size': 64} if 'vit' in model else {}))
    with torch.no_grad():
        _, maps = net.forward_intermediates(torch.randn(2, 3, 64, 64), indices=timm_tffd.resolve_stages(net))
    assert ops.pop('maps') == [len(maps), sum(4 * m.numel() for m in maps), 0]
    # intra gathers each map's two halves forward and the whole map backward: two maps' bytes, read and written, and
    # the indices (int64: the two halves forward, the whole channel permutation backward)
    index_bytes = sum(8 * (2 * (m.shape[1] // 2) + m.shape[1]) for m in maps)
    values = 2 * sum(4 * m.numel() for m in maps)
    assert ops[gather] == [3 * len(maps), values + index_bytes, values]
    assert all(v >= 0 for row in ops.values() for v in row) and all(any(row) for row in ops.values())
    table = terms.traffic_table(model, args)  # the table's format
    assert f'| {gather} | {3 * len(maps)} |' in table and 'passes over the maps' in table.splitlines()[0]
    half = terms.traffic(model, args, torch.bfloat16)
    assert half.pop('maps')[1] == sum(2 * m.numel() for m in maps)
    assert half[gather][2] == ops[gather][2] // 2


def test_traffic_with_channels_last_maps():
    """A CNN's channels-last maps (``--channels-last``) are gathered by ``gather``, as the token views are."""
    args = argparse.Namespace(batch_size=2, img_size=64)
    tapped = terms.Tapped('test_resnet', 2, 64, channels_last=True)
    assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous() for f in tapped.leaves)
    ops = terms.traffic('test_resnet', args, channels_last=True)
    assert 'aten.index_select.default' not in ops and 'aten.index.Tensor' not in ops
    assert ops['aten.gather.default'][0] == 3 * len(tapped.leaves)


def test_interleaved_rounds_alternate_the_order_and_drop_the_warmup():
    calls = []

    def run(name):
        def call():
            calls.append(name)
            return len(calls)  # the call's place in the whole sequence
        return call

    out = overhead.interleaved_rounds({n: run(n) for n in 'abc'}, rounds=3, warmup=1)
    assert ''.join(calls) == 'abc' + 'cba' + 'abc' + 'cba'  # round 0 is the warm-up
    assert out == {'a': [6, 7, 12], 'b': [5, 8, 11], 'c': [4, 9, 10]}
    calls.clear()  # rounds that continue three earlier ones start with round 3: the reverse order
    out = overhead.interleaved_rounds({n: run(n) for n in 'abc'}, rounds=2, first=3)
    assert ''.join(calls) == 'cba' + 'abc' and out == {'a': [3, 4], 'b': [2, 5], 'c': [1, 6]}


def test_table_order_lists_each_mode_from_its_baseline():
    """Rows come eager before compiled, each mode's baseline first, then in ``CONFIGS`` order, whatever order the
    round timed them in."""
    timed_order = ['intra', 'inter+intra', 'baseline', 'baseline-copy', 'inter', 'inter@compiled',
                   'baseline@compiled', 'inter+intra@compiled']
    assert sorted(timed_order, key=overhead.table_order) == [
        'baseline', 'baseline-copy', 'inter', 'intra', 'inter+intra', 'baseline@compiled', 'inter@compiled',
        'inter+intra@compiled']


def test_median_interval():
    assert overhead.median_interval([1.03] * 9) == (1.03, 1.03)
    values = [1.00, 1.02, 1.03, 1.04, 1.05, 1.06, 1.30]
    lo, hi = overhead.median_interval(values)
    assert lo <= 1.04 <= hi and lo >= 1.00 and hi <= 1.06  # the outlier cannot become a resampled median here
    assert (lo, hi) == overhead.median_interval(values)  # seeded: a rerun of the report gives the same interval
    # more rounds of the same spread give a narrower interval
    lo_many, hi_many = overhead.median_interval(values * 8)
    assert hi_many - lo_many < hi - lo


def test_rounds_to_resolve_from_the_scatter_of_pairs():
    """The median of n normal values has a standard error of sqrt(pi / 2) sd / sqrt(n) (1.2533 sd / sqrt(n)); a 95%
    half-width of 1% at a 10% scatter then needs (1.96 x 1.2533 x 10)^2 = 603.4 -> 604 rounds."""
    assert overhead.rounds_to_resolve(0.10, 0.01) == 604
    assert overhead.rounds_to_resolve(0.02) == 25  # (1.96 x 1.2533 x 2)^2 = 24.1
    assert overhead.rounds_to_resolve(0.) == 1
    assert overhead.interval_half_width(0.10, 31) == pytest.approx(1.96 * 1.2533 * 0.10 / 31 ** 0.5, rel=1e-4)
    # the two agree: the rounds it asks for give at most the half-width asked for
    assert overhead.interval_half_width(0.07, overhead.rounds_to_resolve(0.07, 0.015)) <= 0.015
    # and the normal-theory figure matches a simulation of medians of normal log ratios
    g = torch.Generator().manual_seed(0)
    medians = torch.randn(20000, 31, generator=g).mul_(0.05).median(1).values
    assert medians.std().item() == pytest.approx(overhead.interval_half_width(0.05, 31) / 1.96, rel=0.05)


def test_robust_sd():
    """1.4826 x the median absolute deviation: the standard deviation for normal values, not moved by an outlier."""
    assert overhead.robust_sd([0., 1., 2., 3., 4.]) == pytest.approx(1.4826)  # deviations 2 1 0 1 2: MAD 1
    assert overhead.robust_sd([0., 1., 2., 3., 400.]) == pytest.approx(1.4826)
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(20001, generator=g) * 0.05).tolist()
    assert overhead.robust_sd(values) == pytest.approx(0.05, rel=0.03)


def test_noise_check_times_adjacent_pairs(tmp_path, monkeypatch, capsys):
    """``--noise-check``: only the plain step and its copy, in alternating adjacent pairs, and the verdict."""
    out = tmp_path / 'noise.json'
    monkeypatch.setattr(sys, 'argv', ['overhead.py', '--models', 'test_resnet', '--batch-size', '2', '--img-size',
                                      '32', '--warmup', '1', '--rounds', '31', '--noise-check', '5', '--malloc',
                                      'default', '--json', str(out)])
    overhead.main()
    check = json.load(open(out))['noise_check'][0]
    base, copy = check['times_ms']['baseline'], check['times_ms']['baseline-copy']
    assert check['model'] == 'test_resnet' and len(base) == len(copy) == 5
    logs = sorted(math.log(a / b) for a, b in zip(copy, base))
    deviations = sorted(abs(v - logs[2]) for v in logs)  # from the median of the five
    assert check['pair_sd'] == pytest.approx(1.4826 * deviations[2])
    assert check['rounds_for_1pct'] == overhead.rounds_to_resolve(check['pair_sd'])
    assert check['half_width'] == pytest.approx(overhead.interval_half_width(check['pair_sd'], 31))
    text = capsys.readouterr().out
    assert 'test_resnet: plain step' in text and '31-round table' in text and '| model |' not in text
    monkeypatch.setattr(sys, 'argv', ['overhead.py', '--models', 'test_resnet', '--noise-check', '2'])
    with pytest.raises(SystemExit):
        overhead.main()
    assert 'at least 3 pairs' in capsys.readouterr().err


def test_gpu_script_parts_budget_and_failures(tmp_path):
    """``benchmarks/gpu.sh`` on the CPU: its parts' commands (``DRY_RUN``), a part skipped where its limit is under
    20 s, a failing part making the exit status 1, and one line (no traceback) where torch sees no CUDA device or the
    machine's timm is too old for the package."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'gpu.sh')
    wheels = tmp_path / 'wheels'
    wheels.mkdir()
    env = dict(os.environ, DEVICE='cpu', OUT=str(tmp_path / 'out'), WHEELS=str(wheels),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])  # python3: this interpreter

    def run(**extra):
        proc = subprocess.run(['bash', script], env=dict(env, **extra), capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    rc, text = run(DRY_RUN='1', MODELS='test_resnet,test_vit', BATCH='4', ROUNDS='7')
    assert rc == 0 and f'timm {timm.__version__}, timm_tffd {timm_tffd.__version__}' in text
    parts = [line for line in text.splitlines() if line.startswith('== ') and ': ' in line]
    assert [p.split(' (limit')[0] for p in parts] == [
        '== CUDA tests', '== test_resnet eager', '== test_vit eager', '== memory', '== test_resnet compiled',
        '== test_vit compiled']
    assert parts[0].endswith('-m pytest -q -p no:cacheprovider tests/test_losses.py tests/test_wrap.py -k cuda')
    common = '--device cpu --amp --channels-last --batch-size 4 --img-size 224 --rounds 7'
    out = tmp_path / 'out'
    assert parts[1].endswith(f'overhead.py {common} --models test_resnet --floor --configs baseline,baseline-copy,'
                             f'inter,intra,inter+intra --no-memory --json {out}/eager_test_resnet.json --resume')
    assert parts[3].endswith(f'overhead.py {common} --models test_resnet,test_vit --configs baseline,inter+intra '
                             f'--no-time --json {out}/memory.json')
    assert parts[5].endswith(f'overhead.py {common} --models test_vit --floor --configs baseline,inter+intra '
                             f'--compiled --no-memory --json {out}/compiled_test_vit.json --resume')
    assert all('(limit ' in p for p in parts)

    # parts under 20 s are skipped; a part that fails (an unknown model) makes the exit status 1
    rc, text = run(MODELS='no_such_model', TEST_LIMIT='0', EAGER_LIMIT='60', MEMORY_LIMIT='19', COMPILED_LIMIT='5')
    assert rc == 1, text
    log = (out / 'gpu.log').read_text()
    assert '== CUDA tests: skipped, 0 s left for it' in log and '== memory: skipped, 19 s left for it' in log
    assert '== no_such_model eager: exit status 2' in log and '== no_such_model compiled: skipped' in log
    assert "unknown model(s) ['no_such_model']" in log and 'Traceback' not in log
    assert log.splitlines()[-1].endswith('a part failed or was stopped')

    if not torch.cuda.is_available():  # stops before any part where torch sees no GPU
        rc, text = run(DEVICE='cuda')
        assert rc == 1 and 'gpu.sh: torch sees no CUDA device' in text and '== CUDA tests' not in text
    fake = tmp_path / 'old' / 'timm'  # a machine whose timm is too old for the package
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("__version__ = '0.9.16'\n")
    rc, text = run(PYTHONPATH=str(tmp_path / 'old'))
    assert rc == 1 and 'Traceback' not in text and 'cannot import timm_tffd with timm 0.9.16' in text


def test_overhead_mixed_precision_channels_last_rows(tmp_path, monkeypatch):
    """The GPU table's flags on the CPU (``--amp``: bfloat16 autocast; ``--channels-last``; ``--floor`` of
    half-precision maps), as ``gpu.sh`` passes them."""
    out = tmp_path / 'amp.json'
    monkeypatch.setattr(sys, 'argv', ['overhead.py', '--models', 'test_resnet', '--configs', 'inter+intra',
                                      '--batch-size', '2', '--img-size', '32', '--rounds', '2', '--warmup', '1',
                                      '--amp', '--channels-last', '--no-memory', '--floor', '--malloc', 'default',
                                      '--json', str(out)])
    overhead.main()
    data = json.load(open(out))
    assert data['args']['amp'] and data['args']['channels_last']
    # the floor counts half-precision maps: half the bytes of float32 ones
    assert data['floor'][0]['tapped_mb'] * 2 ** 20 == overhead.tapped_bytes('test_resnet', 2, 32, 4) / 2
    assert [r['config'] for r in data['results']] == ['baseline', 'inter+intra']
    assert all(len(r['round_times_ms']) == 2 for r in data['results'])


def test_steal_share_from_proc_stat(tmp_path, monkeypatch):
    import builtins
    stat = tmp_path / 'stat'
    stat.write_text('cpu  100 0 50 900 0 0 0 250 0 0\ncpu0 50 0 25 450 0 0 0 125 0 0\n')
    real_open = builtins.open
    monkeypatch.setattr(builtins, 'open',
                        lambda path, *a, **k: real_open(stat if path == '/proc/stat' else path, *a, **k))
    ticks = overhead.os.sysconf('SC_CLK_TCK')
    assert overhead.steal_seconds() == 250 / ticks
    monkeypatch.setattr(overhead.os, 'cpu_count', lambda: 2)
    assert overhead.steal_share(0.5, 10.) == 0.5 / 20  # 0.5 CPU-seconds of 2 CPUs x 10 s
    assert overhead.steal_share(None, 10.) is None
    stat.write_text('intr 1 2 3\n')
    assert overhead.steal_seconds() is None


def test_memory_only_rows(tmp_path, monkeypatch, capsys):
    """``--no-time``: the per-process memory probes alone, each configuration against its own baseline."""
    out = tmp_path / 'mem.json'
    monkeypatch.setattr(sys, 'argv', ['overhead.py', '--models', 'test_resnet', '--configs', 'inter+intra',
                                      '--batch-size', '2', '--img-size', '64', '--no-time', '--json', str(out)])
    overhead.main()
    rows = json.load(open(out))['results']
    assert [r['config'] for r in rows] == ['baseline', 'inter+intra']
    assert rows[0]['memory_ratio'] == 1 and rows[1]['memory_ratio'] == rows[1]['step_mb'] / rows[0]['step_mb']
    assert all(r['step_mb'] > 0 and 'time_ratio' not in r for r in rows)
    monkeypatch.setattr(sys, 'argv', ['overhead.py', '--no-time', '--no-memory'])
    with pytest.raises(SystemExit):
        overhead.main()
    assert 'nothing to measure' in capsys.readouterr().err


def test_timed_rows_keep_every_round(tmp_path, monkeypatch):
    """Time mode: each row keeps its rounds' step times, the ratio is the median of per-round ratios, and the JSON
    records torch's CPU capability and the floor's paired estimate."""
    out = tmp_path / 'time.json'
    monkeypatch.setattr(sys, 'argv', ['overhead.py', '--models', 'test_resnet', '--configs', 'inter+intra',
                                      '--batch-size', '2', '--img-size', '32', '--rounds', '3', '--warmup', '1',
                                      '--no-memory', '--floor', '--malloc', 'default', '--json', str(out)])
    overhead.main()  # --malloc default: leaves this process's allocator settings alone
    data = json.load(open(out))
    assert data['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    rows = {r['config']: r for r in data['results']}
    assert list(rows) == ['baseline', 'inter+intra']
    base, tffd = rows['baseline']['round_times_ms'], rows['inter+intra']['round_times_ms']
    assert len(base) == len(tffd) == 3 and all(t > 0 for t in base + tffd)
    assert rows['inter+intra']['time_ratio'] == pytest.approx(sorted(a / b for a, b in zip(tffd, base))[1])
    floor = data['floor'][0]
    want = (rows['inter+intra']['time_ratio'] - 1) * sorted(base)[1]
    assert floor['inter+intra']['extra_ms'] == pytest.approx(want)


def test_resume_continues_the_rounds_of_a_killed_run(tmp_path, monkeypatch, capsys):
    """While a time table's rounds run its JSON is rewritten (here after every round); a killed run leaves it
    incomplete, a run without ``--resume`` refuses to overwrite it, and ``--resume`` keeps its rounds, times only the
    missing ones in the continued ABBA order, and gives the rows of the first ``--rounds`` of them."""
    out = tmp_path / 'time.json'
    argv = ['overhead.py', '--models', 'test_resnet', '--configs', 'inter+intra', '--batch-size', '2', '--img-size',
            '32', '--warmup', '1', '--no-memory', '--malloc', 'default', '--json', str(out)]
    order, kill = [], [True]
    real_rounds = overhead.rounds_with_steal

    def rounds_then_kill(runs, rounds, first=0):
        if kill[0] and len(order) == 3:
            raise SystemError('killed')  # the fourth round of the first run: the process dies
        order.append((first, rounds))
        return real_rounds(runs, rounds, first)

    monkeypatch.setattr(overhead, 'rounds_with_steal', rounds_then_kill)
    monkeypatch.setattr(overhead, 'SAVE_SECONDS', 0)
    monkeypatch.setattr(sys, 'argv', argv + ['--rounds', '7'])
    with pytest.raises(SystemError):
        overhead.main()
    killed = json.load(open(out))
    assert killed['complete'] is False and killed['results'] == []
    kept = killed['rounds']['test_resnet']
    assert {c: len(v) for c, v in kept['times_s'].items()} == {'baseline': 3, 'inter+intra': 3}
    assert kept['segments'][0]['first_round'] == 0 and kept['segments'][0]['rounds'] == 3
    assert kept['stolen_s'] is not None and kept['wall_s'] > 0
    capsys.readouterr()

    kill[0] = False
    monkeypatch.setattr(sys, 'argv', argv + ['--rounds', '7'])  # without --resume: the rounds are not overwritten
    with pytest.raises(SystemExit):
        overhead.main()
    assert 'unfinished table' in capsys.readouterr().err and json.load(open(out)) == killed

    monkeypatch.setattr(overhead, 'steal_seconds', lambda: None)  # this host cannot tell steal: none in the sum
    monkeypatch.setattr(sys, 'argv', argv + ['--rounds', '7', '--resume'])
    overhead.main()
    assert order == [(r, 1) for r in range(7)]  # round 3, odd, goes on in the reverse order (interleaved_rounds)
    assert 'test_resnet from round 3' in capsys.readouterr().out
    data = json.load(open(out))
    assert data['complete'] is True
    record = data['rounds']['test_resnet']
    assert [s['rounds'] for s in record['segments']] == [3, 4] and record['segments'][1]['first_round'] == 3
    assert record['stolen_s'] is None and record['wall_s'] > kept['wall_s']
    base, tffd = record['times_s']['baseline'], record['times_s']['inter+intra']
    assert base[:3] == kept['times_s']['baseline'] and tffd[:3] == kept['times_s']['inter+intra'] and len(base) == 7
    rows = {r['config']: r for r in data['results']}
    assert rows['inter+intra']['time_ratio'] == pytest.approx(sorted(a / b for a, b in zip(tffd, base))[3])
    assert rows['inter+intra']['round_times_ms'] == pytest.approx([1e3 * t for t in tffd])

    monkeypatch.setattr(sys, 'argv', argv + ['--rounds', '5', '--resume'])  # fewer rounds: the first five, none timed
    overhead.main()
    data5 = json.load(open(out))
    assert len(order) == 7 and data5['rounds'] == data['rounds'] and data5['complete'] is True
    rows = {r['config']: r for r in data5['results']}
    assert rows['inter+intra']['time_ratio'] == pytest.approx(sorted(a / b for a, b in zip(tffd[:5], base[:5]))[2])

    # a model of the file left out of this run keeps its record, and the file stays incomplete while it is short
    other = json.loads(json.dumps(data))
    other['rounds']['test_vit'] = {**record, 'times_s': {c: v[:2] for c, v in record['times_s'].items()}}
    (tmp_path / 'two.json').write_text(json.dumps(other))
    monkeypatch.setattr(sys, 'argv', argv[:-1] + [str(tmp_path / 'two.json'), '--rounds', '7', '--resume'])
    overhead.main()
    two = json.load(open(tmp_path / 'two.json'))
    assert two['complete'] is False and two['rounds'] == other['rounds'] and len(order) == 7


@pytest.mark.parametrize('change', [['--img-size', '48'], ['--configs', 'inter'], ['--compiled'], 'code', 'record',
                                    'unequal', 'not a table'])
def test_resume_refuses_other_settings_code_or_records(change, tmp_path, monkeypatch, capsys):
    """A file measured with other settings or code, or whose records are malformed, is refused with one line before
    any step is built."""
    out = tmp_path / 'time.json'
    argv = ['overhead.py', '--models', 'test_resnet', '--configs', 'inter+intra', '--batch-size', '2', '--img-size',
            '32', '--warmup', '1', '--no-memory', '--malloc', 'default', '--json', str(out), '--rounds', '2']
    monkeypatch.setattr(sys, 'argv', argv)
    overhead.main()
    data = json.load(open(out))
    times = data['rounds']['test_resnet']['times_s']
    extra, message = [], 'cannot be continued'
    if change == 'code':
        data['identity']['code'] = '0' * 16
    elif change == 'record':
        data['rounds']['test_resnet']['times_s'] = [1.0, 2.0]
        message = 'not one of step times'
    elif change == 'unequal':
        times['baseline'].append(1.0)
        message = 'unequal numbers of rounds'
    elif change == 'not a table':
        data = {'args': {}, 'results': []}
        message = 'no resumable time table'
    else:
        extra = change
    out.write_text(json.dumps(data))
    monkeypatch.setattr(overhead, 'make_step', None)  # a refused file builds no step
    monkeypatch.setattr(sys, 'argv', argv + ['--resume'] + extra)
    with pytest.raises(SystemExit) as e:
        overhead.main()
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_needs_a_time_table_json(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['overhead.py', '--models', 'test_resnet', '--resume'])
    with pytest.raises(SystemExit):
        overhead.main()
    assert 'give --json' in capsys.readouterr().err


def test_code_fingerprint_follows_the_code_not_its_comments(tmp_path):
    """The fingerprint ``--resume`` checks: equal for a copy of the package and after a comment or a docstring
    changes, different once the code changes."""
    package = os.path.dirname(os.path.abspath(timm_tffd.__file__))
    copy = tmp_path / 'timm_tffd'
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns('__pycache__'))
    assert overhead.code_fingerprint(str(copy)) == overhead.code_fingerprint()
    path = copy / 'losses' / '__init__.py'
    text = path.read_text()
    assert text.startswith('"""')
    path.write_text('"""Another docstring."""\n# a comment\n' + text.split('"""', 2)[2])
    assert overhead.code_fingerprint(str(copy)) == overhead.code_fingerprint()
    path.write_text(text + '\nEXTRA = 1\n')
    assert overhead.code_fingerprint(str(copy)) != overhead.code_fingerprint()


_MAPPINGS = r'''
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks import overhead
assert overhead.steady_malloc({mode!r})

def large_mappings():  # readable-writable mappings of 64 MB or more other than the heap
    out = set()
    with open('/proc/self/maps') as f:
        for line in f:
            fields = line.split()
            start, end = (int(a, 16) for a in fields[0].split('-'))
            if fields[1].startswith('rw') and end - start >= 64 << 20 and fields[-1] != '[heap]':
                out.add(fields[0])
    return out

before = large_mappings()
x = torch.ones(64 << 18)  # 64 MB, above glibc's largest mmap threshold
print(len(large_mappings() - before))
'''


@pytest.mark.skipif(not os.path.exists('/proc/self/maps') or not sys.platform.startswith('linux'),
                    reason='needs Linux /proc')
@pytest.mark.parametrize('mode', ['heap', 'mmap32'])
def test_steady_malloc_heap_only_maps_no_block(mode):
    """'heap': a 64 MB tensor comes from the heap; 'mmap32': it gets a mapping of its own."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', _MAPPINGS.format(root=root, mode=mode)], check=True,
                         capture_output=True, text=True).stdout
    new = int(out.split()[-1])
    assert new == (0 if mode == 'heap' else 1)
    with pytest.raises(ValueError, match='unknown allocator mode'):
        overhead.steady_malloc('jemalloc')


def _segmented_table(segments_of: dict) -> dict:
    """A time table JSON of one model whose rows have the given per-segment ratios (baseline steps of 1 s)."""
    sizes = [len(s) for s in next(iter(segments_of.values()))]
    times = {c: [r for seg in segs for r in seg] for c, segs in segments_of.items()}
    times['baseline'] = [1.] * sum(sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return {'identity': {'code': 'abc'}, 'rounds': {'m': {
        'times_s': times, 'stolen_s': 0., 'wall_s': 1.,
        'segments': [{'started': '', 'first_round': s, 'rounds': n} for s, n in zip(starts, sizes)]}}}


def test_segments_tell_a_shift_between_processes_from_scatter():
    deltas = [-0.02, -0.01, 0., 0.01, 0.02] * 12  # 60 rounds, median 0
    same = [1 + d for d in deltas]
    shifted = [1.05 + d for d in deltas]
    table = _segmented_table({'inter': [same, shifted], 'baseline-copy': [same, list(reversed(same))]})
    rows = {r['config']: r for r in segments.analyse([table], permutations=500)}
    inter, copy = rows['inter'], rows['baseline-copy']
    assert [s['ratio'] for s in inter['segments']] == pytest.approx([1.0, 1.05])
    assert inter['ratio'] == pytest.approx((1.02 + 1.03) / 2)  # the 60th and 61st of the 120 pooled ratios
    assert inter['p_process'] < 0.01  # no shuffle of the rounds puts the two halves as far apart
    assert copy['p_process'] == 1.  # equal medians: every shuffle reaches a statistic of 0
    assert inter['process_ci95'] is None  # two segments: nothing to resample across processes


def test_segments_interval_across_processes_covers_their_spread():
    levels = [1.00, 1.01, 1.02, 1.03, 1.04]
    table = _segmented_table({'inter': [[c] * 20 for c in levels]})
    row = segments.analyse([table], permutations=100)[0]
    lo, hi = row['process_ci95']
    assert 1.00 <= lo < 1.02 < hi <= 1.04  # the segments' spread, where the rounds alone say the median is 1.02
    round_lo, round_hi = overhead.median_interval([r for c in levels for r in [c] * 20])
    assert hi - lo > round_hi - round_lo


def test_segments_cli_pools_files_and_refuses_bad_ones(tmp_path, capsys):
    good = tmp_path / 'a.json'
    good.write_text(json.dumps(_segmented_table({'inter': [[1.01] * 12, [1.03] * 12]})))
    assert segments.main([str(good), str(good), '--permutations', '50']) == 0
    out = capsys.readouterr().out
    assert out.count('code abc, m 2 segments') == 2  # each file's code and segments first
    assert '| m | inter | 48 | 1.020 |' in out
    bad = _segmented_table({'inter': [[1.01] * 12, [1.03] * 12]})
    bad['rounds']['m']['segments'][1]['first_round'] = 5
    (tmp_path / 'bad.json').write_text(json.dumps(bad))
    for path in (tmp_path / 'bad.json', tmp_path / 'missing.json'):
        assert segments.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'error: cannot read {path}: ') and err.count('\n') == 1 and 'Traceback' not in err


def test_segments_refuse_an_empty_record_and_bad_counts(tmp_path, capsys):
    path = tmp_path / 'empty.json'
    path.write_text(json.dumps({'rounds': {'m': {}}}))
    assert segments.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f'error: cannot read {path}: m: a stored record is not one of step times (times_s), stolen_s, ' \
        'wall_s and segments\n'
    for flag in ('--permutations', '--min-rounds'):
        with pytest.raises(SystemExit) as exit_:
            segments.main([str(path), flag, '0'])
        assert exit_.value.code == 2 and 'take a positive number' in capsys.readouterr().err
