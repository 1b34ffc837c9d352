"""Publishing a Tf-FD training run on the Hub (timm_tffd.hub) and loading it back (timm_tffd.pretrained), offline.

The pipeline runs for real at small scale: train_timm_tffd.py trains a tiny ResNet with Tf-FD (and a baseline) on the
embedded Fashion-MNIST subset, the run is pushed with --dry-run, then loaded by plain timm (``local-dir:`` and a
pre-populated Hub cache with HF_HUB_OFFLINE=1, in a fresh interpreter that never imports timm_tffd) and by
``timm_tffd.create_model``; the outputs equal the trained model's. The model card of other kinds of runs (SFD, SD / RSD,
logit KD, other data) is checked on checkpoints built here in the saved schema.
"""
import argparse
import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import yaml
import safetensors.torch
import timm
from PIL import Image
from huggingface_hub import HfApi, RepoUrl, constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import httpx

import timm_tffd
from timm_tffd.data.embedded import uses_embedded_data
from timm_tffd.hub import TrainingRun, model_card
from timm_tffd.hub import main as hub_main
from conftest import load_checkpoint, run_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / 'timm_tffd' / 'data' / 'fashion_mnist_small.npz'
REPO_ID = 'tffd-test/test_resnet.tffd_fmnist'
# a tiny run of the training script on the embedded data (no data dir): 256 / 128 images, two epochs
TRAIN = ['--model', 'test_resnet', '--epochs', '2', '--max-train-samples', '256', '--max-val-samples', '128',
         '-b', '64', '--lr', '0.05', '--warmup-epochs', '0', '--device', 'cpu', '-j', '0']
TFFD = ['--tffd', 'inter,intra', '--tffd-pairs', 'adjacent', '--tffd-warmup-epochs', '1', '--tffd-early-decay', '1',
        '2', '--model-ema', '--model-ema-decay', '0.9']
TITLES = dict(tffd='Self-Regulated Feature Learning via Teacher-free Feature Distillation',
              tfd='Teacher-free Distillation via Regularizing Intermediate Representation',
              sfr='Self-Feature Regularization: Self-Feature Distillation Without Teacher Models',
              sfd='Self-boosting for Feature Distillation')


def _train(root, name, *extra):
    proc = run_script(str(ROOT / 'train_timm_tffd.py'), *TRAIN, *extra, '--output', root, '--experiment', name,
                      cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / name


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    return dict(tffd=_train(root, 'tffd', *TFFD), baseline=_train(root, 'base'))


@pytest.fixture(scope='module')
def classes():
    return [str(c) for c in np.load(DATA)['classes']]


@pytest.fixture(scope='module')
def export(runs, tmp_path_factory):
    """The dry-run folder, written through the command line; the class names come from the embedded data."""
    out = tmp_path_factory.mktemp('export') / 'repo'
    hub_main(['push', str(runs['tffd']), '--repo-id', REPO_ID, '--baseline', str(runs['baseline']), '--dry-run',
              '--out', str(out)])
    return out


def _checkpoint(run, name='model_best.pth.tar'):
    return load_checkpoint(run / name)


def _reference(run, key='state_dict'):
    """The trained model, rebuilt from its checkpoint with plain timm."""
    checkpoint = _checkpoint(run)
    model = timm.create_model('test_resnet', num_classes=10, in_chans=1)
    model.load_state_dict(checkpoint[key])
    return model.eval()


def _val_inputs(export, n=16):
    """Validation images through the evaluation transform that config.json describes."""
    cfg = json.loads((export / 'config.json').read_text())['pretrained_cfg']
    transform = timm.data.create_transform(input_size=cfg['input_size'], mean=cfg['mean'], std=cfg['std'],
                                           crop_pct=cfg['crop_pct'], interpolation=cfg['interpolation'])
    return torch.stack([transform(Image.fromarray(im, mode='L')) for im in np.load(DATA)['val_images'][:n]])


def _summary(run):
    with open(run / 'summary.csv') as f:
        return list(csv.DictReader(f))


def _hub_cache(root, repo_id, files):
    """A Hub cache in huggingface_hub's layout: models--org--name/refs/main and snapshots/<revision>/."""
    repo = root / ('models--' + repo_id.replace('/', '--'))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(revision)
    snapshot = repo / 'snapshots' / revision
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copy(f, snapshot / f.name)
    return root


def _details(card):
    """The card's "Model Details" list: {title: value} or, for a section of settings, {title: {key: value}}."""
    block = card.split('## Model Details\n')[1].split('\n## ')[0]
    out, section = {}, None
    for line in block.splitlines():
        top = re.fullmatch(r'- \*\*(.+?):\*\* ?(.*)', line)
        if top:
            section = top.group(1)
            out[section] = top.group(2) or {}
        elif line.startswith('  - '):
            key, value = line[4:].split(': ', 1)
            out[section][key] = value
    return out


def _new_file_mode(folder):
    """The permission bits a new file gets here (the process umask applied to 0o666)."""
    probe = folder / 'probe'
    probe.write_text('')
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


def test_dry_run_folder(runs, export, classes, tmp_path):
    assert sorted(p.name for p in export.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    # readable like any other file of the user (safetensors alone writes 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in export.iterdir()} == dict.fromkeys(
        ['README.md', 'config.json', 'model.safetensors'], _new_file_mode(tmp_path))
    config = json.loads((export / 'config.json').read_text())
    assert config['architecture'] == 'test_resnet'
    assert config['num_classes'] == 10
    assert config['label_names'] == classes
    # the preprocessing the run was evaluated with, as timm resolves it from the run's arguments
    args = vars(_checkpoint(runs['tffd'])['args'])
    expected = timm.data.resolve_data_config(args, model=timm.create_model('test_resnet', in_chans=1))
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32] == list(expected['input_size'])
    assert cfg['mean'] == args['mean'] and cfg['std'] == args['std']
    assert cfg['crop_pct'] == expected['crop_pct'] and cfg['interpolation'] == expected['interpolation']
    assert cfg['tag'] == 'tffd_fmnist' and cfg['license'] == 'apache-2.0'
    assert 'paper_ids' not in cfg and 'origin_url' not in cfg  # the registry's r160_in1k credits are not ours
    # the plain timm weights of model_best, nothing else
    weights = safetensors.torch.load_file(export / 'model.safetensors')
    expected = _checkpoint(runs['tffd'])['state_dict']
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_export_permissions_follow_the_umask(runs, tmp_path):
    old = os.umask(0o027)
    try:
        folder = pathlib.Path(timm_tffd.push_to_hub(runs['baseline'], REPO_ID, dry_run=True, save_dir=tmp_path / 'x'))
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == dict.fromkeys(
        ['README.md', 'config.json', 'model.safetensors'], oct(0o640))


def test_model_card(runs, export):
    card = (export / 'README.md').read_text()
    assert re.search(r'^license: apache-2.0$', card, re.M)
    assert re.search(r'^datasets:\n- fashion_mnist$', card, re.M)
    args = yaml.safe_load((runs['tffd'] / 'args.yaml').read_text())
    details = _details(card)
    assert details['Training recipe']['epochs'] == str(args['epochs'])
    assert details['Training recipe']['smoothing'] == '0.1'
    assert details['Training data'].startswith('the Fashion-MNIST subset embedded in timm_tffd (4000 training / 1000 '
                                               'validation images of the official splits)')
    assert details['Training data'].endswith('a random subset of 256 training images and 128 validation images')
    # the Tf-FD settings of TFFD (options and weights of inter and intra, the reference code's defaults where TFFD
    # names none) and nothing of the methods the run did not use
    assert details['Tf-FD'] == {
        'methods': 'inter, intra', 'weights': 'inter 0.005, intra 0.0004', 'stages': 'all but a leading stem',
        'preact': 'False', 'pairs': 'adjacent', 'direction': 'top-down', 'saliency': 'norm',
        'detach_salient': 'False', 'warmup_epochs': '1', 'early decay': 'epochs 1 to 2'}
    assert not {'SFD', 'Self-distillation', 'Logit KD'} & set(details)
    for flag in ('emd', 'm2o', 'sfd_weight', 'sd_tau', 'kd_temperature', 'teacher'):
        assert flag not in card.split('## Model Usage')[0]
    # final and best top-1 / top-5, and the baseline table, computed from summary.csv here
    rows, base = _summary(runs['tffd']), _summary(runs['baseline'])
    assert 'train_tffd_inter' in rows[0] and 'train_tffd_inter' not in base[0]  # trained with Tf-FD / without
    final, best = rows[-1], max(rows, key=lambda r: float(r['eval_top1']))
    b_final, b_best = base[-1], max(base, key=lambda r: float(r['eval_top1']))
    assert f'final (epoch {final["epoch"]}): {float(final["eval_top1"]):.2f} / {float(final["eval_top5"]):.2f}' in card
    assert f'(epoch {best["epoch"]}): {float(best["eval_top1"]):.2f} / {float(best["eval_top5"]):.2f}' in card
    assert 'evaluated weights (summary.csv): EMA' in card
    table = [line for line in card.splitlines() if line.startswith('|')]
    assert table[2].startswith('| baseline (`base`) | off | 2 |')
    assert table[3].startswith('| this model (`tffd`) | inter,intra | 2 |')
    delta = float(best['eval_top1']) - float(b_best['eval_top1'])
    assert table[4].split('|')[4].strip() == f'{delta:+.2f}'
    assert table[4].split('|')[7].strip() == f'{float(final["eval_top5"]) - float(b_final["eval_top5"]):+.2f}'
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True)" in card
    # Tf-FD and TFD are cited, SFD (not used) is not
    for paper in ('tffd', 'tfd'):
        assert f'title     = {{{TITLES[paper]}}}' in card
    assert 'author    = {Li, Lujun and Liang, Shiuan-Ni and Yang, Ya and Jin, Zhe}' in card
    assert 'doi       = {10.1109/IJCNN55064.2022.9892575}' in card
    assert card.count('```bibtex') == 2 and TITLES['sfd'] not in card


# args.yaml of a run on the embedded data with no method selected, as the training script writes it (every flag)
_ARGS = dict(model='test_resnet', epochs=3, batch_size=64, lr=0.1, smoothing=0.1, smoothing_schedule='constant',
             smoothing_end=None, data=None, data_dir=None, dataset='', max_train_samples=None, model_ema=False,
             tffd=None, tffd_inter_weight=0.005, tffd_intra_weight=0.0004, tffd_emd_weight=0.005, tffd_pairs='all',
             tffd_saliency='norm', tffd_emd_grid=None, tffd_m2o_pairs='all', tffd_warmup_epochs=20.0,
             tffd_early_decay=None, tffd_stages=None, tffd_preact=False, sfd=None, sfd_weight=3.0,
             self_distill=None, sd_tau='0.995,0.999', kd_model_name=None, teacher_checkpoint=None,
             kd_loss_type='kl', kd_temperature=4.0, distill_loss_weight=None, task_loss_weight=None)
_SUMMARY = [dict(epoch=float(e), eval_loss=1.0, eval_top1=top1, eval_top5=90.0) for e, top1 in enumerate((50, 70, 60))]


def _card(tmp_path, task_state, **args):
    """The card of a run with these arguments (over _ARGS) and a checkpoint with this task_state."""
    run = TrainingRun(tmp_path / 'run', dict(_ARGS, **args), _SUMMARY)
    checkpoint = dict(epoch=2, args=argparse.Namespace(**run.args), task_state=task_state)
    return model_card(run, checkpoint, torch.nn.Linear(2, 10), 'org/name')


def test_card_of_sfd_with_tffd_and_rsd(tmp_path):
    """SFD with intra-layer Tf-FD and RSD on CIFAR-100: the card lists these settings, and only these."""
    config = dict(methods=['intra'], stages=[2, 3], preact=True, options=dict(saliency='entropy', detach_salient=False),
                  weights=dict(intra=0.001), warmup_epochs=20.0, decay=None)
    task_state = dict(tffd=dict(config=config, epoch=3.0), sfd=dict(integrator='ri', integrator_state={}))
    card = _card(tmp_path, task_state, data_dir='/data/cifar100', dataset='torch/cifar100', tffd='intra',
                 tffd_intra_weight=0.001, tffd_saliency='entropy', tffd_stages=[2, 3], tffd_preact=True, sfd='ri',
                 kd_model_name='cifar_resnet56', teacher_checkpoint='/home/me/teacher/model_best.pth.tar',
                 self_distill='rsd')
    details = _details(card)
    assert details['Tf-FD'] == {'methods': 'intra', 'weights': 'intra 0.001', 'stages': '[2, 3]', 'preact': 'True',
                                'saliency': 'entropy', 'detach_salient': 'False', 'warmup_epochs': '20'}
    assert details['SFD'] == {'integrator': 'RI', 'weight': '3.0', 'teacher': 'cifar_resnet56',
                              'teacher weights': 'model_best.pth.tar'}
    assert details['Self-distillation'] == {'mode': 'RSD', 'tau': '0.995 -> 0.999 (linear over the epochs)'}
    assert 'Logit KD' not in details and '/home/me' not in card
    assert details['Dataset'] == details['Training data'] == 'torch/cifar100'
    assert re.search(r'^datasets:\n- torch/cifar100$', card, re.M) and 'embedded' not in card
    assert card.count('```bibtex') == 3 and all(TITLES[p] in card for p in ('tffd', 'tfd', 'sfd'))
    assert 'with Teacher-free Feature Distillation (Tf-FD: intra) and SFD feature distillation' in card


def test_card_of_logit_kd_and_of_a_plain_run(tmp_path):
    card = _card(tmp_path, {}, kd_model_name='resnet18', teacher_checkpoint='hf-hub:org/teacher')
    details = _details(card)
    assert details['Logit KD'] == {'teacher': 'resnet18', 'teacher weights': 'hf-hub:org/teacher', 'loss': 'kl',
                                   'temperature': '4.0'}
    assert not {'Tf-FD', 'SFD', 'Self-distillation'} & set(details)
    assert 'trained on the embedded Fashion-MNIST subset' in card and '## Citation' not in card
    assert details['Results']['top-1 / top-5, best top1 (epoch 1)'] == '70.00 / 90.00'
    plain = _details(_card(tmp_path, {}))
    assert not {'Tf-FD', 'SFD', 'Self-distillation', 'Logit KD'} & set(plain)
    # SFR's methods and dynamic label smoothing cite SFR
    emd = dict(methods=['emd'], stages=None, preact=False, weights=dict(emd=0.005), warmup_epochs=20.0, decay=None,
               options=dict(emd_grid=None, emd_pairs='all', emd_eps=0.02, emd_iters=50))
    for task_state, args in (({'tffd': dict(config=emd, epoch=0.0)}, dict(tffd='emd')),
                             ({}, dict(smoothing_schedule='linear'))):
        card = _card(tmp_path, task_state, **args)
        assert TITLES['sfr'] in card and TITLES['sfd'] not in card


def test_card_data_source_follows_the_training_script(tmp_path):
    """The training script uses the embedded subset when given neither a data dir nor a dataset."""
    assert uses_embedded_data(None, '') and uses_embedded_data('', None)
    assert not uses_embedded_data('/data/clothes', '') and not uses_embedded_data(None, 'torch/fashion_mnist')
    for args, name in ((dict(dataset='torch/fashion_mnist'), 'torch/fashion_mnist'), (dict(data='/data/clothes'),
                                                                                      'clothes')):
        card = _card(tmp_path, {}, **args)
        assert _details(card)['Training data'] == name and 'embedded' not in card


def test_card_refuses_a_checkpoint_without_the_tffd_config(tmp_path):
    old = dict(epoch=0.0, weights=dict(inter=0.005), config=dict(tffd=['inter'], stages=[1, 2], preact=False))
    with pytest.raises(ValueError, match='Tf-FD config saved in the checkpoint cannot be read'):
        _card(tmp_path, {'tffd': old}, tffd='inter')
    with pytest.raises(ValueError, match='has no "config"'):
        _card(tmp_path, {'tffd': {'epoch': 1.0}}, tffd='inter')
    with pytest.raises(ValueError, match='has no Tf-FD state'):
        _card(tmp_path, {}, tffd='inter')


_PLAIN_TIMM = """
import sys, runpy, torch, timm, safetensors.torch
x = safetensors.torch.load_file(sys.argv[1])['x']
out = {}
for key, name in (('local', 'local-dir:' + sys.argv[2]), ('hub', 'hf-hub:' + sys.argv[3])):
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        out[key] = model(x)
safetensors.torch.save_file(out, sys.argv[4])
runpy.run_path(sys.argv[5])  # the model card's usage snippet
assert 'timm_tffd' not in sys.modules
"""


def test_plain_timm_loads_offline(runs, export, classes, tmp_path):
    """A fresh interpreter with only timm: local-dir: and a Hub cache with HF_HUB_OFFLINE=1, plus the card's snippet."""
    cache = _hub_cache(tmp_path / 'cache', REPO_ID, export.iterdir())
    x = _val_inputs(export)
    safetensors.torch.save_file({'x': x}, tmp_path / 'x.safetensors')
    Image.fromarray(np.load(DATA)['val_images'][0], mode='L').save(tmp_path / 'image.png')
    snippet = re.search(r'```python\n(.*?)```', (export / 'README.md').read_text(), re.S).group(1)
    (tmp_path / 'snippet.py').write_text(snippet.replace("'image.jpg'", repr(str(tmp_path / 'image.png'))))
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-c', _PLAIN_TIMM, str(tmp_path / 'x.safetensors'), str(export), REPO_ID,
         str(tmp_path / 'out.safetensors'), str(tmp_path / 'snippet.py')],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = safetensors.torch.load_file(tmp_path / 'out.safetensors')
    with torch.no_grad():
        expected = _reference(runs['tffd'])(x)
    for key in ('local', 'hub'):
        assert torch.equal(out[key].argmax(-1), expected.argmax(-1))
        torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)
    # the snippet's top-1 label is the trained model's prediction for that image
    top = eval(proc.stdout.strip().splitlines()[-1])
    assert len(top) == 5 and all(label in classes for label, _ in top)
    assert top[0][0] == classes[int(expected[0].argmax())]


def test_create_model_offline_cache(runs, export, monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)  # read once at import
    cache = _hub_cache(tmp_path / 'cache', REPO_ID, export.iterdir())
    x = _val_inputs(export)
    with torch.no_grad():
        expected = _reference(runs['tffd'])(x)
        for name in ('hf-hub:' + REPO_ID, 'local-dir:' + str(export)):
            model = timm_tffd.create_model(name, pretrained=True, cache_dir=cache).eval()
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    assert model.pretrained_cfg['label_names'][0] == 'T-shirt/top'
    # the Tf-FD names resolve to the Hub; not cached and offline -> a clear error
    assert timm_tffd.list_pretrained() == ['resnet18.tffd_in1k', 'resnet50.tffd_in1k']
    assert timm_tffd.list_pretrained('resnet50*') == ['resnet50.tffd_in1k']
    assert timm_tffd.resolve_pretrained_name('resnet50.tffd_in1k') == f'hf-hub:{timm_tffd.HUB_ORG}/resnet50.tffd_in1k'
    with pytest.raises(FileNotFoundError, match='not in the local Hub cache'):
        timm_tffd.create_model('resnet18.tffd_in1k', pretrained=True, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match='not in the local Hub cache'):
        timm_tffd.create_model('resnet50.tffd_in1k', cache_dir=cache)  # the config comes from the Hub too


def test_create_model_refuses_pickled_weights(runs, export, monkeypatch, tmp_path):
    """A repository with pytorch_model.bin only: plain timm would unpickle it, timm_tffd refuses."""
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    folder = tmp_path / 'pickled'
    folder.mkdir()
    shutil.copy(export / 'config.json', folder)
    torch.save(_checkpoint(runs['tffd'])['state_dict'], folder / 'pytorch_model.bin')
    cache = _hub_cache(tmp_path / 'cache', 'tffd-test/pickled', folder.iterdir())
    assert timm.create_model('hf-hub:tffd-test/pickled', pretrained=True, cache_dir=cache) is not None
    with pytest.raises(FileNotFoundError, match='safetensors only'):
        timm_tffd.create_model('hf-hub:tffd-test/pickled', pretrained=True, cache_dir=cache)
    with pytest.raises(ValueError, match='has no model.safetensors'):
        timm_tffd.create_model(f'local-dir:{folder}', pretrained=True)
    with pytest.raises(ValueError, match='would choose the weight source'):
        timm_tffd.create_model(f'local-dir:{export}', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(folder / 'pytorch_model.bin')))


class _StubHub:
    """huggingface_hub's HfApi calls made by a push, recorded instead of sent."""

    def __init__(self, monkeypatch, upload_dir, create_error=None):
        self.calls = []
        stub = self

        def create_repo(api, repo_id, **kwargs):
            stub.calls.append(('create_repo', repo_id, api.token, kwargs))
            if create_error is not None:
                raise create_error
            return RepoUrl(f'https://huggingface.co/{repo_id}')

        def file_exists(api, repo_id, filename, **kwargs):
            stub.calls.append(('file_exists', repo_id, filename))
            return False

        def upload_folder(api, repo_id, folder_path, **kwargs):
            stub.calls.append(('upload_folder', repo_id, kwargs['commit_message']))
            shutil.copytree(folder_path, upload_dir)
            return types.SimpleNamespace(commit_url=f'https://huggingface.co/{repo_id}/commit/0123abc')

        for name, fn in (('create_repo', create_repo), ('file_exists', file_exists), ('upload_folder', upload_folder)):
            monkeypatch.setattr(HfApi, name, fn)


def test_push_uploads_the_dry_run_folder(runs, export, monkeypatch, tmp_path):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    hub = _StubHub(monkeypatch, tmp_path / 'uploaded')
    url = timm_tffd.push_to_hub(runs['tffd'], REPO_ID, baseline=runs['baseline'])
    assert url == f'https://huggingface.co/{REPO_ID}/commit/0123abc'
    assert hub.calls[0] == ('create_repo', REPO_ID, 'hf_test_token', dict(private=False, exist_ok=False))
    assert hub.calls[-1] == ('upload_folder', REPO_ID, 'Add Tf-FD weights')
    uploaded = tmp_path / 'uploaded'
    assert sorted(p.name for p in uploaded.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    for name in ('README.md', 'config.json'):
        assert (uploaded / name).read_text() == (export / name).read_text()
    sent, written = (safetensors.torch.load_file(f / 'model.safetensors') for f in (uploaded, export))
    assert all(torch.equal(sent[k], written[k]) for k in written)


def test_push_errors(runs, monkeypatch, tmp_path, capsys):
    push = dict(output_dir=runs['tffd'], repo_id=REPO_ID)
    # no token anywhere: nothing is contacted
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.delenv('HF_OIDC_RESOURCE', raising=False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    hub = _StubHub(monkeypatch, tmp_path / 'never')
    with pytest.raises(ValueError, match='no Hugging Face token found'):
        timm_tffd.push_to_hub(**push)
    assert hub.calls == []
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    # a name already taken
    request = httpx.Request('POST', 'https://huggingface.co/api/repos/create')
    taken = HfHubHTTPError('409 Conflict', response=httpx.Response(409, request=request))
    _StubHub(monkeypatch, tmp_path / 'never', create_error=taken)
    with pytest.raises(ValueError, match='already exists on the Hugging Face Hub'):
        timm_tffd.push_to_hub(**push)
    # no write access to the namespace
    denied = HfHubHTTPError('403 Forbidden', response=httpx.Response(403, request=request))
    _StubHub(monkeypatch, tmp_path / 'never', create_error=denied)
    with pytest.raises(PermissionError, match='write access'):
        timm_tffd.push_to_hub(**push)
    # network failure, also through the command line
    _StubHub(monkeypatch, tmp_path / 'never', create_error=httpx.ConnectError('connection refused'))
    with pytest.raises(ConnectionError, match='cannot reach the Hugging Face Hub'):
        timm_tffd.push_to_hub(**push)
    with pytest.raises(SystemExit) as e:
        hub_main(['push', str(runs['tffd']), '--repo-id', REPO_ID])
    assert e.value.code == 1 and 'cannot reach the Hugging Face Hub' in capsys.readouterr().err
    assert not (tmp_path / 'never').exists()


class _Payload:
    """Any pickled object: unpickling it would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


def _rewrite_checkpoint(run, edit):
    checkpoint = _checkpoint(run)
    edit(checkpoint)
    torch.save(checkpoint, run / 'model_best.pth.tar')


def test_bad_inputs(runs, classes, tmp_path, capsys):
    def dry_run(folder, **kwargs):
        return timm_tffd.push_to_hub(folder, REPO_ID, dry_run=True, save_dir=tmp_path / 'out', **kwargs)

    # not a training output
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='not a training output folder: args.yaml and summary.csv missing'):
        dry_run(tmp_path / 'empty')
    with pytest.raises(SystemExit) as e:
        hub_main(['push', str(tmp_path / 'empty'), '--repo-id', REPO_ID, '--dry-run'])
    assert e.value.code == 1 and 'not a training output folder' in capsys.readouterr().err
    proc = run_script('-m timm_tffd.hub', 'push', tmp_path / 'empty', '--repo-id', REPO_ID, '--dry-run')
    assert proc.returncode == 1 and proc.stderr.count('\n') == 1 and 'not a training output folder' in proc.stderr
    # a checkpoint whose architecture disagrees with args.yaml
    other = _copy_run(runs['tffd'], tmp_path / 'other')
    args = yaml.safe_load((other / 'args.yaml').read_text())
    (other / 'args.yaml').write_text(yaml.safe_dump(dict(args, model='resnet18')))
    with pytest.raises(ValueError, match="saved for architecture 'test_resnet' but args.yaml says 'resnet18'"):
        dry_run(other)
    # same name, other shapes: the weights do not fit
    shapes = _copy_run(runs['tffd'], tmp_path / 'shapes')
    _rewrite_checkpoint(shapes, lambda c: c['state_dict'].update({'fc.weight': torch.zeros(7, 96)}))
    with pytest.raises(ValueError, match='does not fit test_resnet'):
        dry_run(shapes)
    # a checkpoint with arbitrary pickled objects is refused, and nothing is unpickled
    pickled = _copy_run(runs['tffd'], tmp_path / 'pickled')
    marker = tmp_path / 'unpickled'
    _rewrite_checkpoint(pickled, lambda c: c.update(extra=_Payload(marker)))
    with pytest.raises(ValueError, match='refusing to load .* pathlib'):
        dry_run(pickled)
    # the same loader reads teacher checkpoints
    with pytest.raises(ValueError, match='refusing to load .* pathlib'):
        timm_tffd.load_teacher_checkpoint(timm.create_model('test_resnet', num_classes=10, in_chans=1),
                                          str(pickled / 'model_best.pth.tar'))
    assert not marker.exists()
    # class names of a dataset that is neither the embedded data nor ImageNet, or of the wrong count
    folder_data = _copy_run(runs['tffd'], tmp_path / 'folder_data')
    _rewrite_checkpoint(folder_data, lambda c: setattr(c['args'], 'data_dir', '/data/clothes'))
    with pytest.raises(ValueError, match="cannot tell the class names of 'clothes'"):
        dry_run(folder_data)
    with pytest.raises(ValueError, match='5 label names for a model with 10 classes'):
        dry_run(runs['tffd'], label_names=classes[:5])
    # EMA weights from a run without EMA, a baseline of another model, bad repo id, a used output folder
    with pytest.raises(ValueError, match='has no state_dict_ema'):
        dry_run(runs['baseline'], ema=True)
    with pytest.raises(ValueError, match='baseline .* trains resnet18, this run test_resnet: not comparable'):
        dry_run(runs['tffd'], baseline=other)
    with pytest.raises(ValueError, match='ORG/NAME'):
        timm_tffd.push_to_hub(runs['tffd'], 'no-namespace', dry_run=True)
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'old.bin').write_bytes(b'')
    with pytest.raises(ValueError, match='is not empty'):
        dry_run(runs['tffd'])


def test_ema_export(runs, tmp_path):
    folder = timm_tffd.push_to_hub(runs['tffd'], REPO_ID, ema=True, dry_run=True, save_dir=tmp_path / 'ema')
    weights = safetensors.torch.load_file(pathlib.Path(folder) / 'model.safetensors')
    checkpoint = _checkpoint(runs['tffd'])
    ema, model = checkpoint['state_dict_ema'], checkpoint['state_dict']
    assert all(torch.equal(weights[k], ema[k]) for k in ema)
    assert not all(torch.equal(weights[k], model[k]) for k in model)
    assert 'state_dict_ema of model_best.pth.tar' in (pathlib.Path(folder) / 'README.md').read_text()
