"""The chapter's calls as d2l 1.0.3 writes them ("Semantic Segmentation and the Dataset", "Transposed Convolution",
"Fully Convolutional Networks"), with only `d2l` replaced by `some_define`, on the real VOC sample in ../shared.
Where a line here differs from the book, a comment says why (no download here; sizes for 4 training images).
Expected values that are the book's own printed output are marked as such."""
import inspect
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.nn import functional as F

import some_define as d2l

# The book's VOC_COLORMAP cell, literally (a learner compares the two).
BOOK_VOC_COLORMAP = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                     [0, 0, 128], [128, 0, 128], [0, 128, 128], [128, 128, 128],
                     [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0],
                     [64, 0, 128], [192, 0, 128], [64, 128, 128], [192, 128, 128],
                     [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0],
                     [0, 64, 128]]
# The book's output of `y[105:115, 130:140]` for 2007_000032 (its void border shown as background, 0).
BOOK_Y = [[0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
          [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
          [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
          [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]]


def book_voc_label_indices(colormap, colormap2label):
    """The book's voc_label_indices, literally: NumPy indices into colormap2label."""
    colormap = colormap.permute(1, 2, 0).numpy().astype('int32')
    idx = ((colormap[:, :, 0] * 256 + colormap[:, :, 1]) * 256
           + colormap[:, :, 2])
    return colormap2label[idx]


@pytest.fixture
def voc_dir(voc_sample, tmp_path, monkeypatch):
    """The sample as VOC2012/ next to the scripts, where load_data_voc(batch_size, crop_size) finds it."""
    here = tmp_path / 'repo'
    shutil.copytree(voc_sample, here / 'VOC2012')
    monkeypatch.setattr(d2l, 'HERE', here)
    monkeypatch.setattr(d2l, 'DATA_DIR', here / 'data')
    return str(here / 'VOC2012')


def test_the_dataset_section(voc_dir, capsys):
    train_features, train_labels = d2l.read_voc_images(voc_dir, True)
    n = 5
    imgs = train_features[:n] + train_labels[:n]
    imgs = [img.permute(1, 2, 0) for img in imgs]
    assert len(imgs) == 10 and all(img.dtype == torch.uint8 and img.shape[2] == 3 for img in imgs)
    palette_png = np.array(Image.open(f'{voc_dir}/SegmentationClass/2007_000032.png'))
    assert train_labels[0].shape == (3, *palette_png.shape)

    assert d2l.VOC_COLORMAP == BOOK_VOC_COLORMAP
    assert d2l.VOC_CLASSES[1] == 'aeroplane' and len(d2l.VOC_CLASSES) == 21

    y = d2l.voc_label_indices(train_labels[0], d2l.voc_colormap2label())
    # void (255 in the PNG) stays 255 here, the book shows it as background: the one difference
    assert torch.equal(torch.where(y[105:115, 130:140] == 255, 0, y[105:115, 130:140]), torch.tensor(BOOK_Y))
    assert torch.equal(y, torch.from_numpy(palette_png).long()), 'the RGB lookup disagrees with the palette PNG'
    # the book's own voc_label_indices (NumPy indexing) on the lookup voc_colormap2label() returns
    assert torch.equal(torch.as_tensor(book_voc_label_indices(train_labels[0], d2l.voc_colormap2label())), y)

    imgs = []
    for _ in range(n):
        imgs += d2l.voc_rand_crop(train_features[0], train_labels[0], 200, 300)
    imgs = [img.permute(1, 2, 0) for img in imgs]
    assert all(img.shape == (200, 300, 3) for img in imgs)
    assert len({tuple(img[0, 0].tolist()) + tuple(img[-1, -1].tolist()) for img in imgs[::2]}) > 1, 'not random'

    crop_size = (320, 480)
    voc_train = d2l.VOCSegDataset(True, crop_size, voc_dir)
    voc_test = d2l.VOCSegDataset(False, crop_size, voc_dir)
    out = capsys.readouterr().out
    assert 'read 4 examples' in out and 'read 3 examples' in out     # one train image is 281 high: filtered
    batch_size = 2      # the book's 64: 4 training images here
    train_iter = torch.utils.data.DataLoader(voc_train, batch_size, shuffle=True, drop_last=True,
                                             num_workers=d2l.get_dataloader_workers())
    for X, Y in train_iter:
        assert X.shape == (2, 3, 320, 480) and X.dtype == torch.float32
        assert Y.shape == (2, 320, 480) and Y.dtype == torch.int64
        break
    assert len(voc_test) == 3


def test_the_fcn_section(voc_dir, capsys, monkeypatch):
    pretrained_net = torchvision.models.resnet18(weights=None)    # the book: pretrained=True (no download here)
    assert [type(m) for m in list(pretrained_net.children())[-3:]] == [nn.Sequential, nn.AdaptiveAvgPool2d, nn.Linear]
    net = nn.Sequential(*list(pretrained_net.children())[:-2])
    X = torch.rand(size=(1, 3, 320, 480))
    assert net(X).shape == (1, 512, 10, 15)
    num_classes = 21
    net.add_module('final_conv', nn.Conv2d(512, num_classes, kernel_size=1))
    net.add_module('transpose_conv', nn.ConvTranspose2d(num_classes, num_classes,
                                                        kernel_size=64, padding=16, stride=32))

    conv_trans = nn.ConvTranspose2d(3, 3, kernel_size=4, padding=1, stride=2, bias=False)
    conv_trans.weight.data.copy_(d2l.bilinear_kernel(3, 3, 4))
    img = torch.rand(3, 40, 60)
    Y = conv_trans(img.unsqueeze(0))
    assert Y.shape == (1, 3, 80, 120)
    # bilinear upsampling: inside the border, what F.interpolate gives (half-pixel centres)
    ref = F.interpolate(img.unsqueeze(0), scale_factor=2, mode='bilinear', align_corners=False)
    torch.testing.assert_close(Y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])
    W = d2l.bilinear_kernel(num_classes, num_classes, 64)
    net.transpose_conv.weight.data.copy_(W)

    batch_size, crop_size = 2, (320, 480)       # the book's 32: 4 training images here (2 steps an epoch)
    train_iter, test_iter = d2l.load_data_voc(batch_size, crop_size)

    def loss(inputs, targets):
        return F.cross_entropy(inputs, targets, reduction='none').mean(1).mean(1)

    num_epochs, lr, wd, devices = 1, 0.001, 1e-3, d2l.try_all_gpus()     # the book: 5 epochs
    trainer = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=wd)
    before = [p.detach().clone() for p in net.parameters()]
    steps = []
    step = d2l.train_batch_ch13

    def counted(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)
    monkeypatch.setattr(d2l, 'train_batch_ch13', counted)
    d2l.train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices)
    out = capsys.readouterr().out
    assert len(steps) == 2
    assert 'loss ' in out and 'train acc ' in out and 'test acc ' in out and 'examples/sec on' in out
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters())), 'train_ch13 did not train'

    def predict(img):
        X = test_iter.dataset.normalize_image(img).unsqueeze(0)
        pred = net(X.to(devices[0])).argmax(dim=1)
        return pred.reshape(pred.shape[1], pred.shape[2])

    def label2image(pred):
        colormap = torch.tensor(d2l.VOC_COLORMAP, device=devices[0])
        X = pred.long()
        return colormap[X, :]

    test_images, test_labels = d2l.read_voc_images(voc_dir, False)
    n, imgs = 3, []
    net.eval()      # the book's net stays in training mode here; BatchNorm's batch of one is noisier without this
    for i in range(n):
        crop_rect = (0, 0, 320, 480)
        X = torchvision.transforms.functional.crop(test_images[i], *crop_rect)
        pred = label2image(predict(X))
        imgs += [X.permute(1, 2, 0), pred.cpu(),
                 torchvision.transforms.functional.crop(test_labels[i], *crop_rect).permute(1, 2, 0)]
        # the module's own predict(net, img) and label2image(pred): the same picture
        assert torch.equal(d2l.label2image(d2l.predict(net, X)).cpu(), pred.cpu())
    assert all(img.shape == (320, 480, 3) for img in imgs)


def test_the_book_step_returns_loss_sum_and_correct_pixels_and_steps_the_trainer():
    """train_batch_ch13(net, X, y, loss, trainer, devices), the book's call: the sum of the per-example losses and the
    number of correct pixels, after trainer.step() on those gradients."""
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 1)
    X, y = torch.randn(2, 3, 5, 6), torch.randint(0, 4, (2, 5, 6))

    def loss(inputs, targets):
        return F.cross_entropy(inputs, targets, reduction='none').mean(1).mean(1)
    ref = nn.Conv2d(3, 4, 1)
    ref.load_state_dict(net.state_dict())
    out = ref(X)
    expected = loss(out, y).sum()
    expected.backward()
    with torch.no_grad():
        stepped = [p - 0.5 * p.grad for p in ref.parameters()]
    trainer = torch.optim.SGD(net.parameters(), lr=0.5)
    train_loss_sum, train_acc_sum = d2l.train_batch_ch13(net, X, y, loss, trainer, d2l.try_all_gpus())
    torch.testing.assert_close(train_loss_sum, expected.detach())
    assert int(train_acc_sum) == int((out.argmax(1) == y).sum())
    for p, q in zip(net.parameters(), stepped):
        torch.testing.assert_close(p.detach(), q)


def test_the_book_signatures():
    """The book's positional parameters come first, every addition is keyword-only with a default."""
    book = {'read_voc_images': ['voc_dir', 'is_train'], 'voc_colormap2label': [],
            'voc_label_indices': ['colormap', 'colormap2label'],
            'voc_rand_crop': ['feature', 'label', 'height', 'width'],
            'load_data_voc': ['batch_size', 'crop_size'],
            'bilinear_kernel': ['in_channels', 'out_channels', 'kernel_size'],
            'train_batch_ch13': ['net', 'X', 'y', 'loss', 'trainer', 'devices'],
            'train_ch13': ['net', 'train_iter', 'test_iter', 'loss', 'trainer', 'num_epochs', 'devices']}
    for name, params in book.items():
        sig = inspect.signature(getattr(d2l, name))
        positional = [p.name for p in sig.parameters.values()
                      if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty or p.name in params]
        assert positional[:len(params)] == params, name
        extra = [p for p in sig.parameters.values() if p.name not in params]
        assert all(p.default is not p.empty for p in extra), f'{name}: every addition needs a default'
        if name in ('load_data_voc', 'train_batch_ch13', 'train_ch13'):
            assert all(p.kind is p.KEYWORD_ONLY for p in extra), f'{name}: additions are keyword-only'
    init = inspect.signature(d2l.VOCSegDataset).parameters
    assert list(init)[:3] == ['is_train', 'crop_size', 'voc_dir']
    assert all(p.kind is p.KEYWORD_ONLY for p in list(init.values())[3:])


def test_train_ch13_takes_any_loaders_and_a_device_list(capsys, monkeypatch):
    """The book's train_ch13 on plain DataLoaders of another dataset (no class count, no seeded sampler) and a list
    of two devices: the net runs as DataParallel over them (on the CPU, DataParallel calls the net itself), its
    weights change, and the figures are printed."""
    torch.manual_seed(0)
    X, y = torch.randn(8, 3, 6, 7), torch.randint(0, 3, (8, 6, 7))
    data = torch.utils.data.TensorDataset(X, y)
    train_iter = torch.utils.data.DataLoader(data, 4, shuffle=True, drop_last=True)
    test_iter = torch.utils.data.DataLoader(data, 4)
    net = nn.Conv2d(3, 3, 1)
    before = net.weight.detach().clone()
    wrapped = []
    forward = nn.DataParallel.forward

    def recorded(self, *inputs, **kwargs):
        wrapped.append(self.device_ids)
        return forward(self, *inputs, **kwargs)
    monkeypatch.setattr(nn.DataParallel, 'forward', recorded)
    history = d2l.train_ch13(net, train_iter, test_iter, lambda out, t: F.cross_entropy(
        out, t, reduction='none').mean((1, 2)), torch.optim.SGD(net.parameters(), lr=0.5), 2, [torch.device('cpu')] * 2)
    assert wrapped, 'two devices: the net should run as DataParallel'
    assert len(history) == 2 and 0 <= history[-1]['test_miou'] <= 1
    assert not torch.equal(net.weight, before)
    assert "examples/sec on ['cpu', 'cpu']" in capsys.readouterr().out
