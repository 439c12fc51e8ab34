"""A labelme export trains with --data-dir and no conversion: the folder that labelme's
examples/semantic_segmentation/labelme2voc.py writes, in its newer layout (SegmentationClass/ label PNGs,
SegmentationClassNpy/ arrays) and its older one (SegmentationClass/ arrays, SegmentationClassPNG/ label PNGs):
classes from class_names.txt, `__ignore__` (-1, 255 in the PNGs) ignored, a seeded share held out as val since
labelme writes no split, and the predict script finding the same val from the checkpoint. CPU only, tiny images."""
import numpy as np
import pytest
import torch
from PIL import Image

import some_define as sd
from test_reliability import ORIGIN_PREDICT, ORIGIN_TRAIN, one_error_line, run_inprocess

FAST = ['--epochs', '1', '--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']
# The labels file a labelme user writes (labelme2voc.py --labels): __ignore__ (value -1) first, then _background_.
LABELS = ['__ignore__', '_background_', 'crack', 'rust stain']


def label_colormap(n=256):
    """imgviz.label_colormap, which labelme.utils.lblsave puts on its label PNGs: VOC's bit-interleaved palette."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = r, g, b
    return cmap


def lblsave(path, lbl):
    """labelme.utils.lblsave: int32 labels in -1..254 as a 'P' PNG of their uint8 values (-1 -> 255)."""
    img = Image.fromarray(lbl.astype(np.uint8), mode='P')
    img.putpalette(label_colormap().flatten())
    img.save(path)


def write_labelme2voc(root, n=10, old=False):
    """labelme2voc.py's output for n annotated 48x72 photos: {name: the -1..2 label array it saved as .npy}."""
    png_dir, npy_dir = ('SegmentationClassPNG', 'SegmentationClass') if old else \
        ('SegmentationClass', 'SegmentationClassNpy')
    for folder in ('JPEGImages', png_dir, npy_dir, 'SegmentationClassVisualization'):
        (root / folder).mkdir(parents=True)
    (root / 'class_names.txt').write_text('\n'.join(LABELS[1:]))      # as it writes it: no __ignore__, no last \n
    rng, truth = np.random.default_rng(0), {}
    for i in range(n):
        name = f'2011_{i:06d}'
        lbl = np.zeros((48, 72), np.int32)
        lbl[4 + i:30, 10:40], lbl[30:44, 40 - i:70] = 1, 2
        lbl[20:26, 20:50] = -1              # a shape labelled __ignore__
        image = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / 'JPEGImages' / f'{name}.jpg')
        lblsave(root / png_dir / f'{name}.png', lbl)
        np.save(root / npy_dir / f'{name}.npy', lbl)
        Image.fromarray(image // 2).save(root / 'SegmentationClassVisualization' / f'{name}.jpg')
        truth[name] = lbl
    return root, truth


@pytest.mark.parametrize('old', [False, True], ids=['SegmentationClass', 'SegmentationClassPNG'])
def test_a_labelme_export_reads_as_written(tmp_path, old):
    """The classes from class_names.txt in VOC's palette; each label as the .npy labelme saved beside it, its -1 as
    255 (ignored); a fifth held out as val, the same every time, disjoint from train, together all of them."""
    root, truth = write_labelme2voc(tmp_path / 'data_dataset_voc', old=old)
    data = sd.find_data('voc', root)
    assert data.kind == 'labelme' and data.title == 'data_dataset_voc'
    assert data.classes == sd.Classes(['background', 'crack', 'rust stain'], label_colormap(3).tolist())
    train, val = (sd.open_dataset(data, is_train) for is_train in (True, False))
    stems = [[p.stem for p, _ in ds.items] for ds in (train, val)]
    assert len(stems[1]) == round(sd.LABELME_VAL_SHARE * 10) == 2 and not set(stems[0]) & set(stems[1])
    assert sorted(stems[0] + stems[1]) == sorted(truth)
    assert stems == [[p.stem for p, _ in sd.open_dataset(sd.find_data('voc', root), t).items] for t in (True, False)]
    for ds in (train, val):
        for i, (image, label) in enumerate(ds.read(i) for i in range(len(ds))):
            expected = torch.from_numpy(truth[ds.items[i][0].stem]).long()
            assert image.shape == (3, 48, 72) and torch.equal(label, torch.where(expected < 0, 255, expected))
    counts, ignored = sd.class_pixel_counts(train, tmp_path)
    assert ignored == 6 * 30 * len(train) and counts.sum() == (48 * 72 - 180) * len(train)


def test_an_ignore_line_in_class_names_is_no_class(tmp_path):
    """class_names.txt written from the labels file (`__ignore__` first, a trailing newline): the same classes."""
    root, _ = write_labelme2voc(tmp_path / 'export', n=5)
    (root / 'class_names.txt').write_text('\n'.join(LABELS) + '\n')
    assert sd.find_data('voc', root).classes.names == ['background', 'crack', 'rust stain']


def test_a_labelme_export_trains_and_predicts_with_data_dir_alone(tmp_path):
    """origin_train.py --data-dir export/ and nothing else; the predict script evaluates the same held-out fifth,
    with labelme's class names, from the checkpoint; --val-share changes the share."""
    root, _ = write_labelme2voc(tmp_path / 'export')
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', root] + FAST, tmp_path)
    assert res.code == 0, res.err + res.out
    assert sd.load_torch_file(tmp_path / 'checkpoints' / 'origin.pt')['classes']['names'][2] == 'rust stain'
    res = run_inprocess(ORIGIN_PREDICT, ['--eval', '--workers', '0'], tmp_path)
    assert res.code == 0 and 'on 2 val images' in res.out and 'rust stain' in res.out, res.err + res.out
    assert len(sd.labelme_files(root, False, 0.3).items) == 3
    one_error_line(run_inprocess(ORIGIN_TRAIN, ['--data-dir', root, '--val-share', '0.01'] + FAST, tmp_path),
                   '--val-share 0.01', 'SegmentationClass')


def test_a_broken_labelme_export_is_one_line(tmp_path):
    root, _ = write_labelme2voc(tmp_path / 'export', n=5)
    (root / 'JPEGImages' / '2011_000003.jpg').unlink()
    one_error_line(run_inprocess(ORIGIN_TRAIN, ['--data-dir', root] + FAST, tmp_path), '2011_000003.jpg',
                   'SegmentationClass/2011_000003.png')
    for label in (root / 'SegmentationClass').glob('*.png'):
        label.unlink()
    one_error_line(run_inprocess(ORIGIN_TRAIN, ['--data-dir', root] + FAST, tmp_path), 'holds no label PNGs',
                   'class_names.txt')
    (root / 'class_names.txt').write_text('_background_\n')
    one_error_line(run_inprocess(ORIGIN_TRAIN, ['--data-dir', root] + FAST, tmp_path), 'class_names.txt',
                   '1 classes')
