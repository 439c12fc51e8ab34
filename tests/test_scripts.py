"""The four scripts end to end (origin_train -> origin_predict, my_train -> my_predict) on the tiny demo
data, as a user runs them: `python <script>` in a working folder, which receives checkpoints/ and pictures/.

Every run happens once, in one module fixture: the two trainings side by side (one thread each on two cores), the
origin prediction as soon as its checkpoint is there, then my_predict.py, which evaluates and compares all three
checkpoints. The --help checks run the script files in this process (runpy, as __main__), importing torch once.
"""
import contextlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

MAIN = Path(__file__).resolve().parents[1]
ORIGIN_TRAIN, ORIGIN_PREDICT = MAIN / 'origin_train.py', MAIN / 'origin_predict.py'
MY_TRAIN, MY_PREDICT = MAIN / 'my_train.py', MAIN / 'my_predict.py'
FAST = ['--epochs', '1', '--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
TIMEOUT = 300


class Run:
    """A script started in the background, its stdout/stderr in files (no pipe to fill up)."""

    def __init__(self, script, args, cwd, name):
        self.name, self.cwd = name, cwd
        env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
        self.out_path, self.err_path = cwd / f'{name}.stdout', cwd / f'{name}.stderr'
        self.cmd = [sys.executable, str(script), *map(str, args)]
        with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
            self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)

    def wait(self):
        try:
            self.code = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.code = 'timeout'
        self.out, self.err = self.out_path.read_text(), self.err_path.read_text()
        return self

    def check(self):
        assert self.code == 0, f'{" ".join(self.cmd)} -> {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err[-3000:]}'


@pytest.fixture(scope='module')
def runs(demo_voc, tmp_path_factory):
    cwd = tmp_path_factory.mktemp('work')
    photos = cwd / 'photos'
    photos.mkdir()
    names = (demo_voc / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()[:2]
    shutil.copy(demo_voc / 'JPEGImages' / f'{names[0]}.jpg', photos / 'first.jpg')
    with Image.open(demo_voc / 'JPEGImages' / f'{names[1]}.jpg') as img:
        img.save(photos / 'second.png')

    data = ['--data-dir', demo_voc]
    start = time.time()
    origin_train = Run(ORIGIN_TRAIN, data + FAST, cwd, 'origin_train')
    my_train = Run(MY_TRAIN, data + FAST + ['--finetune-epochs', '1'], cwd, 'my_train')
    origin_train.wait()
    origin_predict = None
    if origin_train.code == 0:
        origin_predict = Run(ORIGIN_PREDICT, ['--eval', '--workers', '0', photos, '--out-dir', 'segmented'], cwd,
                             'origin_predict')
    my_train.wait()
    if origin_predict is not None:
        origin_predict.wait()
    my_predict = None
    if my_train.code == 0:
        my_predict = Run(MY_PREDICT, ['--eval', '--workers', '0'], cwd, 'my_predict').wait()
    print(f'scripts: {time.time() - start:.0f} s')
    return dict(cwd=cwd, photos=photos, origin_train=origin_train, my_train=my_train,
                origin_predict=origin_predict, my_predict=my_predict)


def get(runs, name):
    run = runs[name]
    if run is None:
        pytest.fail(f'{name} did not run: the training before it failed')
    run.check()
    return run


def assert_png(path):
    assert path.exists(), f'{path} was not written'
    assert path.read_bytes()[:8] == PNG_MAGIC, f'{path} is not a PNG'
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        img.load()
        assert img.size[0] > 10 and img.size[1] > 10
        return img.size, img.mode


# --------------------------------------------------------------------------------------------------- training
EPOCH_LINE = re.compile(r'epoch 1/1: loss [\d.]+, train acc [\d.]+, test acc [\d.]+, test mIoU [\d.]+')
SPEED_LINE = re.compile(r'[\d.]+ examples/sec')


@pytest.mark.parametrize('name', ['origin_train', 'my_train'])
def test_train_report(runs, name):
    run = get(runs, name)
    assert EPOCH_LINE.search(run.out), run.out
    assert SPEED_LINE.search(run.out.strip().splitlines()[-1]), 'examples/sec is the last line'
    assert 'read ' in run.out and ' examples' in run.out
    if name == 'my_train':   # two stages, each reporting its epoch and speed
        assert len(EPOCH_LINE.findall(run.out)) == 2 and len(SPEED_LINE.findall(run.out)) == 2, run.out


def test_checkpoints_written(runs):
    get(runs, 'origin_train')
    get(runs, 'my_train')
    ck = runs['cwd'] / 'checkpoints'
    for name, model in (('origin.pt', 'fcn'), ('my.pt', 'resnet_unet'), ('my_finetune.pt', 'resnet_unet')):
        path = ck / name
        assert path.exists(), f'{path} missing'
        c = torch.load(path, map_location='cpu', weights_only=True)
        assert c['model_args']['name'] == model and c['model_args']['num_classes'] == 21
        assert c['epoch'] == 1 and len(c['history']) == 1
        assert {'loss', 'train_acc', 'test_acc', 'test_miou'} <= set(c['history'][0])
        assert c['config']['crop_size'] == [32, 64]
        assert Path(c['config']['data_dir']).resolve() == runs_data_dir(runs)
    assert not list(ck.glob('*.tmp'))


def runs_data_dir(runs):
    return Path(runs['origin_train'].cmd[runs['origin_train'].cmd.index('--data-dir') + 1]).resolve()


def test_training_curves(runs):
    get(runs, 'origin_train')
    get(runs, 'my_train')
    assert_png(runs['cwd'] / 'pictures' / 'origin_curves.png')
    assert_png(runs['cwd'] / 'pictures' / 'my_curves.png')


# ------------------------------------------------------------------------------------------------- prediction
def test_origin_predict_picture_and_results(runs):
    run = get(runs, 'origin_predict')
    assert 'pictures/origin_out.png' in run.out
    assert_png(runs['cwd'] / 'pictures' / 'origin_out.png')
    check_results(runs['cwd'] / 'checkpoints' / 'origin_results.json')


def check_results(path):
    assert path.exists(), f'{path} missing'
    r = json.loads(path.read_text())
    assert {'pixel_acc', 'mean_acc', 'miou', 'fwiou', 'iou'} <= set(r)
    for key in ('pixel_acc', 'mean_acc', 'miou', 'fwiou'):
        assert 0 <= r[key] <= 1, (key, r[key])
    assert len(r['iou']) == 21
    return r


def test_predict_on_image_folder(runs):
    get(runs, 'origin_predict')
    out = runs['cwd'] / 'segmented'
    for stem, suffix in (('first', '.jpg'), ('second', '.png')):
        with Image.open(runs['photos'] / f'{stem}{suffix}') as img:
            size = img.size
        for kind in ('color', 'overlay', 'labels'):
            got, mode = assert_png(out / f'{stem}_{kind}.png')
            assert got == size, f'{stem}_{kind}.png is {got}, the input {size}'
        with Image.open(out / f'{stem}_labels.png') as labels:
            assert labels.mode == 'P'
            assert np.array(labels).max() < 21
    assert sorted(p.name for p in runs['photos'].iterdir()) == ['first.jpg', 'second.png'], 'inputs touched'


def test_my_predict_pictures_and_results(runs):
    run = get(runs, 'my_predict')
    assert_png(runs['cwd'] / 'pictures' / 'my_out.png')
    size, _ = assert_png(runs['cwd'] / 'pictures' / 'compare.png')
    assert 'compare.png' in run.out
    for name in ('origin', 'my', 'my_finetune'):    # every checkpoint of the comparison is evaluated
        check_results(runs['cwd'] / 'checkpoints' / f'{name}_results.json')
        assert f'checkpoints/{name}.pt on ' in run.out


# ------------------------------------------------------------------------------------------------------- help
COMMON_FLAGS = ['--data-dir', '--download', '--demo', '--device', '--seed', '--epochs', '--batch-size', '--lr',
                '--crop-size', '--no-pretrained', '--backbone-weights', '--save', '--resume', '--void-as-background']
MY_FLAGS = ['--optimizer', '--finetune-epochs', '--finetune-lr', '--model', '--loss', '--norm', '--cutmix',
            '--copyblob', '--accum-steps', '--channels-last', '--cudnn-benchmark', '--compile', '--amp']


def script_help(script):
    """`python script --help`, run as __main__ in this process (torch is imported once for the whole module)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [str(script), '--help']
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name='__main__')
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None)
    return out.getvalue()


@pytest.mark.parametrize('script,flags', [(ORIGIN_TRAIN, COMMON_FLAGS), (MY_TRAIN, COMMON_FLAGS + MY_FLAGS)])
def test_help_mentions_every_flag(script, flags):
    text = script_help(script)
    missing = [f for f in flags if not re.search(re.escape(f) + r'(?![\w-])', text)]
    assert not missing, f'{script.name} --help lacks {missing}'
