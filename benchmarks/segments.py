"""Whether a time table's ratios move between the processes that timed its rounds (``overhead.py`` JSON, no timing).

A time table gathered with ``--resume`` runs its rounds in segments, one process each (the JSON's ``segments``). Each
row's interval in the table is a bootstrap over rounds: it treats every round as an independent draw and covers a
rerun in the same process. Whatever a process fixes for its whole life (where its tensors sit in memory, how its
buffers align) is shared by all of its rounds and is not in that interval. This script reads a completed (or partial)
table and, for each row and each segment of at least ``--min-rounds`` rounds, gives the segment's own median ratio
with its round-bootstrap interval (``overhead.median_interval``), and a permutation test of whether the segments
differ more than their rounds' scatter explains: the statistic is the spread of the segments' median log ratios
around the pooled one, weighted by their rounds (``process_effect_p``); under no process effect the rounds are
exchangeable between segments, so the labels are shuffled (``--permutations`` times, fixed seed) and ``p`` is the
share of shuffles whose statistic reaches the observed one (counting the observed labelling).

Where a row has at least ``MIN_PROCESSES`` segments it also gets a two-stage bootstrap interval of its pooled median
(resample the segments, then the rounds within each): the interval that covers a rerun in new processes. With fewer
segments there is nothing to resample and the column reads ``-``. A table meant to resolve a ratio across processes
runs its rounds in several segments: the same ``overhead.py`` command with ``--resume`` and ``--rounds`` raised step by
step (25, 50, ... 250), each call a new process.

    python benchmarks/segments.py benchmarks/results/overhead_time.json
    python benchmarks/segments.py benchmarks/results/previous_df1cfe3/overhead_time_rerun.json \
        benchmarks/results/overhead_time.json      # two runs: their segments side by side, row by row

Several files pool each row over the segments of all of them, in the order given, and the test then asks whether the
runs differ too: what a row moves between runs hours apart (another process, and the host in another state). Whether
pooling is meaningful is the reader's call: the files' code fingerprints are printed first.
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
from typing import List, Optional, Sequence, Tuple

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: `benchmarks` too
from benchmarks.overhead import baseline_of, median_interval, table_order, time_state  # noqa: E402

MIN_PROCESSES = 5  # segments a row needs for an interval across processes


def segment_ratios(record: dict, config: str, min_rounds: int = 10) -> List[List[float]]:
    """Per-round time ratios of ``config`` to its baseline (``overhead.baseline_of``) in each segment of a model's
    record that holds at least ``min_rounds`` rounds, in the order the segments ran."""
    times = record['times_s']
    ratios = [a / b for a, b in zip(times[config], times[baseline_of(config)])]
    out = []
    for seg in record['segments']:
        part = ratios[seg['first_round']:seg['first_round'] + seg['rounds']]
        if len(part) >= min_rounds:
            out.append(part)
    return out


def _spread(groups: Sequence[Sequence[float]], centre: float) -> float:
    """The segments' medians' squared distances from ``centre``, each weighted by the segment's rounds."""
    return sum(len(g) * (statistics.median(g) - centre) ** 2 for g in groups)


def process_effect_p(segments: Sequence[Sequence[float]], permutations: int = 2000, seed: int = 0) -> Optional[float]:
    """Permutation p-value of a segment effect (``None`` with fewer than two segments). The statistic: the segments'
    median log ratios' squared distances from the pooled median, each weighted by its rounds (a segment of many
    rounds that sits apart weighs more than a short one, whose median scatters more); ``p`` is the share of label
    shuffles, the observed labelling counted, whose statistic is at least the observed one."""
    if len(segments) < 2:
        return None
    logs = [[math.log(r) for r in seg] for seg in segments]
    pooled = [v for seg in logs for v in seg]
    centre = statistics.median(pooled)
    observed = _spread(logs, centre)
    sizes = [len(seg) for seg in logs]
    rng = random.Random(seed)
    reach = 1
    for _ in range(permutations):
        rng.shuffle(pooled)
        groups, start = [], 0
        for n in sizes:
            groups.append(pooled[start:start + n])
            start += n
        if _spread(groups, centre) >= observed * (1 - 1e-9):
            reach += 1
    return reach / (permutations + 1)


def process_interval(segments: Sequence[Sequence[float]], resamples: int = 2000,
                     seed: int = 0) -> Optional[Tuple[float, float]]:
    """95% two-stage bootstrap interval of the pooled median ratio: draw the segments with replacement, then the
    rounds within each drawn segment; ``None`` with fewer than ``MIN_PROCESSES`` segments."""
    if len(segments) < MIN_PROCESSES:
        return None
    rng = random.Random(seed)
    medians = []
    for _ in range(resamples):
        values = []
        for seg in rng.choices(segments, k=len(segments)):
            values += rng.choices(seg, k=len(seg))
        medians.append(statistics.median(values))
    medians.sort()
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def check(data) -> None:
    """A ValueError that says what is wrong unless ``data`` is a time table of ``overhead.py --json``: per model, step
    times of every configuration and its baseline (``overhead.time_state`` checks a record) and segments that tile
    the rounds."""
    if not (isinstance(data, dict) and isinstance(data.get('rounds'), dict) and data['rounds']):
        raise ValueError('it holds no rounds (a time table written by overhead.py --json)')
    for model_name, record in data['rounds'].items():
        if not (isinstance(record, dict) and isinstance(record.get('times_s'), dict)):
            raise ValueError(f'{model_name}: a stored record is not one of step times (times_s), stolen_s, wall_s and '
                             'segments')
        try:
            time_state(list(record['times_s']), record)
        except ValueError as e:
            raise ValueError(f'{model_name}: {e}') from None
        missing = sorted({baseline_of(c) for c in record['times_s']} - set(record['times_s']))
        if missing:
            raise ValueError(f'{model_name}: no rounds of {", ".join(missing)}, the baseline of other rows')
        rounds, first = len(next(iter(record['times_s'].values()))), 0
        for seg in record['segments']:
            if not (isinstance(seg, dict) and seg.get('first_round') == first and isinstance(seg.get('rounds'), int)
                    and seg['rounds'] >= 0):
                raise ValueError(f'{model_name}: its segments do not follow each other from round 0')
            first += seg['rounds']
        if first != rounds:
            raise ValueError(f'{model_name}: its segments hold {first} rounds, its step times {rounds}')


def analyse(tables: Sequence[dict], min_rounds: int = 10, permutations: int = 2000) -> List[dict]:
    """One entry per (model, row) of one or more time table JSONs (a row of several tables: its segments in all of
    them, in the order given): the pooled median ratio over the kept segments, each segment's median, rounds and
    interval, the permutation p of a segment effect and the interval across segments."""
    rows = []
    models = list(dict.fromkeys(m for data in tables for m in data['rounds']))
    for model_name in models:
        records = [data['rounds'][model_name] for data in tables if model_name in data['rounds']]
        configs = [c for c in records[0]['times_s'] if baseline_of(c) != c and all(c in r['times_s'] for r in records)]
        for config in sorted(configs, key=table_order):
            segments = [seg for record in records for seg in segment_ratios(record, config, min_rounds)]
            if not segments:
                continue
            pooled = [r for seg in segments for r in seg]
            rows.append({
                'model': model_name, 'config': config, 'rounds': len(pooled),
                'ratio': statistics.median(pooled),
                'segments': [{'rounds': len(seg), 'ratio': statistics.median(seg),
                              'ratio_ci95': median_interval(seg)} for seg in segments],
                'p_process': process_effect_p(segments, permutations),
                'process_ci95': process_interval(segments)})
    return rows


def _table(rows: List[dict]) -> str:
    lines = ['| model | config | rounds | ratio | per segment: ratio [95% interval] (rounds) | p, process effect | '
             '95% interval across processes |', '|---|---|---:|---:|---|---:|---:|']
    for r in rows:
        segs = ', '.join(f'{s["ratio"]:.3f} [{s["ratio_ci95"][0]:.3f}, {s["ratio_ci95"][1]:.3f}] ({s["rounds"]})'
                         for s in r['segments'])
        p = '-' if r['p_process'] is None else f'{r["p_process"]:.3f}'
        ci = '-' if r['process_ci95'] is None else f'[{r["process_ci95"][0]:.3f}, {r["process_ci95"][1]:.3f}]'
        lines.append(f'| {r["model"]} | {r["config"]} | {r["rounds"]} | {r["ratio"]:.3f} | {segs} | {p} | {ci} |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('json', nargs='+', help='time tables written by overhead.py --json (several: each row pooled '
                        'over the segments of all of them)')
    parser.add_argument('--min-rounds', type=int, default=10, help='leave out segments with fewer rounds')
    parser.add_argument('--permutations', type=int, default=2000)
    args = parser.parse_args(argv)
    if args.min_rounds < 1 or args.permutations < 1:
        parser.error('--min-rounds and --permutations take a positive number')
    tables = []
    for path in args.json:
        try:
            with open(path) as f:
                data = json.load(f)
            check(data)
        except (OSError, ValueError) as e:
            print(f'error: cannot read {path}: {e}', file=sys.stderr)
            return 2
        tables.append(data)
        identity = data.get('identity')
        code = identity.get('code') if isinstance(identity, dict) else None
        counts = ', '.join(f'{m} {n} segment{"s" * (n != 1)}'
                           for m, n in ((m, len(r['segments'])) for m, r in data['rounds'].items()))
        print(f'{path}: code {code}, {counts}')
    rows = analyse(tables, args.min_rounds, args.permutations)
    print()
    print(_table(rows))
    tested = [r for r in rows if r['p_process'] is not None]
    if tested:
        print(f'\n{sum(r["p_process"] < 0.05 for r in tested)} of {len(tested)} rows with p < 0.05 (about '
              f'{0.05 * len(tested):.1f} expected where no process effect exists)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
