"""The book's building blocks (the names and behaviour kept from d2l, checkpoints, evaluation), checked
against independent computations: interpolation, PIL, brute-force loops. CPU only, tiny sizes."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import some_define as sd


@pytest.fixture(scope='module')
def fcn():
    torch.manual_seed(0)
    return sd.build_model('fcn', num_classes=21).eval()


@pytest.fixture(scope='module')
def unet():
    torch.manual_seed(0)
    return sd.build_model('resnet_unet', num_classes=21).eval()


def split_ids(voc_dir, is_train):
    name = 'train.txt' if is_train else 'val.txt'
    return (voc_dir / 'ImageSets' / 'Segmentation' / name).read_text().split()


# ------------------------------------------------------------------------------------------------ bilinear kernel
def test_bilinear_kernel_upsamples_like_bilinear_interpolation():
    conv = nn.ConvTranspose2d(3, 3, kernel_size=4, padding=1, stride=2, bias=False)
    conv.weight.data.copy_(sd.bilinear_kernel(3, 3, 4))
    x = torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = conv(x)
    ref = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)
    assert y.shape == ref.shape == (2, 3, 18, 26)
    torch.testing.assert_close(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_bilinear_kernel_maps_channel_i_to_channel_i_only():
    w = sd.bilinear_kernel(3, 3, 4)
    assert w.shape == (3, 3, 4, 4)
    row = torch.tensor([0.25, 0.75, 0.75, 0.25])
    for i in range(3):
        for j in range(3):
            expected = torch.outer(row, row) if i == j else torch.zeros(4, 4)
            torch.testing.assert_close(w[i, j], expected)


# ----------------------------------------------------------------------------------------- labels and colour maps
def label_pngs(demo_voc, voc_sample_dir=None):
    paths = [sd.voc_paths(demo_voc, name)[1] for name in split_ids(demo_voc, True)[:3]]
    if voc_sample_dir is not None:
        paths += sorted((voc_sample_dir / 'SegmentationClass').glob('*.png'))
    return paths


def check_palette_equals_rgb_lookup(path):
    with Image.open(path) as img:
        assert img.mode == 'P', f'{path}: VOC labels are palette PNGs'
        rgb = torch.from_numpy(np.array(img.convert('RGB'))).permute(2, 0, 1)
        raw = np.array(img)
    direct = sd.read_label(path)
    via_colour = sd.voc_label_indices(rgb, sd.voc_colormap2label())
    assert direct.dtype == torch.int64 and direct.shape == raw.shape
    assert torch.equal(direct, torch.from_numpy(raw.astype(np.int64)))
    assert torch.equal(direct, via_colour), path
    return direct


def test_palette_label_equals_rgb_lookup_on_demo_labels(demo_voc):
    labels = [check_palette_equals_rgb_lookup(p) for p in label_pngs(demo_voc)]
    assert any((label == 255).any() for label in labels), 'demo labels have a void border'


def test_palette_label_equals_rgb_lookup_on_real_labels(voc_sample):
    labels = [check_palette_equals_rgb_lookup(p) for p in sorted((voc_sample / 'SegmentationClass').glob('*.png'))]
    assert len(labels) == 8
    assert any((label == 255).any() for label in labels)
    assert any(((label > 0) & (label < 21)).any() for label in labels)


def test_voc_label_indices_void_and_unknown_colours():
    colours = sd.VOC_COLORMAP + [[224, 224, 192], [1, 2, 3], [255, 255, 255], [0, 0, 1]]
    colormap = torch.tensor(colours, dtype=torch.uint8).T.reshape(3, 1, len(colours))
    idx = sd.voc_label_indices(colormap, sd.voc_colormap2label())
    assert idx.shape == (1, len(colours))
    assert idx[0].tolist() == list(range(21)) + [255, -1, -1, -1]


# ------------------------------------------------------------------------------------------------------ crops
def coordinate_pair(h=20, w=30):
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    feature = torch.stack([rows, cols, rows * 0 + 7]).to(torch.int64)
    label = rows * w + cols
    return feature, label


def test_voc_rand_crop_keeps_image_and_label_aligned():
    h, w = 20, 30
    feature, label = coordinate_pair(h, w)
    tops_lefts = set()
    for seed in range(10):
        for s in (seed, None):
            with sd.seeded(s):
                f, l = sd.voc_rand_crop(feature, label, 8, 11)
            assert f.shape == (3, 8, 11) and l.shape == (8, 11)
            assert torch.equal(l, f[0] * w + f[1]), 'image and label cropped at different places'
            top, left = int(f[0, 0, 0]), int(f[1, 0, 0])
            # one contiguous rectangle of the original
            assert torch.equal(f, feature[:, top:top + 8, left:left + 11])
            tops_lefts.add((top, left))
    assert len(tops_lefts) > 1, 'the crop is not random'


def test_voc_rand_crop_is_reproducible_when_seeded_and_leaves_the_global_rng_alone():
    """seeded(seed) at the caller makes the book's crop reproducible; the global generator (the model's draws) goes on
    as if no crop had been drawn. seeded(None) draws from the global generator, as the book's call does."""
    feature, label = coordinate_pair()
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    crops = []
    for _ in range(2):
        with sd.seeded(123):
            crops.append(sd.voc_rand_crop(feature, label, 8, 11))
    assert torch.equal(crops[0][0], crops[1][0]) and torch.equal(crops[0][1], crops[1][1])
    assert torch.equal(torch.rand(3), expected_next), 'a seeded crop moved the global generator'
    others = set()
    for seed in range(20):
        with sd.seeded(seed):
            others.add(tuple(sd.voc_rand_crop(feature, label, 8, 11)[0][:2, 0, 0].tolist()))
    assert len(others) > 1, 'every seed gives the same crop'
    torch.manual_seed(7)
    with sd.seeded(None):
        sd.voc_rand_crop(feature, label, 8, 11)
    assert not torch.equal(torch.rand(3), expected_next), 'seeded(None) should draw from the global generator'


# ----------------------------------------------------------------------------------------------------- dataset
def test_dataset_size_filter_counts_what_pil_says(demo_voc, capsys):
    ids = split_ids(demo_voc, True)
    sizes = []
    for name in ids:
        with Image.open(sd.voc_paths(demo_voc, name)[0]) as img:
            sizes.append(img.size[::-1])
    expected = sum(1 for h, w in sizes if h >= 64 and w >= 96)
    assert 0 < expected < len(ids), 'the demo data should have images below the crop'
    capsys.readouterr()
    ds = sd.VOCSegDataset(True, (64, 96), demo_voc)
    assert len(ds) == expected
    assert f'read {expected} examples' in capsys.readouterr().out


def find_window(full, crop):
    """(top, left) where crop (C x h x w) sits in full (C x H x W), or None."""
    c, h, w = crop.shape
    for top in range(full.shape[1] - h + 1):
        for left in range(full.shape[2] - w + 1):
            if np.array_equal(full[:, top:top + h, left:left + w], crop):
                return top, left
    return None


def test_dataset_items_are_normalised_aligned_crops(demo_voc):
    ds = sd.VOCSegDataset(True, (64, 96), demo_voc)
    raw = sd.VOCSegDataset(True, (64, 96), demo_voc, normalize=False)
    mean = torch.tensor(sd.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(sd.IMAGENET_STD).view(3, 1, 1)
    for i in range(min(3, len(ds))):
        x, y = ds[(i, 1000 + i)]
        assert x.dtype == torch.float32 and x.shape == (3, 64, 96)
        assert y.dtype == torch.int64 and y.shape == (64, 96)
        values = set(y.unique().tolist())
        assert values <= set(range(21)) | {255}, values
        xr, yr = raw[(i, 1000 + i)]
        assert xr.dtype == torch.uint8 and yr.dtype == torch.uint8        # the fast path's bytes
        assert torch.equal(y, yr.long())
        torch.testing.assert_close(x * std + mean, xr.float() / 255, atol=1e-5, rtol=0)
        # the crop is a window of the JPEG and the same window of the label
        img_path, label_path = ds.items[i]
        with Image.open(img_path) as im:
            full = np.array(im.convert('RGB')).transpose(2, 0, 1)
        with Image.open(label_path) as lab:
            full_label = np.array(lab).astype(np.int64)
        where = find_window(full, xr.numpy())
        assert where is not None, 'the image crop is not a window of the image'
        top, left = where
        assert np.array_equal(full_label[top:top + 64, left:left + 96], y.numpy()), 'label crop misaligned'


def test_to_device_turns_the_loaders_bytes_into_the_books_tensors(demo_voc):
    """uint8 batches from the fast loader become exactly the book's float32 images and int64 labels."""
    book = sd.VOCSegDataset(True, (64, 96), demo_voc)
    fast = sd.VOCSegDataset(True, (64, 96), demo_voc, normalize=False)
    items = [(i, 7 + i) for i in range(4)]
    Xb = torch.stack([book[i][0] for i in items])
    yb = torch.stack([book[i][1] for i in items])
    X, y = sd.to_device(torch.stack([fast[i][0] for i in items]), torch.stack([fast[i][1] for i in items]),
                        torch.device('cpu'), channels_last=True)
    assert y.dtype == torch.int64 and torch.equal(y, yb)
    assert X.dtype == torch.float32 and X.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(X, Xb, atol=1e-6, rtol=0)


def test_dataset_seeded_items_are_reproducible(demo_voc):
    ds = sd.VOCSegDataset(True, (64, 96), demo_voc)
    differs = False
    for i in range(len(ds)):
        a, b = ds[(i, 42)], ds[(i, 42)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        c = ds[(i, 43)]
        differs |= not torch.equal(a[1], c[1])
    assert differs, 'the seed does not change the crop'


def test_void_as_background_gives_no_255(demo_voc):
    ds = sd.VOCSegDataset(True, (64, 96), demo_voc)
    ds0 = sd.VOCSegDataset(True, (64, 96), demo_voc, void_as_background=True)
    saw_void = False
    for i in range(len(ds)):
        _, y = ds[(i, 5)]
        _, y0 = ds0[(i, 5)]
        assert not (y0 == 255).any()
        void = y == 255
        saw_void |= bool(void.any())
        assert torch.equal(y0[~void], y[~void]) and (y0[void] == 0).all()
    assert saw_void


def test_real_voc_sample_reads(voc_sample):
    ids = split_ids(voc_sample, True)
    expected = 0
    for name in ids:
        with Image.open(sd.voc_paths(voc_sample, name)[0]) as img:
            w, h = img.size
        expected += h >= 200 and w >= 300
    ds = sd.VOCSegDataset(True, (200, 300), voc_sample)
    assert len(ds) == expected == 5
    saw_void = False
    for i in range(len(ds)):
        x, y = ds[(i, i)]
        assert x.shape == (3, 200, 300) and y.shape == (200, 300)
        assert set(y.unique().tolist()) <= set(range(21)) | {255}
        saw_void |= bool((y == 255).any())
    assert saw_void

    features, labels = sd.read_voc_images(voc_sample, False)
    assert len(features) == len(labels) == 3 == len(split_ids(voc_sample, False))
    for f, l in zip(features, labels):
        assert f.shape[0] == 3 and f.shape[1:] == l.shape[-2:]


# ------------------------------------------------------------------------------------------------------ models
def test_fcn_output_shape_and_layers(fcn):
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 21, 64, 96)
    assert isinstance(fcn, nn.Sequential)
    names = [name for name, _ in fcn.named_children()]
    assert names[-2:] == ['final_conv', 'transpose_conv'] and len(names) == 10
    t = fcn.transpose_conv
    assert (t.kernel_size, t.stride, t.padding) == ((64, 64), (32, 32), (16, 16))
    assert torch.equal(t.weight.data, sd.bilinear_kernel(21, 21, 64))
    # Xavier on the 1x1 conv (bound sqrt(6 / (512 + 21)) ~ 0.106; the default init stays below 1/sqrt(512) ~ 0.044)
    w = fcn.final_conv.weight.abs().max().item()
    assert 0.06 < w <= (6 / (512 + 21)) ** 0.5 + 1e-6


@pytest.mark.parametrize('size', [(50, 70), (33, 97)])
def test_resnet_unet_any_input_size(unet, size):
    with torch.no_grad():
        out = unet(torch.randn(1, 3, *size))
    assert out.shape == (1, 21, *size)


def test_resnet_unet_parameter_count(unet):
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 18.3e6) < 0.1e6, n


# ------------------------------------------------------------------------------------------------------- loss
def test_loss_is_the_books_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 21, 5, 7, generator=g)
    y = torch.randint(0, 21, (3, 5, 7), generator=g)
    expected = F.cross_entropy(logits, y, reduction='none').mean(1).mean(1)
    out = sd.cross_entropy_loss(logits, y)
    assert out.shape == (3,)
    torch.testing.assert_close(out, expected)


def test_loss_void_pixels_contribute_nothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 21, 6, 8, generator=g)
    y = torch.randint(0, 21, (2, 6, 8), generator=g)
    y[0, :2] = 255
    y[1, :, 3] = 255
    logp = F.log_softmax(logits, dim=1)
    expected = torch.zeros(2)
    for n in range(2):
        total = 0.0
        for i in range(6):
            for j in range(8):
                if y[n, i, j] != 255:
                    total -= float(logp[n, y[n, i, j], i, j])
        expected[n] = total / (6 * 8)
    torch.testing.assert_close(sd.cross_entropy_loss(logits, y), expected)


# ---------------------------------------------------------------------------------------------- confusion matrix
def brute_force_metrics(pred, target, n):
    mat = [[0] * n for _ in range(n)]
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if t != 255:
            mat[t][p] += 1
    total = sum(map(sum, mat))
    gt = [sum(mat[c]) for c in range(n)]
    pr = [sum(mat[r][c] for r in range(n)) for c in range(n)]
    iou = [mat[c][c] / (gt[c] + pr[c] - mat[c][c]) if gt[c] + pr[c] else float('nan') for c in range(n)]
    accs = [mat[c][c] / gt[c] for c in range(n) if gt[c]]
    present = [c for c in range(n) if gt[c] + pr[c]]
    return dict(mat=mat, pixel_acc=sum(mat[c][c] for c in range(n)) / total, mean_acc=sum(accs) / len(accs),
                iou=iou, miou=sum(iou[c] for c in present) / len(present),
                fwiou=sum(gt[c] / total * iou[c] for c in present))


def test_confusion_matrix_matches_brute_force():
    n = 5
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 9, 11), generator=g)       # classes 0..2 in the ground truth
    pred = torch.randint(0, 4, (4, 9, 11), generator=g)         # 3: predicted only; 4: absent from both
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    ref = brute_force_metrics(pred, target, n)

    cm = sd.ConfusionMatrix(n)
    cm.update(pred[:2], target[:2])
    cm.update(pred[2:], target[2:])                              # accumulates across calls
    assert cm.mat.tolist() == ref['mat']
    r = cm.compute()
    for key in ('pixel_acc', 'mean_acc', 'miou', 'fwiou'):
        assert r[key] == pytest.approx(ref[key], abs=1e-12), key
    assert np.isnan(r['iou'][4]) and r['iou'][3] == 0.0
    np.testing.assert_allclose(r['iou'], ref['iou'], atol=1e-12)
    assert r['pixels'] == int((target != 255).sum())


# ------------------------------------------------------------------------------------------------- checkpoints
def make_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = sd.build_model('fcn', num_classes=21)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    out = model(torch.randn(2, 3, 32, 32))
    sd.cross_entropy_loss(out, torch.randint(0, 21, (2, 32, 32))).sum().backward()
    opt.step()
    config = dict(dataset='voc', demo=False, data_dir=str(tmp_path), crop_size=[32, 64], model='fcn',
                  optimizer='adam', lr=1e-3, epochs=1, weight_decay=1e-3, finetune_epochs=0, finetune_lr=1e-5,
                  stage='train', batch_size=4, void_as_background=False)
    ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=1,
                history=[dict(epoch=1, loss=2.5, train_acc=0.3, test_acc=0.4, test_miou=0.1, lr=1e-3,
                              seconds=1.0)],
                config=config, num_classes=21, classes=sd.VOC._asdict(),
                model_args=dict(name='fcn', num_classes=21, norm='batch', aux_loss=False))
    path = tmp_path / 'checkpoints' / 'fcn.pt'
    sd.save_checkpoint(ckpt, path)
    return model.eval(), ckpt, path


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip_and_rebuild(tmp_path):
    model, ckpt, path = make_checkpoint(tmp_path)
    assert path.exists() and not list(path.parent.glob('*.tmp'))
    loaded = sd.load_torch_file(path)
    assert_same(ckpt, loaded)
    torch.load(path, weights_only=True)      # plain types only

    net, ck = sd.load_model(path, 'cpu')
    assert not net.training
    assert ck['epoch'] == 1 and ck['config']['model'] == 'fcn'
    assert_same(model.state_dict(), net.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))


# --------------------------------------------------------------------------------------------------- inference
def test_label2image_colours():
    pred = torch.tensor([list(range(11)) + [255], list(range(11, 21)) + [255, 0]])
    img = sd.label2image(pred)
    assert img.shape == (2, 12, 3) and img.dtype == torch.uint8
    for r in range(2):
        for c in range(12):
            k = int(pred[r, c])
            expected = [224, 224, 192] if k == 255 else sd.VOC_COLORMAP[k]
            assert img[r, c].tolist() == expected


def test_predict_any_size(fcn):
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)
    pred = sd.predict(fcn, img)
    assert pred.shape == (50, 70) and pred.dtype == torch.int64
    assert pred.min() >= 0 and pred.max() < 21
    # at a multiple of 32 it is exactly the book's argmax of the net on the normalised image
    img = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=g)
    x = ((img.float() / 255 - torch.tensor(sd.IMAGENET_MEAN).view(3, 1, 1))
         / torch.tensor(sd.IMAGENET_STD).view(3, 1, 1)).unsqueeze(0)
    with torch.no_grad():
        expected = fcn(x).argmax(1)[0]
    assert torch.equal(sd.predict(fcn, img), expected)


def run_script(script, args, cwd, monkeypatch):
    """A script in this process, as `python script args` would run it (saves a torch import per run)."""
    import runpy
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [script] + [str(a) for a in args])
    runpy.run_path(str(Path(sd.__file__).parent / script), run_name='__main__')


def test_accum_steps_gives_the_same_update_as_the_whole_batch(demo_voc, tmp_path, monkeypatch):
    """Batch 12 in micro-batches of 6 = batch 12, for a model without batch statistics (GroupNorm). One update: this
    random-initialised net amplifies float32 rounding from update to update (after three updates of batch 4 the two
    runs differed by up to 4% on an Intel Xeon, 1e-6 after one; in float64 they agree to 1e-15 after three)."""
    common = ['--data-dir', demo_voc, '--model', 'fcn', '--norm', 'group', '--optimizer', 'sgd', '--epochs', 1,
              '--finetune-epochs', 0, '--batch-size', 12, '--crop-size', 32, 64, '--no-pretrained', '--workers', 0]
    run_script('my_train.py', common + ['--save', 'whole.pt'], tmp_path, monkeypatch)
    run_script('my_train.py', common + ['--accum-steps', 2, '--save', 'accum.pt'], tmp_path, monkeypatch)
    whole = sd.load_torch_file(tmp_path / 'whole.pt')
    accum = sd.load_torch_file(tmp_path / 'accum.pt')
    torch.manual_seed(0)    # what my_train.py does before building the model
    initial = sd.build_model('fcn', norm='group').state_dict()
    moved = 0
    for key, value in whole['model'].items():
        assert torch.allclose(value, accum['model'][key], rtol=1e-4, atol=1e-6), key
        moved += not torch.equal(value, initial[key]) if key in initial else 0
    assert moved > 0    # training changed the weights: the comparison is not between two untouched models
    assert whole['history'][0]['loss'] == pytest.approx(accum['history'][0]['loss'], rel=1e-5)


def test_my_train_with_the_tutorial_techniques(demo_voc, tmp_path, monkeypatch, capsys):
    """The technique flags together: focal loss with pixel-count weights, EvoNorm, CutMix and CopyBlob (person
    pasted onto background) train side by side, and the checkpoint records them. What each of them does to the
    batch or the loss that trains is checked in test_flags.py."""
    run_script('my_train.py', ['--data-dir', demo_voc, '--model', 'fcn', '--epochs', 1, '--finetune-epochs', 0,
                               '--batch-size', 4, '--crop-size', 32, 64, '--no-pretrained', '--workers', 0,
                               '--loss', 'focal', '--class-weights', 'counts', '--norm', 'evo', '--cutmix', 1,
                               '--copyblob', 1, '--copyblob-pairs', 'person:background', '--save', 'tricks.pt'],
               tmp_path, monkeypatch)
    ckpt = sd.load_torch_file(tmp_path / 'tricks.pt')
    config = ckpt['config']
    assert (config['loss'], config['norm'], config['cutmix'], config['copyblob']) == ('focal', 'evo', 1.0, 1.0)
    assert ckpt['model_args']['norm'] == 'evo' and ckpt['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    net, _ = sd.load_model(tmp_path / 'tricks.pt', 'cpu')
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in net.modules())
    out = capsys.readouterr().out
    assert 'epoch 1/1' in out and 'share' in out     # the class-frequency table was printed


def test_copyblob_pairs_by_name_and_a_clear_error_for_an_unknown_one():
    assert sd.parse_pairs(['person:background', '5:11'], sd.VOC_CLASSES, 'voc') == [(15, 0), (5, 11)]
    assert sd.parse_pairs(None, sd.VOC_CLASSES, 'voc')[0] == (5, 11)     # bottle on diningtable
    with pytest.raises(sd.UserError, match='--copyblob-pairs'):
        sd.parse_pairs(['unicorn:road'], sd.VOC_CLASSES, 'voc')
