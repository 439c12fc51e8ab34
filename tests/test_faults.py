"""Faults of the machine, not of the user: a disk that fills up, a read-only folder, a job preempted by SIGTERM.
Each must end in one line naming the file (or the stop) and what to do, leave no partial file, keep everything
written before, and let `--resume` continue exactly: every random draw of a run (crops, the tutorial's
augmentation, CutMix, CopyBlob, both stages) comes from (seed, epoch, step), so a resumed run is the same run.

Full disks are made two ways: a file whose writes fail with ENOSPC part-way (everywhere), and a real tmpfs too
small for the next checkpoint (where the tests run as root and may mount one; skipped otherwise).
"""
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import some_define as sd
from test_distributed import free_port, start_torchrun
from conftest import finish
from test_reliability import (FAST, MY_PREDICT, MY_TRAIN, ORIGIN_PREDICT, ORIGIN_TRAIN, one_error_line,
                              run_inprocess, subprocess_env)

TINY = ['--batch-size', '2', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    return Path(sd.make_demo_voc(tmp_path_factory.mktemp('voc') / 'VOC2012', num_train=12, num_val=6, seed=5))


def leftovers(folder):
    """Partial files a failed or stopped write could leave: temporary files and unpacking folders."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*') if p.name.endswith('.tmp'))


# ------------------------------------------------------------------------------------ a disk that fills up
class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: the write that crosses it writes what fits and fails."""
    room = 64

    def write(self, data):
        left = FullDisk.room - self.tell()
        if len(data) > left:
            super().write(bytes(memoryview(data)[:max(left, 0)]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.fixture
def fill_disk(monkeypatch):
    """fill_disk(suffix, after=0): writes of files whose name ends with `suffix` (their temporary file: + '.<pid>.tmp')
    fail with ENOSPC, from the (after+1)-th such file on. Returns the names that failed."""
    failed = []

    def arm(suffix, after=0):
        seen = []

        def opener(file, mode='r', *args, **kwargs):
            if 'w' in mode and str(file).endswith('.tmp') and str(file).rsplit('.', 2)[0].endswith(suffix):
                seen.append(file)
                if len(seen) > after:
                    failed.append(Path(file))
                    return FullDisk(file, 'w')
            return open(file, mode, *args, **kwargs)
        monkeypatch.setattr(sd, 'open', opener, raising=False)     # what write_atomically opens
        return failed
    return arm


def test_a_full_disk_at_the_second_checkpoint_keeps_the_first_and_resume_continues(voc, tmp_path, fill_disk):
    save = tmp_path / 'ck' / 'origin.pt'
    args = ['--data-dir', voc, '--epochs', '2', '--save', save] + TINY
    failed = fill_disk('origin.pt', after=1)
    line = one_error_line(run_inprocess(ORIGIN_TRAIN, args, tmp_path), save, 'No space left on device',
                          'still holds the last finished epoch', '--resume')
    assert failed and sd.load_torch_file(save)['epoch'] == 1      # the last good checkpoint loads
    assert leftovers(tmp_path) == [], line
    fill_disk('never')      # room again
    res = run_inprocess(ORIGIN_TRAIN, args + ['--resume'], tmp_path)
    assert res.code == 0 and 'resuming' in res.out, res.err
    assert sd.load_torch_file(save)['epoch'] == 2


@pytest.mark.parametrize('target', ['_curves.png', '_results.json', '_results.txt', '_confusion.png', 'out.png',
                                    '_color.png', 'class_pixels'])
def test_every_other_write_on_a_full_disk_is_one_line_and_no_partial_file(voc, tmp_path, fill_disk, target):
    """Curves, results, the confusion matrix, the picture, a folder's predictions: one line naming the file, none
    of it left half-written. The class-count cache is a cache: the run goes on without it."""
    save, data = tmp_path / 'm.pt', tmp_path / 'VOC2012'
    shutil.copytree(voc, data, ignore=shutil.ignore_patterns('class_pixels_*'))   # no count cached yet
    train = ['--data-dir', data, '--epochs', '1', '--model', 'fcn', '--finetune-epochs', '0', '--save', save,
             '--loss', 'weighted_ce'] + TINY
    if target in ('_curves.png', 'class_pixels'):
        failed = fill_disk(target if target != 'class_pixels' else '.json')
        res = run_inprocess(MY_TRAIN, train, tmp_path)
        if target == 'class_pixels':
            assert res.code == 0 and failed and not list(tmp_path.rglob('class_pixels_*')), res.err
        else:
            one_error_line(res, 'my_curves.png', 'No space left on device', '--resume')
            assert sd.load_torch_file(save)['epoch'] == 1
    else:
        assert run_inprocess(MY_TRAIN, train, tmp_path).code == 0
        photos = tmp_path / 'photos'
        photos.mkdir()
        Image.new('RGB', (40, 30)).save(photos / 'a.png')
        failed = fill_disk(target)
        res = run_inprocess(MY_PREDICT, ['--checkpoint', save, '--eval', '--workers', '0', '--picture',
                                         tmp_path / 'out.png', photos, '--out-dir', tmp_path / 'segmented'], tmp_path)
        one_error_line(res, target.lstrip('_'), 'No space left on device')
    assert failed and leftovers(tmp_path) == []


def test_a_checkpoint_that_cannot_be_moved_aside(voc, tmp_path, monkeypatch):
    """Starting anew keeps an existing checkpoint as *.prev.pt: a rename that fails is one line, the file stays."""
    save = tmp_path / 'o.pt'
    args = ['--data-dir', voc, '--epochs', '1', '--save', save] + TINY
    assert run_inprocess(ORIGIN_TRAIN, args, tmp_path).code == 0
    before = save.read_bytes()
    real = os.replace

    def read_only_rename(src, dst):
        if str(dst).endswith('.prev.pt'):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(src, dst)
    monkeypatch.setattr(sd.os, 'replace', read_only_rename)
    one_error_line(run_inprocess(ORIGIN_TRAIN, args, tmp_path), save, 'Read-only file system', '--resume')
    assert save.read_bytes() == before


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a real tmpfs folder, unmounted afterwards; skipped where it cannot be."""
    mounted = []

    def mount(size, read_only=False):
        folder = tmp_path / f'tmpfs{len(mounted)}'
        folder.mkdir()
        options = f'size={size}' + (',ro' if read_only else '')
        if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', folder],
                                               capture_output=True).returncode != 0:
            pytest.skip('mounting a tmpfs needs root (and a machine that allows it)')
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(['umount', '-l', folder], capture_output=True)


def test_a_real_disk_too_small_for_the_next_checkpoint(voc, tmp_path, tmpfs):
    """One checkpoint (about 50 MB) fits, the next one beside it does not: the run stops in one line, the first
    checkpoint loads, no partial file is left on the full disk, and --resume finishes once there is room."""
    disk = tmpfs('75m')
    save = disk / 'origin.pt'
    args = ['--data-dir', voc, '--epochs', '2', '--save', save] + TINY
    one_error_line(run_inprocess(ORIGIN_TRAIN, args, tmp_path), save, 'No space left on device')
    assert sd.load_torch_file(save)['epoch'] == 1 and sorted(os.listdir(disk)) == ['origin.pt']
    subprocess.run(['mount', '-o', 'remount,size=200m', disk], check=True)
    res = run_inprocess(ORIGIN_TRAIN, args + ['--resume'], tmp_path)
    assert res.code == 0, res.err
    assert sd.load_torch_file(save)['epoch'] == 2


def test_a_read_only_folder(voc, tmp_path, tmpfs):
    folder = tmpfs('1m', read_only=True)
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', voc, '--save', folder / 'o.pt'] + FAST, tmp_path)
    one_error_line(res, folder, 'Read-only file system')
    trained = tmp_path / 'o.pt'
    assert run_inprocess(ORIGIN_TRAIN, ['--data-dir', voc, '--save', trained] + FAST, tmp_path).code == 0
    photo = tmp_path / 'photo.png'
    Image.new('RGB', (40, 30)).save(photo)
    res = run_inprocess(ORIGIN_PREDICT, [photo, '--checkpoint', trained, '--out-dir', folder / 'out'], tmp_path)
    one_error_line(res, folder / 'out', 'Read-only file system', '--out-dir')


# ---------------------------------------------------------------------------------- a resumed run is the same run
def cityscapes(root):
    """A tiny Cityscapes tree (official layout, raw label ids, some of which map to 255): the tutorial's
    augmentation trains on it."""
    rng = np.random.default_rng(0)
    for split, n in (('train', 6), ('val', 2)):
        for folder in ('leftImg8bit', 'gtFine'):
            (root / folder / split / 'town').mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)).save(
                root / 'leftImg8bit' / split / 'town' / f'town_{i:06d}_000019_leftImg8bit.png')
            ids = rng.choice([0, 7, 8, 11, 21, 24, 26], size=(48, 96)).astype(np.uint8)
            Image.fromarray(ids).save(root / 'gtFine' / split / 'town' / f'town_{i:06d}_000019_gtFine_labelIds.png')
    return root


@pytest.mark.parametrize('case', ['cutmix', 'copyblob', 'tutorial_augmentation', 'fine_tune_stage', 'dropout'])
def test_resume_is_exact_with_every_random_draw(voc, tmp_path, case):
    """2 epochs, then --resume to 3 (for the fine-tune: its epoch 1, then 2) ends with the weights of an
    uninterrupted run, bit for bit, with each of the run's random draws in play."""
    data = ['--data-dir', voc]
    if case == 'tutorial_augmentation':
        data = ['--dataset', 'cityscapes', '--data-dir', cityscapes(tmp_path / 'cs')]
    extra = {'cutmix': ['--cutmix', '1'], 'copyblob': ['--copyblob', '1', '--copyblob-pairs', 'car:background',
                                                       'person:background', 'bird:background'],
             'tutorial_augmentation': [], 'fine_tune_stage': ['--cutmix', '0.5', '--copyblob', '0.5',
                                                              '--copyblob-pairs', 'car:background'],
             'dropout': ['--batch-size', '4']}[case]    # DeepLabV3's head drops out: the model's own draws
    model = 'deeplabv3_resnet50' if case == 'dropout' else 'fcn'
    common = data + ['--model', model, '--optimizer', 'adam', '--lr', '1e-3', '--seed', '3'] + TINY + extra
    if case == 'fine_tune_stage':
        stop, full = ['--epochs', '2', '--finetune-epochs', '1'], ['--epochs', '2', '--finetune-epochs', '2']
    else:
        stop, full = ['--epochs', '2', '--finetune-epochs', '0'], ['--epochs', '3', '--finetune-epochs', '0']
    straight, resumed = tmp_path / 'straight.pt', tmp_path / 'resumed.pt'
    for args in (full + ['--save', straight], stop + ['--save', resumed], full + ['--save', resumed, '--resume']):
        res = run_inprocess(MY_TRAIN, common + args, tmp_path)
        assert res.code == 0, res.err + res.out
    stage = sd.finetune_path if case == 'fine_tune_stage' else Path
    a, b = sd.load_torch_file(stage(straight)), sd.load_torch_file(stage(resumed))
    assert a['epoch'] == b['epoch'] == (2 if case == 'fine_tune_stage' else 3)
    differ = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert not differ, f'{len(differ)} tensors differ after --resume: {differ[:4]}'
    assert [h['loss'] for h in a['history']] == [h['loss'] for h in b['history']]


def test_the_fine_tune_draws_other_crops_than_the_first_stage(voc, tmp_path, monkeypatch):
    """Its epochs continue the run's count (the curves' axis): the fine-tune's first epoch is not epoch 0 again."""
    epochs, set_epoch = [], sd.SeededSampler.set_epoch
    monkeypatch.setattr(sd.SeededSampler, 'set_epoch', lambda self, e: (epochs.append(e), set_epoch(self, e)))
    res = run_inprocess(MY_TRAIN, ['--data-dir', voc, '--model', 'fcn', '--epochs', '2', '--finetune-epochs', '2',
                                   '--save', 'm.pt'] + TINY, tmp_path)
    assert res.code == 0, res.err
    assert epochs == [0, 1, 2, 3]
    ds = sd.VOCSegDataset(True, (32, 64), voc, normalize=False)
    sampler = sd.SeededSampler(ds, shuffle=True, seed=3)
    crops = []
    for epoch in (0, 2):
        sampler.set_epoch(epoch)
        crops.append(sorted(list(sampler)))     # the same items, other crop seeds
    assert crops[0] != crops[1]


def test_batch_augmentations_draw_from_the_step_alone(monkeypatch):
    """CutMix and CopyBlob take every draw from the generator of (seed, epoch, step, rank) that the loop hands them:
    whatever else has used the global random state (a model's dropout, a library) changes nothing."""
    images, labels = torch.rand(6, 3, 16, 20), torch.zeros(6, 16, 20, dtype=torch.long)
    labels[::2, 3:9, 4:12] = 1
    augment = sd.batch_augment(cutmix=1.0, copyblob_prob=1.0, pairs=[(1, 0)])
    seen = []

    def recorded(X, y, generator):
        state = generator.get_state()
        seen.append([t.clone() for t in augment(X, y, generator)])
        generator.set_state(state)
        return X, y
    model = torch.nn.Conv2d(3, 2, 1)
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        sd.train_epoch(model, [(images, labels)] * 2, sd.cross_entropy_loss,
                            torch.optim.SGD(model.parameters(), lr=0.1), augment=recorded, seed=7)
    (a0, a1), (b0, b1) = seen[:2], seen[2:]
    assert all(torch.equal(u, v) for u, v in zip(a0 + a1, b0 + b1))     # the same draws, whatever the global state
    assert not torch.equal(a0[1], a1[1]) or not torch.equal(a0[0], a1[0])   # step 0 and step 1 draw differently


# ------------------------------------------------------------------------------------------- a preempted job
def start(args, cwd, env=None):
    """A training script in a session of its own (a scheduler signals the whole job: the script and its DataLoader
    workers), stdout read line by line."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env or subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def terminate_mid_epoch(proc, whole_job=True):
    """SIGTERM a moment into epoch 2, to the whole job (as SLURM does) or to the process itself (torchrun forwards
    it to its workers); returns (exit status, stdout, stderr)."""
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith('epoch 1/'):
            break
    time.sleep(0.3)
    (os.killpg if whole_job else os.kill)(proc.pid, signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    return proc.returncode, ''.join(out) + rest, err


def test_sigterm_mid_epoch_stops_like_ctrl_c_and_resume_is_exact(voc, tmp_path):
    """What SLURM or Kubernetes send before they kill a job: exit status 143, one line with what the checkpoint
    holds and how to go on, no traceback (DataLoader workers included), no partial file; --resume then ends with
    the weights of an uninterrupted run."""
    common = [MY_TRAIN, '--data-dir', voc, '--model', 'fcn', '--finetune-epochs', '0', '--cutmix', '1',
              '--batch-size', '2', '--crop-size', '32', '64', '--no-pretrained', '--workers', '2']
    stopped = tmp_path / 'stopped.pt'
    code, out, err = terminate_mid_epoch(start(common + ['--epochs', '200', '--save', stopped], tmp_path))
    assert code == 143 and 'Traceback' not in err and 'Exception' not in err, err
    lines = [line for line in out.splitlines() if line.startswith('terminated')]
    assert len(lines) == 1 and '--resume' in lines[0] and str(stopped) in lines[0], out
    done = sd.load_torch_file(stopped)['epoch']
    assert f'holds {done} finished epoch' in lines[0] and leftovers(tmp_path) == []
    epochs = str(done + 1)
    runs = [start(common + args, tmp_path) for args in (['--epochs', epochs, '--save', stopped, '--resume'],
                                                        ['--epochs', epochs, '--save', 'straight.pt'])]
    for proc in runs:
        code, out, err = finish(proc, timeout=300)
        assert code == 0, err
    a, b = sd.load_torch_file(stopped)['model'], sd.load_torch_file(tmp_path / 'straight.pt')['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_under_torchrun_stops_every_process(voc, tmp_path):
    proc = start_torchrun([ORIGIN_TRAIN, '--data-dir', voc, '--epochs', '200', '--save', 'ddp.pt'] + TINY[:-2] +
                          ['--workers', '1'], tmp_path)
    code, out, err = terminate_mid_epoch(proc, whole_job=False)
    assert code != 0 and proc.poll() is not None
    assert out.count('terminated (SIGTERM): ') == 1, out        # rank 0 says it, once
    ours = [line for line in err.splitlines() if 'origin_train.py' in line or 'some_define.py' in line]
    assert not ours, err        # torchrun prints its own SignalException; our processes print no traceback
    assert sd.load_torch_file(tmp_path / 'ddp.pt')['epoch'] >= 1 and leftovers(tmp_path) == []
    assert subprocess.run(['pgrep', '-f', str(tmp_path)], capture_output=True).stdout == b''


def test_two_nodes_on_one_machine_train_like_one_node(voc, tmp_path):
    """--nnodes 2 (one process a node, gloo, a rendezvous endpoint): the device comes from LOCAL_RANK and the data
    shard from RANK, so two nodes of one process train to the weights of one node of two."""
    common = [ORIGIN_TRAIN, '--data-dir', voc, '--epochs', '1', '--batch-size', '4', '--crop-size', '32', '64',
              '--no-pretrained', '--workers', '0']
    one = start_torchrun(common + ['--save', 'one_node.pt'], tmp_path)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(MY_TRAIN.parent))
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node-rank={n}',
                               '--nproc-per-node=1', '--master-addr=127.0.0.1', f'--master-port={port}',
                               *map(str, common + ['--save', 'two_nodes.pt'])], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    for proc in [one] + nodes:
        code, out, err = finish(proc, timeout=300)
        assert code == 0, err[-3000:]
    a, b = sd.load_torch_file(tmp_path / 'one_node.pt'), sd.load_torch_file(tmp_path / 'two_nodes.pt')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['history'][0]['loss'] == b['history'][0]['loss']
