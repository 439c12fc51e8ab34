"""The fast paths compute what the book's do (CPU, float64 where rounding would hide a difference): the FCN's
transposed conv as conv + pixel_shuffle, the U-Net's upsample as matrix products, the splits kept on the device
against the streaming loader (same batches, same trained weights, exact resume), and a training loop that checks
the loss once per epoch yet still names the step where it broke."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import some_define as sd  # noqa: E402
from test_reliability import MY_TRAIN, ORIGIN_TRAIN, one_error_line, run_inprocess  # noqa: E402

FAST = ['--epochs', '1', '--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']
aten = torch.ops.aten


class Kernels(TorchDispatchMode):
    """The aten ops that actually run (forward and backward), with whether each convolution is a transposed one:
    what a module does, whatever class it is an instance of."""

    def __init__(self):
        super().__init__()
        self.ops, self.transposed = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        if func in (aten.convolution.default, aten.convolution_backward.default):
            self.transposed += bool(args[6] if func is aten.convolution.default else args[7])
        return func(*args, **(kwargs or {}))

    def count(self, *funcs):
        return sum(op in funcs for op in self.ops)


@pytest.mark.parametrize('channels, kernel, stride, padding, size', [(21, 64, 32, 16, (3, 4)), (5, 8, 4, 2, (5, 7)),
                                                                     (3, 4, 2, 1, (1, 1)), (4, 6, 3, 0, (2, 5))])
def test_shuffle_conv_transpose_is_the_transposed_conv(channels, kernel, stride, padding, size):
    torch.manual_seed(0)
    book = nn.ConvTranspose2d(channels, channels, kernel, stride=stride, padding=padding).double()
    fast = sd.ShuffleConvTranspose2d(channels, channels, kernel, stride=stride, padding=padding).double()
    fast.load_state_dict(book.state_dict())       # same keys and shapes: checkpoints of either load into both
    x = torch.randn(2, channels, *size, dtype=torch.float64, requires_grad=True)
    a, b = book(x), fast(x)
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    g = torch.randn_like(a)
    grads_a = torch.autograd.grad(a, [x, book.weight, book.bias], g)
    grads_b = torch.autograd.grad(b, [x, fast.weight, fast.bias], g)
    for name, u, v in zip(('input', 'weight', 'bias'), grads_a, grads_b):
        torch.testing.assert_close(v, u, rtol=0, atol=1e-10, msg=name)


def test_a_transposed_conv_the_fast_form_cannot_compute_keeps_its_own():
    """fast_layers swaps every nn.ConvTranspose2d: one with output_padding (one more row and column) stays exact."""
    torch.manual_seed(0)
    book = nn.ConvTranspose2d(3, 3, 4, stride=2, padding=1, output_padding=1).double()
    placed = sd.fast_layers(nn.Sequential(copy.deepcopy(book)))
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(placed(x), book(x), rtol=0, atol=1e-12)


def test_fcn_keeps_the_books_layer_and_initialisation():
    torch.manual_seed(0)
    net = sd.fcn_resnet18(21)
    t = net.transpose_conv
    assert type(t) is nn.ConvTranspose2d, 'the book\'s block builds the chapter\'s own layer'
    assert (t.kernel_size, t.stride, t.padding) == ((64, 64), (32, 32), (16, 16))
    assert torch.equal(t.weight, sd.bilinear_kernel(21, 21, 64))
    book = nn.ConvTranspose2d(21, 21, 64, stride=32, padding=16)
    assert {k: v.shape for k, v in t.state_dict().items()} == {k: v.shape for k, v in book.state_dict().items()}
    book.load_state_dict(t.state_dict())
    x = torch.randn(1, 21, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(t(x), book(x), rtol=1e-5, atol=1e-5)     # float32: rounding only


def test_the_fcn_runs_the_fast_kernel_not_a_transposed_conv():
    """The FCN's 64/32 upsample runs as a 2x2 convolution and pixel_shuffle, forward and backward: no transposed
    convolution runs at all (an isinstance check would pass with the fallback too)."""
    torch.manual_seed(0)
    book = sd.fcn_resnet18(21)
    x = torch.randn(2, 3, 64, 96)
    # the control: the book's block runs its transposed conv, so the count below can see one
    with Kernels() as k:
        book(x[:1])
    assert k.transposed == 1 and k.count(aten.pixel_shuffle.default) == 0
    net = sd.place_model(copy.deepcopy(book), torch.device('cpu'))      # as the training script places it
    with Kernels() as k:
        out = net(x)
        out.sum().backward()
    assert out.shape == (2, 21, 64, 96)
    assert k.count(aten.pixel_shuffle.default) == 1, 'the fast path did not run'
    assert k.transposed == 0, f'{k.transposed} transposed convolution kernel(s) ran'
    with torch.no_grad():
        torch.testing.assert_close(net(x), book(x), rtol=1e-4, atol=1e-4)     # float32 rounding only


def test_the_unet_takes_the_matrix_upsample_where_asked(monkeypatch):
    """On CUDA (forced here by Upsample2x.everywhere) each of the U-Net's five upsamples is two matrix products,
    forward and backward, and no bilinear kernel runs; on the CPU it is F.interpolate's kernel."""
    torch.manual_seed(0)
    net = sd.place_model(sd.ResNetUNet(21), torch.device('cpu'))
    x = torch.randn(1, 3, 64, 64)
    bilinear = (aten.upsample_bilinear2d.default, aten.upsample_bilinear2d.vec,
                aten.upsample_bilinear2d_backward.default)
    with Kernels() as k:
        net(x).sum().backward()
    assert k.count(*bilinear) == 10       # five upsamples, forward and backward
    monkeypatch.setattr(sd.Upsample2x, 'everywhere', True)
    calls, real = [], sd.upsample2x
    monkeypatch.setattr(sd, 'upsample2x', lambda t: calls.append(t.shape) or real(t))
    with Kernels() as k:
        net(x).sum().backward()
    assert len(calls) == 5 and k.count(*bilinear) == 0, (calls, k.count(*bilinear))
    assert k.count(aten.mm.default, aten.bmm.default) >= 10


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('size', [(5, 7), (1, 3), (10, 15)])
def test_upsample2x_is_bilinear_align_corners(channels_last, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    a = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)
    b = sd.upsample2x(x)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    g = torch.randn_like(a)
    torch.testing.assert_close(torch.autograd.grad(b, x, g)[0], torch.autograd.grad(a, x, g)[0], rtol=0, atol=1e-12)
    assert b.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_upsample2x_first_met_in_evaluation_still_trains():
    """Its matrices are cached: one first made under inference_mode must serve a later backward."""
    with torch.inference_mode():
        sd.upsample2x(torch.randn(1, 2, 13, 17))
    x = torch.randn(1, 2, 13, 17, requires_grad=True)
    sd.upsample2x(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_unet_upsamples_with_it_once_placed():
    net = sd.ResNetUNet(21)
    assert type(net.upsample) is nn.Upsample, 'the block builds the published layout\'s plain upsample'
    before = net.state_dict()
    sd.place_model(net, torch.device('cpu'))
    assert isinstance(net.upsample, sd.Upsample2x)
    x = torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(net.upsample(x), sd.upsample2x(x))
    after = net.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or torch.equal(after[k], before[k])
                                               for k in before)


def test_a_checkpoint_loads_into_the_fast_layers_and_back(tmp_path):
    """Prediction rebuilds the model from a checkpoint and swaps its fast layers in: the same state_dict, so a
    checkpoint of either form loads into the other, and the predictions agree."""
    torch.manual_seed(0)
    book = sd.fcn_resnet18(21).eval()
    path = tmp_path / 'fcn.pt'
    torch.save({'model_args': dict(name='fcn', num_classes=21, norm='batch', aux_loss=False),
                'model': book.state_dict(), 'classes': sd.VOC._asdict(), 'config': {}}, path)
    net, _ = sd.load_model(path, torch.device('cpu'))
    assert type(net.transpose_conv) is sd.ShuffleConvTranspose2d
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(net(x), book(x), rtol=1e-4, atol=1e-4)
    fresh = sd.fcn_resnet18(21)
    fresh.load_state_dict(net.state_dict())     # and back into the book's layer


# ------------------------------------------------------------------------------------------- data on the device
@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    return Path(sd.make_demo_voc(tmp_path_factory.mktemp('voc') / 'VOC2012', num_train=12, num_val=6, seed=2))


def test_device_data_gives_the_streaming_batches(voc, capsys):
    cpu = torch.device('cpu')
    kept = sd.load_data_voc(4, (32, 64), data=voc, seed=3, num_workers=2, device=cpu, on_device='on')
    assert 'kept on cpu' in capsys.readouterr().out
    streamed = sd.load_data_voc(4, (32, 64), data=voc, seed=3, num_workers=2, device=cpu, on_device='off')
    assert 'streamed, 2 DataLoader workers' in capsys.readouterr().out
    assert isinstance(kept[0], sd.DeviceData) and not isinstance(streamed[0], sd.DeviceData)
    for on, off in zip(kept, streamed):
        for epoch in (0, 1):
            on.sampler.set_epoch(epoch)
            off.sampler.set_epoch(epoch)
            a, b = list(on), list(off)
            assert len(a) == len(b) == len(on) == len(off) > 0
            for (Xa, ya), (Xb, yb) in zip(a, b):
                assert torch.equal(Xa, Xb) and torch.equal(ya, yb) and ya.dtype == torch.int64


def test_data_on_device_choice(voc, tmp_path):
    ds = sd.VOCSegDataset(True, (32, 64), voc, normalize=False)
    assert sd.data_on_device('auto', torch.device('cpu'), [ds]) == (False, 'auto: no GPU')
    assert sd.data_on_device('off', torch.device('cpu'), [ds])[0] is False
    assert sd.data_on_device('on', torch.device('cpu'), [ds])[0] is True
    whole = sd.VOCSegDataset(True, None, voc, normalize=False)        # no crop: nothing to cut on the device
    assert sd.data_on_device('auto', torch.device('cpu'), [whole])[0] is False
    tutorial = sd.SegDataset(sd.voc_files(voc), sd.VOC, (32, 64), augment=True)     # random scale, flip, jitter
    assert sd.data_on_device('auto', torch.device('cpu'), [tutorial]) == (
        False, "the tutorial's augmentation runs in the DataLoader workers")
    with pytest.raises(sd.UserError, match='--data-on-device off'):
        sd.data_on_device('on', torch.device('cpu'), [tutorial])


def test_on_and_off_train_to_the_same_weights_and_resume_exactly(voc, tmp_path):
    common = ['--data-dir', voc, '--model', 'fcn', '--finetune-epochs', '0', '--seed', '1'] + FAST[2:]
    paths = {name: tmp_path / f'{name}.pt' for name in ('on', 'off', 'resumed')}
    for name, flags in (('on', ['--epochs', '2', '--data-on-device', 'on']),
                        ('off', ['--epochs', '2', '--data-on-device', 'off']),
                        ('resumed', ['--epochs', '1', '--data-on-device', 'on'])):
        res = run_inprocess(MY_TRAIN, common + flags + ['--save', paths[name]], tmp_path)
        assert res.code == 0, res.err + res.out
    res = run_inprocess(MY_TRAIN, common + ['--epochs', '2', '--data-on-device', 'on', '--resume', '--save',
                                            paths['resumed']], tmp_path)
    assert res.code == 0 and 'resuming' in res.out, res.err + res.out
    ckpts = {name: sd.load_torch_file(path) for name, path in paths.items()}
    for name in ('off', 'resumed'):
        assert ckpts[name]['epoch'] == 2
        differ = [k for k, v in ckpts['on']['model'].items() if not torch.equal(v, ckpts[name]['model'][k])]
        assert not differ, f'{name}: {differ[:4]}'
        keys = ('loss', 'train_acc', 'test_acc', 'test_miou')
        assert [[h[k] for k in keys] for h in ckpts[name]['history']] == \
            [[h[k] for k in keys] for h in ckpts['on']['history']]
    assert {'train_seconds', 'eval_seconds'} <= set(ckpts['on']['history'][0])


def test_non_finite_loss_found_after_the_epoch_still_names_its_step(voc, tmp_path, monkeypatch):
    """The loop checks the loss once per epoch: the message must still name the FIRST step whose loss was not
    finite, here found by watching every step's loss (batch 2: six steps, lr 1e6 breaks one before the last)."""
    losses, real = [], sd.train_batch_ch13

    def watched(*args, **kwargs):
        out = real(*args, **kwargs)
        losses.append(float(out[0]))
        return out
    monkeypatch.setattr(sd, 'train_batch_ch13', watched)
    args = ['--data-dir', voc, '--lr', '1e6', '--save', tmp_path / 'ck.pt', '--batch-size', '2'] + FAST[4:]
    res = run_inprocess(ORIGIN_TRAIN, args, tmp_path)
    first = next(i for i, value in enumerate(losses, 1) if not torch.isfinite(torch.tensor(value)))
    assert first < len(losses) == 6, losses
    line = one_error_line(res, f'epoch 1, step {first};', '--lr')
    assert 'no checkpoint was written' in line
