"""What each regularizer buys on real data: Tf-FD against label smoothing, DropBlock, RSD, logit KD and SFD.

Every configuration trains the same CIFAR-style network (``cifar_resnet8`` from the zoo) on Fashion-MNIST through
``train_timm_tffd.py``, with several seeds; the table gives the final-epoch test top-1 (mean, std), the gain over the
baseline with a 95% confidence interval, and the wall time of a run (plus the teacher's training for KD / SFD).

Data: the full official Fashion-MNIST (60k / 10k), from Debian's package::

    apt-get install dataset-fashion-mnist        # -> /usr/share/datasets/fashion-mnist/*.gz

    python benchmarks/accuracy.py --mode quick --stage lr      # 1. the baseline's learning rate
    python benchmarks/accuracy.py --mode quick --stage sweep   # 2. the Tf-FD weight scale
    python benchmarks/accuracy.py --mode quick                 # 3. every configuration (--lr from step 1)
    python benchmarks/accuracy.py --mode full                  # the same on all 60k training images
    python benchmarks/accuracy.py --mode quick --stage ablation --tffd-scale 10   # where the effect comes from

The last column of each table is the weighted extra terms' share of the training loss in the last epoch (the loss
scale at which a regularizer acts), read from the run's own log.

Statistics: seeds are paired across configurations (the same seed gives the same initial weights and the same batch
order), so the gain's interval is the paired t interval of the per-seed differences, ``mean(d) +- t(0.975, n-1) *
sd(d) / sqrt(n)``.
"""
import argparse
import concurrent.futures
import csv
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'train_timm_tffd.py')
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
FASHION_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte')

# Budgets on 2 CPU cores. Student cifar_resnet8 (0.08M parameters), teacher cifar_resnet20 (trained in the run).
# quick: a fixed 10k training subset, 5 epochs, 3 seeds (10 configurations x 3 seeds: the measured run times, two at
# a time with the teacher trained beside them, add up to about 28 minutes); the test
# set is always the full 10k images (standard error of a top-1 about 0.3 points). full: all 60k training images.
MODES = {
    'quick': dict(train_samples=10000, epochs=5, seeds=3, teacher_epochs=5),
    'full': dict(train_samples=0, epochs=6, seeds=3, teacher_epochs=6),
    'tiny': dict(train_samples=64, epochs=1, seeds=2, teacher_epochs=1),  # the CI smoke path
}
STUDENT = 'cifar_resnet8'
TEACHER = 'cifar_resnet20'


def _tffd_weights(scale: float) -> List[str]:
    return ['--tffd-inter-weight', f'{0.005 * scale:g}', '--tffd-intra-weight', f'{0.0004 * scale:g}']


def configurations(teacher_ckpt: Optional[str], tffd_scale: float = 1.0) -> Dict[str, List[str]]:
    """Configuration name -> extra arguments on top of the shared recipe (which sets ``--smoothing 0``).

    The Tf-FD rows use the reference code's weights; ``tffd_scale != 1`` adds inter+intra and Tf-FD + label
    smoothing with both weights scaled (the sweep's best, e.g. ``-x10``) next to them."""
    tffd_w = _tffd_weights(1.)
    teacher = ['--teacher', TEACHER, '--teacher-checkpoint', teacher_ckpt or 'TEACHER']
    configs = {
        'baseline': [],
        'label-smoothing': ['--smoothing', '0.1'],
        'dropblock': ['--drop-block', '0.1'],
        'tffd-inter': ['--tffd', 'inter'] + tffd_w[:2],
        'tffd-intra': ['--tffd', 'intra'] + tffd_w[2:],
        'tffd-inter+intra': ['--tffd', 'inter,intra'] + tffd_w,
        'tffd+label-smoothing': ['--tffd', 'inter,intra', '--smoothing', '0.1'] + tffd_w,
        'rsd': ['--self-distill', 'rsd'],
        'kd': teacher,
        'sfd-ri': teacher + ['--sfd', 'ri'],
    }
    if tffd_scale != 1:
        scaled = _tffd_weights(tffd_scale)
        configs[f'tffd-inter+intra-x{tffd_scale:g}'] = ['--tffd', 'inter,intra'] + scaled
        configs[f'tffd+label-smoothing-x{tffd_scale:g}'] = ['--tffd', 'inter,intra', '--smoothing', '0.1'] + scaled
    return configs


def ablations(scale: float) -> Dict[str, List[str]]:
    """``--stage ablation``: where Tf-FD's effect comes from, at the sweep's weight scale. Each variant changes one
    thing against inter+intra: a term alone, the features before the closing ReLU (``--tffd-preact``), adjacent
    stage pairs only, the two deeper stages only, or a fixed salient half."""
    weights = _tffd_weights(scale)
    both = ['--tffd', 'inter,intra'] + weights
    tag = f'x{scale:g}'
    return {
        'baseline': [],
        f'tffd-inter+intra-{tag}': both,
        f'tffd-inter-{tag}': ['--tffd', 'inter'] + weights[:2],
        f'tffd-intra-{tag}': ['--tffd', 'intra'] + weights[2:],
        f'tffd-inter+intra-{tag}-preact': both + ['--tffd-preact'],
        f'tffd-inter+intra-{tag}-adjacent': both + ['--tffd-pairs', 'adjacent'],
        f'tffd-inter+intra-{tag}-deep-stages': both + ['--tffd-stages', '2', '3'],
        f'tffd-inter+intra-{tag}-detach-salient': both + ['--tffd-detach-salient'],
    }


def paired_gain(config: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean per-seed difference and its paired t confidence interval (NaN bounds with fewer than 2 pairs)."""
    if len(config) != len(baseline):
        raise ValueError(f'paired statistics need as many runs as the baseline: {len(config)} vs {len(baseline)}')
    d = [c - b for c, b in zip(config, baseline)]
    gain = statistics.fmean(d)
    if len(d) < 2:
        return {'gain': gain, 'ci_low': math.nan, 'ci_high': math.nan}
    from scipy.stats import t
    half = t.ppf(0.5 + confidence / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return {'gain': gain, 'ci_low': gain - half, 'ci_high': gain + half}


def summarize(values: Sequence[float]) -> dict:
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else math.nan,
            'n': len(values)}


def _last_epoch(run_dir: str) -> dict:
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))[-1]


def final_top1(run_dir: str) -> float:
    return float(_last_epoch(run_dir)['eval_top1'])


def regularizer_share(run_dir: str) -> Optional[float]:
    """The weighted Tf-FD / distillation terms' share of the training loss in the last epoch, ``1 - base / total``
    (the loss scale at which the regularizer acted). The base loss is logged as ``train_base_loss`` by the Tf-FD and
    SFD tasks and as ``train_task_loss`` by timm's distillation tasks; None for a run that logs neither."""
    row = _last_epoch(run_dir)
    base = row.get('train_base_loss') or row.get('train_task_loss')
    if not base:
        return None
    return 1. - float(base) / float(row['train_loss'])


def prepare_fashion_mnist(src: str, root: str) -> str:
    """Lay the official IDX files out as torchvision's FashionMNIST expects (``root/FashionMNIST/raw``)."""
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for name in FASHION_FILES:
        dst = os.path.join(raw, name)
        if os.path.exists(dst):
            continue
        gz = os.path.join(src, name + '.gz')
        if not os.path.exists(gz):
            raise SystemExit(f'{gz} not found: install the data with `apt-get install dataset-fashion-mnist` or '
                             f'pass --fashion-mnist DIR')
        with gzip.open(gz, 'rb') as fi, open(dst + '.tmp', 'wb') as fo:
            shutil.copyfileobj(fi, fo)
        os.replace(dst + '.tmp', dst)
    return root


def run_training(name: str, extra: List[str], seed: int, args, budget: dict, epochs: int, model: str = STUDENT):
    """Train one configuration with one seed (skipped when its finished summary exists); returns (dir, seconds)."""
    exp = f'{name}-seed{seed}'
    run_dir = os.path.join(args.runs, exp)
    done = os.path.join(run_dir, 'wall_time.json')
    if os.path.exists(done):
        with open(done) as f:
            return run_dir, json.load(f)['seconds']
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, SCRIPT, *args.data_args, '--model', model, '--num-classes', '10', '--in-chans', '1',
           '--epochs', str(epochs), '--sched', 'cosine', '--warmup-epochs', '0', '--lr', str(args.lr),
           '--weight-decay', '5e-4', '--opt', 'sgd', '--momentum', '0.9', '-b', str(args.batch_size),
           '--smoothing', '0', '--no-aug', '--workers', str(args.workers), '--seed', str(seed),
           '--checkpoint-hist', '1', '--log-interval', '100000', '--output', args.runs, '--experiment', exp, *extra]
    if '--tffd' in extra:
        cmd += ['--tffd-warmup-epochs', str(args.tffd_warmup)]
    if budget['train_samples']:
        cmd += ['--max-train-samples', str(budget['train_samples'])]
    if args.mode == 'tiny':
        cmd += ['--max-val-samples', '64']
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f'{exp} failed (exit {proc.returncode}):\n{" ".join(cmd)}\n{proc.stderr[-3000:]}')
    with open(done, 'w') as f:
        json.dump({'seconds': seconds, 'command': cmd}, f)
    print(f'  {exp}: top-1 {final_top1(run_dir):.2f}  ({seconds:.0f} s)', flush=True)
    return run_dir, seconds


def write_report(results: dict, out_dir: str, stem: str, title: str):
    """``<stem>.json`` and ``<stem>.md`` (+ plots when matplotlib is installed)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{stem}.json'), 'w') as f:
        json.dump(results, f, indent=2)
    lines = [f'# {title}', '', results['recipe'], '',
             '| configuration | top-1 mean | std | gain vs baseline [95% CI] | wall time / run (s) | + teacher (s) '
             '| extra terms / train loss |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for name, r in results['configs'].items():
        gain = '—' if name == 'baseline' else \
            f'{r["gain"]:+.2f} [{r["ci_low"]:+.2f}, {r["ci_high"]:+.2f}]'
        teacher = f'{r["teacher_s"]:.0f}' if r['teacher_s'] else '—'
        share = r.get('loss_share')
        share = f'{100 * share:.1f}%' if share is not None else '—'
        lines.append(f'| {name} | {r["mean"]:.2f} | {r["std"]:.2f} | {gain} | {r["time_s"]:.0f} | {teacher} '
                     f'| {share} |')
    with open(os.path.join(out_dir, f'{stem}.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from timm_tffd.plot import plot_curves, plot_gain_vs_cost
    runs = [d for r in results['configs'].values() for d in r['runs']]
    plot_curves(runs, os.path.join(out_dir, f'{stem}_curves.png'), title)
    rows = [dict(config=n, gain=r['gain'], ci_low=r['ci_low'], ci_high=r['ci_high'],
                 cost_s=r['time_s'] + (r['teacher_s'] or 0)) for n, r in results['configs'].items()
            if n != 'baseline']
    plot_gain_vs_cost(rows, os.path.join(out_dir, f'{stem}_gain_vs_cost.png'), title)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--mode', choices=list(MODES), default='quick')
    parser.add_argument('--stage', choices=['compare', 'sweep', 'lr', 'ablation'], default='compare',
                        help='compare: all configurations; sweep: Tf-FD weight scales; lr: baseline learning rates; '
                             'ablation: Tf-FD variants at --tffd-scale (terms alone, pre-activation, pairs, stages)')
    parser.add_argument('--configs', default='', help='comma-separated subset of the configurations')
    parser.add_argument('--seeds', type=int, default=0, help='seeds per configuration (default: the mode\'s)')
    parser.add_argument('--lr', type=float, default=0.2, help='baseline-tuned (--stage lr): 0.2')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--tffd-scale', type=float, default=1.0,
                        help='both default Tf-FD weights times this (the sweep\'s best); compare: added rows next to '
                             'the reference-weight ones; ablation: every variant')
    parser.add_argument('--tffd-warmup', type=int, default=0, help='Tf-FD warm-up epochs (short budgets: 0)')
    parser.add_argument('--workers', type=int, default=1)
    parser.add_argument('--jobs', type=int, default=2, help='training runs at a time')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run (OMP_NUM_THREADS); 0: torch\'s '
                        'default')
    parser.add_argument('--fashion-mnist', default=FASHION_MNIST, help='folder with the official .gz files')
    parser.add_argument('--embedded', action='store_true', help='use the embedded subset instead (smoke tests)')
    parser.add_argument('--runs', default=os.path.join(REPO, 'benchmarks', 'runs'), help='training outputs')
    parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results'), help='report folder')
    args = parser.parse_args(argv)
    budget = dict(MODES[args.mode])
    seeds = list(range(args.seeds or budget['seeds']))
    args.runs = os.path.join(os.path.abspath(args.runs), f'{args.mode}-{args.stage}')
    if args.embedded:
        args.data_args = ['--img-size', '28']
    else:
        root = prepare_fashion_mnist(args.fashion_mnist, os.path.join(os.path.dirname(args.runs), 'data'))
        args.data_args = ['--data-dir', root, '--dataset', 'torch/fashion_mnist', '--train-split', 'train',
                          '--val-split', 'test', '--img-size', '28', '--mean', '0.2860', '--std', '0.3530']

    if args.stage == 'lr':
        configs = {f'baseline-lr{lr:g}': ['--lr', f'{lr:g}'] for lr in (0.02, 0.05, 0.1, 0.2, 0.4)}
    elif args.stage == 'sweep':
        configs = {'baseline': []}
        for scale in (1, 10, 100):
            configs[f'tffd-inter+intra-x{scale}'] = ['--tffd', 'inter,intra'] + _tffd_weights(scale)
    elif args.stage == 'ablation':
        configs = ablations(args.tffd_scale)
    else:
        configs = configurations(None, args.tffd_scale)
    if args.configs:
        keep = args.configs.split(',')
        unknown = [c for c in keep if c not in configs]
        if unknown:
            parser.error(f'unknown configuration(s) {unknown}; choose from {", ".join(configs)}')
        configs = {k: v for k, v in configs.items() if k in keep or k == 'baseline'}

    # one pool of training processes; the teacher starts first, the runs that need it are queued last
    pool = concurrent.futures.ThreadPoolExecutor(max(1, args.jobs))  # each job waits on one training process
    needs_teacher = [name for name, extra in configs.items() if 'TEACHER' in extra]
    teacher = None
    if needs_teacher:
        print(f'teacher {TEACHER}: trained in the run', flush=True)
        teacher = pool.submit(run_training, 'teacher', [], 0, args, budget, budget['teacher_epochs'], TEACHER)

    def job(name: str, extra: List[str], seed: int):
        if 'TEACHER' in extra:
            ckpt = os.path.join(teacher.result()[0], 'last.pth.tar')
            extra = [ckpt if a == 'TEACHER' else a for a in extra]
        return run_training(name, extra, seed, args, budget, budget['epochs'])

    order = [n for n in configs if n not in needs_teacher] + needs_teacher
    futures = {(name, s): pool.submit(job, name, configs[name], s) for name in order for s in seeds}
    try:
        per_config = {name: [futures[name, s].result() for s in seeds] for name in configs}
        teacher_s = teacher.result()[1] if teacher else 0.
    finally:  # a failed run stops the benchmark: queued runs are dropped, running ones finish
        pool.shutdown(cancel_futures=True)
    results = {'mode': args.mode, 'stage': args.stage, 'budget': budget, 'seeds': seeds, 'student': STUDENT,
               'teacher': TEACHER, 'teacher_s': teacher_s, 'configs': {}}
    base = [final_top1(d) for d, _ in per_config.get('baseline', per_config[next(iter(per_config))])]
    for name, runs in per_config.items():
        top1 = [final_top1(d) for d, _ in runs]
        r = summarize(top1)
        r.update(paired_gain(top1, base) if name != 'baseline' else {'gain': 0., 'ci_low': 0., 'ci_high': 0.})
        shares = [regularizer_share(d) for d, _ in runs]
        r.update(top1=top1, runs=[d for d, _ in runs], time_s=statistics.fmean(s for _, s in runs),
                 teacher_s=teacher_s if name in needs_teacher else 0.,
                 loss_share=statistics.fmean(shares) if None not in shares else None)
        results['configs'][name] = r
    data = 'embedded Fashion-MNIST subset' if args.embedded else 'Fashion-MNIST (official split)'
    results['recipe'] = (
        f'{STUDENT} on {data}, {budget["train_samples"] or "all"} training images, {budget["epochs"]} epochs, '
        f'SGD lr {"per configuration" if args.stage == "lr" else args.lr} cosine, batch {args.batch_size}, wd 5e-4, '
        f'no augmentation, seeds {seeds}; {args.jobs} run(s) at a time, {args.threads or "default"} thread(s) each. '
        + (f'KD/SFD teacher {TEACHER} trained {budget["teacher_epochs"]} epochs in this run ({teacher_s:.0f} s). '
           if needs_teacher else '') +
        f'Command: python benchmarks/accuracy.py {" ".join(argv if argv is not None else sys.argv[1:])}')
    stem = 'accuracy' if args.stage == 'compare' else f'accuracy_{args.stage}'
    if args.mode != 'full':
        stem += f'_{args.mode}'
    write_report(results, args.out, stem, f'Fashion-MNIST, {args.mode} mode, {args.stage}')
    print(open(os.path.join(args.out, f'{stem}.md')).read())


if __name__ == '__main__':
    main()
