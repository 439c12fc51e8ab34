"""Cityscapes / MiniCity (the DeepLabV3 tutorial's data). Everywhere, on a small synthetic tree in the official
layout written here: raw labelIds mapped to the 19 train ids (others -> 255) by the official table, the tutorial's
training transform keeping image and label aligned, and --class-weights tutorial reaching the loss. Where the real
one-image sample exists (shared/cityscapes_sample, not in a user's clone): the same mapping on a real frame, the
labelTrainIds fallback, MiniCity's flat layout, the training crops, and a short my_train.py + my_predict.py run.
CPU only."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

MAIN = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(MAIN))
import some_define as sd  # noqa: E402
from conftest import finish  # noqa: E402
from test_reliability import MY_PREDICT, MY_TRAIN, run_inprocess  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / 'shared' / 'cityscapes_sample'
STEM = 'frankfurt_000000_000294'


def have_sample():
    return (SAMPLE / 'gtFine' / 'val' / 'frankfurt' / f'{STEM}_gtFine_labelIds.png').exists()


@pytest.fixture(autouse=True)
def sample(request):
    """The tests of the real sample (all but test_synthetic_*) skip where it is absent."""
    if not request.node.name.startswith('test_synthetic') and not have_sample():
        pytest.skip(f'no Cityscapes sample at {SAMPLE}')


# The official Cityscapes table (cityscapesScripts' labels.py): the raw ids of the 19 train ids, in train-id order.
TRAIN_ID_OF = {raw: train for train, raw in enumerate([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                                       31, 32, 33])}
# The tutorial's 19 class weights (its --class-weights tutorial), as published with it (the same list appears in
# OCNet's and mmsegmentation's Cityscapes configs).
TUTORIAL_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539, 0.9843,
                    1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


# ------------------------------------------------------------------------------------- a synthetic tree, everywhere
# val: a grid of raw ids, mapped ones and ones the table sends to 255 (unlabeled, out of roi, ground, parking, guard
# rail, polegroup, caravan, and 34, which is no Cityscapes id). train: a grey ramp brighter to the right and
# downwards, labelled by quadrant (road, sidewalk / building, wall = train ids 0, 1 / 2, 3), for the alignment checks.
RAW_IDS = [0, 3, 6, 7, 8, 9, 11, 14, 17, 18, 21, 23, 24, 26, 29, 31, 33, 34]
H, W = 48, 64


def ramp_pair(h=H, w=W):
    """(uint8 3xHxW grey image increasing to the right and downwards, HxW quadrant classes 0 1 / 2 3)."""
    y, x = torch.arange(h).view(h, 1).expand(h, w), torch.arange(w).view(1, w).expand(h, w)
    image = (40 + 2 * x + y).to(torch.uint8).expand(3, h, w).contiguous()
    return image, (2 * (y >= h // 2) + (x >= w // 2)).long()


def write_synthetic(root):
    for split, city in (('train', 'aachen'), ('val', 'bremen')):
        stem = f'{city}_000000_000019'
        images, labels = root / 'leftImg8bit' / split / city, root / 'gtFine' / split / city
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        if split == 'train':
            image, quadrant = ramp_pair()
            raw = torch.tensor([7, 8, 11, 12])[quadrant]
        else:
            image = torch.randint(256, (3, H, W), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            raw = torch.tensor(RAW_IDS)[torch.arange(H * W).view(H, W) // 7 % len(RAW_IDS)]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / f'{stem}_leftImg8bit.png')
        Image.fromarray(raw.numpy().astype(np.uint8), mode='L').save(labels / f'{stem}_gtFine_labelIds.png')
    return root


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp('synthetic') / 'cityscapes')


def test_synthetic_label_ids_map_to_train_ids(synthetic):
    ds = sd.CityscapesSegDataset(False, None, synthetic)
    assert len(ds) == 1 and ds.num_classes == 19 and ds.items[0][1].name.endswith('_gtFine_labelIds.png')
    raw = torch.from_numpy(np.array(Image.open(ds.items[0][1]), dtype=np.int64))
    image, label = ds[0]
    expected = raw.clone().apply_(lambda v: TRAIN_ID_OF.get(v, 255))
    assert torch.equal(label, expected)
    assert set(raw.unique().tolist()) == set(RAW_IDS)
    assert {0, 1, 2, 5, 8, 10, 11, 13, 16, 18, 255} == set(label.unique().tolist())
    assert image.shape == (3, H, W) and image.dtype == torch.float32


def check_aligned(image, label):
    """A ramp_pair after any transform that moves image and label together (scale, crop, pad, flip) and changes the
    image's values only monotonically (brightness, contrast; saturation leaves grey alone): in every row, each pixel
    of a left-quadrant class is no brighter than each pixel of a right-quadrant class, and in every column the top
    quadrants no brighter than the bottom ones, wherever the two meet. Returns (checked rows, rows seen flipped)."""
    value, rows, flipped = image[0].int(), 0, 0
    for v, l, classes in ((value, label, ((0, 2), (1, 3))), (value.T, label.T, ((0, 1), (2, 3)))):
        for line_v, line_l in zip(v, l):
            first, second = torch.isin(line_l, torch.tensor(classes[0])), torch.isin(line_l, torch.tensor(classes[1]))
            if first.any() and second.any():
                assert line_v[first].max() <= line_v[second].min(), (line_l.tolist(), line_v.tolist())
                if classes == ((0, 2), (1, 3)):
                    rows += 1
                    cols = torch.arange(len(line_l)).float()
                    flipped += bool(cols[first].mean() > cols[second].mean())
    return rows, flipped


def test_synthetic_tutorial_augment_keeps_image_and_label_aligned():
    """The tutorial's transform (random scale, pad with void, crop, flip, colour jitter), 60 draws: image and label
    stay aligned, flipped or not, scaled up or down, padded or not."""
    image, label = ramp_pair()
    rows = flipped = padded = 0
    shapes = set()
    for seed in range(60):
        with sd.seeded(seed):
            out, lab = sd.tutorial_augment(image, label, (40, 56))
        assert out.shape == (3, 40, 56) and out.dtype == torch.uint8 and lab.shape == (40, 56)
        assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 255}
        pad = out[0][lab == 255]                        # void padding: black, jittered like the rest
        assert pad.numel() == 0 or (pad == pad[0]).all() and pad[0] <= out[0][lab != 255].min()
        r, f = check_aligned(out, lab)
        rows, flipped, padded = rows + r, flipped + f, padded + bool((lab == 255).any())
        shapes.add(tuple(torch.bincount(lab.flatten(), minlength=256)[[0, 1, 2, 3, 255]].tolist()))
    assert 0 < flipped < rows and padded > 0 and len(shapes) > 10, (rows, flipped, padded, len(shapes))


def test_synthetic_training_items_are_aligned(synthetic):
    """The same through the dataset (labelIds mapped, then the transform) as the training loop reads it."""
    ds = sd.CityscapesSegDataset(True, (40, 56), synthetic, normalize=False)
    assert ds.augment
    rows = flipped = 0
    for seed in range(12):
        image, label = ds[(0, seed)]
        assert image.shape == (3, 40, 56) and label.dtype == torch.uint8
        r, f = check_aligned(image, label.long())
        rows, flipped = rows + r, flipped + f
    assert 0 < flipped < rows


def test_synthetic_training_with_the_tutorials_class_weights(synthetic, tmp_path, monkeypatch):
    """my_train.py --dataset cityscapes --loss weighted_ce --class-weights tutorial: the loss that trains is the
    cross entropy weighted by the tutorial's 19 numbers."""
    losses, train = [], sd.train_ch13
    monkeypatch.setattr(sd, 'train_ch13', lambda net, train_iter, test_iter, loss, *args, **kwargs: (
        losses.append(loss), train(net, train_iter, test_iter, loss, *args, **kwargs))[1])
    res = run_inprocess(MY_TRAIN, ['--dataset', 'cityscapes', '--data-dir', synthetic, '--model', 'fcn', '--epochs', 1,
                                   '--finetune-epochs', 0, '--batch-size', 1, '--crop-size', 32, 64,
                                   '--no-pretrained', '--workers', 0, '--loss', 'weighted_ce', '--class-weights',
                                   'tutorial', '--save', 'ckpt'], tmp_path)
    assert res.code == 0, res.err + res.out
    assert len(losses) == 1
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 19, 5, 6, generator=g), torch.randint(19, (2, 5, 6), generator=g)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(TUTORIAL_WEIGHTS), reduction='none').mean((1, 2))
    torch.testing.assert_close(losses[0](logits, target), expected)


def test_synthetic_train_ids_back_to_label_ids(synthetic):
    """Predictions go back to Cityscapes' label ids (its evaluation scripts' format): a frame mapped to train ids
    and back is the frame itself wherever its id is one of the 19 classes, and 0 (unlabeled) elsewhere."""
    ds = sd.CityscapesSegDataset(False, None, synthetic)
    raw = torch.from_numpy(np.array(Image.open(ds.items[0][1]), dtype=np.int64))
    back = sd.CITYSCAPES_TRAINID_TO_ID[ds.read(0)[1]].long()
    official = torch.tensor(list(TRAIN_ID_OF))
    assert torch.equal(back, torch.where(torch.isin(raw, official), raw, 0))
    assert set(back.unique().tolist()) == set(RAW_IDS) & set(TRAIN_ID_OF) | {0}


def test_synthetic_predictions_in_the_official_format(synthetic, tmp_path):
    """--eval --write-split and own images, on a Cityscapes checkpoint: each prediction also as *_labelIds.png,
    the train ids of *_labels.png mapped back to label ids."""
    res = run_inprocess(MY_TRAIN, ['--dataset', 'cityscapes', '--data-dir', synthetic, '--model', 'fcn', '--epochs', 1,
                                   '--finetune-epochs', 0, '--batch-size', 1, '--crop-size', 32, 64,
                                   '--no-pretrained', '--workers', 0, '--save', 'ckpt'], tmp_path)
    assert res.code == 0, res.err + res.out
    photos = tmp_path / 'photos'
    photos.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(photos / 'street.png')
    res = run_inprocess(MY_PREDICT, ['--checkpoint', 'ckpt', '--eval', '--write-split', '--workers', 0, photos,
                                     '--out-dir', 'predictions'], tmp_path)
    assert res.code == 0, res.err + res.out
    out = tmp_path / 'predictions'
    for stem in ('bremen_000000_000019_leftImg8bit', 'street'):
        train_ids = torch.from_numpy(np.array(Image.open(out / f'{stem}_labels.png'), dtype=np.int64))
        label_ids = torch.from_numpy(np.array(Image.open(out / f'{stem}_labelIds.png'), dtype=np.int64))
        assert torch.equal(label_ids, torch.tensor(list(TRAIN_ID_OF))[train_ids])


# ------------------------------------------------------------------------------------------ the real sample
def read_png(name, root=SAMPLE):
    return torch.from_numpy(np.array(Image.open(root / 'gtFine' / 'val' / 'frankfurt' / f'{STEM}_gtFine_{name}.png'),
                                     dtype=np.int64))


def train_ids_png(root=SAMPLE):
    return read_png('labelTrainIds', root)


def mapped_label_ids():
    """The raw labelIds PNG through the official table, computed here independently of some_define."""
    raw = read_png('labelIds')
    return raw.clone().apply_(lambda v: TRAIN_ID_OF.get(v, 255))


@pytest.fixture(scope='module')
def with_train(tmp_path_factory):
    """A copy of the sample with a 'train' split (the val image again) beside 'val'."""
    if not have_sample():
        pytest.skip(f'no Cityscapes sample at {SAMPLE}')
    root = tmp_path_factory.mktemp('cityscapes') / 'cityscapes'
    shutil.copytree(SAMPLE, root)
    for top in ('leftImg8bit', 'gtFine'):
        shutil.copytree(root / top / 'val', root / top / 'train')
    return root


def test_reads_label_ids_as_train_ids():
    ds = sd.CityscapesSegDataset(False, None, SAMPLE)
    assert len(ds) == 1 and ds.num_classes == 19
    assert ds.items[0][1].name.endswith('_gtFine_labelIds.png')   # the raw ids are preferred when both exist
    image, label = ds[0]
    expected = mapped_label_ids()
    assert image.shape == (3,) + tuple(expected.shape) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert torch.equal(label, expected)                            # exactly the official table, pixel for pixel
    assert not torch.equal(read_png('labelIds'), expected)         # the mapping did something
    assert set(label.unique().tolist()) <= set(range(19)) | {255}
    # uint8 image for the training loop, the same picture and label
    raw_image, raw_label = sd.CityscapesSegDataset(False, None, SAMPLE, normalize=False)[0]
    assert raw_image.dtype == torch.uint8 and raw_label.dtype == torch.uint8
    assert torch.equal(raw_label.long(), expected)
    assert torch.allclose(sd.normalize_image(raw_image), image)


def test_label_ids_agree_with_the_label_train_ids_png():
    """The sample's labelTrainIds PNG is NOT the pixel-exact image of its labelIds PNG: the fixture downscaled the
    two files (2048x1024 -> 256x128) separately, and they disagree at 77 of 32768 pixels, every one on a class
    boundary (the PNG's value lies within 2 px in the mapped label). So: the table matches per raw id (each id's
    pixels are mostly its train id in the PNG), and the disagreements are boundary jitter only."""
    label = sd.CityscapesSegDataset(False, None, SAMPLE)[0][1]
    png, raw = train_ids_png(), read_png('labelIds')
    assert (label == png).double().mean() > 0.995
    for v in raw.unique().tolist():
        values, counts = png[raw == v].unique(return_counts=True)
        assert int(values[counts.argmax()]) == TRAIN_ID_OF.get(v, 255), f'labelId {v}'
    near = torch.zeros_like(png, dtype=torch.bool)
    padded = torch.nn.functional.pad(label[None, None].float(), (2, 2, 2, 2), value=-1)[0, 0].long()
    h, w = png.shape
    for dy in range(5):
        for dx in range(5):
            near |= padded[dy:dy + h, dx:dx + w] == png
    assert near.all()


def test_falls_back_to_label_train_ids(tmp_path):
    root = tmp_path / 'cs'
    shutil.copytree(SAMPLE, root)
    (root / 'gtFine' / 'val' / 'frankfurt' / f'{STEM}_gtFine_labelIds.png').unlink()
    ds = sd.CityscapesSegDataset(False, None, root)
    assert ds.items[0][1].name.endswith('_gtFine_labelTrainIds.png')
    assert torch.equal(ds[0][1], train_ids_png())


def test_minicity_flat_layout(tmp_path):
    root = tmp_path / 'minicity'
    (root / 'leftImg8bit' / 'val').mkdir(parents=True)
    (root / 'gtFine' / 'val').mkdir(parents=True)
    shutil.copy(SAMPLE / 'leftImg8bit' / 'val' / 'frankfurt' / f'{STEM}_leftImg8bit.png',
                root / 'leftImg8bit' / 'val' / f'{STEM}_leftImg8bit.png')
    shutil.copy(SAMPLE / 'gtFine' / 'val' / 'frankfurt' / f'{STEM}_gtFine_labelIds.png',
                root / 'gtFine' / 'val' / f'{STEM}_gtFine_labelIds.png')
    ds = sd.CityscapesSegDataset(False, None, root)
    reference = sd.CityscapesSegDataset(False, None, SAMPLE)
    assert len(ds) == 1 and ds.items[0][1].parent == root / 'gtFine' / 'val'
    assert torch.equal(ds[0][1], mapped_label_ids())
    assert torch.equal(ds[0][0], reference[0][0])


def test_missing_label_is_one_clear_error(tmp_path):
    root = tmp_path / 'cs'
    shutil.copytree(SAMPLE, root)
    for p in (root / 'gtFine' / 'val' / 'frankfurt').glob('*.png'):
        p.unlink()
    with pytest.raises(sd.UserError, match='labelIds.png is missing'):
        sd.CityscapesSegDataset(False, None, root)
    with pytest.raises(sd.UserError, match='no Cityscapes train images'):
        sd.CityscapesSegDataset(True, (64, 128), root)


def test_training_crops(with_train):
    ds = sd.CityscapesSegDataset(True, (64, 128), with_train)
    assert len(ds) == 1
    seen = []
    for seed in range(6):
        image, label = ds[(0, seed)]
        assert image.shape == (3, 64, 128) and image.dtype == torch.float32 and torch.isfinite(image).all()
        assert label.shape == (64, 128) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= set(range(19)) | {255}
        again = ds[(0, seed)]
        assert torch.equal(again[0], image) and torch.equal(again[1], label)   # (index, seed) -> the same item
        seen.append(image)
    assert any(not torch.equal(seen[0], other) for other in seen[1:])          # and seeds do vary the crop
    # without the tutorial's random scale/flip/jitter a crop is a window of the full label
    plain = sd.CityscapesSegDataset(True, (64, 128), with_train, normalize=False, augment=False)
    full = mapped_label_ids()
    image, label = plain[(0, 3)]
    assert image.dtype == torch.uint8
    windows = full.unfold(0, 64, 1).unfold(1, 128, 1)                          # every 64x128 window
    assert (windows == label).flatten(2).all(2).any()


def start_script(script, args, cwd):
    return subprocess.Popen([sys.executable, str(MAIN / script)] + [str(a) for a in args], cwd=cwd,
                            env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_ok(proc, timeout=240):
    code, out, err = finish(proc, timeout)
    assert code == 0, f'{proc.args[1:3]} exited {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}'
    return out


def test_train_and_predict_scripts(with_train, tmp_path):
    common = ['--dataset', 'cityscapes', '--data-dir', with_train, '--model', 'fcn', '--epochs', 1,
              '--batch-size', 1, '--crop-size', 64, 128, '--no-pretrained', '--workers', 0,
              '--finetune-epochs', 0, '--loss', 'weighted_ce']
    # the two trainings run side by side (separate working folders: each draws its own pictures/)
    (tmp_path / 'tutorial').mkdir()
    counted = start_script('my_train.py', common + ['--save', 'ckpt'], tmp_path)
    tutorial = start_script('my_train.py', common + ['--class-weights', 'tutorial', '--save', 'ckpt_tutorial'],
                            tmp_path / 'tutorial')
    out, out_tutorial = finish_ok(counted), finish_ok(tutorial)
    assert 'epoch 1/1' in out and 'epoch 1/1' in out_tutorial
    assert 'share' in out and 'share' not in out_tutorial   # pixel-count weights are shown, the tutorial's are fixed
    ckpt = torch.load(tmp_path / 'ckpt', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['num_classes'] == 19 and ckpt['config']['dataset'] == 'cityscapes'
    assert ckpt['model_args']['name'] == 'fcn' and len(ckpt['history']) == 1
    tutorial = torch.load(tmp_path / 'tutorial' / 'ckpt_tutorial', map_location='cpu', weights_only=True)
    assert tutorial['config']['class_weights'] == 'tutorial' and tutorial['epoch'] == 1

    out = finish_ok(start_script('my_predict.py', ['--checkpoint', 'ckpt', '--eval'], tmp_path))
    assert 'mIoU' in out
    result = json.loads((tmp_path / 'ckpt_results.json').read_text())
    assert result['images'] == 1 and len(result['iou']) == 19
    assert result['pixels'] == int((mapped_label_ids() != 255).sum())   # the whole image at its original size
    assert (tmp_path / 'pictures' / 'my_out.png').exists()
