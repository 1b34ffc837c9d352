"""Time of the Tf-FD terms alone (forward + backward), on the feature maps a timm model taps, CPU.

The maps have the shapes and memory layouts of the model's own taps: a ResNet's NCHW stage outputs, a ViT's
channels-last NCHW views of its blocks' token tensors without the class token (see ``Tapped``). Each configuration's
backward also carries a stand-in for the network's own gradient into the tapped tensors (``sum(t * r)``, a full-size
gradient per tensor), so the time includes adding the terms' gradients to it, as in a training step. Configurations
run interleaved round after round; the table gives median milliseconds and the median per-round ratio against the
first configuration.

* ``network``: the stand-in gradient alone (what any training step pays anyway);
* ``inter+intra``: plus the inter and intra terms with their default options, weighted 0.005 and 0.0004 (their
  default weights), computed by the wrapped model's own forward on the maps (``Tapped.terms``), so that they run as
  they do in a training step whatever that forward does with the maps.

``--profile N`` runs N steps of ``inter+intra`` under ``torch.profiler`` instead and prints the operators grouped by
input shape, CPU time summed over the N steps (the stand-in's own ``aten::mul`` and ``aten::sum`` over full maps are
the network's part). It tells which operators run, not what they cost: on resnet50's terms (``--threads 2
--profile 10``, 2026-12-07) the operators that write a fresh full-size output read many times their cost timed alone
(the whole-map gather 196 ms per call, the pooling's backward product 131 ms, against about 6 and 9 ms), and the
profiled steps took 665 ms each against 140 ms timed; compare costs with the timed modes or ``ab_terms.py``. Both
modes fix glibc's allocator settings as ``overhead.py`` does (``steady_malloc``, ``--malloc``).

``--traffic DTYPES`` counts instead the bytes the terms read and write in one step, operator by operator (``Traffic``:
a byte model, each tensor argument read once, each output written once; no timing, so the same on any machine), with
the maps in each dtype (``--channels-last``: a CNN's maps in channels-last memory), and gives the total as passes over
the tapped maps: what the ``--floor`` of ``overhead.py`` (four passes) is to be compared with. ``float16`` and
``bfloat16`` stand for a GPU's mixed precision (half-size maps, float32 accumulation where the terms ask for it; the
count runs without autocast).

    python benchmarks/terms.py                              # resnet50 and vit_small at 224 px, batch 16
    python benchmarks/terms.py --models resnet18 --rounds 5
    python benchmarks/terms.py --models resnet50 --threads 2 --profile 5
    python benchmarks/terms.py --models resnet50,resnet18,vit_small_patch16_224 --traffic float32,bfloat16,float16
    python benchmarks/terms.py --models resnet50,resnet18 --traffic float32,float16 --channels-last
"""
import argparse
import math
import os
import statistics
import sys
from typing import Callable, Dict, List

import torch
import timm
from torch.utils._python_dispatch import TorchDispatchMode

import timm_tffd
from timm_tffd.losses.saliency import channels_last_map

DEFAULT_MODELS = ('resnet50', 'vit_small_patch16_224')
CONFIGS = ('network', 'inter+intra')


class Tapped:
    """Random leaves standing for the tensors a model's taps come from, the maps ``wrap(model, 'inter,intra')`` would
    see, a random stand-in ``upstream`` for the network's own gradient into each leaf, and the wrapped ``model``.

    A ResNet's leaf is its NCHW stage output and the map is the leaf. A ViT's leaf is a block's ``(B, N, C)`` token
    tensor, its ``num_prefix_tokens`` (the class token) included, and the map is the NCHW view of its patch tokens
    (channels-last memory), as ``FeatureTaps`` makes it; with ``channels_last``, a CNN's maps are channels-last too (as
    when training with ``--channels-last``). Values: ReLU'd Gaussians."""

    def __init__(self, model_name: str, batch_size: int, img_size: int, channels_last: bool = False):
        self.model = model = timm_tffd.wrap(timm.create_model(model_name, img_size=img_size) if 'vit' in model_name
                                            else timm.create_model(model_name), 'inter,intra')
        model.train()
        timm_tffd.get_tffd_state(model).keep_features = True
        with torch.no_grad():
            model(torch.randn(2, 3, img_size, img_size))  # 2: BatchNorm needs more than one value per channel
        feats = timm_tffd.get_tffd_state(model).take().features
        g = torch.Generator().manual_seed(0)
        prefix = getattr(model, 'num_prefix_tokens', 0)
        self.leaves, self.prefix = [], []
        for f in feats:
            c, h, w = f.shape[1:]
            if channels_last_map(f):  # a token view: its token tensor, prefix tokens in front
                self.prefix.append(prefix)
                shape = (batch_size, prefix + h * w, c)
            else:
                self.prefix.append(None)
                shape = (batch_size, c, h, w)
            leaf = torch.randn(shape, generator=g).relu_()
            if channels_last and len(shape) == 4:
                leaf = leaf.contiguous(memory_format=torch.channels_last)
            self.leaves.append(leaf.requires_grad_())
        self.grid = [tuple(f.shape[2:]) for f in feats]
        self.upstream = [torch.randn(f.shape, generator=g) for f in self.leaves]

    def maps(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """The maps of ``tensors`` (the leaves, or nodes made from them)."""
        return [t if k is None else t[:, k:].unflatten(1, hw).permute(0, 3, 1, 2)
                for t, k, hw in zip(tensors, self.prefix, self.grid)]

    def terms(self, tensors: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The Tf-FD terms of the maps of ``tensors``, by the wrapped model's forward with its taps replaced."""
        state = timm_tffd.get_tffd_state(self.model)
        state.taps.forward = lambda model, x, staged=None: (None, self.maps(tensors))  # instead of running the network
        try:
            self.model(None)
        finally:
            del state.taps.forward
        return state.take().terms


def make_step(config: str, tapped: Tapped) -> Callable[[], tuple]:
    """One forward and backward of ``config`` on ``tapped``'s leaves; the step returns their gradients."""
    leaves = tapped.leaves

    def step():
        nodes = [f.view_as(f) for f in leaves]  # a node between leaves and terms, as a network's layers are
        loss = sum((m * r).sum() for m, r in zip(nodes, tapped.upstream))  # the network's own gradient into the taps
        if config == 'inter+intra':
            terms = tapped.terms(nodes)
            loss = loss + 0.005 * terms['inter'] + 0.0004 * terms['intra']
        return torch.autograd.grad(loss, leaves)
    return step


def measure(model_name: str, args) -> Dict[str, Dict[str, float]]:
    from benchmarks.overhead import timed, interleaved_rounds  # here: overhead imports this module
    tapped = Tapped(model_name, args.batch_size, args.img_size)
    times = interleaved_rounds({c: timed(make_step(c, tapped)) for c in args.configs}, args.rounds, args.warmup)
    base = args.configs[0]
    return {c: {'ms': 1000 * statistics.median(times[c]),
                'ratio': statistics.median(t / b for t, b in zip(times[c], times[base]))} for c in args.configs}


def profile(model_name: str, args, row_limit: int = 25) -> str:
    """The operator table of ``args.profile`` steps of ``inter+intra`` after ``args.warmup`` steps, its
    ``row_limit`` most expensive rows (-1: all)."""
    step = make_step('inter+intra', Tapped(model_name, args.batch_size, args.img_size))
    for _ in range(args.warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.profile):
            step()
    return prof.key_averages(group_by_input_shape=True).table(sort_by='self_cpu_time_total', row_limit=row_limit)


def _tensors(tree) -> List[torch.Tensor]:
    """The tensors in an operator's arguments or outputs (tensors, lists and tuples of them, a dict of keywords)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct values of ``t`` (an expanded dimension, stride 0, counts once)."""
    return t.element_size() * math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0)


class Traffic(TorchDispatchMode):
    """Counts, per ATen operator, the calls and the bytes of the tensors each call reads and writes, for every operator
    that runs while the mode is on, the autograd engine's included (the backward's gradient formulas and the additions
    that accumulate a tensor's gradients).

    A byte model, not a hardware count: an operator reads each tensor argument whole once and writes its outputs once
    (an in-place operator writes the tensor it mutates); a gather (``index_select``, advanced indexing, ``gather``)
    reads what it writes and its index; ``copy_``, ``fill_``, ``zero_`` and ``out=`` do not read the tensor they write.
    Views, operators that return their input's memory, and ``empty`` move nothing. Under the mode autograd adds
    gradients out of place (the mode holds references to them) where it would add in place, the same bytes either way.
    ``TorchDispatchMode`` is PyTorch's private module for this, with no public counterpart (``torch.utils.flop_counter``
    is built on it); an operator's ``torch.Tag.inplace`` and ``torch.Tag.out`` tags say that it writes an argument."""

    GATHERS = {'aten.index_select.default': 2, 'aten.index.Tensor': 1, 'aten.gather.default': 2}  # operator: position
    # of its index argument (an expanded index counts once)
    OVERWRITE = ('aten.copy_.default', 'aten.fill_.Scalar', 'aten.fill_.Tensor', 'aten.zero_.default')

    def __init__(self):
        super().__init__()
        self.ops: Dict[str, List[int]] = {}  # name: [calls, bytes read, bytes written]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        storages = {t.untyped_storage().data_ptr() for t in ins}
        writes_argument = torch.Tag.inplace in func.tags or torch.Tag.out in func.tags
        if func.is_view or name.startswith(('aten.empty', 'aten.new_empty')) or (
                not writes_argument and outs and all(t.untyped_storage().data_ptr() in storages for t in outs)):
            return out
        written = sum(tensor_bytes(t) for t in outs)
        if name in self.GATHERS:
            read = written + sum(tensor_bytes(t) for t in _tensors(args[self.GATHERS[name]]))
        else:
            skip = _tensors(kwargs.get('out')) + (_tensors(args[0]) if name in self.OVERWRITE else [])
            read = sum(tensor_bytes(t) for t in ins if not any(t is u for u in skip))
        row = self.ops.setdefault(name, [0, 0, 0])
        row[0] += 1
        row[1] += read
        row[2] += written
        return out


def traffic(model_name: str, args, dtype: torch.dtype = torch.float32,
            channels_last: bool = False) -> Dict[str, List[int]]:
    """Per operator, ``[calls, bytes read, bytes written]`` that the Tf-FD terms add to a step (``inter+intra``'s
    operators less those of ``network``'s, counted by ``Traffic`` on one step of each after a warm-up step), with the
    maps in ``dtype`` (and a CNN's maps in channels-last memory with ``channels_last``); the bytes of the tapped maps
    under the key ``'maps'``."""
    tapped = Tapped(model_name, args.batch_size, args.img_size, channels_last)
    tapped.leaves = [f.detach().to(dtype).requires_grad_() for f in tapped.leaves]
    tapped.upstream = [u.to(dtype) for u in tapped.upstream]
    counts = {}
    for config in ('network', 'inter+intra'):
        step = make_step(config, tapped)
        step()
        with Traffic() as mode:
            step()
        counts[config] = mode.ops
    added = {}
    for name in sorted(set(counts['network']) | set(counts['inter+intra'])):
        diff = [a - b for a, b in zip(counts['inter+intra'].get(name, [0, 0, 0]), counts['network'].get(name, [0] * 3))]
        if any(d < 0 for d in diff):
            raise RuntimeError(f'{model_name}: the plain step ran more of {name} than the step with the terms ({diff})')
        if any(diff):
            added[name] = diff
    added['maps'] = [len(tapped.leaves), sum(tensor_bytes(f) for f in tapped.maps(tapped.leaves)), 0]
    return added


def traffic_table(model_name: str, args, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> str:
    """``traffic`` as a table, largest operators first, and the total in passes over the tapped maps (MB: 2**20
    bytes)."""
    ops = traffic(model_name, args, dtype, channels_last)
    maps = ops.pop('maps')[1]
    rows = sorted(ops.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
    total = sum(r + w for _, r, w in ops.values())
    layout = ', channels-last' if channels_last else ''
    lines = [f'{model_name}, batch {args.batch_size}, {args.img_size} px, maps {str(dtype).replace("torch.", "")}'
             f'{layout}: the tapped maps {maps / 2 ** 20:.1f} MB; the terms run {sum(c for c, _, _ in ops.values())} '
             f'operators and read and write {total / 2 ** 20:.0f} MB per step, {total / maps:.1f} passes over the maps',
             '', '| operator | calls | read (MB) | written (MB) | passes |', '|---|---:|---:|---:|---:|']
    lines += [f'| {name} | {c} | {r / 2 ** 20:.1f} | {w / 2 ** 20:.1f} | {(r + w) / maps:.2f} |'
              for name, (c, r, w) in rows if r + w >= maps / 1000]
    return '\n'.join(lines)


def main():
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: `benchmarks` too
    from benchmarks import overhead  # here: overhead imports this module
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default=','.join(DEFAULT_MODELS))
    parser.add_argument('--configs', default=','.join(CONFIGS), help=f'from {", ".join(CONFIGS)}')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=11)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (default: torch\'s own choice)')
    overhead.add_malloc_argument(parser)
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='profile N steps of inter+intra instead of timing the configurations')
    parser.add_argument('--traffic', default='', metavar='DTYPES',
                        help='count the bytes the terms read and write per step instead of timing them, maps in '
                             'each of these dtypes (e.g. float32,bfloat16)')
    parser.add_argument('--channels-last', action='store_true',
                        help='--traffic: a CNN\'s maps in channels-last memory (as training with --channels-last)')
    args = parser.parse_args()
    setup = overhead.single_process_timing(args.threads, args.malloc)
    args.configs = args.configs.split(',')
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f'unknown configuration(s) {unknown}; choose from {", ".join(CONFIGS)}')
    if args.traffic:
        for name in args.models.split(','):
            for dtype in args.traffic.split(','):
                print(traffic_table(name, args, getattr(torch, dtype), args.channels_last) + '\n', flush=True)
        return
    if args.profile:
        for name in args.models.split(','):
            print(f'{name}: {args.profile} steps of inter+intra, batch {args.batch_size}, {args.img_size} px, {setup}')
            print(profile(name, args), flush=True)
        return
    print(f'torch {torch.__version__}, {setup}, batch {args.batch_size}, {args.img_size} px, {args.rounds} rounds')
    print(f'| model | {" | ".join(args.configs)} |')
    print(f'|---|{"---|" * len(args.configs)}')
    for name in args.models.split(','):
        res = measure(name, args)
        cells = [f'{res[c]["ms"]:.0f} ms ({res[c]["ratio"]:.2f}x)' for c in args.configs]
        print(f'| {name} | {" | ".join(cells)} |', flush=True)


if __name__ == '__main__':
    main()
