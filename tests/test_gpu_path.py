"""The GPU's default path, run whole by the scripts, as a user runs them.

On the CPU (plain `python -m pytest tests`) the scripts get what a GPU gets by default, by flag where there is one:
mixed precision (the CPU's bf16), channels_last, the splits kept on the device, and the U-Net's matrix upsample
(forced by `Upsample2x.everywhere`); plus the fp16 + GradScaler path of a GPU without bf16. With
`python -m pytest tests --device cuda` the same tests run on the GPU with no such flag: its own defaults (AMP,
channels_last, data on the device, cudnn.benchmark). Both recipes and their fine-tune, --resume after a kill,
--eval --mst, own data with focal + class weights, CutMix + CopyBlob, DeepLabV3 + aux, and torchrun with nccl where
there are two GPUs. A crash, a non-finite loss (the loop stops on one) or a non-finite figure fails.
"""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import some_define as sd
from test_distributed import as_folder, start_torchrun
from conftest import finish
from test_reliability import MY_PREDICT, MY_TRAIN, ORIGIN_PREDICT, ORIGIN_TRAIN, run_inprocess

TINY = ['--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']
# A CPU without bf16 instructions (AVX2 only) runs bf16 convolutions tens of times slower than fp32: there the same
# path runs on fewer and smaller val images, at fewer scales.
NATIVE_BF16 = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)()
SCALES = ['--mst', '--scales', '0.75', '1.0', '1.5'][:None if NATIVE_BF16 else 4]   # multi-scale + flip
# A script run in a process of its own, with the CUDA-only branches taken on the CPU too when asked.
LAUNCHER = '''
import runpy, sys
import some_define as sd
sd.Upsample2x.everywhere = sys.argv[1] == 'cpu'
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    return Path(sd.make_demo_voc(tmp_path_factory.mktemp('voc') / 'VOC2012', num_train=12,
                                 num_val=6 if NATIVE_BF16 else 2, seed=4, sizes=[(32, 64), (40, 72), (48, 96)]))


@pytest.fixture
def gpu(device, monkeypatch):
    """The flags that give the train scripts and the predict scripts the GPU's default path here, and a record of
    what the training steps saw."""
    seen = {'steps': [], 'upsample2x': 0}
    train_batch, upsample2x = sd.train_batch_ch13, sd.upsample2x

    def recorded_step(net, X, y, loss, trainer, devices=None, *, amp=None, scaler=None, step=True):
        seen['steps'].append((X.device.type, X.is_contiguous(memory_format=torch.channels_last), amp, scaler))
        return train_batch(net, X, y, loss, trainer, devices, amp=amp, scaler=scaler, step=step)

    def counted_upsample(x):
        seen['upsample2x'] += 1
        return upsample2x(x)
    monkeypatch.setattr(sd, 'train_batch_ch13', recorded_step)
    monkeypatch.setattr(sd, 'upsample2x', counted_upsample)
    if device == 'cuda':
        return ['--device', 'cuda'], ['--device', 'cuda'], seen
    monkeypatch.setattr(sd.Upsample2x, 'everywhere', True)
    return ['--device', 'cpu', '--amp', '--channels-last', '--data-on-device', 'on'], ['--device', 'cpu', '--amp'], seen


def run_ok(script, args, cwd):
    res = run_inprocess(script, args, cwd)
    assert res.code == 0, f'{script.name} {" ".join(map(str, args))}\n{res.err}\n{res.out[-3000:]}'
    return res


def check_fast_path(res, seen, device):
    """The run took the GPU's default path: mixed precision, data kept on the device, channels_last steps."""
    assert 'data: decoded once and kept on' in res.out, res.out
    assert f'amp {str(sd.amp_dtype(sd.pick_device(device), True)).replace("torch.", "")}' in res.out, res.out
    assert seen['steps'] and all(s[0] == device and s[1] and s[2] is not None for s in seen['steps']), seen['steps']


def check_checkpoint(path, epochs):
    ckpt = sd.load_torch_file(path)
    assert ckpt['epoch'] == epochs and len(ckpt['history']) >= epochs
    for h in ckpt['history']:
        assert all(math.isfinite(h[k]) for k in ('loss', 'train_acc', 'test_acc', 'test_miou')), h
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    return ckpt


def check_results(ckpt_path, mst=False):
    result = json.loads(sd.results_path(ckpt_path, '.json', mst).read_text())
    assert result['mst'] == mst and result['images'] > 0
    assert all(math.isfinite(result[k]) for k in ('pixel_acc', 'mean_acc', 'miou', 'fwiou')), result
    return result


def test_the_books_recipe_then_eval_single_and_multi_scale(voc, tmp_path, gpu, device):
    flags, predict_flags, seen = gpu
    save = tmp_path / 'origin.pt'
    res = run_ok(ORIGIN_TRAIN, ['--data-dir', voc, '--epochs', '2', '--save', save] + TINY + flags, tmp_path)
    check_fast_path(res, seen, device)
    check_checkpoint(save, 2)
    for extra in ([], SCALES):
        run_ok(ORIGIN_PREDICT, ['--checkpoint', save, '--eval', '--workers', '0'] + extra + predict_flags, tmp_path)
    single, multi = check_results(save), check_results(save, mst=True)
    assert single['pixels'] == multi['pixels']


def test_the_improved_recipe_with_its_fine_tune_then_eval(voc, tmp_path, gpu, device):
    flags, predict_flags, seen = gpu
    save = tmp_path / 'checkpoints' / 'my.pt'    # the default, where my_predict.py looks
    res = run_ok(MY_TRAIN, ['--data-dir', voc, '--epochs', '1', '--finetune-epochs', '1'] + TINY +
                 flags, tmp_path)
    check_fast_path(res, seen, device)
    assert seen['upsample2x'] > 0, "the U-Net did not take the matrix upsample"
    check_checkpoint(save, 1)
    finetuned = check_checkpoint(sd.finetune_path(save), 1)
    assert finetuned['config']['stage'] == 'finetune'
    run_ok(MY_PREDICT, ['--eval', '--workers', '0'] + SCALES + predict_flags, tmp_path)     # the fine-tune's
    check_results(sd.finetune_path(save), mst=True)


def test_fp16_with_a_grad_scaler_and_its_resume(voc, tmp_path, gpu, device, monkeypatch):
    """What a GPU without bf16 (T4, V100) runs: fp16 autocast and a GradScaler, whose state the checkpoint keeps
    and --resume restores. The FCN: CPU fp16 kernels are slow."""
    flags, predict_flags, seen = gpu
    monkeypatch.setattr(sd, 'amp_dtype', lambda device, amp=None: torch.float16 if amp or amp is None else None)
    save = tmp_path / 'fp16.pt'
    common = ['--data-dir', voc, '--model', 'fcn', '--finetune-epochs', '0', '--save', save] + TINY + flags
    res = run_ok(MY_TRAIN, common + ['--epochs', '1'], tmp_path)
    assert 'amp float16' in res.out and all(s[3] is not None for s in seen['steps'])
    scale = check_checkpoint(save, 1)['scaler']['scale']
    assert scale > 0
    res = run_ok(MY_TRAIN, common + ['--epochs', '2', '--resume'], tmp_path)
    assert 'resuming' in res.out
    check_checkpoint(save, 2)


def test_resume_after_a_kill(voc, tmp_path, device):
    """SIGKILL once epoch 1 is reported, then --resume: the run ends where an uninterrupted one does (on the CPU,
    with the same weights; a GPU's kernels need not be deterministic)."""
    (tmp_path / 'launch.py').write_text(LAUNCHER)
    flags = ['--device', 'cuda'] if device == 'cuda' else ['--device', 'cpu', '--amp', '--channels-last',
                                                           '--data-on-device', 'on']
    common = ['--data-dir', voc, '--finetune-epochs', '0'] + TINY + flags
    env = dict(os.environ, PYTHONPATH=str(MY_TRAIN.parent), OMP_NUM_THREADS='1')
    killed = tmp_path / 'killed.pt'
    with open(tmp_path / 'killed.stderr', 'w') as err:
        proc = subprocess.Popen([sys.executable, tmp_path / 'launch.py', device, MY_TRAIN, '--epochs', '50', '--save',
                                 killed] + common, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            if line.startswith('epoch 1/50'):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / 'killed.stderr').read_text()
    assert sd.load_torch_file(killed)['epoch'] >= 1
    res = subprocess.run([sys.executable, tmp_path / 'launch.py', device, MY_TRAIN, '--epochs', '3', '--resume',
                          '--save', killed] + common, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and 'resuming' in res.stdout, res.stderr
    resumed = check_checkpoint(killed, 3)
    if device == 'cpu':
        straight = tmp_path / 'straight.pt'
        res = subprocess.run([sys.executable, tmp_path / 'launch.py', device, MY_TRAIN, '--epochs', '3', '--save',
                              straight] + common, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        want = sd.load_torch_file(straight)['model']
        assert not [k for k, v in want.items() if not torch.equal(v, resumed['model'][k])]


def test_own_data_with_focal_class_weights_cutmix_and_copyblob(voc, tmp_path, gpu, device):
    flags, predict_flags, seen = gpu
    data = as_folder(voc, tmp_path)
    save = tmp_path / 'own.pt'
    res = run_ok(MY_TRAIN, ['--dataset', 'folder', '--data-dir', data, '--epochs', '1', '--finetune-epochs', '0',
                            '--loss', 'focal', '--class-weights', 'counts', '--cutmix', '1', '--copyblob', '1',
                            '--copyblob-pairs', 'person:background', 'car:background', '--save', save] + TINY + flags,
                 tmp_path)
    check_fast_path(res, seen, device)
    check_checkpoint(save, 1)
    run_ok(MY_PREDICT, ['--checkpoint', save, '--eval', '--workers', '0'] + predict_flags, tmp_path)
    assert check_results(save)['class_names'] == sd.VOC_CLASSES


def test_deeplabv3_with_its_auxiliary_head(voc, tmp_path, gpu, device):
    flags, predict_flags, seen = gpu
    save = tmp_path / 'deeplab.pt'
    res = run_ok(MY_TRAIN, ['--data-dir', voc, '--model', 'deeplabv3_resnet50', '--aux-loss', '--epochs', '1',
                            '--finetune-epochs', '0', '--save', save] + TINY + flags, tmp_path)
    check_fast_path(res, seen, device)
    ckpt = check_checkpoint(save, 1)
    assert ckpt['model_args']['aux_loss'] is True
    torch.manual_seed(0)    # what my_train.py does before building the model: the auxiliary head trained
    initial = sd.build_model('deeplabv3_resnet50', num_classes=21, aux_loss=True).aux_classifier.state_dict()
    moved = [k for k, v in initial.items() if not torch.equal(ckpt['model'][f'aux_classifier.{k}'], v)]
    assert any(k.endswith('weight') for k in moved), 'the auxiliary head did not train'
    run_ok(MY_PREDICT, ['--checkpoint', save, '--eval', '--workers', '0'] + predict_flags, tmp_path)
    check_results(save)


def test_torchrun_with_nccl_on_two_gpus(voc, tmp_path, device):
    if device != 'cuda' or torch.cuda.device_count() < 2:
        pytest.skip('needs --device cuda and two GPUs (the CPU runs torchrun with gloo in test_distributed.py)')
    save = tmp_path / 'ddp.pt'
    proc = start_torchrun([ORIGIN_TRAIN, '--data-dir', voc, '--epochs', '2', '--save', save] + TINY, tmp_path)
    code, out, err = finish(proc, timeout=600)
    assert code == 0, err[-3000:]
    assert out.count('epoch 2/2') == 1 and 'x2' in out, out
    check_checkpoint(save, 2)
    proc = start_torchrun([ORIGIN_PREDICT, '--checkpoint', save, '--eval', '--workers', '0'], tmp_path)
    code, out, err = finish(proc, timeout=600)
    assert code == 0, err[-3000:]
    assert check_results(save)['pixels'] > 0
