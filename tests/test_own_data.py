"""A user's own data: class files (--classes, classes.txt, class_dict.csv), the folder layout (--dataset folder) with
index and RGB masks, the VOC layout with other classes, every bad input as one line naming the file, and a round
trip train -> checkpoint -> predict whose table, results and pictures carry the dataset's class names and colours.
CPU only, tiny data made from the demo generator."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import some_define as sd  # noqa: E402
from test_reliability import (MY_PREDICT, MY_TRAIN, ORIGIN_PREDICT, ORIGIN_TRAIN, one_error_line,  # noqa: E402
                              run_inprocess)

FAST = ['--epochs', '1', '--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']
# four classes: the demo's background, aeroplane, car and person; its birds and cats become 'ignore'
NAMES = ['sky', 'plane', 'car', 'person']
COLORS = [[10, 20, 30], [250, 0, 0], [0, 250, 0], [0, 0, 250]]
FROM_VOC = {0: 0, 1: 1, 7: 2, 15: 3}


def to_classes(label):
    """A demo VOC label (indices) -> indices of the four classes above (others and void -> 255)."""
    out = np.full(label.shape, 255, np.uint8)
    for voc, ours in FROM_VOC.items():
        out[label == voc] = ours
    return out


def write_folder(root, voc, rgb, classes_text=None):
    """The demo data in the folder layout: index masks ('L' PNGs) or RGB masks in COLORS (void: VOC's void colour)."""
    for split, is_train in (('train', True), ('val', False)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'masks' / split).mkdir(parents=True)
        for image, label in sd.voc_files(voc, is_train).items:
            shutil.copy(image, root / 'images' / split / image.name)
            mask = to_classes(np.array(Image.open(label)))
            if rgb:
                table = sd.palette(COLORS).numpy()
                Image.fromarray(table[mask]).save(root / 'masks' / split / label.name)
            else:
                Image.fromarray(mask, mode='L').save(root / 'masks' / split / label.name)
    text = ''.join(f'{n} {r} {g} {b}\n' for n, (r, g, b) in zip(NAMES, COLORS))
    (root / 'classes.txt').write_text(classes_text if classes_text is not None else text)
    return root


def random_folder(root, class_names, counts, paint, seed=0):
    """A user's folder layout of random 48x72 JPEGs and index masks that paint(mask) draws, {split: count} of each,
    and classes.txt."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for folder in ('images', 'masks'):
            (root / folder / split).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / 'images' / split / f'{i}.jpg')
            mask = np.zeros((48, 72), np.uint8)
            paint(mask)
            Image.fromarray(mask).save(root / 'masks' / split / f'{i}.png')
    (root / 'classes.txt').write_text('\n'.join(class_names) + '\n')
    return root


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    return Path(sd.make_demo_voc(tmp_path_factory.mktemp('voc') / 'VOC2012', num_train=12, num_val=6, seed=1))


@pytest.fixture(scope='module')
def folders(tmp_path_factory, voc):
    base = tmp_path_factory.mktemp('folders')
    return {'index': write_folder(base / 'index', voc, rgb=False), 'rgb': write_folder(base / 'rgb', voc, rgb=True)}


@pytest.fixture
def folder(tmp_path, folders):
    """A private copy of the RGB-mask folder to break."""
    return Path(shutil.copytree(folders['rgb'], tmp_path / 'mydata'))


# ------------------------------------------------------------------------------------------------- class files
BOOK_COLORMAP = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                 [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128], [192, 0, 128],
                 [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]]


def test_palette_colors_are_vocs():
    """The one palette: the book's VOC_COLORMAP literal, VOC's void colour, and the PIL palette of its PNGs."""
    assert sd.VOC_COLORMAP == sd.palette_colors(21) == BOOK_COLORMAP
    assert sd.palette_colors(256)[255] == sd.VOID_COLOR == [224, 224, 192]
    table = sd.palette(BOOK_COLORMAP[:3]).tolist()
    assert table[:3] == BOOK_COLORMAP[:3] and table[255] == [224, 224, 192] and table[21] == sd.palette_colors(22)[21]


def test_class_file_formats(tmp_path):
    f = tmp_path / 'classes.txt'
    f.write_text('# background first\nbackground\npotted plant 0 64 0\n\ncat\nperson 255 0 0\n')
    classes = sd.read_classes(f)
    assert classes.names == ['background', 'potted plant', 'cat', 'person']
    # given colours kept; the others take VOC's palette in order, skipping colours already taken
    assert classes.colors == [[0, 0, 0], [0, 64, 0], [128, 0, 0], [255, 0, 0]]
    csv = tmp_path / 'class_dict.csv'
    csv.write_text('name,r,g,b\nSky,128,128,128\nRoad,128,64,128\n')
    assert sd.read_classes(csv) == sd.Classes(['Sky', 'Road'], [[128, 128, 128], [128, 64, 128]])


@pytest.mark.parametrize('text, says', [('a\nb 1 2\n', 'line 2'), ('a\nb 1 2 300\n', 'line 2'),
                                        ('a\na\n', 'twice'), ('a 1 2 3\nb 1 2 3\n', 'twice'),
                                        ('only\n', '1 classes'), ('a\nb 224 224 192\n', 'ignored')])
def test_bad_class_files(tmp_path, text, says):
    f = tmp_path / 'classes.txt'
    f.write_text(text)
    with pytest.raises(sd.UserError, match=says) as info:
        sd.read_classes(f)
    assert str(f) in str(info.value)


# ------------------------------------------------------------------------------------------------ the datasets
@pytest.mark.parametrize('kind', ['index', 'rgb'])
def test_folder_dataset_reads_both_mask_kinds_alike(folders, voc, kind):
    data = sd.find_data('folder', folders[kind])
    assert data.classes == sd.Classes(NAMES, COLORS) and data.title == kind
    ds = sd.open_dataset(data, is_train=True)
    files = sd.voc_files(voc, True).items
    assert len(ds) == len(files) and ds.num_classes == 4
    for i in range(len(ds)):
        _, label = ds.read(i)
        expected = torch.from_numpy(to_classes(np.array(Image.open(files[i][1])))).long()
        assert torch.equal(label, expected)
    assert any((ds.read(i)[1] == 3).any() for i in range(len(ds)))


def test_voc_layout_with_own_classes(tmp_path, voc):
    """--classes with the VOC layout: palette labels hold indices of the file's classes."""
    root = Path(shutil.copytree(voc, tmp_path / 'VOC2012'))
    for _, label in sd.voc_files(root, True).items + sd.voc_files(root, False).items:
        img = Image.fromarray(to_classes(np.array(Image.open(label))), mode='P')
        img.putpalette(sd.palette(COLORS).reshape(-1).tolist())
        img.save(label)
    (tmp_path / 'classes.txt').write_text('\n'.join(NAMES) + '\n')
    data = sd.find_data('voc', root, classes=tmp_path / 'classes.txt')
    assert data.classes.names == NAMES and data.classes.colors[:2] == sd.VOC_COLORMAP[:2]
    train_iter, _ = sd.load_data_voc(4, (32, 64), data=data, num_workers=0, device=torch.device('cpu'))
    assert train_iter.dataset.num_classes == 4
    X, y = next(iter(train_iter))
    assert X.shape == (4, 3, 32, 64) and set(y.unique().tolist()) <= {0, 1, 2, 3, 255}
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', root, '--classes', tmp_path / 'classes.txt'] + FAST, tmp_path)
    assert res.code == 0, res.err + res.out
    ckpt = sd.load_torch_file(tmp_path / 'checkpoints' / 'origin.pt')
    assert ckpt['classes']['names'] == NAMES and ckpt['model_args']['num_classes'] == 4
    res = run_inprocess(ORIGIN_PREDICT, ['--eval', '--workers', '0'], tmp_path)
    assert res.code == 0 and 'person' in res.out, res.err + res.out


# ------------------------------------------------------------------------------------------------- bad inputs
def break_folder(folder, case):
    images, masks = folder / 'images' / 'train', folder / 'masks' / 'train'
    first = sorted(masks.iterdir())[0]
    if case == 'image_without_mask':
        first.unlink()
        return images / (first.stem + '.jpg')
    if case == 'mask_without_image':
        (images / (first.stem + '.jpg')).unlink()
        return first
    if case == 'size_mismatch':
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(first)
        return first
    if case == 'value_outside_classes':
        Image.fromarray(np.full((90, 120), 7, np.uint8), mode='L').resize(Image.open(first).size).save(first)
        return first
    if case == 'colour_not_a_class':
        mask = np.array(Image.open(first))
        mask[5, 9] = [1, 2, 3]
        Image.fromarray(mask).save(first)
        return first
    if case == 'no_classes_file':
        (folder / 'classes.txt').unlink()
        return folder / 'classes.txt'
    shutil.rmtree(folder / 'images' / 'val')
    return folder / 'images' / 'val'


@pytest.mark.parametrize('case', ['image_without_mask', 'mask_without_image', 'size_mismatch',
                                  'value_outside_classes', 'colour_not_a_class', 'no_classes_file', 'no_val_folder'])
def test_bad_folder_is_one_line_naming_the_file(tmp_path, folder, case):
    named = break_folder(folder, case)
    res = run_inprocess(ORIGIN_TRAIN, ['--dataset', 'folder', '--data-dir', folder] + FAST, tmp_path)
    line = one_error_line(res, named)
    if case == 'colour_not_a_class':
        assert '(1, 2, 3)' in line and 'x=9, y=5' in line, line
    if case == 'value_outside_classes':
        assert '7' in line, line


# ------------------------------------------------------------------------------------------------- round trip
@pytest.fixture(scope='module')
def trained(tmp_path_factory, folders):
    """my_train.py on the RGB-mask folder with the tutorial's techniques (class weights from the masks, focal loss,
    CopyBlob by class name, CutMix), then my_predict.py --eval and origin_predict.py on photos."""
    work = tmp_path_factory.mktemp('own')
    args = ['--dataset', 'folder', '--data-dir', folders['rgb'], '--finetune-epochs', '0', '--loss', 'focal',
            '--class-weights', 'counts', '--copyblob', '1', '--copyblob-pairs', 'person:sky', '--cutmix', '0.5']
    train = run_inprocess(MY_TRAIN, args + FAST, work)
    predict = run_inprocess(MY_PREDICT, ['--eval', '--workers', '0'], work)
    photos = work / 'photos'
    photos.mkdir()
    shutil.copy(sorted((folders['rgb'] / 'images' / 'val').iterdir())[0], photos / 'a.jpg')
    segment = run_inprocess(ORIGIN_PREDICT, [photos, '--checkpoint', 'checkpoints/my.pt', '--out-dir', 'seg'], work)
    return work, train, predict, segment


def test_training_on_own_data_records_the_classes(trained):
    work, train, _, _ = trained
    assert train.code == 0, train.err + train.out
    assert 'person' in train.out and 'share' in train.out     # the class-weight table names our classes
    ckpt = sd.load_torch_file(work / 'checkpoints' / 'my.pt')
    assert ckpt['classes'] == {'names': NAMES, 'colors': COLORS}
    assert ckpt['model_args']['num_classes'] == 4 and ckpt['config']['dataset'] == 'folder'


def test_predict_on_own_data_names_the_classes(trained):
    work, _, predict, segment = trained
    assert predict.code == 0, predict.err + predict.out
    for name in NAMES:
        assert name in predict.out
    result = json.loads((work / 'checkpoints' / 'my_results.json').read_text())
    assert result['class_names'] == NAMES and len(result['iou']) == 4
    assert (work / 'checkpoints' / 'my_confusion.png').exists() and (work / 'pictures' / 'compare.png').exists()
    assert segment.code == 0, segment.err + segment.out
    with Image.open(work / 'seg' / 'a_labels.png') as labels:
        assert labels.mode == 'P' and labels.getpalette()[:12] == sum(COLORS, [])
        assert np.array(labels).max() < 4


def test_copyblob_on_own_classes_needs_pairs(tmp_path, folders):
    res = run_inprocess(MY_TRAIN, ['--dataset', 'folder', '--data-dir', folders['index'], '--copyblob', '1',
                                   '--finetune-epochs', '0'] + FAST, tmp_path)
    one_error_line(res, '--copyblob-pairs')


def test_folder_demo_writes_a_layout_users_can_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, 'DEMO_DIR', tmp_path / 'demo' / 'VOC2012')
    root = sd.make_demo_folder(tmp_path / 'demo' / 'folder')
    data = sd.find_data('folder', root)
    assert data.classes == sd.DEMO_FOLDER_CLASSES
    val = sd.open_dataset(data, is_train=False)
    with Image.open(val.items[0][1]) as mask:
        assert mask.mode == 'RGB'
    assert len(val) == 40 and set(val.read(0)[1].unique().tolist()) <= set(range(6)) | {255}


@pytest.mark.parametrize('foreground', [255, 1])
def test_masks_saved_as_0_255_are_named_before_training(tmp_path, foreground):
    """One class, its masks saved as 0/255 (common for binary masks): here 255 means "ignore", so the class never
    reaches the loss. One line says so before the first epoch, with the class, the share of 255 and the fix; masks
    saved as 0/1 train without it."""
    def paint(mask):
        mask[10:30, 20:50] = foreground
    root = random_folder(tmp_path / 'cracks', ['background', 'crack'], {'train': 6, 'val': 2}, paint)
    res = run_inprocess(MY_TRAIN, ['--dataset', 'folder', '--data-dir', root, '--model', 'fcn', '--finetune-epochs',
                                   '0', '--save', 'c.pt'] + FAST + ['--batch-size', '2'], tmp_path)
    assert res.code == 0, res.err
    warnings = [line for line in res.out.splitlines() if line.startswith('warning:')]
    if foreground == 1:
        assert warnings == []
    else:
        share = 600 / (48 * 72)
        assert len(warnings) == 1 and 'crack has no labelled pixel' in warnings[0], res.out
        assert f'{share:.1%}' in warnings[0] and '0/1' in warnings[0] and 'colours' in warnings[0]
        assert res.out.index('warning:') < res.out.index('epoch 1/1')


# ------------------------------------------------------------------------------- as labelling tools export it
# CVAT's "Segmentation mask" export, as its documentation (docs.cvat.ai, "Segmentation Mask" format) and Datumaro's
# VOC writer lay it out: labelmap.txt under the header `# label:color_rgb:parts:actions`, one `name:R,G,B:parts:actions`
# a line, background first with 0,0,0; ImageSets/Segmentation/default.txt (train.txt and val.txt when the task has
# those subsets), ids without extension; SegmentationClass/<id>.png, RGB masks in the label colours;
# SegmentationObject/<id>.png, instances in VOC's instance colours; JPEGImages/<id> with the image's own suffix when
# the export has the images.
CVAT_LABELS = [('background', (0, 0, 0)), ('crack', (250, 50, 83)), ('rust stain', (51, 221, 255))]
CVAT_SUFFIXES = ['.jpg', '.png', '.JPG']        # CVAT keeps each image's name: a phone's IMG_0001.JPG stays so


def write_cvat_export(root, subsets):
    """A CVAT "Segmentation mask 1.1" export with images: {subset: number of images}."""
    rng = np.random.default_rng(0)
    for folder in ('ImageSets/Segmentation', 'SegmentationClass', 'SegmentationObject', 'JPEGImages'):
        (root / folder).mkdir(parents=True)
    (root / 'labelmap.txt').write_text('# label:color_rgb:parts:actions\n' + ''.join(
        f'{name}:{r},{g},{b}::\n' for name, (r, g, b) in CVAT_LABELS))
    truth, k = {}, 0
    for subset, n in subsets.items():
        ids = [f'IMG_{k + i:04d}' for i in range(n)]
        (root / 'ImageSets' / 'Segmentation' / f'{subset}.txt').write_text(''.join(i + '\n' for i in ids))
        for i, name in enumerate(ids):
            index = np.zeros((48, 72), np.uint8)
            index[4 + i:30, 10:40], index[30:44, 40 - i:70] = 1, 2
            colors = np.array([c for _, c in CVAT_LABELS], np.uint8)
            Image.fromarray(colors[index]).save(root / 'SegmentationClass' / f'{name}.png')
            Image.fromarray(np.array([(0, 0, 0), (128, 0, 0), (0, 128, 0)], np.uint8)[index]).save(
                root / 'SegmentationObject' / f'{name}.png')
            image = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / 'JPEGImages' / f'{name}{CVAT_SUFFIXES[i % 3]}')
            truth[name] = torch.from_numpy(index).long()
        k += n
    return root, truth


def test_a_cvat_export_trains_as_exported(tmp_path):
    """--data-dir export/ and nothing else: the classes and colours from labelmap.txt, the masks through them, images
    whatever their suffix; the checkpoint and the predict script carry CVAT's names."""
    root, truth = write_cvat_export(tmp_path / 'export', {'train': 6, 'val': 3})
    data = sd.find_data('voc', root)
    assert data.classes == sd.Classes([n for n, _ in CVAT_LABELS], [list(c) for _, c in CVAT_LABELS])
    assert data.title == 'export'
    for is_train in (True, False):
        ds = sd.open_dataset(data, is_train)
        assert [p.suffix for p, _ in ds.items] == CVAT_SUFFIXES[:len(ds)] * (len(ds) // 3)
        for i, (image, label) in enumerate(ds.read(i) for i in range(len(ds))):
            assert image.shape == (3, 48, 72) and torch.equal(label, truth[ds.items[i][1].stem])
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', root] + FAST, tmp_path)
    assert res.code == 0, res.err + res.out
    assert sd.load_torch_file(tmp_path / 'checkpoints' / 'origin.pt')['classes']['names'][2] == 'rust stain'
    res = run_inprocess(ORIGIN_PREDICT, ['--eval', '--workers', '0'], tmp_path)
    assert res.code == 0 and 'rust stain' in res.out, res.err + res.out


def test_a_cvat_export_without_subsets_holds_a_seeded_share_out(tmp_path):
    """default.txt alone: one line names it and both ways on (split it, or --val-share); --val-share 0.2 holds out
    the same fifth every run (whatever --seed), and the predict script finds it again from the checkpoint."""
    root, _ = write_cvat_export(tmp_path / 'export', {'default': 10})
    line = one_error_line(run_inprocess(ORIGIN_TRAIN, ['--data-dir', root] + FAST, tmp_path), 'default.txt',
                          '--val-share', 'train.txt', 'val.txt')
    assert 'ImageSets/Segmentation' in line, line
    splits = [[sd.voc_files(root, is_train, 0.2).items for is_train in (True, False)] for _ in range(2)]
    train, val = splits[0]
    assert splits[0] == splits[1] and len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', root, '--val-share', '0.2', '--seed', '3'] + FAST, tmp_path)
    assert res.code == 0, res.err + res.out
    res = run_inprocess(ORIGIN_PREDICT, ['--eval', '--workers', '0'], tmp_path)
    assert res.code == 0 and 'on 2 val images' in res.out, res.err + res.out
    for share in ('0.01', '1.5'):
        one_error_line(run_inprocess(ORIGIN_TRAIN, ['--data-dir', root, '--val-share', share] + FAST, tmp_path),
                       f'--val-share {share}', 'default.txt')
    split = root / 'ImageSets' / 'Segmentation'
    for name, lines in (('train.txt', ''), ('val.txt', '')):        # the task's own subsets: no share to hold out
        (split / name).write_text(lines)
    with pytest.raises(sd.UserError, match='--val-share is for default.txt alone'):
        sd.voc_files(root, True, 0.2)
    (split / 'train.txt').unlink()
    (split / 'val.txt').unlink()
    (split / 'default.txt').unlink()
    with pytest.raises(sd.UserError, match="default.txt is missing: --val-share splits a CVAT export's"):
        sd.voc_files(root, True, 0.2)


def test_labelmap_lines_are_checked(tmp_path):
    f = tmp_path / 'labelmap.txt'
    f.write_text('# label:color_rgb:parts:actions\nbackground:0,0,0::\ncrack:1,2::\n')
    with pytest.raises(sd.UserError, match='line 3') as info:
        sd.read_classes(f)
    assert str(f) in str(info.value) and 'name:R,G,B' in str(info.value)
    f.write_text('# label:color_rgb:parts:actions\nbackground:0,0,0::\ncrack:::\n')
    assert sd.read_classes(f) == sd.Classes(['background', 'crack'], [[0, 0, 0], [128, 0, 0]])


# A portrait photo from a phone: landscape pixels and EXIF Orientation 6 ("turn a quarter clockwise to show"),
# shown upright by every viewer, browser and labelling tool, so its mask is drawn upright.
def write_phone_folder(root, mask_on_stored_pixels=False):
    """The folder layout with two portrait phone photos (40 wide, 64 high as shown); their upright pictures."""
    shown = {}
    for split in ('train', 'val'):
        for folder in ('images', 'masks'):
            (root / folder / split).mkdir(parents=True)
        upright = np.zeros((64, 40, 3), np.uint8)
        upright[:16] = (230, 20, 20)                       # a red band at the top, as the photo is shown
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(
            root / 'images' / split / 'x.jpg', exif=exif, quality=95)
        mask = np.zeros((64, 40), np.uint8)
        mask[:16] = 1
        mask = np.rot90(mask) if mask_on_stored_pixels else mask        # the stored pixels: a quarter anticlockwise
        Image.fromarray(np.ascontiguousarray(mask), mode='L').save(root / 'masks' / split / 'x.png')
        shown[split] = upright
    (root / 'classes.txt').write_text('background\nred\n')
    return root, shown


def test_phone_photos_are_read_as_shown(tmp_path):
    """Images are read turned as the EXIF orientation says (as OpenCV and mmsegmentation read them), headers judge
    the crop by the shown size, and predictions on such a photo come out upright."""
    root, shown = write_phone_folder(tmp_path / 'phone')
    data = sd.find_data('folder', root)
    ds = sd.open_dataset(data, True, crop_size=(56, 32))      # fits the shown 64x40, not the stored 40x64
    assert len(ds) == 1 and ds.sizes == [(64, 40)]
    image, label = ds.read(0)
    assert image.shape == (3, 64, 40) and (image.float() - torch.from_numpy(shown['train']).permute(2, 0, 1)).abs(
        ).mean() < 4
    assert torch.equal(label, (torch.arange(64) < 16).long()[:, None].expand(64, 40))
    net = sd.build_model('fcn', num_classes=2).eval()
    with torch.no_grad():
        sd.segment_files(net, [root / 'images' / 'val' / 'x.jpg'], tmp_path / 'seg', data.classes)
    for kind in ('labels', 'color', 'overlay'):
        with Image.open(tmp_path / 'seg' / f'x_{kind}.png') as picture:
            assert picture.size == (40, 64)


def test_a_mask_drawn_on_a_phone_photos_stored_pixels_is_named(tmp_path):
    root, _ = write_phone_folder(tmp_path / 'phone', mask_on_stored_pixels=True)
    args = ['--dataset', 'folder', '--data-dir', root] + FAST + ['--crop-size', '32', '32', '--batch-size', '1']
    res = run_inprocess(ORIGIN_TRAIN, args, tmp_path)
    line = one_error_line(res, root / 'masks' / 'train' / 'x.png', 'x.jpg', 'EXIF orientation 6', '64x40', '40x64')
    assert 'stored pixels' in line and 'as shown' in line, line


def test_real_voc_jpegs_read_as_stored(voc_sample):
    """VOC's photos carry no EXIF orientation: reading them as shown changes nothing."""
    for path in sorted((voc_sample / 'JPEGImages').glob('*.jpg')):
        with Image.open(path) as img:
            assert 0x0112 not in img.getexif()
            stored = torch.from_numpy(np.array(img.convert('RGB'))).permute(2, 0, 1)
        assert torch.equal(sd.read_image(path), stored)
