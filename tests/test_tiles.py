"""Sliding-window prediction (--tile, --tile-overlap, --whole-image): mmsegmentation's slide mode, against that
mode's loop written out here (windows at the stride, the last one shifted back to the border, scores summed into a
map and divided by a count map), and against whole-image prediction where the comparison is fair: a net whose
receptive field is a few pixels, compared at the pixels that lie that far inside every window covering them (nearer a
window's edge the window sees zeros where the whole image has pixels). Then the automatic switch and the flags
through the scripts, on a checkpoint of one epoch (its training crop, 32x64, is the default window).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import some_define as sd
from test_flags import record, run_ok
from test_reliability import FAST, MY_PREDICT, ORIGIN_PREDICT, ORIGIN_TRAIN, run_inprocess

HALO = 2        # two 3x3 convolutions: a score depends on the pixels up to 2 away


def local_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()


def mmseg_slide(scores_of, X, crop, stride):
    """mmseg/models/segmentors/encoder_decoder.py slide_inference, as it is written there."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    batch_size, _, h_img, w_img = X.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds, count_mat = None, X.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_seg_logit = scores_of(X[:, :, y1:y2, x1:x2])
            if preds is None:
                preds = X.new_zeros((batch_size, crop_seg_logit.shape[1], h_img, w_img))
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def fair_pixels(size, windows_y, windows_x, window):
    """The pixels at least HALO inside every window that covers them (image borders included: the whole image is
    padded to a multiple of 32 at its bottom and right, a window at the border is not)."""
    masks = []
    for length, starts, side in zip(size, (windows_y, windows_x), window):
        inside = torch.ones(length, dtype=torch.bool)
        for s in starts:
            covered = torch.zeros(length, dtype=torch.bool)
            covered[s:s + side] = True
            deep = torch.zeros(length, dtype=torch.bool)
            deep[s + HALO:s + side - HALO] = True
            inside &= ~covered | deep
        masks.append(inside)
    return masks[0][:, None] & masks[1][None, :]


# ---------------------------------------------------------------------------------------------- the mechanism
@pytest.mark.parametrize('length,window,stride,starts', [
    (200, 96, 64, [0, 64, 104]), (300, 128, 85, [0, 85, 170, 172]), (96, 96, 64, [0]), (50, 96, 64, [0]),
    (256, 128, 128, [0, 128]), (257, 128, 128, [0, 128, 129])])
def test_window_starts_cover_the_side_and_the_last_ends_at_the_border(length, window, stride, starts):
    got = sd.window_starts(length, window, stride)
    assert got == starts
    covered = torch.zeros(length, dtype=torch.bool)
    for s in got:
        covered[s:s + window] = True
        assert s + min(window, length) <= length         # every window whole, inside the side
    assert covered.all()
    assert got[-1] + min(window, length) == length       # the last one ends at the border


def test_tiles_are_mmsegmentations_slide_mode_and_the_whole_image_at_the_windows_interior():
    """200x300 in 96x128 windows overlapping by a third: the scores are mmseg's loop's, window for window; they are
    the whole image's within float tolerance wherever every covering window sees the pixel's receptive field; the
    net sees exactly the 3 x 4 windows of that stride."""
    net = local_net()
    X = torch.randn(2, 3, 200, 300)
    tiling = sd.Tiling((96, 128), 1 / 3, 'on')
    assert tiling.stride() == (64, 85)
    seen = []
    net.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape[-2:])))
    tiled = sd.predict_scores(net, X, tiling=tiling)
    assert seen == [(96, 128)] * 12
    with torch.no_grad():
        expected = mmseg_slide(net, X, (96, 128), (64, 85))
    torch.testing.assert_close(tiled, expected, atol=1e-5, rtol=1e-5)
    whole = sd.predict_scores(net, X)
    fair = fair_pixels((200, 300), [0, 64, 104], [0, 85, 170, 172], (96, 128))
    assert fair.float().mean() > 0.8
    torch.testing.assert_close(tiled[..., fair], whole[..., fair], atol=1e-5, rtol=1e-5)
    assert (tiled - whole).abs().amax(dim=1)[:, ~fair].max() > 1e-3     # where it is unfair, it differs


def test_an_overlap_of_zero_puts_windows_side_by_side_and_more_overlap_means_more_windows():
    net = local_net()
    X = torch.randn(1, 3, 192, 256)
    counts = {}
    for overlap in (0.0, 0.5):
        seen = []
        hook = net.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
        sd.predict_scores(net, X, tiling=sd.Tiling((64, 128), overlap, 'on'))
        hook.remove()
        counts[overlap] = len(seen)
    assert counts == {0.0: 3 * 2, 0.5: 5 * 3}


def test_labels_come_band_by_band_and_are_the_tiled_scores_argmax():
    """predict's tiled labels (a band of rows at a time) are the argmax of slide_scores' whole map, on a batch; each
    band holds the rows between two rows of windows, the last one the rest."""
    net = local_net()
    images = torch.randint(0, 256, (2, 3, 200, 300), dtype=torch.uint8)
    tiling = sd.Tiling((96, 128), 1 / 3, 'on')
    X = sd.normalize_image(images)
    bands = list(sd.slide_bands(X, tiling, net))
    assert [band.shape[2] for band in bands] == [64, 40, 96]
    scores = sd.slide_scores(net, X, tiling)
    torch.testing.assert_close(torch.cat(bands, dim=2), scores)
    assert torch.equal(sd.predict(net, images, tiling=tiling), scores.argmax(1))


def test_tiles_compose_with_multi_scale_and_the_flip_and_with_the_test_size():
    """--mst: each window through every scale and its flip (softmax averaged), the windows then averaged as mmseg's
    slide mode averages logits. --test-size: the windows are taken at that size, the scores resized back."""
    net = local_net()
    X = torch.randn(1, 3, 100, 150)
    tiling, scales = sd.Tiling((64, 64), 0.25, 'on'), (0.5, 1.0)

    def window_mst(window):
        out = 0
        for s in scales:
            size = (round(window.shape[-2] * s), round(window.shape[-1] * s))
            x = F.interpolate(window, size=size, mode='bilinear', align_corners=False)
            for flip in (False, True):
                scores = sd.run_padded(net, x.flip(-1) if flip else x)
                p = F.interpolate(scores, size=window.shape[-2:], mode='bilinear', align_corners=False).softmax(1)
                out = out + (p.flip(-1) if flip else p)
        return out / 4
    with torch.no_grad():
        expected = mmseg_slide(window_mst, X, (64, 64), (48, 48))
    torch.testing.assert_close(sd.predict_scores(net, X, scales, tiling=tiling), expected, atol=1e-5, rtol=1e-5)
    small = F.interpolate(X, size=(80, 120), mode='bilinear', align_corners=False)
    with torch.no_grad():
        expected = F.interpolate(mmseg_slide(net, small, (64, 64), (48, 48)), size=(100, 150), mode='bilinear',
                                 align_corners=False)
    torch.testing.assert_close(sd.predict_scores(net, X, test_size=(80, 120), tiling=tiling), expected,
                               atol=1e-5, rtol=1e-5)


def test_the_automatic_switch_tiles_above_the_threshold_only(monkeypatch):
    """'auto' (no --tile) tiles the images over TILE_ABOVE_PIXELS and no others; 'off' (--whole-image) never; 'on'
    (--tile) always. Cityscapes' 2048x1024 stays whole, a 12 MP photo does not."""
    auto, off, on = (sd.Tiling((32, 64), 1 / 3, mode) for mode in ('auto', 'off', 'on'))
    assert not auto.applies(1024, 2048) and auto.applies(3024, 4032)
    assert not off.applies(3024, 4032) and on.applies(32, 64)
    net = local_net()
    X = torch.randn(1, 3, 64, 96)
    seen = []
    net.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape[-2:])))
    sd.predict_scores(net, X, tiling=auto)
    assert seen == [(64, 96)]
    monkeypatch.setattr(sd, 'TILE_ABOVE_PIXELS', 64 * 96 - 1)
    seen.clear()
    sd.predict_scores(net, X, tiling=auto)
    assert seen == [(32, 64)] * 6
    seen.clear()
    sd.predict_scores(net, X, tiling=off)
    assert seen == [(64, 96)]


def test_predict_tiling_from_the_flags():
    config = {'crop_size': [32, 64]}
    assert sd.predict_tiling(config) == sd.Tiling((32, 64), sd.TILE_OVERLAP, 'auto')
    assert sd.predict_tiling(config, [100, 200], 0.5) == sd.Tiling((100, 200), 0.5, 'on')
    assert sd.predict_tiling(config, whole_image=True).mode == 'off'
    with pytest.raises(sd.UserError, match='--tile 0 64'):
        sd.predict_tiling(config, [0, 64])


# ------------------------------------------------------------------------------------------------ the scripts
@pytest.fixture(scope='module')
def fcn(demo_voc, tmp_path_factory):
    """origin_train.py, one epoch: its checkpoint (training crop 32x64)."""
    work = tmp_path_factory.mktemp('tiles_fcn')
    run_ok(ORIGIN_TRAIN, ['--data-dir', demo_voc] + FAST, work)
    return work / 'checkpoints' / 'origin.pt'


@pytest.fixture
def photo(demo_voc, tmp_path):
    """A demo image enlarged to 150x200 (a JPEG, as a camera writes)."""
    src = sorted((demo_voc / 'JPEGImages').glob('*.jpg'))[0]
    path = tmp_path / 'photos' / 'big.jpg'
    path.parent.mkdir()
    Image.open(src).convert('RGB').resize((200, 150)).save(path, quality=95)
    return path


def reference_labels(ckpt, image, window):
    """The labels of mmseg's loop over the checkpoint's net, at a third of overlap."""
    net, _ = sd.load_model(ckpt, torch.device('cpu'))
    stride = tuple(int(side * 2 / 3) for side in window)
    with torch.no_grad():
        scores = mmseg_slide(lambda x: sd.run_padded(net, x), sd.normalize_image(image)[None], window, stride)
    return scores.argmax(1)[0]


def test_my_predict_tiles_a_photo_over_the_threshold_and_not_with_whole_image(fcn, photo, tmp_path, monkeypatch):
    """my_predict.py photo.jpg: above the (lowered) threshold the net sees only windows of the training crop, and the
    label PNG is mmseg's slide mode over those windows; with --whole-image it sees the photo whole."""
    monkeypatch.setattr(sd, 'TILE_ABOVE_PIXELS', 100 * 100)
    calls = record(monkeypatch, 'run_padded')
    run_ok(MY_PREDICT, [photo, '--checkpoint', fcn, '--out-dir', 'seg'], tmp_path)
    rows, cols = sd.window_starts(150, 32, 21), sd.window_starts(200, 64, 42)
    assert [tuple(c['x'].shape[-2:]) for c in calls] == [(32, 64)] * (len(rows) * len(cols))
    calls.clear()
    with Image.open(tmp_path / 'seg' / 'big_labels.png') as png:
        labels = torch.from_numpy(np.array(png)).long()
    assert torch.equal(labels, reference_labels(fcn, sd.read_image(photo), (32, 64)))
    calls.clear()
    run_ok(MY_PREDICT, [photo, '--checkpoint', fcn, '--out-dir', 'whole', '--whole-image'], tmp_path)
    assert [tuple(c['x'].shape[-2:]) for c in calls] == [(150, 200)]


def test_tile_flag_tiles_every_image_and_eval_counts_the_tiled_labels(fcn, tmp_path, monkeypatch):
    """origin_predict.py --eval --tile 48 64: every val image reaches the net in 48x64 windows (the picture's crops
    are not tiled), and the figures are those of mmseg's slide mode over the val split."""
    calls = record(monkeypatch, 'run_padded')
    run_ok(ORIGIN_PREDICT, ['--checkpoint', fcn, '--eval', '--tile', '48', '64', '--workers', '0', '--picture',
                            'p.png', '--num-images', '1'], tmp_path)
    sizes = [tuple(c['x'].shape) for c in calls]
    voc = Path(sd.load_torch_file(fcn)['config']['data_dir'])
    ids = (voc / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()
    cm = sd.ConfusionMatrix(21)
    windows = 0
    for name in ids:
        image = sd.read_image(voc / 'JPEGImages' / f'{name}.jpg')
        h, w = image.shape[-2:]
        windows += len(sd.window_starts(h, 48, 32)) * len(sd.window_starts(w, 64, 42))
        cm.update(reference_labels(fcn, image, (48, 64)), sd.read_label(voc / 'SegmentationClass' / f'{name}.png'))
    assert sum(n for n, _, h, w in sizes if (h, w) == (48, 64)) == windows
    assert {size[-2:] for size in sizes} == {(48, 64), (32, 64)}      # (32, 64): the picture's crop
    result = json.loads(sd.results_path(fcn, '.json').read_text())
    expected = cm.compute()
    assert result['pixels'] == expected['pixels']
    assert result['miou'] == pytest.approx(expected['miou']) and result['pixel_acc'] == expected['pixel_acc']


@pytest.mark.parametrize('flags,named', [(['--tile-overlap', '1'], '--tile-overlap'),
                                         (['--tile', '32', '64', '--whole-image'], '--whole-image')])
def test_bad_tile_flags_are_one_usage_error(fcn, tmp_path, flags, named):
    res = run_inprocess(ORIGIN_PREDICT, ['--checkpoint', fcn] + flags, tmp_path)
    assert res.code == 2 and 'Traceback' not in res.err and named in res.err.splitlines()[-1], res.err


def test_the_overlay_is_torchvisions_draw_segmentation_masks_at_half_alpha():
    """segmentation_pictures' overlay, computed in uint8 for big photos, is the picture torchvision draws; with a
    user's colours of odd values too (VOC's are all even)."""
    import torchvision
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    pred = torch.randint(0, 4, (37, 53))
    classes = sd.Classes(['background', 'a', 'b', 'c'], [[0, 0, 0], [255, 1, 3], [7, 129, 33], [201, 99, 255]])
    overlay = dict(sd.segmentation_pictures(image, pred, classes))['overlay']
    masks = pred[None] == torch.arange(4)[:, None, None]
    colors = [tuple(c) for c in classes.colors]
    expected = torchvision.utils.draw_segmentation_masks(image, masks, alpha=0.5, colors=colors)
    assert np.array_equal(np.asarray(overlay), expected.permute(1, 2, 0).numpy())
