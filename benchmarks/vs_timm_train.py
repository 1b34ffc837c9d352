"""Without ``--tffd``, does a training epoch of ``train_timm_tffd.py`` cost what timm's own ``train.py`` costs?

timm's ``train.py`` is not part of the pip package: fetch it from timm's repository (do not commit it) and pass its
path. Both scripts run the same command line on the same small ImageFolder (the embedded Fashion-MNIST subset
exported as PNG files), on the CPU, one process each, one thread (``OMP_NUM_THREADS=1``), no loader workers::

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-repo     # or: git show HEAD:train.py
    python benchmarks/vs_timm_train.py --timm-train /tmp/timm-repo/train.py --rounds 5

*Epoch time*: each script runs with ``--epochs 1`` and with ``--epochs 3``; the difference over 2 is one epoch
(training and validation) without the process start, model creation and first-epoch warm-up, which both scripts pay
once. The four runs of a round are interleaved (their order alternates between rounds), and the ratio is the median
over rounds of the two scripts' epoch times in the same round, which cancels the machine's drift between rounds; the
95% interval is a bootstrap over the rounds. Steal time (``/proc/stat``) during the runs is reported.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.overhead import median_interval, steal_seconds, steal_share  # noqa: E402

SCRIPT = os.path.join(REPO, 'train_timm_tffd.py')


def export_embedded(root: str, train: int, val: int) -> str:
    """The embedded Fashion-MNIST subset as an ImageFolder (``train/<class>/*.png``, ``validation/...``)."""
    from timm_tffd.data.embedded import EmbeddedFashionMNIST
    for split, count in (('train', train), ('validation', val)):
        data = EmbeddedFashionMNIST('train' if split == 'train' else 'validation', 'L')
        for i in range(min(count, len(data))):
            image, label = data[i]
            folder = os.path.join(root, split, f'class{label}')
            os.makedirs(folder, exist_ok=True)
            image.save(os.path.join(folder, f'{i}.png'))
    return root


def run(script: str, data: str, epochs: int, out: str, common) -> float:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    cmd = [sys.executable, script, data, *common, '--epochs', str(epochs), '--output', out,
           '--experiment', f'{os.path.basename(script)}-{epochs}-{time.time_ns()}']
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
    return elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--timm-train', required=True, help='path of timm\'s train.py')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--train-samples', type=int, default=1024)
    parser.add_argument('--val-samples', type=int, default=256)
    parser.add_argument('--json', default=None, help='write the results here')
    args = parser.parse_args(argv)
    if not os.path.isfile(args.timm_train):
        raise SystemExit(f'error: no timm train.py at {args.timm_train!r}')
    common = ['--model', args.model, '--in-chans', '1', '--img-size', str(args.img_size), '--mean', '0.5', '--std',
              '0.5', '-b', str(args.batch_size), '-j', '0', '--warmup-epochs', '0', '--log-interval', '1000',
              '--device', 'cpu', '--checkpoint-hist', '1']
    scripts = {'timm train.py': args.timm_train, 'train_timm_tffd.py': SCRIPT}
    with tempfile.TemporaryDirectory() as tmp:
        data = export_embedded(os.path.join(tmp, 'data'), args.train_samples, args.val_samples)
        epoch = {name: [] for name in scripts}
        steal0, wall0 = steal_seconds(), time.perf_counter()
        for r in range(args.rounds):
            order = list(scripts.items()) if r % 2 == 0 else list(reversed(scripts.items()))
            times = {}
            for name, script in order:
                times[name] = (run(script, data, 1, os.path.join(tmp, 'out'), common),
                               run(script, data, 3, os.path.join(tmp, 'out'), common))
            for name, (t1, t3) in times.items():
                epoch[name].append((t3 - t1) / 2)
            print(f'round {r}: ' + '  '.join(f'{n}: {e[-1]:.2f} s/epoch' for n, e in epoch.items()), flush=True)
        stolen = None if steal0 is None else steal_seconds() - steal0
        share = steal_share(stolen, time.perf_counter() - wall0)
    ratios = [ours / theirs for ours, theirs in zip(epoch['train_timm_tffd.py'], epoch['timm train.py'])]
    low, high = median_interval(ratios)
    result = dict(command=' '.join(common), rounds=args.rounds, epoch_seconds=epoch,
                  median_epoch_seconds={n: statistics.median(e) for n, e in epoch.items()},
                  ratio=statistics.median(ratios), ratio_interval=[low, high], steal_share=share)
    print(f'epoch time, train_timm_tffd.py / timm train.py: {result["ratio"]:.3f} [{low:.3f}, {high:.3f}] '
          f'(median of {args.rounds} rounds; medians {result["median_epoch_seconds"]}; steal {share})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
