"""Cost of one training step with Tf-FD (and its family) against plain timm training, measured in the same run.

One step = forward, loss, backward, optimizer step (SGD, momentum 0.9), CPU, float32.

* Time: every configuration gets its own copy of the same initial model; configurations run interleaved, round after
  round (alternating their order), and the ratio is the median over rounds of each step's time divided by the baseline
  step's of the same round: the speed of a shared 2-core machine drifts by 10% between rounds, and a ratio within a
  round cancels that drift. The ratio's 95% interval is a bootstrap over the rounds (it does not cover drift between
  days). The table also gives the median step time. On a virtual machine the hypervisor can take CPU time from
  the guest (steal time, ``/proc/stat``); the share it took while each model's rounds ran is printed after the
  table (and stored in the JSON): where it is large, the intervals widen and the times are slower than the hardware.
  On the CPU the timing process fixes glibc's allocator settings first (``steady_malloc``; ``--malloc``: heap only by
  default), so that a configuration's time does not depend on the heap state the others left.
* Order: a round runs the configurations in the order of ``--configs``, the next round in the reverse order. On a
  noisy host the ratio of two steps scatters less the closer they run (resnet18 on 2026-12-07: 5 to 6.5% between
  neighbours, about 10% two to four steps apart), so the row that matters most belongs next to its baseline:
  ``--configs intra,inter+intra,baseline,baseline-copy,inter`` times ``inter+intra`` and the control against the
  neighbouring baseline step. The table lists the rows in a fixed order whatever the timing order.
* Memory: each (model, configuration) runs in a fresh process with glibc's mmap threshold fixed
  (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors go back to the OS). After one warm-up step the peak-RSS counter
  is reset (``/proc/self/clear_refs``) and one more step runs: *step memory* is that step's peak RSS minus the RSS
  before it (activations, gradients and temporaries; parameters and optimizer state are already resident).

* Teacher-based configurations (SFD, timm's LogitDistillationTask and FeatureDistillationTask, teacher resnet50) run
  for the other models only; their ratio "with teacher training" adds one resnet50 baseline step (measured in the same
  run) to each student step: a teacher trained for as many steps as the student.

* ``--compiled``: every configuration also compiled as the training script's ``--torchcompile`` compiles it
  (``task.compile``, inductor; it runs on the CPU too), each compared with the compiled plain step.
* ``--floor``: the cost floor of the Tf-FD terms: four passes (``FLOOR_PASSES``) over the bytes of the tapped maps at
  the copy bandwidth measured in the same process, and the measured extra time of ``inter+intra`` (eager and
  compiled; the table's ratio minus one, times the plain step's median time) as a multiple of it. The JSON keeps
  every round's step times (``round_times_ms``).
* ``--noise-check PAIRS``: before a table, whether this host can resolve it: the plain step and its copy run as
  PAIRS adjacent pairs (``baseline``, ``baseline-copy``, the order alternating), and from the scatter of their
  per-pair log time ratios (``robust_sd``) it prints how wide the interval of a ``--rounds``-round table's control row
  would be (a table runs ``baseline-copy`` next to ``baseline`` too) and how many rounds a 1% interval needs. The
  other rows run farther from their baseline in each round, and on a noisy host the scatter grows with the steps
  between two timed ones, so their intervals come out as wide or wider.
* ``--resume`` (with ``--json``): a long table over several sessions. While a time table's rounds run, its JSON is
  rewritten at least every ``SAVE_SECONDS`` (``complete: false`` until every model in it has its rounds), with each
  model's step times of every round, the steal and wall seconds, and one segment (start, first round, rounds) per
  process that timed some; a run without ``--resume`` refuses to overwrite such an unfinished file. The same command
  with ``--resume`` keeps those rounds and times only the ones missing to ``--rounds`` (the ABBA order goes on where it
  stopped; the rows are of the first ``--rounds`` rounds). It refuses, with one line, a file measured with other code
  (``code_fingerprint``: the package's and this benchmark's code, comments and docstrings aside), other Python, torch
  or timm, another CPU model, CPU instructions, CPU count or GPU, other threads or step settings. The rounds of one
  table can then come from several days on the same hardware: each round's ratio is still taken within the round,
  and the segments let the ratios of each day be compared.
* ``--cpus 0,1`` pins the process (and its probes) to those CPUs with one torch thread each; ``--device cuda``,
  ``--amp`` (float16 with a GradScaler on CUDA) and ``--channels-last`` run the same table on a GPU, where the step
  time is taken between ``torch.cuda.synchronize()`` calls and step memory is the caching allocator's peak.

    python benchmarks/overhead.py                       # resnet18, resnet50, vit_small at 224px, batch 16
    python benchmarks/overhead.py --compiled --floor --cpus 0,1 --rounds 21
    python benchmarks/overhead.py --configs baseline,baseline-copy,inter+intra --rounds 31   # with a control row
    python benchmarks/overhead.py --device cuda --amp --channels-last --compiled --floor --batch-size 256 --rounds 50 \
        --configs baseline,baseline-copy,inter,intra,inter+intra
    python benchmarks/overhead.py --models resnet18 --batch-size 8 --rounds 5 --configs baseline,inter+intra
    python benchmarks/overhead.py --models resnet18 --cpus 0,1 --noise-check 30 --rounds 31   # is the host calm?
    python benchmarks/overhead.py --configs intra,inter+intra,baseline,baseline-copy,inter --compiled --floor \
        --cpus 0,1 --rounds 250 --no-memory --json t.json --resume   # the same again until complete
    python benchmarks/overhead.py --trees before=/tmp/old,now=. --rounds 21   # one step, two versions of timm_tffd

* ``--trees NAME=PATH,...``: the same step (``inter+intra-wrap``: ``wrap(model, 'inter,intra')`` and ``TfFDLoss``)
  in one worker process per source tree, each importing ``timm_tffd`` from its PATH, timed round by round; the table
  gives each tree's per-round time ratio and CPU-time difference to the tree before it (what the change between the
  two buys) and its ratio to the first tree, with bootstrap intervals, and step memory as above. With
  ``--tree-step terms`` the workers time the Tf-FD terms alone (``benchmarks/terms.py``): the changes between trees
  are confined to them, and a step of a few hundred ms resolves their difference in far fewer seconds than whole
  training steps do on a busy machine.
"""
import argparse
import ast
import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import timm
from timm.task import ClassificationTask, FeatureDistillationTask, LogitDistillationTask

import timm_tffd

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: `benchmarks` too
from benchmarks import terms  # noqa: E402

DEFAULT_MODELS = ('resnet18', 'resnet50', 'vit_small_patch16_224')
TEACHER = 'resnet50'  # the teacher of the teacher-based configurations (random weights: the cost is the same)


def _tffd(methods: str, **options) -> Callable:
    def build(model: nn.Module) -> nn.Module:
        config = timm_tffd.TfFDConfig(methods, options=options, warmup_epochs=0)
        return timm_tffd.TfFDTask(model, nn.CrossEntropyLoss(), tffd=config, verbose=False)
    return build


def _four_taps(methods: str) -> Callable:
    """Tf-FD on four evenly spaced taps (the last of each quarter of the default stages): a ResNet's four stages
    as by default; blocks 3, 6, 9 and 12 of a 12-block ViT instead of all twelve."""
    def build(model: nn.Module) -> nn.Module:
        default = timm_tffd.resolve_stages(model)
        n = len(default)
        stages = [default[(q + 1) * n // 4 - 1] for q in range(4)] if n > 4 else default
        config = timm_tffd.TfFDConfig(methods, stages=stages, warmup_epochs=0)
        return timm_tffd.TfFDTask(model, nn.CrossEntropyLoss(), tffd=config, verbose=False)
    return build


class _Wrapped(nn.Module):
    """``timm_tffd.wrap(model, methods)`` with ``TfFDLoss`` as a task: the two-call form with default options and
    weights, the same in every version of the library (``--trees`` runs it against older source trees)."""

    def __init__(self, model: nn.Module, methods: str):
        super().__init__()
        self.model = timm_tffd.wrap(model, methods)
        self.criterion = timm_tffd.TfFDLoss(nn.CrossEntropyLoss(), self.model)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        return {'loss': self.criterion(self.model(x), y)}


def _teacher() -> nn.Module:
    return timm.create_model(TEACHER, num_classes=1000)


# configuration name -> task builder; each task's forward(input, target) returns a dict with 'loss'
CONFIGS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    'baseline': lambda model: ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False),
    # the plain step again, on its own copy of the model: a control, whose ratio to the baseline shows what two
    # identical steps differ by in this design (their models' memory placement, their place in the round)
    'baseline-copy': lambda model: ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False),
    'inter': _tffd('inter'),
    'intra': _tffd('intra'),
    'inter+intra': _tffd('inter,intra'),
    'inter+intra-4taps': _four_taps('inter,intra'),
    'inter+intra-wrap': lambda model: _Wrapped(model, 'inter,intra'),
    'm2o': _tffd('m2o'),
    'emd': _tffd('emd'),
    'emd-grid7': _tffd('emd', emd_grid=7),
    # teacher-based, student != TEACHER only
    'sfd-ri': lambda model: timm_tffd.SFDTask(model, _teacher(), integrator='ri', verbose=False),
    'timm-logit-kd': lambda model: LogitDistillationTask(model, _teacher(), nn.CrossEntropyLoss(), temperature=4.,
                                                         verbose=False),
    'timm-feature-kd': lambda model: FeatureDistillationTask(model, _teacher(), nn.CrossEntropyLoss(),
                                                             verbose=False),
}
TEACHER_CONFIGS = ('sfd-ri', 'timm-logit-kd', 'timm-feature-kd')
TREE_CONFIG = 'inter+intra-wrap'  # the training step that --trees runs in every source tree


COMPILED = '@compiled'  # suffix of a configuration whose task is compiled as the script's --torchcompile does
TREE_STEPS = {'step': TREE_CONFIG, 'compiled': 'inter+intra' + COMPILED, 'terms': 'terms'}  # --tree-step: config


def split_config(config: str) -> Tuple[str, bool]:
    """``'inter+intra@compiled'`` -> ``('inter+intra', True)``."""
    return (config[:-len(COMPILED)], True) if config.endswith(COMPILED) else (config, False)


def make_step(model_name: str, config: str, batch_size: int, img_size: int, seed: int = 0, device: str = 'cpu',
              amp: bool = False, channels_last: bool = False):
    """One training step of ``config`` (``NAME`` or ``NAME@compiled``): forward through the task, backward, SGD."""
    name, compiled = split_config(config)
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=1000, img_size=img_size) if 'vit' in model_name \
        else timm.create_model(model_name, num_classes=1000)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    task = CONFIGS[name](model)
    task.to(device)
    task.train()
    if compiled:
        task.compile(backend='inductor')
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.float16 if device != 'cpu'
                               else torch.bfloat16) if amp else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device) if amp and device != 'cpu' else None

    def step():
        with autocast:
            loss = task(x, y)['loss']
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return loss.detach()
    return step


def _sync(device: str):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def make_terms_step(model_name: str, batch_size: int, img_size: int):
    """The Tf-FD part of the ``TREE_CONFIG`` step alone (``benchmarks.terms``, configuration ``inter+intra``): the
    terms' forward and backward on leaves shaped like the model's taps, with a stand-in for the network's gradient."""
    torch.manual_seed(0)
    return terms.make_step('inter+intra', terms.Tapped(model_name, batch_size, img_size))


def _status_kb(key: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{key} not in /proc/self/status')


def probe_memory(model_name: str, config: str, batch_size: int, img_size: int, device: str = 'cpu',
                 amp: bool = False, channels_last: bool = False) -> dict:
    step = make_step(model_name, config, batch_size, img_size, device=device, amp=amp, channels_last=channels_last)
    step()  # allocates optimizer state and warms caches (and compiles)
    if torch.device(device).type == 'cuda':  # the caching allocator's peak, not the process RSS
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return {'step_mb': (torch.cuda.max_memory_allocated() - before) / 2 ** 20,
                'peak_mb': torch.cuda.max_memory_allocated() / 2 ** 20}
    before = _status_kb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak-RSS counter to the current RSS
    step()
    return {'step_mb': (_status_kb('VmHWM') - before) / 1024, 'peak_mb': _status_kb('VmHWM') / 1024}


def tree_env(tree: Optional[str] = None, **extra: str) -> dict:
    """The environment of a subprocess that imports ``timm_tffd`` from the source tree ``tree`` (a folder holding a
    ``timm_tffd`` package; None: as this process does), with ``extra`` variables set."""
    env = dict(os.environ, **extra)
    if tree is not None:
        env['PYTHONPATH'] = os.pathsep.join([os.path.abspath(tree)] + [p for p in [env.get('PYTHONPATH')] if p])
    return env


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
MALLOC_MODES = {  # --malloc: glibc's allocator settings for timing on the CPU (see steady_malloc)
    'heap': 'glibc malloc: heap only, no trim',
    'mmap32': 'glibc malloc: mmap threshold 32 MB, no trim',
    'default': 'allocator settings: default',
}


def steady_malloc(mode: str = 'heap') -> bool:
    """For timing on the CPU: fix glibc's allocator settings (``mode``, a key of ``MALLOC_MODES``) before any tensor
    is allocated. By default glibc moves its mmap threshold as blocks are freed and gives the top of the heap back to
    the OS past a threshold, so whether a step's tensors come from the heap or from fresh pages that fault in depends
    on what ran before it in the process: of configurations interleaved in one process, the Tf-FD steps read 0.91 to
    0.92x the plain step in one run.

    ``'heap'`` (the default) serves every block from the heap and never trims it (``M_MMAP_MAX`` 0): freed memory is
    reused, as a caching allocator (CUDA's) reuses it, and no step pays for faulting in fresh pages. ``'mmap32'``
    fixes the mmap threshold at 32 MB (its largest) and turns trimming off: a tensor up to 32 MB reuses heap memory,
    a larger one (a ResNet-50 layer1 map at batch 16 is 51 MB) is mapped afresh and faulted in page by page at every
    allocation. ``'default'`` leaves glibc's settings. Returns whether glibc took the settings (``'default'``:
    False)."""
    if mode not in MALLOC_MODES:
        raise ValueError(f'unknown allocator mode {mode!r}; choose from {", ".join(MALLOC_MODES)}')
    if mode == 'default':
        return False
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    mapped = libc.mallopt(M_MMAP_MAX, 0) if mode == 'heap' else libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def add_malloc_argument(parser: argparse.ArgumentParser):
    parser.add_argument('--malloc', default='heap', choices=tuple(MALLOC_MODES),
                        help='glibc\'s allocator settings for CPU timing (overhead.steady_malloc): heap only '
                             '(default), mmap threshold 32 MB, or glibc\'s defaults')


def _malloc(args) -> str:
    if getattr(args, 'steady_malloc', False):
        return MALLOC_MODES[args.malloc]
    return MALLOC_MODES['default']


def single_process_timing(threads: int = 0, malloc: str = 'heap') -> str:
    """The setup of the timers that run in one process (``terms.py``, ``ab_terms.py``, ``pooling.py``): ``threads``
    torch threads (0: torch's own choice) and ``steady_malloc(malloc)``. Returns the threads and allocator for a
    header."""
    if threads:
        torch.set_num_threads(threads)
    steady = steady_malloc(malloc)
    return f'{torch.get_num_threads()} threads, {_malloc(argparse.Namespace(steady_malloc=steady, malloc=malloc))}'


def measure_memory(model_name: str, config: str, args, tree: Optional[str] = None) -> dict:
    env = tree_env(tree, MALLOC_MMAP_THRESHOLD_='65536')
    cmd = [sys.executable, os.path.abspath(__file__), '--probe', model_name, config, '--batch-size',
           str(args.batch_size), '--img-size', str(args.img_size), '--device', getattr(args, 'device', 'cpu'),
           *_flags(args)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class TreeWorker:
    """A subprocess that imports ``timm_tffd`` from one source tree, builds ``make_step(model_name, config)`` (or
    ``make_terms_step`` for ``config='terms'``), runs the warm-up steps, then times one step per request
    (``step()``)."""

    def __init__(self, tree: str, model_name: str, config: str, args):
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', model_name, config, '--batch-size',
               str(args.batch_size), '--img-size', str(args.img_size), '--warmup', str(args.warmup)]
        if getattr(args, 'threads', None):
            cmd += ['--threads', str(args.threads)]
        cmd += ['--malloc', getattr(args, 'malloc', 'heap')]
        self.proc = subprocess.Popen(cmd, env=tree_env(tree), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        ready = self.proc.stdout.readline().split()  # 'ready PATH' once warmed up, PATH: the timm_tffd it imported
        if ready[:1] != ['ready'] or not ready[1].startswith(os.path.abspath(tree) + os.sep):
            self.close()
            raise RuntimeError(f'the worker for {tree} did not start from that tree (said {" ".join(ready)!r})')

    def step(self) -> Tuple[float, float]:
        """Wall and CPU seconds (all threads of the worker) of one step."""
        self.proc.stdin.write('step\n')
        self.proc.stdin.flush()
        wall, cpu = self.proc.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve(model_name: str, config: str, args):
    """A ``TreeWorker``'s side: for each line on stdin, one timed step, its wall and CPU seconds on stdout."""
    build = make_terms_step if config == 'terms' else functools.partial(make_step, config=config)
    step = build(model_name, batch_size=args.batch_size, img_size=args.img_size)
    for _ in range(args.warmup):
        step()
    print('ready', os.path.abspath(timm_tffd.__file__), flush=True)
    for _ in sys.stdin:
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        print(time.perf_counter() - t0, time.process_time() - c0, flush=True)


def measure_trees(model_name: str, trees: Dict[str, str], args) -> Dict[str, dict]:
    """The same step (``TREE_STEPS[args.tree_step]``: ``TREE_CONFIG``, the compiled task step, or the Tf-FD part
    alone) with ``timm_tffd`` from each source tree, one worker process per tree, timed round by round (ABBA order).
    Each tree's per-round ratio and difference (seconds) to the tree before it (what the change between them buys)
    and its ratio to the first tree, as medians with a bootstrap interval, in wall time and in the worker's CPU time
    (which other processes on the machine inflate less), and the median step time."""
    names = list(trees)
    workers = {}
    try:
        for n in names:  # one at a time: the warm-up steps do not overlap
            workers[n] = TreeWorker(trees[n], model_name, TREE_STEPS[args.tree_step], args)
        times, stolen, wall = rounds_with_steal({n: workers[n].step for n in names}, args.rounds)  # (wall, cpu)
    finally:
        for w in workers.values():
            w.close()
    out = {'steal_share': steal_share(stolen, wall)}
    for k, n in enumerate(names):
        out[n] = {'median_s': statistics.median(t[0] for t in times[n]),
                  'cpu_median_s': statistics.median(t[1] for t in times[n])}
        for clock, i in (('', 0), ('cpu_', 1)):
            for key, other in (('vs_previous', names[max(k - 1, 0)]), ('vs_first', names[0])):
                ratios = [a[i] / b[i] for a, b in zip(times[n], times[other])]
                out[n][clock + key] = statistics.median(ratios)
                out[n][clock + key + '_ci95'] = median_interval(ratios)
            diffs = [a[i] - b[i] for a, b in zip(times[n], times[names[max(k - 1, 0)]])]
            out[n][clock + 'diff_s'] = statistics.median(diffs)
            out[n][clock + 'diff_s_ci95'] = median_interval(diffs)
    return out


def run_trees(trees: Dict[str, str], models, args) -> list:
    """``--trees``: print and return one row per (model, tree)."""
    print('| model | tree | step time (ms) | vs previous tree | 95% interval | CPU time vs previous | 95% interval '
          '| CPU ms vs previous | 95% interval | vs first tree | step memory (MB) |\n'
          '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    rows = []
    for model_name in models:
        res = measure_trees(model_name, trees, args)
        for n, tree in trees.items():
            r = res[n]
            mem = None if args.no_memory or args.tree_step == 'terms' \
                else measure_memory(model_name, TREE_STEPS[args.tree_step], args, tree)['step_mb']
            rows.append({'model': model_name, 'tree': n, 'path': tree, 'time_ms': r['median_s'] * 1e3, **r,
                         'step_mb': mem, 'steal_share': res['steal_share']})
            (lo, hi), (clo, chi) = r['vs_previous_ci95'], r['cpu_vs_previous_ci95']
            dlo, dhi = (1e3 * d for d in r['cpu_diff_s_ci95'])
            print(f'| {model_name} | {n} | {r["median_s"] * 1e3:.0f} | {r["vs_previous"]:.4f} | [{lo:.4f}, {hi:.4f}] '
                  f'| {r["cpu_vs_previous"]:.4f} | [{clo:.4f}, {chi:.4f}] | {1e3 * r["cpu_diff_s"]:.1f} '
                  f'| [{dlo:.1f}, {dhi:.1f}] | {r["vs_first"]:.4f} | {"-" if mem is None else f"{mem:.0f}"} |',
                  flush=True)
        if res['steal_share'] is not None:
            print(f'|  | steal while {model_name} ran: {100 * res["steal_share"]:.1f}% |', flush=True)
    return rows


def steal_seconds() -> Optional[float]:
    """CPU seconds the hypervisor has taken from this machine since boot, summed over its CPUs (``/proc/stat``);
    None where the kernel does not report it."""
    try:
        with open('/proc/stat') as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf('SC_CLK_TCK') if fields[0] == 'cpu' and len(fields) > 8 else None
    except (OSError, ValueError):
        return None


def steal_share(stolen: Optional[float], wall: float) -> Optional[float]:
    """Share of the CPUs' time over ``wall`` seconds that was stolen."""
    return None if stolen is None or wall <= 0 else stolen / (wall * (os.cpu_count() or 1))


def interleaved_rounds(runs: Dict[str, Callable[[], Any]], rounds: int, warmup: int = 0,
                       first: int = 0) -> Dict[str, list]:
    """Call every run once per round, ``warmup + rounds`` rounds, in the order of ``runs`` in even rounds and in the
    reverse order in odd ones (ABBA: no run always goes first or last), and return each run's results of the last
    ``rounds`` rounds (what a run returns is its measurement: seconds, or a tuple of clocks). ``first``: the number of
    the first round (rounds that continue earlier ones keep the alternation)."""
    names = list(runs)
    out = {n: [] for n in names}
    for r in range(first, first + warmup + rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            result = runs[n]()
            if r >= first + warmup:
                out[n].append(result)
    return out


def rounds_with_steal(runs: Dict[str, Callable[[], Any]], rounds: int,
                      first: int = 0) -> Tuple[Dict[str, list], Optional[float], float]:
    """``interleaved_rounds``, the CPU seconds the hypervisor took while they ran (``None`` where ``/proc/stat``
    cannot tell) and their wall seconds."""
    steal0, wall0 = steal_seconds(), time.perf_counter()
    out = interleaved_rounds(runs, rounds, first=first)
    steal1 = steal_seconds()
    stolen = None if steal0 is None or steal1 is None else steal1 - steal0
    return out, stolen, time.perf_counter() - wall0


def timed(fn: Callable) -> Callable[[], float]:
    """``fn`` as a run of ``interleaved_rounds`` that returns its wall seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


SAVE_SECONDS = 60  # at most this long between two writes of the JSON while a model's rounds run (a write of 250
# rounds of ten configurations takes about 25 ms, between two rounds: under 0.1% of the time, and of no step)


def measure_time(model_name: str, configs, args, done: Optional[dict] = None,
                 save: Optional[Callable[[dict], None]] = None) -> Dict[str, Dict[str, float]]:
    """Median step time of each configuration, and the median over rounds of its ratio to the baseline step of the
    same round (the machine's speed drifts by several percent between rounds; a ratio within a round cancels it).
    Rounds alternate the order of the configurations (ABBA), so no configuration always runs first.

    ``done``: rounds timed before (``time_state``'s record, from a JSON that ``--resume`` continues); only the rounds
    still missing to ``args.rounds`` run, ``save(record)`` gets the record at the end of the first round that ends
    ``SAVE_SECONDS`` or more after the last save, and at the end. The rows are of the first ``args.rounds`` rounds
    (a record may hold more)."""
    record = time_state(configs, done)
    times = record['times_s']
    have = rounds_of(record)
    if have < args.rounds:
        torch.compiler.reset()  # every model compiles afresh: the wrapped models of one process share dynamo's
        # recompile limit (one _tffd_forward), past which a wrapped forward runs uncompiled
        steps = {c: make_step(model_name, c, args.batch_size, args.img_size, device=args.device, amp=args.amp,
                              channels_last=args.channels_last) for c in configs}
        for s in steps.values():
            for _ in range(args.warmup):
                s()
        runs = {c: timed(steps[c]) for c in configs}
        record['segments'].append({'started': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
                                   'first_round': have, 'rounds': 0})
        saved = time.perf_counter()
        while have < args.rounds:
            new, stolen, wall = rounds_with_steal(runs, 1, first=have)
            for c in configs:
                times[c] += new[c]
            have += 1
            record['stolen_s'] = None if stolen is None or record['stolen_s'] is None else record['stolen_s'] + stolen
            record['wall_s'] += wall
            record['segments'][-1]['rounds'] += 1
            if save is not None and (have == args.rounds or time.perf_counter() - saved >= SAVE_SECONDS):
                save(record)
                saved = time.perf_counter()
    out = {'steal_share': steal_share(record['stolen_s'], record['wall_s']), 'record': record}
    used = {c: v[:args.rounds] for c, v in times.items()}
    for c, v in used.items():
        ratios = [a / b for a, b in zip(v, used[baseline_of(c)])]
        out[c] = {'median_s': statistics.median(v), 'ratio': statistics.median(ratios),
                  'ratio_ci95': median_interval(ratios), 'times_s': v}
    return out


def rounds_of(record: dict) -> int:
    """The number of rounds in a record of ``time_state``."""
    return len(next(iter(record['times_s'].values())))


def time_state(configs, done: Optional[dict] = None) -> dict:
    """A model's timed rounds so far: every configuration's step seconds (``times_s``), the CPU seconds stolen and the
    wall seconds while they ran, and one segment (start, first round, rounds) per process that timed some. ``done``:
    such a record from a JSON, checked (a ValueError says what is wrong) and copied."""
    if not done:
        return {'times_s': {c: [] for c in configs}, 'stolen_s': 0., 'wall_s': 0., 'segments': []}
    number = (int, float)
    if not (isinstance(done, dict) and isinstance(done.get('times_s'), dict) and done['times_s']
            and all(isinstance(v, list) and all(isinstance(t, number) for t in v) for v in done['times_s'].values())
            and isinstance(done.get('stolen_s'), (*number, type(None))) and isinstance(done.get('wall_s'), number)
            and isinstance(done.get('segments'), list)):
        raise ValueError('a stored record is not one of step times (times_s), stolen_s, wall_s and segments')
    if sorted(done['times_s']) != sorted(configs):
        raise ValueError(f'the stored rounds are of configurations {sorted(done["times_s"])}; this run times '
                         f'{sorted(configs)}')
    if len({len(v) for v in done['times_s'].values()}) != 1:
        raise ValueError('the stored configurations have unequal numbers of rounds')
    return json.loads(json.dumps(done))  # a copy: the caller's record stays as it was


def _source_digest(path: str) -> bytes:
    """The code of a Python file without its comments and docstrings (``ast``): what it runs."""
    with open(path, 'rb') as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        body = getattr(node, 'body', None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def code_fingerprint(root: Optional[str] = None) -> str:
    """A hash of the code a timed step runs: every Python file of the ``timm_tffd`` package (or of the package at
    ``root``) and this benchmark, comments and docstrings aside. Rounds kept in a JSON are continued (``--resume``)
    only under the same fingerprint."""
    h = hashlib.sha256()
    root = root or os.path.dirname(os.path.abspath(timm_tffd.__file__))
    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith('.py')]
    for path in sorted(paths):
        h.update(os.path.relpath(path, root).encode() + b'\0' + _source_digest(path) + b'\0')
    h.update(_source_digest(os.path.abspath(__file__)))
    return h.hexdigest()[:16]


def _cpu_model() -> Optional[str]:
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
    except OSError:
        return None


RESUME_SETTINGS = ('configs', 'batch_size', 'img_size', 'cpus', 'compiled', 'device', 'amp', 'channels_last',
                   'malloc', 'steady_malloc')  # the arguments that must match for the rounds of two runs to be one
# measurement (steady_malloc: whether glibc took the allocator settings)


def run_identity(args) -> dict:
    """What ``--resume`` compares: the code, the versions, the machine (CPU model and instructions, CPUs, GPU),
    torch's threads and the settings of the steps."""
    cuda = torch.device(args.device).type == 'cuda'
    return {'code': code_fingerprint(), 'python': platform.python_version(), 'torch': torch.__version__,
            'timm': timm.__version__, 'cpu_model': _cpu_model(), 'cpu_count': os.cpu_count(),
            'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads(),
            'gpu': torch.cuda.get_device_name(args.device) if cuda else None,
            'cuda': torch.version.cuda if cuda else None,
            **{k: getattr(args, k, None) for k in RESUME_SETTINGS}}


def stored_rounds(path: str, identity: dict, model_configs: Dict[str, list]) -> Dict[str, dict]:
    """The per-model round records of the time table in ``path`` (``{}`` where the file does not exist), after
    checking it was measured under ``identity`` and that its records of the models in ``model_configs`` are of those
    configurations; a ValueError that says what differs otherwise. Records of other models are kept as they are."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read {path} ({e})') from None
    if not (isinstance(data, dict) and isinstance(data.get('rounds'), dict)
            and isinstance(data.get('identity'), dict)):
        raise ValueError(f'{path} holds no resumable time table')
    differ = [k for k in identity if data['identity'].get(k) != identity[k]]
    if differ:
        raise ValueError(f'{path} was measured with other ' + ', '.join(
            f'{k} ({data["identity"].get(k)!r}, now {identity[k]!r})' for k in differ)
            + '; its rounds cannot be continued: give another --json or leave out --resume')
    for model_name, configs in model_configs.items():
        if model_name in data['rounds']:
            try:
                time_state(configs, data['rounds'][model_name])
            except ValueError as e:
                raise ValueError(f'{path}, {model_name}: {e}') from None
    return data['rounds']


def unfinished(path: str) -> bool:
    """Whether ``path`` holds a time table whose rounds a killed run left short (``complete: false``)."""
    try:
        with open(path) as f:
            return json.load(f).get('complete') is False
    except (OSError, ValueError, AttributeError):
        return False


def baseline_of(config: str) -> str:
    """The configuration a row is compared with: the plain step in the same mode (eager or compiled)."""
    return 'baseline' + (COMPILED if split_config(config)[1] else '')


def table_order(config: str) -> tuple:
    """Rows of a model in the table: eager before compiled, each mode's baseline first, then as in ``CONFIGS``
    (within a round the steps run in the order of ``--configs``)."""
    name, compiled = split_config(config)
    return compiled, name != 'baseline', list(CONFIGS).index(name)


def _flags(args) -> list:
    return [f for f, on in (('--amp', getattr(args, 'amp', False)),
                            ('--channels-last', getattr(args, 'channels_last', False))) if on]


def copy_bandwidth(device: str = 'cpu', mbytes: int = 256, reps: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), median of ``reps``: the memory bandwidth the floor
    assumes."""
    src = torch.ones(mbytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[1:])


FLOOR_PASSES = 4  # the terms read each tapped map in the forward and again in the backward, where they also read and
# write its gradient: four passes over the maps' bytes at memory bandwidth, with nothing else counted


def tapped_bytes(model_name: str, batch_size: int, img_size: int, bytes_per_value: int = 4) -> int:
    """Bytes of the maps ``wrap(model, 'inter,intra')`` taps in one step (the default stages)."""
    tapped = terms.Tapped(model_name, batch_size, img_size)
    return sum(leaf.numel() for leaf in tapped.leaves) * bytes_per_value


def floor_row(model_name: str, times: Dict[str, dict], args) -> dict:
    """The terms' cost floor for ``model_name`` and the measured extra time of ``inter+intra`` as a multiple of it."""
    nbytes = tapped_bytes(model_name, args.batch_size, args.img_size, 2 if args.amp else 4)
    bandwidth = copy_bandwidth(args.device)
    floor_s = FLOOR_PASSES * nbytes / bandwidth
    row = {'model': model_name, 'tapped_mb': nbytes / 2 ** 20, 'bandwidth_gbs': bandwidth / 1e9,
           'floor_ms': floor_s * 1e3}
    for config in ('inter+intra', 'inter+intra' + COMPILED):
        if config in times:
            # the table's paired estimate (the median of per-round ratios) in time: a difference of the two medians
            # would mix rounds of different machine speed
            extra = (times[config]['ratio'] - 1) * times[baseline_of(config)]['median_s']
            row[config] = {'extra_ms': extra * 1e3, 'floor_multiple': extra / floor_s,
                           'floor_share_of_step': floor_s / times[baseline_of(config)]['median_s']}
    return row


def write_json(args, **results):
    """``results`` into ``args.json``, with the arguments and the CPU instructions torch's kernels use (results move
    between hosts with them). It writes a temporary file and renames it over ``args.json``: a run killed while
    writing leaves the earlier file whole."""
    with open(args.json + '.tmp', 'w') as f:
        json.dump({'args': vars(args), 'cpu_capability': torch.backends.cpu.get_cpu_capability(), **results}, f,
                  indent=2)
    os.replace(args.json + '.tmp', args.json)


def _versions() -> str:
    """torch, timm, the CPU instructions torch's kernels use (results move between hosts with it) and threads."""
    return (f'torch {torch.__version__}, timm {timm.__version__}, CPU capability '
            f'{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads')


def median_interval(values, resamples: int = 2000, seed: int = 0) -> Tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values`` (the per-round time ratios): how far the table's
    ratio could move on a rerun under the same conditions. It does not cover drift between days."""
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


MEDIAN_SE = math.sqrt(math.pi / 2)  # a median's standard error over a mean's, for normal values


def rounds_to_resolve(sd: float, half_width: float = 0.01) -> int:
    """Rounds whose median ratio has a 95% interval of about +-``half_width`` when the per-round log ratios scatter
    with standard deviation ``sd``: the median's standard error, ``sqrt(pi / 2) sd / sqrt(n)``, times 1.96."""
    return max(1, math.ceil((1.96 * MEDIAN_SE * sd / half_width) ** 2))


def interval_half_width(sd: float, rounds: int) -> float:
    """The 95% half-width of the median ratio over ``rounds`` rounds, as in ``rounds_to_resolve``."""
    return 1.96 * MEDIAN_SE * sd / math.sqrt(rounds)


def robust_sd(values) -> float:
    """The standard deviation of normal values estimated from their median absolute deviation (1.4826 x MAD): the
    scatter that sets a median's interval, which a few outlying steps do not move (a plain standard deviation would
    let one 1.5x step double it)."""
    m = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - m) for v in values)


def noise_check(model_name: str, args, pairs: int) -> dict:
    """Time ``pairs`` adjacent pairs of the plain step and its copy (``measure_time``: the order alternates) and
    return the scatter of their per-pair log time ratios (``pair_sd``: ``robust_sd``), the interval a table of
    ``args.rounds`` rounds would have at that scatter and the rounds a +-1% interval needs."""
    if pairs < 3:
        raise ValueError(f'--noise-check needs at least 3 pairs, got {pairs}')
    as_pairs = argparse.Namespace(**{**vars(args), 'rounds': pairs})
    measured = measure_time(model_name, ['baseline', 'baseline-copy'], as_pairs)
    steal, times = measured['steal_share'], {c: measured[c]['times_s'] for c in ('baseline', 'baseline-copy')}
    sd = robust_sd([math.log(a / b) for a, b in zip(times['baseline-copy'], times['baseline'])])
    return {'model': model_name, 'pairs': pairs, 'step_ms': 1e3 * statistics.median(times['baseline']),
            'step_ms_range': [1e3 * min(times['baseline']), 1e3 * max(times['baseline'])], 'pair_sd': sd,
            'rounds': args.rounds, 'half_width': interval_half_width(sd, args.rounds),
            'rounds_for_1pct': rounds_to_resolve(sd), 'steal_share': steal,
            'times_ms': {c: [1e3 * t for t in v] for c, v in times.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default=','.join(DEFAULT_MODELS))
    parser.add_argument('--configs', default='baseline,inter,intra,inter+intra',
                        help=f'any of {", ".join(CONFIGS)}, or "all"; a round runs them in this order (then the '
                             'reverse), so those next to the baseline are timed against its nearest steps')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=7, help='timed steps per configuration')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--no-memory', action='store_true', help='skip the per-process memory probes')
    parser.add_argument('--no-time', action='store_true',
                        help='memory probes only (they are deterministic, so they may run beside other work)')
    parser.add_argument('--json', default='', help='also write the results to this file (a time table: also its '
                        'rounds so far, while they run; see --resume)')
    parser.add_argument('--trees', default='',
                        help=f'NAME=PATH,...: compare the {TREE_CONFIG} step with timm_tffd imported from each '
                             f'source tree (a folder holding a timm_tffd package), instead of --configs')
    parser.add_argument('--tree-step', default='step', choices=tuple(TREE_STEPS),
                        help='with --trees: time the whole training step, the task step compiled (inter+intra'
                             f'{COMPILED}), or the Tf-FD terms alone (forward and backward on leaves shaped like the '
                             'taps, benchmarks/terms.py)')
    parser.add_argument('--probe', nargs=2, metavar=('MODEL', 'CONFIG'), help=argparse.SUPPRESS)
    parser.add_argument('--worker', nargs=2, metavar=('MODEL', 'CONFIG'), help=argparse.SUPPRESS)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (default: torch\'s own choice, or one '
                                                               'per --cpus entry)')
    parser.add_argument('--cpus', default='', help='pin this process and its workers to these CPUs, e.g. 0,1')
    parser.add_argument('--compiled', action='store_true',
                        help='add every configuration compiled (task.compile, inductor) next to its eager row')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--amp', action='store_true', help='autocast (float16 + GradScaler on CUDA, bfloat16 on CPU)')
    parser.add_argument('--channels-last', action='store_true')
    add_malloc_argument(parser)
    parser.add_argument('--floor', action='store_true',
                        help='also print the terms\' cost floor (bytes of the tapped maps at copy bandwidth) and the '
                             'measured inter+intra overhead as a multiple of it')
    parser.add_argument('--resume', action='store_true',
                        help='keep the rounds already in --json (same code, versions, machine and settings) and '
                             'time only those missing to --rounds per model (a time table\'s --json is rewritten '
                             'at least every %d s while its rounds run)' % SAVE_SECONDS)
    parser.add_argument('--noise-check', type=int, default=0, metavar='PAIRS',
                        help='only time PAIRS adjacent pairs of the plain step and its copy, and say how wide a '
                             '--rounds-round table\'s intervals would be on this host and how many rounds 1%% needs')
    args = parser.parse_args()
    if args.no_time and args.no_memory:
        parser.error('--no-time and --no-memory leave nothing to measure')
    if args.noise_check and args.noise_check < 3:
        parser.error(f'--noise-check needs at least 3 pairs, got {args.noise_check}')
    if args.resume and (not args.json or args.no_time or args.trees or args.noise_check):
        parser.error('--resume continues the time table in --json: give --json, without --no-time, --trees or '
                     '--noise-check')
    unknown = [m for m in args.models.split(',') if not timm.is_model(m)]
    if unknown:
        parser.error(f'unknown model(s) {unknown}; see timm.list_models()')
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(',')})  # inherited by the probe processes
        args.threads = args.threads or len(args.cpus.split(','))
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.probe and args.device == 'cpu':
        args.steady_malloc = steady_malloc(args.malloc)  # this process and, through their own call, the tree workers
    if args.probe:
        print(json.dumps(probe_memory(*args.probe, args.batch_size, args.img_size, args.device, args.amp,
                                      args.channels_last)))
        return
    if args.worker:
        serve(*args.worker, args)
        return
    if args.noise_check:
        print(f'{_versions()}, batch {args.batch_size}, {args.img_size}px, {_malloc(args)}\n')
        checks = []
        for model_name in args.models.split(','):
            c = noise_check(model_name, args, args.noise_check)
            checks.append(c)
            lo, hi = c['step_ms_range']
            needed = float(f'{c["rounds_for_1pct"]:.2g}')  # two figures: a MAD of 30 pairs is good to about 20%
            steal = '' if c['steal_share'] is None else f'; steal {100 * c["steal_share"]:.1f}%'
            print(f'{model_name}: plain step {c["step_ms"]:.0f} ms ({lo:.0f} to {hi:.0f}); {c["pairs"]} adjacent pairs '
                  f'of it and its copy differ by {100 * c["pair_sd"]:.1f}% (robust sd of the log ratio){steal}. A '
                  f'{c["rounds"]}-round table: intervals of about +-{100 * c["half_width"]:.1f}%; +-1% needs about '
                  f'{needed:.0f} rounds.', flush=True)
        if args.json:
            write_json(args, noise_check=checks)
        return
    if args.trees:
        trees = dict(item.split('=', 1) for item in args.trees.split(','))
        print(f'{_versions()}, batch {args.batch_size}, {args.img_size}px, {args.rounds} timed rounds, '
              f'{_malloc(args)}, trees: {trees}\n')
        rows = run_trees(trees, args.models.split(','), args)
        if args.json:
            write_json(args, results=rows)
        return
    configs = list(CONFIGS) if args.configs == 'all' else [c.strip() for c in args.configs.split(',')]
    unknown = [c for c in configs if split_config(c)[0] not in CONFIGS]
    if unknown:
        parser.error(f'unknown configuration(s) {unknown}; choose from {", ".join(CONFIGS)}')
    if args.compiled:
        configs += [c + COMPILED for c in configs if not split_config(c)[1]]
    for c in list(configs):
        if baseline_of(c) not in configs:
            configs.insert(0, baseline_of(c))
    models = args.models.split(',')
    if any(c in TEACHER_CONFIGS for c in configs) and TEACHER in models:
        models = [TEACHER] + [m for m in models if m != TEACHER]  # its baseline step prices teacher training
    model_configs = {m: [c for c in configs if not (c in TEACHER_CONFIGS and m == TEACHER)] for m in models}
    done: Dict[str, dict] = {}
    identity = None if args.no_time else run_identity(args)
    if args.resume:
        try:
            done = stored_rounds(args.json, identity, model_configs)
        except ValueError as e:
            parser.error(str(e))
    elif args.json and not args.no_time and unfinished(args.json):
        parser.error(f'{args.json} holds the rounds of an unfinished table: continue it with --resume, or give '
                     'another --json')
    resumed = ''.join(f', {m} from round {rounds_of(done[m])}' for m in models if m in done)
    print(f'{_versions()}, batch {args.batch_size}, {args.img_size}px, '
          + ('memory probes only\n' if args.no_time else f'{args.rounds} timed rounds{resumed}, {_malloc(args)}\n'))
    results = []
    header = ('| model | config | step time (ms) | time ratio | 95% interval | + teacher training | step memory (MB) '
              '| memory ratio |')
    print(header + '\n|---|---|---:|---:|---:|---:|---:|---:|')
    teacher_step = {}
    floors = []
    steal: Dict[str, Optional[float]] = {}

    def save(model_name: str, record: dict):  # while a model's rounds run: a killed run can be resumed
        done[model_name] = record
        write_json(args, identity=identity, complete=False, rounds=done, results=results)
        print(f'{model_name}: {rounds_of(record)} of {args.rounds} rounds, kept in {args.json}', file=sys.stderr,
              flush=True)

    for model_name in models:
        mem = {} if args.no_memory else {c: measure_memory(model_name, c, args) for c in model_configs[model_name]}
        if args.no_time:
            for c in model_configs[model_name]:
                row = {'model': model_name, 'config': c, 'step_mb': mem[c]['step_mb'],
                       'memory_ratio': mem[c]['step_mb'] / mem[baseline_of(c)]['step_mb']}
                results.append(row)
                print(f'| {model_name} | {c} | - | - | - | - | {row["step_mb"]:.0f} | {row["memory_ratio"]:.3f} |',
                      flush=True)
            continue
        times = measure_time(model_name, model_configs[model_name], args, done.get(model_name),
                             functools.partial(save, model_name) if args.json else None)
        done[model_name] = times['record']
        teacher_step.setdefault(model_name, times['baseline']['median_s'])
        if args.floor:
            floors.append(floor_row(model_name, times, args))
        for c in sorted(model_configs[model_name], key=table_order):
            base_s = times[baseline_of(c)]['median_s']
            row = {'model': model_name, 'config': c, 'time_ms': times[c]['median_s'] * 1e3,
                   'time_ratio': times[c]['ratio'], 'time_ratio_ci95': times[c]['ratio_ci95'],
                   'round_times_ms': [1e3 * t for t in times[c]['times_s']]}
            if c in TEACHER_CONFIGS and TEACHER in teacher_step:
                row['time_ratio_with_teacher_training'] = times[c]['ratio'] + teacher_step[TEACHER] / base_s
            if mem:
                row.update(step_mb=mem[c]['step_mb'],
                           memory_ratio=mem[c]['step_mb'] / mem[baseline_of(c)]['step_mb'])
            results.append(row)
            mem_cols = f'{row["step_mb"]:.0f} | {row["memory_ratio"]:.3f}' if mem else '- | -'
            with_teacher = row.get('time_ratio_with_teacher_training')
            with_teacher = f'{with_teacher:.3f}' if with_teacher else '-'
            lo, hi = row['time_ratio_ci95']
            print(f'| {model_name} | {c} | {row["time_ms"]:.0f} | {row["time_ratio"]:.3f} | [{lo:.3f}, {hi:.3f}] | '
                  f'{with_teacher} | {mem_cols} |', flush=True)
        steal[model_name] = times['steal_share']
    if any(v is not None for v in steal.values()):
        print('\nCPU time taken by the hypervisor (steal) while the rounds ran: '
              + ', '.join(f'{m} {100 * v:.1f}%' for m, v in steal.items() if v is not None))
    if floors:
        print(f'\nFloor: {FLOOR_PASSES} passes over the tapped maps at the measured copy bandwidth.\n\n'
              '| model | tapped maps (MB) | copy bandwidth (GB/s) | floor (ms) | floor / step | mode | extra time (ms) '
              '| extra / floor |\n|---|---:|---:|---:|---:|---|---:|---:|')
        for f in floors:
            for config in ('inter+intra', 'inter+intra' + COMPILED):
                if config in f:
                    m = f[config]
                    print(f'| {f["model"]} | {f["tapped_mb"]:.0f} | {f["bandwidth_gbs"]:.1f} | {f["floor_ms"]:.1f} | '
                          f'{100 * m["floor_share_of_step"]:.2f}% | {"compiled" if COMPILED in config else "eager"} | '
                          f'{m["extra_ms"]:.1f} | {m["floor_multiple"]:.1f} |')
    if args.json:
        # complete: every model in the file has its rounds (one left out of this run may not)
        kept = {} if args.no_time else {'identity': identity, 'rounds': done,
                                        'complete': all(rounds_of(r) >= args.rounds for r in done.values())}
        write_json(args, results=results, steal_share=steal, floor=floors, **kept)


if __name__ == '__main__':
    main()
