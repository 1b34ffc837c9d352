"""Training curves and cost/benefit plots from training output folders (needs the ``plot`` extra: matplotlib).

    python -m timm_tffd.plot RUN_DIR [RUN_DIR ...] [--out DIR_OR_PNG]

writes ``curves.png`` into the first ``RUN_DIR``, or into the folder ``--out`` names (or to ``--out`` itself when it
ends in ``.png``). Runs are grouped into configurations by name: a folder ``<config>-seed<N>`` (the layout
``benchmarks/accuracy.py`` writes) joins the group ``<config>``; any other folder is its own group. Each group is drawn
as the mean over its runs with the min-max spread across seeds shaded: eval top-1 and train loss against epoch, as in
SFD (Pei et al., IJCAI 2021), Figure 1.
"""
import argparse
import csv
import os
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ['read_summary', 'group_runs', 'plot_curves', 'plot_gain_vs_cost']

FIGSIZE = (12, 4.5)
DPI = 100
CURVES_NAME = 'curves.png'
_SEED_SUFFIX = re.compile(r'-seed\d+$')


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit('plotting needs matplotlib: pip install "timm_tffd[plot]"') from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def read_summary(run_dir: str) -> Dict[str, np.ndarray]:
    """Columns of a run's ``summary.csv`` as float arrays (one value per epoch)."""
    path = os.path.join(run_dir, 'summary.csv')
    if not os.path.isfile(path):
        raise ValueError(f'{run_dir} is not a training output folder: it has no summary.csv')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f'{path} has no epochs yet')
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def group_runs(run_dirs: Sequence[str]) -> 'OrderedDict[str, List[str]]':
    """Group run folders by configuration name (the folder name without a trailing ``-seed<N>``)."""
    groups: 'OrderedDict[str, List[str]]' = OrderedDict()
    for d in run_dirs:
        name = _SEED_SUFFIX.sub('', os.path.basename(os.path.normpath(d)))
        groups.setdefault(name, []).append(d)
    return groups


def _colors(plt, n: int) -> list:
    """n distinct colors: matplotlib's 10-color cycle, or tab20 for more series."""
    cmap = plt.get_cmap('tab10' if n <= 10 else 'tab20')
    return [cmap(i % cmap.N) for i in range(n)]


def plot_curves(run_dirs: Sequence[str], out: str, title: Optional[str] = None) -> str:
    """Eval top-1 and train loss against epoch, mean and seed spread per configuration; returns ``out``.

    Args:
        run_dirs: Training output folders (with summary.csv).
        out: PNG path; its folder is created when missing.
        title: Figure title.
    """
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    groups = group_runs(run_dirs)
    colors = _colors(plt, len(groups))
    for color, (name, dirs) in zip(colors, groups.items()):
        summaries = [read_summary(d) for d in dirs]
        n = min(len(s['epoch']) for s in summaries)
        epochs = summaries[0]['epoch'][:n] + 1
        for ax, key in ((ax_acc, 'eval_top1'), (ax_loss, 'train_loss')):
            values = np.stack([s[key][:n] for s in summaries])
            ax.plot(epochs, values.mean(0), color=color, label=f'{name} (n={len(dirs)})')
            if len(dirs) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.2)
    ax_acc.set(xlabel='epoch', ylabel='eval top-1 (%)', title='test accuracy')
    ax_loss.set(xlabel='epoch', ylabel='train loss', title='training loss')
    ax_acc.legend(fontsize='small')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_gain_vs_cost(rows: Sequence[dict], out: str, title: Optional[str] = None) -> str:
    """One point per configuration: top-1 gain over the baseline (95% CI bars) against wall time per run.

    Args:
        rows: dicts with ``config``, ``gain``, ``ci_low``, ``ci_high`` and ``cost_s`` (wall seconds, teacher included).
        out: PNG path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(FIGSIZE[0] * 0.8, FIGSIZE[1]), dpi=DPI)
    for color, r in zip(_colors(plt, len(rows)), rows):
        err = [[r['gain'] - r['ci_low']], [r['ci_high'] - r['gain']]]
        ax.errorbar(r['cost_s'], r['gain'], yerr=err, fmt='o', capsize=3, color=color, label=r['config'])
    ax.axhline(0, color='grey', lw=0.8)
    if rows:
        ax.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.01, 0.5))  # labels never hide the points
    ax.set(xlabel='wall time per run (s), teacher training included', ylabel='top-1 gain over baseline (points)',
           title=title or 'accuracy gain against training cost')
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _curves_path(run_dirs: Sequence[str], out: Optional[str] = None) -> str:
    """Where the command line writes the curves: ``out`` when it ends in ``.png``, else ``CURVES_NAME`` in the
    folder ``out``, by default in the first run folder.

    Args:
        run_dirs: The run folders given.
        out: ``--out``: a folder or a ``.png`` path, or ``None``.
    """
    if out is None:
        return os.path.join(run_dirs[0], CURVES_NAME)
    if out.lower().endswith('.png'):
        return out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f'--out {out} is a file, not a folder (name a folder, or a .png file)')
    return os.path.join(out, CURVES_NAME)


def main(argv=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) and plot; bad input exits with one error line."""
    parser = argparse.ArgumentParser(prog='python -m timm_tffd.plot', description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='+', help='training output folders (with summary.csv)')
    parser.add_argument('--out', '--output', metavar='DIR_OR_PNG', default=None,
                        help=f'folder to write {CURVES_NAME} into, or a .png path (default: the first run folder)')
    parser.add_argument('--title', default=None)
    args = parser.parse_args(argv)
    try:
        print(plot_curves(args.runs, _curves_path(args.runs, args.out), args.title))
    except (ValueError, OSError) as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n')


if __name__ == '__main__':
    main(sys.argv[1:])
