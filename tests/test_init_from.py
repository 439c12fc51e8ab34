"""--init-from FILE: a training run starts from a trained model's weights, wherever the names and shapes match.

The files users bring: our own checkpoints (origin_train.py's FCN on the demo data, 21 classes) and torchvision's
published DeepLabV3 COCO files. The stand-in for `deeplabv3_resnet50_coco-cd0a2569.pth` is built from torchvision's
own builder (num_classes=21, aux_loss=True): its 370 names and shapes, BatchNorm's 61 `num_batches_tracked` counters
included (the published COCO files hold them, unlike the 2017 ImageNet backbones), random values, a plain
OrderedDict saved with torch.save. As in test_weights.py, a stand-in cannot hash to cd0a2569: torchvision's entry is
pointed at a name carrying the stand-in's own sha256 prefix. Another class count comes from a user's own data: a
3-class folder dataset (images/, masks/, classes.txt). The scripts run in this process; where only the start
matters, training is replaced by a capture of the net it would train.
"""
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

import some_define as sd
from test_flags import FAST, run_ok
from test_own_data import random_folder
from test_flags import fcn as fcn_ckpt  # noqa: F401 - origin_train.py, one epoch on the demo data: 21 classes
from test_reliability import MY_TRAIN, ORIGIN_TRAIN, one_error_line, run_inprocess
from test_weights import places, save_named  # noqa: F401 - places: the weights' places, empty and offline

IMAGENET = [a for a in FAST if a != '--no-pretrained']     # the ImageNet default: none here, nothing to download
COCO = torchvision.models.segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1
COCO_NAME = 'deeplabv3_resnet50_coco-cd0a2569.pth'
FCN_HEAD = ['final_conv.weight', 'final_conv.bias', 'transpose_conv.weight', 'transpose_conv.bias']


def init_line(res):
    lines = [line for line in res.out.splitlines() if line.startswith('--init-from ')]
    assert len(lines) == 1, res.out
    return lines[0]


def captured_start(monkeypatch):
    """train_ch13 replaced: the list receives the state_dict (copied) of each net it is given, nothing trains."""
    starts = []
    monkeypatch.setattr(sd, 'train_ch13', lambda net, *rest, **kw: starts.append(
        {k: v.clone() for k, v in sd.unwrapped(net).state_dict().items()}))
    return starts


@pytest.fixture(scope='module')
def three_classes(tmp_path_factory):
    """A user's own data of 3 classes in the folder layout: images/{train,val}/, masks/{train,val}/, classes.txt."""
    def paint(mask):
        mask[5:25, 10:40], mask[30:45, 45:70] = 1, 2
    return random_folder(tmp_path_factory.mktemp('own') / 'shapes', ['background', 'circle', 'square'],
                         {'train': 8, 'val': 2}, paint)


@pytest.fixture(scope='module')
def coco_file(tmp_path_factory):
    """The stand-in for torchvision's deeplabv3_resnet50_coco-cd0a2569.pth, named `<stem>-<its own sha256 prefix>`:
    (path, state)."""
    with torch.device('meta'):
        names = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                   num_classes=21, aux_loss=True).state_dict()
    g = torch.Generator().manual_seed(0)
    state = OrderedDict((k, torch.randint(0, 10_000, (), generator=g) if k.endswith('.num_batches_tracked')
                         else torch.randn(v.shape, generator=g)) for k, v in names.items())
    assert len(state) == 370 and sum(k.endswith('.num_batches_tracked') for k in state) == 61
    assert state['classifier.4.weight'].shape == (21, 256, 1, 1) and 'aux_classifier.4.bias' in state
    return save_named(state, tmp_path_factory.mktemp('coco'), 'deeplabv3_resnet50_coco'), state


@pytest.fixture
def coco(coco_file, monkeypatch):
    """The stand-in, with torchvision's entry naming it (its hash prefix is checked as the real one's)."""
    path, state = coco_file
    monkeypatch.setattr(COCO.value, 'url', f'https://download.pytorch.org/models/{path.name}')
    return path, state


# -------------------------------------------------------------------------------------------- our checkpoints
def test_a_checkpoint_of_other_classes_starts_a_run_that_trains(fcn_ckpt, three_classes, tmp_path, places):
    file = torch.load(fcn_ckpt, weights_only=True)['model']
    starts, train = [], sd.train_ch13

    def recorded(net, *args, **kwargs):
        starts.append({k: v.clone() for k, v in sd.unwrapped(net).state_dict().items()})
        return train(net, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd, 'train_ch13', recorded)
        res = run_ok(ORIGIN_TRAIN, ['--dataset', 'folder', '--data-dir', three_classes, '--init-from', fcn_ckpt]
                     + IMAGENET + ['--batch-size', '2'], tmp_path)
    weights = [k for k in file if not k.endswith('.num_batches_tracked')]
    assert init_line(res) == (f'--init-from {fcn_ckpt}: loaded {len(weights) - 4} of {len(weights)} tensors; left '
                              f'as built {", ".join(FCN_HEAD)} (21 classes in the file, 3 here)')
    start = starts[0]
    assert all(torch.equal(start[k], file[k]) for k in file if k not in FCN_HEAD)
    assert torch.equal(start['transpose_conv.weight'], sd.bilinear_kernel(3, 3, 64))    # the head as built
    ckpt = torch.load(tmp_path / 'checkpoints' / 'origin.pt', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['model']['final_conv.weight'].shape[0] == 3
    assert ckpt['config']['init_from'] == str(fcn_ckpt) and f'from {fcn_ckpt.name}' in res.out
    # resumed (--resume alone: --init-from beside it is an error), the run keeps the record of how it started
    more = [a if a != '1' else '2' for a in IMAGENET]      # --epochs 2: extended by one
    res = run_ok(ORIGIN_TRAIN, ['--dataset', 'folder', '--data-dir', three_classes, '--resume'] + more
                 + ['--batch-size', '2'], tmp_path)
    ckpt = torch.load(tmp_path / 'checkpoints' / 'origin.pt', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['config']['init_from'] == str(fcn_ckpt) and f'from {fcn_ckpt.name}' in res.out


def test_a_checkpoint_of_the_same_classes_leaves_nothing(fcn_ckpt, demo_voc, tmp_path, monkeypatch):
    starts = captured_start(monkeypatch)
    res = run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--model', 'fcn', '--finetune-epochs', '0', '--init-from',
                            fcn_ckpt] + FAST, tmp_path)
    file = torch.load(fcn_ckpt, weights_only=True)['model']
    n = sum(not k.endswith('.num_batches_tracked') for k in file)
    assert init_line(res) == f'--init-from {fcn_ckpt}: loaded {n} of {n} tensors; nothing left as built'
    assert starts[0].keys() == file.keys() and all(torch.equal(starts[0][k], file[k]) for k in file)


# ----------------------------------------------------------------------------------- torchvision's COCO files
def test_torchvisions_coco_file_with_its_21_classes(coco, demo_voc, tmp_path, monkeypatch, places):
    """No --no-pretrained: the ImageNet resnet50, which the file replaces, is neither here nor downloadable."""
    path, state = coco
    starts = captured_start(monkeypatch)
    res = run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--model', 'deeplabv3_resnet50', '--finetune-epochs', '0',
                            '--init-from', path] + IMAGENET, tmp_path)
    assert init_line(res) == (f'--init-from {path}: loaded 302 of 302 tensors; nothing left as built; unused from '
                              'the file: aux_classifier.* (7)')
    start = starts[0]
    assert set(state) - set(start) == {k for k in state if k.startswith('aux_classifier.')}
    assert all(torch.equal(start[k], state[k]) for k in start)      # counters included


def test_torchvisions_coco_file_into_other_classes(coco, three_classes, tmp_path, monkeypatch):
    path, state = coco
    starts = captured_start(monkeypatch)
    res = run_ok(MY_TRAIN, ['--dataset', 'folder', '--data-dir', three_classes, '--model', 'deeplabv3_resnet50',
                            '--aux-loss', '--finetune-epochs', '0', '--init-from', path] + FAST, tmp_path)
    head = ['classifier.4.weight', 'classifier.4.bias', 'aux_classifier.4.weight', 'aux_classifier.4.bias']
    assert init_line(res) == (f'--init-from {path}: loaded 305 of 309 tensors; left as built {", ".join(head)} '
                              '(21 classes in the file, 3 here)')
    start = starts[0]
    assert start.keys() == state.keys()
    assert all(torch.equal(start[k], state[k]) for k in state if k not in head)
    assert start['classifier.4.weight'].shape == (3, 256, 1, 1) and start['aux_classifier.4.bias'].shape == (3,)


def test_a_wrong_file_under_the_published_name_is_refused(coco_file, tmp_path, demo_voc):
    """The real name, the stand-in's bytes: its sha256 does not start with cd0a2569."""
    path = tmp_path / COCO_NAME
    path.symlink_to(coco_file[0])
    res = run_inprocess(MY_TRAIN, ['--data-dir', demo_voc, '--model', 'deeplabv3_resnet50', '--finetune-epochs',
                                   '0', '--init-from', path] + FAST, tmp_path)
    one_error_line(res, str(path), 'is not the file its name says', 'cd0a2569', COCO.url, 'drop --init-from')


# ------------------------------------------------------------------------------------------- one line each
@pytest.mark.parametrize('case', ['coco_into_fcn', 'fcn_into_unet'])
def test_a_file_of_another_model_is_one_line(case, coco, fcn_ckpt, demo_voc, tmp_path):
    if case == 'coco_into_fcn':
        script, file, model = ORIGIN_TRAIN, coco[0], 'fcn'
        args = []
    else:
        script, file, model = MY_TRAIN, fcn_ckpt, 'resnet_unet'
        args = ['--finetune-epochs', '0']
    res = run_inprocess(script, ['--data-dir', demo_voc, '--init-from', file] + args + FAST, tmp_path)
    one_error_line(res, str(file), f'fits nothing in a {model}')
    assert not (tmp_path / 'checkpoints').exists() or not any((tmp_path / 'checkpoints').glob('*.pt'))


@pytest.mark.parametrize('flag', ['--resume', '--backbone-weights'])
def test_init_from_with_resume_or_backbone_weights_contradicts(flag, fcn_ckpt, demo_voc, tmp_path):
    extra = [flag] + (['resnet18-f37072fd.pth'] if flag == '--backbone-weights' else [])
    res = run_inprocess(MY_TRAIN, ['--data-dir', demo_voc, '--model', 'fcn', '--init-from', fcn_ckpt] + extra
                        + FAST, tmp_path)
    one_error_line(res, '--init-from', flag, 'contradict')


@pytest.mark.parametrize('case', ['missing', 'truncated', 'not_a_state_dict'])
def test_a_missing_or_corrupt_file_is_one_line_naming_it(case, fcn_ckpt, demo_voc, tmp_path):
    path = tmp_path / 'trained.pt'
    if case == 'truncated':
        path.write_bytes(fcn_ckpt.read_bytes()[:100_000])
    elif case == 'not_a_state_dict':
        torch.save([1, 2, 3], path)
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', demo_voc, '--init-from', path] + FAST, tmp_path)
    line = one_error_line(res, str(path))
    assert {'missing': 'does not exist', 'truncated': 'not a readable --init-from file',
            'not_a_state_dict': 'holds no state_dict'}[case] in line


def test_tensors_the_file_lacks_are_left_and_named(fcn_ckpt, tmp_path, capsys):
    """A checkpoint without the last resnet stage (7.*): that stage stays as built, and the line says so."""
    file = torch.load(fcn_ckpt, weights_only=True)['model']
    path = tmp_path / 'partial.pt'
    torch.save({k: v for k, v in file.items() if not k.startswith('7.')}, path)
    net = sd.fcn_resnet18(21)
    built = {k: v.clone() for k, v in net.state_dict().items()}
    sd.init_from(net, path, 'fcn', 21)
    stage = [k for k in file if k.startswith('7.') and not k.endswith('.num_batches_tracked')]
    n = sum(not k.endswith('.num_batches_tracked') for k in file)
    assert capsys.readouterr().out.strip() == (f'--init-from {path}: loaded {n - len(stage)} of {n} tensors; left as '
                                               f'built 7.* ({len(stage)}) (not in the file)')
    state = net.state_dict()
    assert all(torch.equal(state[k], built[k]) for k in state if k.startswith('7.'))
    assert all(torch.equal(state[k], file[k]) for k in state if not k.startswith('7.'))
