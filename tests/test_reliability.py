"""Reliability (errors and checkpoints): every user mistake ends with a non-zero exit and ONE line on
stderr that names the file or flag and the fix, never a traceback (also from inside a DataLoader worker); checkpoints
are written atomically, a run resumes exactly, Ctrl-C and a non-finite loss stop cleanly, a pickle that runs code is
refused, and predicting on a folder skips unreadable files without touching the inputs.

CPU only, offline, tiny data (make_demo_voc with 12 + 6 images). Importing torch costs seconds per process, so most
script runs happen in this process (runpy on the script itself, with sys.argv, cwd and stdout/stderr swapped, which
runs the same run_main as `python script.py`); the cases that need a real process (an error raised inside a
DataLoader worker, the offline backbone download, Ctrl-C) run the scripts with subprocess.
"""
import contextlib
import errno
import io
import os
import pickle
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import some_define as sd  # noqa: E402

MAIN = Path(__file__).resolve().parents[1]
ORIGIN_TRAIN, ORIGIN_PREDICT = MAIN / 'origin_train.py', MAIN / 'origin_predict.py'
MY_TRAIN, MY_PREDICT = MAIN / 'my_train.py', MAIN / 'my_predict.py'
BACKBONE_URL = 'https://download.pytorch.org/models/resnet18-f37072fd.pth'
FAST = ['--epochs', '1', '--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']


# ----------------------------------------------------------------------------------------------------- helpers
@dataclass
class Result:
    code: int
    out: str
    err: str


def print_warning(message, category, filename, lineno, file=None, line=None):
    """What an interpreter does with a warning: its text on stderr (pytest would only record it)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_inprocess(script, args, cwd):
    """`python script args` in this process: same run_main, same exit status, same stdout/stderr text.

    An exception that escapes run_main is what the user would see as a traceback: it is put into err as one."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [str(script)] + [str(a) for a in args]
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # a fresh interpreter's warning filters (pytest records warnings instead of printing them)
            warnings.resetwarnings()
            for action, category in (('ignore', DeprecationWarning), ('ignore', PendingDeprecationWarning),
                                     ('ignore', ImportWarning), ('ignore', ResourceWarning)):
                warnings.simplefilter(action, category)
            warnings.showwarning = print_warning
            try:
                runpy.run_path(str(script), run_name='__main__')
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:       # noqa: BLE001 - exactly what would reach the user as a traceback
                err.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return Result(code, out.getvalue(), err.getvalue())


def subprocess_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.update(extra)
    return env


def run_subprocess(script, args, cwd, env=None, timeout=180):
    proc = subprocess.run([sys.executable, str(script)] + [str(a) for a in args], cwd=cwd,
                          env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def one_error_line(res, *must_contain):
    """Non-zero exit, no traceback, exactly one non-empty line on stderr, holding every string of must_contain."""
    report = f'exit {res.code}\n--- stderr:\n{res.err}\n--- stdout (end):\n{res.out[-1500:]}'
    assert res.code != 0, report
    assert 'Traceback' not in res.err, report
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, report
    line = lines[0]
    for text in must_contain:
        assert str(text) in line, f'{text!r} not named in the error line\n{report}'
    return line


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def voc_master(tmp_path_factory):
    """12 training and 6 validation images in the VOC2012 layout (never modified: tests corrupt copies)."""
    return Path(sd.make_demo_voc(tmp_path_factory.mktemp('voc_master') / 'VOC2012', num_train=12, num_val=6))


@pytest.fixture
def voc(tmp_path, voc_master):
    """A private copy of the dataset to break."""
    dst = tmp_path / 'VOC2012'
    shutil.copytree(voc_master, dst)
    return dst


def split_ids(voc_dir, split='train'):
    return (Path(voc_dir) / 'ImageSets' / 'Segmentation' / f'{split}.txt').read_text().split()


def image_path(voc_dir, name):
    return Path(voc_dir) / 'JPEGImages' / f'{name}.jpg'


def label_path(voc_dir, name):
    return Path(voc_dir) / 'SegmentationClass' / f'{name}.png'


def truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def write_palette_label(path, array):
    img = Image.frombytes('P', (array.shape[1], array.shape[0]), array.astype(np.uint8).tobytes())
    img.putpalette(sd.palette().reshape(-1).tolist())
    img.save(path)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, voc_master):
    """A real origin_train.py checkpoint (1 epoch on the tiny data), for the predict-side cases."""
    run_dir = tmp_path_factory.mktemp('trained')
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', voc_master] + FAST, run_dir)
    assert res.code == 0, res.err + res.out
    path = run_dir / 'checkpoints' / 'origin.pt'
    assert path.exists()
    return path


def train_args(voc_dir, *extra):
    return ['--data-dir', voc_dir] + FAST + [str(e) for e in extra]


# The cases that need a process of their own cost an interpreter start each (torch + torchvision: 5-10 s on two
# shared cores): they start in background threads when the module starts and their tests collect the results,
# so they overlap with the in-process cases. Only the jobs of selected tests are started.
def job_truncated_jpeg_in_worker(workdir, voc_master):
    voc_dir = workdir / 'VOC2012'
    shutil.copytree(voc_master, voc_dir)
    path = image_path(voc_dir, split_ids(voc_dir, 'train')[3])
    truncate(path)
    return path, run_subprocess(ORIGIN_TRAIN, train_args(voc_dir, '--workers', '2'), workdir)


def job_backbone_offline(workdir, voc_master):
    empty_home = workdir / 'torch_home'
    empty_home.mkdir()
    proxy = 'http://127.0.0.1:9'    # nothing listens there: the download fails at once, network or not
    env = subprocess_env(TORCH_HOME=str(empty_home), HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy,
                         http_proxy=proxy, NO_PROXY='', no_proxy='')
    args = [a for a in train_args(voc_master) if a != '--no-pretrained']
    return run_subprocess(ORIGIN_TRAIN, args, workdir, env=env)


def hear_ctrl_c():
    """A shell starts a background job (`pytest ... &`) with SIGINT ignored, and its children inherit that: Python then
    installs no Ctrl-C handler and the run below would never stop. A terminal's foreground job hears it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def job_ctrl_c(workdir, voc_master):
    """Ctrl-C in a terminal signals the whole foreground process group: the script and its DataLoader workers.
    Sent once epoch 1 is reported (its checkpoint written, its curves drawn)."""
    save = workdir / 'ck.pt'
    args = train_args(voc_master, '--epochs', '50', '--workers', '2', '--save', save)
    proc = subprocess.Popen([sys.executable, str(ORIGIN_TRAIN)] + [str(a) for a in args], cwd=workdir,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=hear_ctrl_c)
    out_lines, err_chunks, epoch_done = [], [], threading.Event()

    def read_out():
        for line in proc.stdout:
            out_lines.append(line)
            if line.startswith('epoch 1/'):
                epoch_done.set()

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)]
    for t in readers:
        t.start()
    signalled = False
    try:
        if epoch_done.wait(240) and proc.poll() is None:
            signalled = save.exists()
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for t in readers:
        t.join(10)
    return save, signalled, Result(proc.returncode, ''.join(out_lines), ''.join(err_chunks))


class Job(threading.Thread):
    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as err:    # noqa: BLE001 - handed to the test
            self.error = err

    def result(self, timeout=400):
        self.join(timeout)
        assert not self.is_alive(), f'{self.fn.__name__} still running after {timeout} s'
        if self.error is not None:
            raise self.error
        return self.value


JOBS = {
    'test_04b_truncated_jpeg_read_by_a_worker_of_a_real_process': job_truncated_jpeg_in_worker,
    'test_08_backbone_weights_missing_offline': job_backbone_offline,
    'test_16_ctrl_c_stops_cleanly_and_says_resume': job_ctrl_c,
}


@pytest.fixture(scope='module', autouse=True)
def jobs(request, tmp_path_factory, voc_master):
    selected = {item.name for item in request.session.items if getattr(item, 'module', None) is request.module}
    return {name: Job(fn, tmp_path_factory.mktemp(fn.__name__), voc_master)
            for name, fn in JOBS.items() if name in selected}


# ------------------------------------------------------------------------------------------ 1-7: data mistakes
def test_01_missing_data_dir(tmp_path):
    missing = tmp_path / 'no_such_VOC2012'
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', missing] + FAST[2:], tmp_path)
    one_error_line(res, missing, '--download', '--demo')


@pytest.mark.parametrize('case', ['no_data_dir', 'empty_folder'])
def test_01b_cityscapes_missing_names_the_steps_to_get_it(tmp_path, case):
    """Neither Cityscapes nor MiniCity can be downloaded without an account: the line says how to get them."""
    folder = tmp_path / 'minicity'
    folder.mkdir()
    args = ['--dataset', 'cityscapes'] + (['--data-dir', folder] if case == 'empty_folder' else []) + FAST[2:]
    res = run_inprocess(MY_TRAIN, args, tmp_path)
    one_error_line(res, '--data-dir', 'gtFine_trainvaltest.zip', 'leftImg8bit_trainvaltest.zip', 'arrange_images.py',
                   *([folder] if case == 'empty_folder' else []))


def test_02_missing_split_file(tmp_path, voc):
    split = voc / 'ImageSets' / 'Segmentation' / 'val.txt'
    split.unlink()
    res = run_inprocess(ORIGIN_TRAIN, train_args(voc), tmp_path)
    one_error_line(res, split)


def test_02b_empty_split_file_is_not_blamed_on_the_crop(tmp_path, voc):
    """An empty train.txt (a half-copied dataset) must say so, not advise a smaller --crop-size."""
    split = voc / 'ImageSets' / 'Segmentation' / 'train.txt'
    split.write_text('\n')
    res = run_inprocess(ORIGIN_TRAIN, train_args(voc), tmp_path)
    line = one_error_line(res, split)
    assert '--crop-size' not in line, line


@pytest.mark.parametrize('which', ['image', 'label'])
def test_03_id_without_its_image_or_label(tmp_path, voc, which):
    name = split_ids(voc, 'train')[2]
    path = image_path(voc, name) if which == 'image' else label_path(voc, name)
    path.unlink()
    res = run_inprocess(ORIGIN_TRAIN, train_args(voc), tmp_path)
    one_error_line(res, path)


@pytest.mark.parametrize('case', ['garbage_jpeg', 'truncated_png_in_worker'])
def test_04_corrupt_and_truncated_images(tmp_path, voc, case):
    """Garbage bytes fail when the header is read (main process); a file cut in half only when it is decoded, that
    is inside a DataLoader worker with --workers 2: the worker's traceback must not reach the user. (A truncated
    JPEG read by a worker of a real process: test_04b, at the end.)"""
    name = split_ids(voc, 'train')[3]
    if case == 'garbage_jpeg':
        path = image_path(voc, name)
        path.write_bytes(b'this is not a JPEG \x00\x01\x02' * 40)
        res = run_inprocess(ORIGIN_TRAIN, train_args(voc), tmp_path)
    else:
        path = label_path(voc, name)
        truncate(path)
        res = run_inprocess(ORIGIN_TRAIN, train_args(voc, '--workers', '2'), tmp_path)
        assert 'train: ' in res.out, res.out    # the error came from the loop, that is from a worker
    one_error_line(res, path)


def test_05_label_and_image_of_different_sizes(tmp_path, voc):
    name = split_ids(voc, 'train')[1]
    lab = label_path(voc, name)
    arr = np.array(Image.open(lab))
    write_palette_label(lab, np.pad(arr, ((0, 3), (0, 5))))
    res = run_inprocess(ORIGIN_TRAIN, train_args(voc), tmp_path)
    line = one_error_line(res, lab)
    assert 'size' in line, line


def test_06_label_values_outside_the_classes(tmp_path, voc):
    name = split_ids(voc, 'train')[0]
    lab = label_path(voc, name)
    arr = np.array(Image.open(lab))
    arr[:8, :8] = 30
    write_palette_label(lab, arr)
    res = run_inprocess(ORIGIN_TRAIN, train_args(voc), tmp_path)
    line = one_error_line(res, lab)
    assert '30' in line, line


def test_07_every_image_smaller_than_the_crop(tmp_path, voc):
    sizes = {f'{h}x{w}' for h, w in (Image.open(image_path(voc, n)).size[::-1] for n in split_ids(voc, 'train'))}
    args = ['--data-dir', voc, '--epochs', '1', '--batch-size', '4', '--crop-size', '224', '224', '--no-pretrained',
            '--workers', '0']
    res = run_inprocess(ORIGIN_TRAIN, args, tmp_path)
    line = one_error_line(res, '224x224', '--crop-size')
    named = set(re.findall(r'\d+x\d+', line)) - {'224x224'}
    assert named & sizes, f'the largest image seen is not named: {line} (sizes {sorted(sizes)})'


# ----------------------------------------------------------------------------------------- 9: backbone weights
@pytest.mark.parametrize('case', ['not_resnet18', 'no_such_file'])
def test_09_backbone_weights_file_that_is_not_resnet18(tmp_path, voc_master, case):
    weights = tmp_path / 'weights.pth'
    if case == 'not_resnet18':
        torch.save({'conv1.weight': torch.zeros(8, 3, 3, 3), 'fc.bias': torch.zeros(10)}, weights)
    args = [a for a in train_args(voc_master) if a != '--no-pretrained'] + ['--backbone-weights', weights]
    res = run_inprocess(ORIGIN_TRAIN, args, tmp_path)
    one_error_line(res, weights)


@pytest.mark.parametrize('where, model, name', [('cwd', 'fcn', 'resnet18-f37072fd.pth'),
                                                ('flag', 'fcn', 'resnet18-f37072fd.pth'),
                                                ('torch_cache', 'fcn', 'resnet18-f37072fd.pth'),
                                                ('cwd', 'deeplabv3_resnet50', 'resnet50-0676ba61.pth'),
                                                ('flag', 'deeplabv3_resnet101', 'resnet101-63fe2227.pth')])
def test_09b_a_file_under_the_official_name_that_is_not_that_file(tmp_path, voc_master, monkeypatch, where, model,
                                                                   name):
    """A 580 KB file circulates as resnet18-f37072fd.pth: its sha256 does not start with f37072fd (torchvision's
    naming convention), so it stops the run in one line with its size, not in the unpickler."""
    folder = {'cwd': tmp_path, 'flag': tmp_path / 'elsewhere', 'torch_cache': tmp_path / 'hub' / 'checkpoints'}[where]
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / name
    fake.write_bytes(b'<!DOCTYPE html>' + bytes(580_000))      # what a saved download page looks like
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    args = [a for a in train_args(voc_master, '--model', model, '--finetune-epochs', '0') if a != '--no-pretrained']
    res = run_inprocess(MY_TRAIN, args + (['--backbone-weights', fake] if where == 'flag' else []), tmp_path)
    one_error_line(res, fake, '580,015 bytes', name.split('-')[1][:8], '--no-pretrained')


# ------------------------------------------------------------------------------------------ 10-11: checkpoints
@pytest.mark.parametrize('case', ['19_classes_origin_predict', '19_classes_my_predict', 'weights_do_not_fit'])
def test_10_checkpoint_of_another_model(tmp_path, trained, case):
    ckpt = torch.load(trained, weights_only=True)
    if case.startswith('19_classes'):
        ckpt['model'] = sd.build_model('fcn', num_classes=19).state_dict()
        ckpt['model_args'] = dict(ckpt['model_args'], num_classes=19)
        ckpt['num_classes'] = 19
        assert ckpt['config']['dataset'] == 'voc'
    else:
        ckpt['model']['final_conv.weight'] = torch.zeros(5, 512, 1, 1)
    path = tmp_path / 'other.pt'
    torch.save(ckpt, path)
    script = MY_PREDICT if case.endswith('my_predict') else ORIGIN_PREDICT
    res = run_inprocess(script, ['--checkpoint', path, '--workers', '0'], tmp_path)
    line = one_error_line(res, path)
    if case.startswith('19_classes'):
        assert '19' in line, line


@pytest.mark.parametrize('case', ['predict', 'train_resume'])
def test_11_truncated_checkpoint(tmp_path, trained, voc_master, case):
    path = tmp_path / 'cut.pt'
    shutil.copy(trained, path)
    truncate(path)
    if case == 'predict':
        res = run_inprocess(ORIGIN_PREDICT, ['--checkpoint', path, '--workers', '0'], tmp_path)
    else:
        res = run_inprocess(ORIGIN_TRAIN, train_args(voc_master, '--save', path, '--resume'), tmp_path)
    one_error_line(res, path)


# ------------------------------------------------------------------------------------------ 12: unknown names
@pytest.mark.parametrize('script, flag', [(MY_TRAIN, '--model'), (MY_TRAIN, '--loss'), (MY_TRAIN, '--norm'),
                                          (MY_TRAIN, '--optimizer'), (ORIGIN_PREDICT, '--dataset')])
def test_12_unknown_name_is_rejected_by_argparse(tmp_path, script, flag):
    res = run_inprocess(script, [flag, 'nope'], tmp_path)
    assert res.code == 2, res
    assert 'Traceback' not in res.err, res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    errors = [line for line in lines if 'error:' in line]
    assert len(errors) == 1 and errors[0] == lines[-1], res.err
    assert flag in errors[0] and 'nope' in errors[0], res.err
    assert all(line.startswith(('usage:', ' ')) for line in lines[:-1]), res.err


def test_12b_unknown_names_raise_user_error():
    with pytest.raises(sd.UserError, match='nope'):
        sd.build_model('nope')


# ------------------------------------------------------------------------------------ 13: unwritable outputs
@pytest.mark.parametrize('case', ['train_save', 'predict_out_dir', 'predict_picture'])
def test_13_output_folder_that_cannot_be_written(tmp_path, trained, voc_master, case):
    blocker = tmp_path / 'a_regular_file'
    blocker.write_text('not a folder')
    target = blocker / 'sub'
    if case == 'train_save':
        res = run_inprocess(ORIGIN_TRAIN, train_args(voc_master, '--save', target / 'x.pt'), tmp_path)
        assert not (tmp_path / 'pictures').exists() or not list((tmp_path / 'pictures').iterdir())
    elif case == 'predict_out_dir':
        img = tmp_path / 'photo.jpg'
        shutil.copy(image_path(voc_master, split_ids(voc_master, 'val')[0]), img)
        res = run_inprocess(ORIGIN_PREDICT, [img, '--checkpoint', trained, '--out-dir', target, '--workers', '0'],
                            tmp_path)
    else:
        res = run_inprocess(ORIGIN_PREDICT, ['--checkpoint', trained, '--picture', target / 'out.png',
                                             '--workers', '0'], tmp_path)
    one_error_line(res, target)


# ------------------------------------------------------------------------------------ 14: atomic checkpoints
def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_14_save_checkpoint_failing_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / 'ck.pt'
    old = {'epoch': 1, 'w': torch.arange(1000.0)}
    sd.save_checkpoint(old, path)
    new = {'epoch': 2, 'w': torch.ones(100_000)}
    real_save = torch.save

    def half_then(exc):
        def save(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            raise exc
        return save

    monkeypatch.setattr(torch, 'save', half_then(OSError(errno.ENOSPC, 'No space left on device')))
    with pytest.raises(sd.UserError) as info:       # disk full: one line naming the checkpoint
        sd.save_checkpoint(new, path)
    assert str(path) in str(info.value)
    assert_same(sd.load_torch_file(path), old)

    monkeypatch.setattr(torch, 'save', half_then(KeyboardInterrupt()))     # Ctrl-C in the middle of the write
    with pytest.raises(KeyboardInterrupt):
        sd.save_checkpoint(new, path)
    assert_same(sd.load_torch_file(path), old)

    monkeypatch.setattr(torch, 'save', real_save)
    sd.save_checkpoint(new, path)
    assert_same(sd.load_torch_file(path), new)


def test_14b_kill_during_save_checkpoint_keeps_the_previous_one(tmp_path):
    """SIGKILL a forked writer at various moments of a 64 MB save: the path holds the old or the new checkpoint,
    whole, never a torn one; at least one kill must land while the temporary file is being written."""
    path = tmp_path / 'ck.pt'
    old = {'epoch': 1, 'w': torch.arange(1000.0)}
    new = {'epoch': 2, 'w': torch.ones(16_000_000)}
    sd.save_checkpoint(old, path)
    mid_save_kills = 0
    for delay in (0.0, 0.003, 0.01, 0.03, 0.06, 0.1, 0.2):
        for tmp in tmp_path.glob('ck.pt.*.tmp'):      # what the last killed writer left
            tmp.unlink()
        pid = os.fork()
        if pid == 0:                                    # the child: write, then vanish without cleanup
            try:
                sd.save_checkpoint(new, path)
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        got = sd.load_torch_file(path)
        if got['epoch'] == 1:
            assert_same(got, old)
            if os.WIFSIGNALED(status) and list(tmp_path.glob(f'ck.pt.{pid}.tmp')):
                mid_save_kills += 1
        else:
            assert_same(got, new)
            sd.save_checkpoint(old, path)
    assert mid_save_kills >= 1, 'no kill landed during a save: the test did not test anything'


# ------------------------------------------------------------------------------------------- 15: exact resume
def test_15_resume_is_exact(tmp_path, voc_master):
    common = ['--data-dir', voc_master, '--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained',
              '--workers', '0', '--seed', '0', '--model', 'fcn', '--optimizer', 'adam', '--lr', '1e-3',
              '--finetune-epochs', '0']
    a, b = tmp_path / 'a.pt', tmp_path / 'b.pt'
    res = run_inprocess(MY_TRAIN, common + ['--epochs', '2', '--save', a], tmp_path)
    assert res.code == 0, res.err
    res = run_inprocess(MY_TRAIN, common + ['--epochs', '1', '--save', b], tmp_path)
    assert res.code == 0, res.err
    assert torch.load(b, weights_only=True)['epoch'] == 1
    res = run_inprocess(MY_TRAIN, common + ['--epochs', '2', '--save', b, '--resume'], tmp_path)
    assert res.code == 0, res.err
    assert 'resuming' in res.out
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca['epoch'] == cb['epoch'] == 2
    assert ca['model'].keys() == cb['model'].keys()
    differ = [k for k in ca['model'] if not torch.equal(ca['model'][k], cb['model'][k])]
    assert not differ, f'weights differ after resume: {differ[:5]}'
    keys = ('epoch', 'loss', 'train_acc', 'test_acc', 'test_miou')
    assert [[h[k] for k in keys] for h in ca['history']] == [[h[k] for k in keys] for h in cb['history']]


# -------------------------------------------------------------------------------------- 17: non-finite loss
def test_17_non_finite_loss_stops_with_epoch_and_step(tmp_path, voc_master):
    save = tmp_path / 'ck.pt'
    res = run_inprocess(ORIGIN_TRAIN, train_args(voc_master, '--epochs', '3', '--lr', '1e6', '--save', save),
                        tmp_path)
    line = one_error_line(res, '--lr')
    assert re.search(r'epoch \d+, step \d+', line), line


def test_17b_the_kept_checkpoint_is_a_good_one(tmp_path, voc_master):
    """One step per epoch (batch 12 of 12) and lr 1e4: the first update makes the weights huge but finite (BatchNorm
    keeps the activations in range), later ones overflow (at epoch 3 on an Intel Xeon). The message names the last
    good epoch and says its checkpoint is kept; that file holds that epoch, finite weights and a finite history: an
    epoch whose update made the weights inf/nan is never saved."""
    save = tmp_path / 'ck.pt'
    args = train_args(voc_master, '--epochs', '6', '--batch-size', '12', '--lr', '1e4', '--save', save)
    res = run_inprocess(ORIGIN_TRAIN, args, tmp_path)
    line = one_error_line(res, '--lr')
    match = re.search(r'epoch (\d+), step 1; (.+) \(epoch (\d+)\) is kept', line)
    assert match, line
    failed, kept = int(match.group(1)), int(match.group(3))
    assert Path(match.group(2)) == save and kept == failed - 1 >= 1, line
    ckpt = sd.load_torch_file(save)
    assert ckpt['epoch'] == kept and len(ckpt['history']) == kept
    bad = [k for k, v in ckpt['model'].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f'{save} (epoch {ckpt["epoch"]}), said to be kept, holds non-finite weights: {bad[:4]}'
    assert all(np.isfinite(h['loss']) for h in ckpt['history'])


# ----------------------------------------------------------------------------------------- 18: safe loading
class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('writer', ['torch_save', 'plain_pickle'])
def test_18_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / 'pwned_x'
    path = tmp_path / 'evil.pt'
    payload = {'model': RunsCode(marker), 'model_args': {'name': 'fcn'}}
    if writer == 'torch_save':
        torch.save(payload, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(payload, f)
    with pytest.raises(sd.UserError) as info:
        sd.load_torch_file(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    res = run_inprocess(ORIGIN_PREDICT, ['--checkpoint', path, '--workers', '0'], tmp_path)
    one_error_line(res, path)
    assert not marker.exists()


# -------------------------------------------------------------------------------------- 19: predict a folder
def test_19_predict_folder_skips_unreadable_files(tmp_path, trained, voc_master):
    photos = tmp_path / 'photos'
    photos.mkdir()
    val = split_ids(voc_master, 'val')
    shutil.copy(image_path(voc_master, val[0]), photos / 'a.jpg')
    Image.open(image_path(voc_master, val[1])).save(photos / 'b.png')
    (photos / 'c.jpg').write_bytes(b'garbage, not an image' * 20)
    shutil.copy(image_path(voc_master, val[2]), photos / 'd.jpg')
    truncate(photos / 'd.jpg')
    (photos / 'notes.txt').write_text('not an image, not an image suffix')
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out_dir = tmp_path / 'out'
    res = run_inprocess(ORIGIN_PREDICT, [photos, '--checkpoint', trained, '--out-dir', out_dir, '--workers', '0'],
                        tmp_path)
    assert res.code == 0, res.err + res.out
    assert 'Traceback' not in res.err, res.err
    warned = [line for line in res.err.splitlines() if line.strip()]
    assert len(warned) == 2, res.err
    assert any(str(photos / 'c.jpg') in w for w in warned) and any(str(photos / 'd.jpg') in w for w in warned), res.err
    assert re.search(r'skipped 2\b', res.out), res.out
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before, 'an input file was changed'
    outputs = {p.name for p in out_dir.iterdir()}
    assert {'a_color.png', 'a_overlay.png', 'a_labels.png', 'b_color.png', 'b_overlay.png', 'b_labels.png'} <= outputs
    assert not outputs & set(before)


def test_19b_predict_into_the_input_folder_never_overwrites_an_input(tmp_path, trained, voc_master):
    """--out-dir = the input folder (a natural thing to type): cat.jpg's output cat_color.png must not replace the
    input photo cat_color.png, which comes later in the same folder."""
    photos = tmp_path / 'photos'
    photos.mkdir()
    val = split_ids(voc_master, 'val')
    shutil.copy(image_path(voc_master, val[0]), photos / 'cat.jpg')
    Image.open(image_path(voc_master, val[1])).save(photos / 'cat_color.png')
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    res = run_inprocess(ORIGIN_PREDICT, [photos, '--checkpoint', trained, '--out-dir', photos, '--workers', '0'],
                        tmp_path)
    assert 'Traceback' not in res.err, res.err
    after = {name: (photos / name).read_bytes() for name in before}
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f'inputs overwritten by outputs: {changed}\n{res.err}{res.out}'


# ------------------------------------------------------------- 4b, 8, 16: in a process of their own (see JOBS)
# Last in the file, so that the in-process cases above run while these processes work.
def test_04b_truncated_jpeg_read_by_a_worker_of_a_real_process(jobs, request):
    path, res = jobs[request.node.name].result()
    one_error_line(res, path)
    assert 'train: ' in res.out, res.out        # the header was fine: the worker's decoding failed


def test_08_backbone_weights_missing_offline(jobs, request):
    if (MAIN / 'resnet18-f37072fd.pth').exists():
        pytest.skip('resnet18-f37072fd.pth lies next to the scripts: nothing to download')
    res = jobs[request.node.name].result()
    one_error_line(res, BACKBONE_URL, '--no-pretrained')


def test_16_ctrl_c_stops_cleanly_and_says_resume(jobs, request):
    save, signalled, res = jobs[request.node.name].result()
    report = f'exit {res.code}\n--- stderr:\n{res.err}\n--- stdout:\n{res.out}'
    assert signalled, 'epoch 1 never finished, or left no checkpoint:\n' + report
    assert res.code == 130, report
    assert 'Traceback' not in res.err, report
    assert '--resume' in res.out + res.err, report
    ckpt = sd.load_torch_file(save)
    assert ckpt['epoch'] >= 1 and len(ckpt['history']) == ckpt['epoch']


def test_19c_predict_own_images_needs_no_dataset(tmp_path, voc_master):
    """A checkpoint and some photos are enough: segmenting them must not look for the training data (here deleted)."""
    voc = tmp_path / 'VOC2012'
    shutil.copytree(voc_master, voc)
    res = run_inprocess(ORIGIN_TRAIN, train_args(voc, '--save', tmp_path / 'ck.pt'), tmp_path)
    assert res.code == 0, res.err
    photo = tmp_path / 'photo.jpg'
    shutil.copy(image_path(voc, split_ids(voc, 'val')[0]), photo)
    shutil.rmtree(voc)
    res = run_inprocess(ORIGIN_PREDICT, [photo, '--checkpoint', tmp_path / 'ck.pt', '--out-dir', tmp_path / 'out'],
                        tmp_path)
    assert res.code == 0, res.err + res.out
    assert (tmp_path / 'out' / 'photo_labels.png').exists()
