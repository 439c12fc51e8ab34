"""The four scripts end to end (origin_train -> origin_predict, my_train -> my_predict) on the tiny demo
data, as a user runs them: `python <script>` in a working folder, which receives checkpoints/ and pictures/.

Every run happens once, in one module fixture: the two trainings side by side (one thread each on two cores), the
origin prediction as soon as its checkpoint is there, then my_predict.py, which evaluates and compares all three
checkpoints. The --help checks run the script files in this process (runpy, as __main__), importing torch once.
"""
import argparse
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
sys.path.insert(0, str(MAIN))
import some_define as sd  # noqa: E402

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


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert('RGB'))


def test_training_curves(runs, tmp_path):
    """The curves picture of each run is the plot of its checkpoint's history (for my_train.py, stage 1's epochs
    then the fine-tune's), titled with its recipe and data: redrawn here from the checkpoints, pixel for pixel."""
    get(runs, 'origin_train')
    get(runs, 'my_train')
    ck, pictures = runs['cwd'] / 'checkpoints', runs['cwd'] / 'pictures'
    origin, first, second = (torch.load(ck / name, weights_only=True) for name in
                             ('origin.pt', 'my.pt', 'my_finetune.pt'))
    for picture, history, config, start in (('origin_curves.png', origin['history'], origin['config'], 0),
                                            ('my_curves.png', first['history'] + second['history'], second['config'],
                                             len(first['history']))):
        assert_png(pictures / picture)
        title = f'{sd.recipe_title(config)} - {config["data_title"]}'
        sd.plot_history(history, tmp_path / picture, title, start)
        assert np.array_equal(pixels(pictures / picture), pixels(tmp_path / picture)), picture
    assert len(first['history'] + second['history']) == 2
    sd.plot_history(first['history'], tmp_path / 'stage1.png', title)      # the control: another history differs
    assert not np.array_equal(pixels(pictures / 'my_curves.png'), pixels(tmp_path / 'stage1.png'))
    # the fine-tune is marked where it starts, with its lr: without the mark the picture differs
    sd.plot_history(first['history'] + second['history'], tmp_path / 'unmarked.png', title)
    assert not np.array_equal(pixels(pictures / 'my_curves.png'), pixels(tmp_path / 'unmarked.png'))


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
    """my_predict.py --eval with no other flag: the fine-tune's checkpoint draws my_out.png, and each checkpoint of
    the default comparison (origin, my, my_finetune: all there) is evaluated on the whole val split, its figures
    those of its own weights (evaluated again here)."""
    run = get(runs, 'my_predict')
    assert_png(runs['cwd'] / 'pictures' / 'my_out.png')
    assert_png(runs['cwd'] / 'pictures' / 'compare.png')
    assert 'wrote pictures/my_out.png' in run.out and 'wrote pictures/compare.png' in run.out
    val = sd.VOCSegDataset(False, None, runs_data_dir(runs), normalize=False)
    for name in ('origin', 'my', 'my_finetune'):    # every checkpoint of the comparison is evaluated
        r = check_results(runs['cwd'] / 'checkpoints' / f'{name}_results.json')
        assert f'checkpoints/{name}.pt on {len(val)} val images' in run.out
        net, _ = sd.load_model(runs['cwd'] / 'checkpoints' / f'{name}.pt', torch.device('cpu'))
        again = sd.evaluate_full(net, val, num_workers=0).compute()
        assert r['images'] == len(val) and r['pixels'] == again['pixels'] > 0
        for key in ('pixel_acc', 'miou', 'fwiou'):
            assert r[key] == pytest.approx(again[key], abs=1e-12), (name, key)


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


def script_parser(script, monkeypatch):
    """The ArgumentParser the script builds (caught when it parses, before anything runs)."""
    parsers = []

    def caught(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', caught)
    monkeypatch.setattr(sys, 'argv', [str(script)])
    with pytest.raises(SystemExit):
        runpy.run_path(str(script), run_name='__main__')
    monkeypatch.undo()
    return parsers[0]


@pytest.mark.parametrize('script,flags', [(ORIGIN_TRAIN, COMMON_FLAGS), (MY_TRAIN, COMMON_FLAGS + MY_FLAGS),
                                          (ORIGIN_PREDICT, []), (MY_PREDICT, ['--compare'])])
def test_help_mentions_every_flag(script, flags, monkeypatch):
    """`python SCRIPT --help` lists every flag the script accepts (every option string of its parser, and those the
    test names), each with its default; docs/flags.md names every flag."""
    text = script_help(script)
    actions = [a for a in script_parser(script, monkeypatch)._actions if not isinstance(a, argparse._HelpAction)]
    accepted = [o for a in actions for o in a.option_strings]
    assert set(flags) <= set(accepted)
    missing = [f for f in accepted if not re.search(re.escape(f) + r'(?![\w-])', text)]
    assert not missing, f'{script.name} --help lacks {missing}'
    assert not [a.dest for a in actions if 'default' not in (a.help or '')], 'help without its default'
    flags_doc = (MAIN / 'docs' / 'flags.md').read_text()
    undocumented = [a.option_strings or a.dest for a in actions if a.option_strings and not any(
        re.search(re.escape(o) + r'(?![\w-])', flags_doc) for o in a.option_strings)]
    assert not undocumented, f'docs/flags.md does not name {undocumented}'


# ------------------------------------------------------------------------------------- the README's first command
def test_the_readmes_first_command(tmp_path, monkeypatch):
    """The README's first command (`python origin_train.py --demo && python origin_predict.py && python my_train.py
    --demo && python my_predict.py --eval`, read from README.md), its flags as written, shortened by --epochs 1 (and
    one epoch of fine-tune; a 12 + 6 image demo written beforehand where --demo looks, which it then reuses), in a
    copy of the scripts and of some_define.py (whose data/, checkpoints/ and pictures/ are the copy's), run in this
    process. The --demo recipe applies where no flag overrides it; the predict scripts need no flag; my_predict.py
    evaluates the fine-tune and compares the three checkpoints; every picture says DEMO."""
    import importlib.util
    from test_readme import first_command
    from test_reliability import run_inprocess
    shorter = {'origin_train.py': ['--epochs', '1'], 'my_train.py': ['--epochs', '1', '--finetune-epochs', '1']}
    runs = [(script, args + shorter.get(script, [])) for script, args in first_command()]
    app = tmp_path / 'clone'
    app.mkdir()
    for name in ('some_define.py', 'origin_train.py', 'origin_predict.py', 'my_train.py', 'my_predict.py'):
        shutil.copy(MAIN / name, app / name)
    spec = importlib.util.spec_from_file_location('some_define', app / 'some_define.py')
    clone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clone)
    monkeypatch.setitem(sys.modules, 'some_define', clone)          # what the copied scripts import
    assert clone.DEMO_DIR == app / 'data' / 'demo' / 'VOC2012'
    clone.make_demo_voc(clone.DEMO_DIR, num_train=12, num_val=6)
    titles, grid = [], clone.save_image_grid
    monkeypatch.setattr(clone, 'save_image_grid', lambda path, rows, title, **kw: (
        titles.append((Path(path).name, title)), grid(path, rows, title, **kw))[1])
    for script, args in runs:
        res = run_inprocess(app / script, args, app)
        assert res.code == 0, f'{script} {args}\n{res.err}\n{res.out[-3000:]}'
    ck = app / 'checkpoints'
    origin, mine, tuned = (torch.load(ck / n, weights_only=True) for n in ('origin.pt', 'my.pt', 'my_finetune.pt'))
    for c, lr in ((origin, 1e-3), (mine, 1e-3), (tuned, 1e-3)):
        cfg = c['config']
        assert (cfg['crop_size'], cfg['batch_size'], cfg['pretrained'], cfg['lr']) == ([64, 96], 8, False, lr)
        assert Path(cfg['data_dir']) == clone.DEMO_DIR and cfg['data_title'] == 'DEMO data (synthetic)'
    assert tuned['config']['stage'] == 'finetune' and tuned['config']['finetune_lr'] == 1e-4
    assert (origin['model_args']['name'], mine['model_args']['name']) == ('fcn', 'resnet_unet')
    assert [name for name, _ in titles] == ['origin_out.png', 'my_out.png', 'compare.png']
    assert all('DEMO data (synthetic)' in title for _, title in titles), titles
    for name in ('origin', 'my', 'my_finetune'):
        assert json.loads((ck / f'{name}_results.json').read_text())['images'] == 6
    for picture in ('origin_out.png', 'my_out.png', 'compare.png', 'origin_curves.png', 'my_curves.png'):
        assert_png(app / 'pictures' / picture)
