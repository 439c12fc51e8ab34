"""Definitions for the d2l semantic-segmentation chapter, its ResNetUNet improvement and a segmentation
tutorial's tricks.

Read top to bottom, it follows the data: constants -> data -> models -> losses -> augmentation -> training ->
evaluation/inference -> pictures -> the pieces the four scripts share. Names from the book (d2l, "Semantic
Segmentation and the Dataset", "Transposed Convolution", "Fully Convolutional Networks") are kept where the book has
one, so a reader of the book recognises them; where the book is wasteful (the whole split as float32 in memory, a
256**3-entry lookup table) the names and the results stay, the waste does not.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

# ----------------------------------------------------------------------------------------------------- constants
VOC_CLASSES = ['background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train',
               'tv/monitor']
VOC_COLORMAP = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128], [192, 0, 128],
                [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]]
IGNORE_INDEX = 255              # VOC's 'void' border and Cityscapes' unlabelled pixels: no loss, no metric
VOID_COLOR = [224, 224, 192]    # how VOC draws index 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HERE = Path(__file__).resolve().parent
DEMO_DIR = HERE / 'data' / 'demo' / 'VOC2012'
DOWNLOAD_DIR = HERE / 'data'
# ImageNet backbones: the file torchvision's weights API downloads, looked for next to the scripts first
BACKBONE_FILES = {
    'resnet18': 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
}


class UserError(Exception):
    """A mistake the user can fix. The scripts print its single line and exit with status 2."""


def error_line(err):
    """The one line worth showing: DataLoader workers re-raise our error wrapped in their traceback text."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    line = lines[-1].strip() if lines else type(err).__name__
    for prefix in ('some_define.UserError: ', 'UserError: '):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return line


def run_main(main):
    """Every script ends with run_main(main): a user mistake becomes one line on stderr, not a traceback."""
    try:
        main()
    except UserError as err:
        print(f'error: {error_line(err)}', file=sys.stderr)
        sys.exit(2)


def is_main_process():
    return int(os.environ.get('RANK', '0')) == 0


def log(*args, **kwargs):
    """print, from rank 0 only: with torchrun every rank runs the same script."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------------------------------------- data
def find_voc_dir(data_dir=None):
    """The VOC2012 folder: --data-dir, or VOC2012 / VOCdevkit/VOC2012 / data/VOCdevkit/VOC2012 next to the scripts."""
    if data_dir is not None:
        base = Path(data_dir)
        candidates = [base, base / 'VOC2012', base / 'VOCdevkit' / 'VOC2012']
    else:
        candidates = [HERE / 'VOC2012', HERE / 'VOCdevkit' / 'VOC2012', DOWNLOAD_DIR / 'VOCdevkit' / 'VOC2012']
    for path in candidates:
        if (path / 'ImageSets' / 'Segmentation').is_dir():
            return path
    where = data_dir if data_dir is not None else ' or '.join(str(c) for c in candidates)
    raise UserError(f'no VOC2012 dataset at {where} (needs ImageSets/Segmentation, JPEGImages, SegmentationClass): '
                    'pass --data-dir to it, --download to fetch it (2 GB), or --demo for a small synthetic one')


def download_voc(root):
    """torchvision's VOCSegmentation(download=True): the 2 GB trainval tar, checked by md5, into root/VOCdevkit."""
    root = Path(root)
    if (root / 'VOCdevkit' / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'val.txt').exists():
        return
    log(f'downloading PASCAL VOC 2012 (2 GB) into {root} ...')
    try:
        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.VOCSegmentation(str(root), year='2012', image_set='trainval', download=True)
    except Exception as err:  # network, disk, a changed mirror: all end in the same advice
        raise UserError(f'could not download VOC2012 into {root} ({error_line(err)}): download '
                        'VOCtrainval_11-May-2012.tar by hand, unpack it and pass --data-dir') from None


def read_split(voc_dir, is_train=True):
    txt = Path(voc_dir) / 'ImageSets' / 'Segmentation' / ('train.txt' if is_train else 'val.txt')
    if not txt.exists():
        raise UserError(f'split file {txt} is missing: the VOC2012 folder is incomplete, unpack the dataset again')
    ids = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f'split file {txt} lists no ids: the VOC2012 folder is incomplete, unpack the dataset again')
    return ids


def voc_paths(voc_dir, name):
    return Path(voc_dir) / 'JPEGImages' / f'{name}.jpg', Path(voc_dir) / 'SegmentationClass' / f'{name}.png'


def open_image(path):
    """A fully decoded PIL image, or a one-line error naming the file (truncated and corrupt files included)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise UserError(f'{path} is missing: restore it or remove its id from the split file') from None
    except Exception as err:
        raise UserError(f'{path} cannot be read ({error_line(err)}): replace the file or remove its id from the '
                        'split file') from None


def image_to_tensor(img):
    """uint8 CHW: decoded in the worker, normalised later on the device (4x less to copy than float32)."""
    return torch.from_numpy(np.array(img.convert('RGB'), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_voc_images(voc_dir, is_train=True, limit=None):
    """The book's reader: uint8 CHW images and RGB label images. `limit` reads only the first ones (pictures)."""
    names = read_split(voc_dir, is_train)[:limit]
    features, labels = [], []
    for name in names:
        img_path, label_path = voc_paths(voc_dir, name)
        features.append(image_to_tensor(open_image(img_path)))
        labels.append(image_to_tensor(open_image(label_path)))
    return features, labels


def voc_colormap2label():
    """Colour -> class, as sorted packed RGB codes and their classes (22 entries, not the book's 256**3 table)."""
    colors = torch.tensor(VOC_COLORMAP + [VOID_COLOR], dtype=torch.int64)
    codes = (colors[:, 0] * 256 + colors[:, 1]) * 256 + colors[:, 2]
    classes = torch.tensor(list(range(len(VOC_COLORMAP))) + [IGNORE_INDEX])
    order = codes.argsort()
    return codes[order], classes[order]


def voc_label_indices(colormap, colormap2label):
    """RGB label image (3xHxW) -> class indices (HxW int64); colours outside the palette give -1."""
    codes, classes = colormap2label
    c = colormap.to(torch.int64)
    idx = (c[0] * 256 + c[1]) * 256 + c[2]
    pos = torch.searchsorted(codes, idx).clamp(max=len(codes) - 1)
    return torch.where(codes[pos] == idx, classes[pos], torch.full_like(idx, -1))


def read_label(path, colormap2label=None):
    """VOC labels are palette PNGs whose indices ARE the classes; an RGB label goes through the colour lookup."""
    img = open_image(path)
    if img.mode in ('P', 'L', 'I', 'I;16'):
        return torch.from_numpy(np.array(img, dtype=np.int64))
    return voc_label_indices(image_to_tensor(img), colormap2label or voc_colormap2label())


def check_pair(image, label, img_path, label_path, num_classes):
    if image.shape[1:] != label.shape:
        raise UserError(f'{label_path} is {label.shape[0]}x{label.shape[1]} but {img_path} is '
                        f'{image.shape[1]}x{image.shape[2]}: image and label must have the same size')
    bad = ((label < 0) | (label >= num_classes)) & (label != IGNORE_INDEX)
    if bad.any():
        values = sorted(set(label[bad].unique().tolist()))[:5]
        raise UserError(f'{label_path} holds label values {values} outside 0..{num_classes - 1} and '
                        f'{IGNORE_INDEX}: is it a label of this dataset (VOC palette PNG)?')


def voc_rand_crop(feature, label, height, width, generator=None):
    """The book's random crop, the same rectangle for image and label; `generator` makes it reproducible."""
    if generator is None:
        rect = torchvision.transforms.RandomCrop.get_params(feature, (height, width))
    else:
        h, w = feature.shape[-2:]
        top = int(torch.randint(0, h - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - width + 1, (1,), generator=generator))
        rect = (top, left, height, width)
    feature = torchvision.transforms.functional.crop(feature, *rect)
    label = torchvision.transforms.functional.crop(label, *rect)
    return feature, label


def normalize_image(img):
    """uint8 or [0,1] float image(s) -> ImageNet-normalised float32, on whatever device they are on."""
    x = img.float() / 255 if img.dtype == torch.uint8 else img.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


class VOCSegDataset(torch.utils.data.Dataset):
    """The book's dataset, read lazily: only file names are kept, each item is decoded when a worker asks for it.

    crop_size=None gives whole images (evaluation at the original size); normalize=False gives uint8 images and
    labels for the training loop, which normalises and widens them on the device. Items may be asked for as
    (index, seed): the crop then comes from that seed, so a run is reproducible whatever the number of workers (see
    SeededSampler).
    """
    num_classes = len(VOC_CLASSES)

    def __init__(self, is_train, crop_size, voc_dir, void_as_background=False, normalize=True):
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.void_as_background, self.normalize = void_as_background, normalize
        self.colormap2label = voc_colormap2label()
        self.split = Path(voc_dir) / 'ImageSets' / 'Segmentation' / ('train.txt' if is_train else 'val.txt')
        self.items, largest = [], (0, 0)
        for name in read_split(voc_dir, is_train):
            img_path, label_path = voc_paths(voc_dir, name)
            for path in (img_path, label_path):
                if not path.exists():
                    raise UserError(f'{path} is missing (id {name} of {self.split}): restore it or remove the id')
            try:
                with Image.open(img_path) as img:     # the header only: no decoding to filter by size
                    w, h = img.size
            except Exception as err:
                raise UserError(f'{img_path} cannot be read ({error_line(err)}): replace the file or remove its '
                                f'id from {self.split}') from None
            largest = max(largest, (h, w))
            if self.crop_size is None or (h >= self.crop_size[0] and w >= self.crop_size[1]):
                self.items.append((img_path, label_path))
        if not self.items:
            raise UserError(f'every image listed in {self.split} is smaller than the crop {self.crop_size[0]}x'
                            f'{self.crop_size[1]} (largest {largest[0]}x{largest[1]}): pass a smaller --crop-size')
        log(f'read {len(self.items)} examples')

    def __len__(self):
        return len(self.items)

    def read(self, idx):
        """(uint8 3xHxW image, int64 HxW label) at full size, checked."""
        img_path, label_path = self.items[idx]
        image = image_to_tensor(open_image(img_path))
        label = read_label(label_path, self.colormap2label)
        check_pair(image, label, img_path, label_path, self.num_classes)
        if self.void_as_background:
            label[label == IGNORE_INDEX] = 0
        return image, label

    def __getitem__(self, item):
        idx, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.read(idx)
        if self.crop_size is not None:
            gen = None if seed is None else torch.Generator().manual_seed(int(seed))
            image, label = voc_rand_crop(image, label, *self.crop_size, generator=gen)
        return self.output(image, label)

    def output(self, image, label):
        """The book's pair (float32 image, int64 label), or for the fast path both as uint8: normalised and widened
        on the device by to_device, with 8x fewer label bytes through shared memory, pinned memory and the bus
        (every class index and 255 fit in a byte)."""
        if self.normalize:
            return normalize_image(image), label
        return image, label.to(torch.uint8)


class SeededSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler (one process or many) that also hands each item a crop seed drawn from (seed, epoch).

    The same --seed then gives the same batches and crops whatever the worker count, and a run resumed at epoch k
    sees exactly what an uninterrupted one saw. Shuffled for training; for evaluation the items are split between
    ranks without padding, so that all ranks together see each item once, as a single process does.
    """

    def __init__(self, dataset, shuffle, seed=0, drop_last=True, num_replicas=None, rank=None):
        world = num_replicas if num_replicas is not None else int(os.environ.get('WORLD_SIZE', '1'))
        rank = rank if rank is not None else int(os.environ.get('RANK', '0'))
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.eval_limit = None

    def __iter__(self):
        if self.shuffle:
            indices = list(super().__iter__())
        else:   # evaluation: the first eval_limit items (the book drops the last partial batch), dealt out by rank
            indices = list(range(len(self.dataset) if self.eval_limit is None else self.eval_limit))
            indices = indices[self.rank::self.num_replicas]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        seeds = torch.randint(0, 2 ** 62, (len(self.dataset),), generator=gen).tolist()
        return iter([(i, seeds[i]) for i in indices])

    def __len__(self):
        if self.shuffle:
            return super().__len__()
        n = len(self.dataset) if self.eval_limit is None else self.eval_limit
        return len(range(self.rank, n, self.num_replicas))


def default_workers():
    return min(4, os.cpu_count() or 1)


def make_loader(dataset, batch_size, is_train, seed=0, num_workers=None, drop_last=True):
    """Shuffled for training; both drop the last partial batch, as the book does."""
    workers = default_workers() if num_workers is None else num_workers
    sampler = SeededSampler(dataset, shuffle=is_train, seed=seed, drop_last=True)
    if not is_train and drop_last and len(dataset) >= batch_size:
        sampler.eval_limit = len(dataset) // batch_size * batch_size
    per_rank = max(1, batch_size // sampler.num_replicas) if is_train else batch_size
    if is_train and len(dataset) // sampler.num_replicas < per_rank:
        raise UserError(f'only {len(dataset)} training examples for a batch of {batch_size}: '
                        'pass a smaller --batch-size or a smaller --crop-size')
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, drop_last=is_train, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def load_data_voc(batch_size, crop_size, voc_dir, void_as_background=False, num_workers=None, seed=0,
                  normalize=True):
    """The book's two loaders: (train_iter, test_iter) of random crops."""
    train = VOCSegDataset(True, crop_size, voc_dir, void_as_background, normalize)
    test = VOCSegDataset(False, crop_size, voc_dir, void_as_background, normalize)
    return (make_loader(train, batch_size, True, seed, num_workers),
            make_loader(test, batch_size, False, seed, num_workers))



# Cityscapes / MiniCity (the tutorial's data): torchvision's class table maps the raw labelIds to the 19 train ids.
CITYSCAPES_TRAIN_CLASSES = sorted((c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < 19),
                                  key=lambda c: c.train_id)
CITYSCAPES_CLASSES = [c.name for c in CITYSCAPES_TRAIN_CLASSES]
CITYSCAPES_COLORMAP = [list(c.color) for c in CITYSCAPES_TRAIN_CLASSES]


def cityscapes_id_to_trainid():
    """A 256-entry lookup: raw labelId -> train id, every other id (and 'ignore in eval') -> 255."""
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    for c in torchvision.datasets.Cityscapes.classes:
        if c.id >= 0 and 0 <= c.train_id < 19:
            lut[c.id] = c.train_id
    return lut


class CityscapesSegDataset(VOCSegDataset):
    """Cityscapes as VOCSegDataset: leftImg8bit/<split>/[city/]<name>_leftImg8bit.png and gtFine/<same>, so both the
    official layout (city folders) and MiniCity's flat one work. Labels: *_gtFine_labelIds.png mapped to train ids,
    else *_gtFine_labelTrainIds.png as the official scripts write them. Training items get the tutorial's transform
    (random scale 0.75-2.0, crop with void padding, horizontal flip, colour jitter)."""
    num_classes = len(CITYSCAPES_CLASSES)

    def __init__(self, is_train, crop_size, root, normalize=True, augment=None):
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.normalize, self.void_as_background = normalize, False
        self.augment = is_train if augment is None else augment
        split = 'train' if is_train else 'val'
        image_dir = Path(root) / 'leftImg8bit' / split
        if not image_dir.is_dir():
            raise UserError(f'no Cityscapes {split} images at {image_dir}: pass --data-dir to the folder that holds '
                            'leftImg8bit/ and gtFine/')
        self.split, self.lut, self.items = image_dir, cityscapes_id_to_trainid(), []
        for img_path in sorted(image_dir.rglob('*_leftImg8bit.png')):
            stem = img_path.name[:-len('_leftImg8bit.png')]
            label_dir = Path(root) / 'gtFine' / split / img_path.parent.relative_to(image_dir)
            ids, train_ids = label_dir / f'{stem}_gtFine_labelIds.png', label_dir / f'{stem}_gtFine_labelTrainIds.png'
            if not ids.exists() and not train_ids.exists():
                raise UserError(f'{ids} is missing (nor is there a labelTrainIds file): restore gtFine/')
            self.items.append((img_path, ids if ids.exists() else train_ids))
        if not self.items:
            raise UserError(f'no *_leftImg8bit.png under {image_dir}: is --data-dir the Cityscapes folder?')
        log(f'read {len(self.items)} examples')
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        self.transform = None if self.crop_size is None else v2.Compose(
            [v2.RandomCrop(self.crop_size, pad_if_needed=True, fill=fill)]
            + ([v2.RandomHorizontalFlip(), v2.ColorJitter(0.3, 0.3, 0.3)] if self.augment else []))

    def read(self, idx):
        img_path, label_path = self.items[idx]
        image = image_to_tensor(open_image(img_path))
        label = torch.from_numpy(np.array(open_image(label_path), dtype=np.int64))
        if label_path.name.endswith('_labelIds.png'):
            label = self.lut[label.clamp(0, 255)]
        check_pair(image, label, img_path, label_path, self.num_classes)
        return image, label

    def __getitem__(self, item):
        idx, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.read(idx)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(int(seed))
                image, label = tv_tensors.Image(image), tv_tensors.Mask(label)
                if self.augment:    # the tutorial's random scale, image bilinear, labels nearest
                    s = float(torch.empty(1).uniform_(0.75, 2.0))
                    size = [round(image.shape[-2] * s), round(image.shape[-1] * s)]
                    image = v2.functional.resize(image, size, antialias=True)
                    label = v2.functional.resize(label, size)
                image, label = self.transform(image, label)
                image, label = image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
        return self.output(image, label)


# The demo dataset: five VOC classes drawn as simple shapes with their own colours and textures, so that a
# small net learns them from scratch in minutes on a CPU.
DEMO_CLASSES = (1, 3, 7, 8, 15)  # aeroplane, bird, car, cat, person


def voc_palette():
    """768-int palette: the 21 VOC colours, index 255 = void (224,224,192), rest black."""
    pal = [0] * 768
    for i, c in enumerate(VOC_COLORMAP):
        pal[3 * i:3 * i + 3] = c
    pal[765:768] = VOID_COLOR
    return pal


def _draw_object(cls, cx, cy, s, size, rng):
    """Return (part mask: 0 outside, 1 main part, 2 secondary part, main colour, secondary colour)."""
    m = Image.new("L", size, 0)
    d = ImageDraw.Draw(m)
    jit = lambda c: np.clip(np.array(c) + rng.integers(-20, 21, 3), 0, 255)
    if cls == 1:  # aeroplane: fuselage + swept wings + tail fin, light grey/white
        d.ellipse([cx - s / 2, cy - s / 12, cx + s / 2, cy + s / 12], fill=1)
        d.polygon([(cx + s / 10, cy), (cx - s / 8, cy - s / 2), (cx - s / 4, cy - s / 2), (cx - s / 10, cy),
                   (cx - s / 4, cy + s / 2), (cx - s / 8, cy + s / 2)], fill=1)
        d.polygon([(cx - s / 2.2, cy), (cx - s / 2.2, cy - s / 4), (cx - s / 2.8, cy)], fill=2)
        return m, jit([215, 215, 220]), jit([170, 170, 180])
    if cls == 3:  # bird: small orange ellipse + dark-yellow triangular beak
        d.ellipse([cx - s / 3, cy - s / 5, cx + s / 3, cy + s / 5], fill=1)
        d.polygon([(cx + s / 3.4, cy - s / 12), (cx + s / 2, cy), (cx + s / 3.4, cy + s / 12)], fill=2)
        return m, jit([235, 130, 30]), jit([200, 170, 0])
    if cls == 7:  # car: red or blue body + cabin, two dark wheels
        d.rectangle([cx - s / 2, cy - s / 6, cx + s / 2, cy + s / 8], fill=1)
        d.rectangle([cx - s / 4, cy - s / 3, cx + s / 4, cy - s / 6], fill=1)
        for wx in (cx - s / 3, cx + s / 3):
            d.ellipse([wx - s / 8, cy + s / 8 - s / 8, wx + s / 8, cy + s / 8 + s / 8], fill=2)
        return m, jit([200, 25, 25] if rng.random() < 0.5 else [30, 50, 200]), jit([25, 25, 25])
    if cls == 8:  # cat: brown or grey ellipse body + two triangle ears (striped texture below)
        d.ellipse([cx - s / 2, cy - s / 4, cx + s / 2, cy + s / 3], fill=1)
        for ex in (cx - s / 3, cx - s / 8):
            d.polygon([(ex - s / 9, cy - s / 6), (ex, cy - s / 2), (ex + s / 9, cy - s / 6)], fill=1)
        return m, jit([140, 90, 50] if rng.random() < 0.5 else [120, 120, 125]), jit([60, 40, 30])
    # person: skin-toned circle head on a dark rectangle torso
    d.rectangle([cx - s / 6, cy - s / 6, cx + s / 6, cy + s / 2], fill=1)
    d.ellipse([cx - s / 7, cy - s / 2, cx + s / 7, cy - s / 2 + 2 * s / 7], fill=2)
    return m, rng.integers(20, 90, 3), jit([230, 185, 150])


def _make_pair(h, w, rng):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: smooth muted gradient between two random colours along a random direction
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * xx / w + np.sin(a) * yy / h)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    c0, c1 = rng.uniform(40, 180, 3), rng.uniform(40, 180, 3)
    img = c0 + (c1 - c0) * t[..., None]
    lab = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.choice(DEMO_CLASSES))
        s = rng.uniform(0.3, 0.7) * min(h, w)
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h  # centre inside -> mostly visible
        m, col1, col2 = _draw_object(cls, cx, cy, s, (w, h), rng)
        m = np.asarray(m)
        # per-object shading; cats get stripes so texture is a cue besides colour
        shade = 1 + 0.15 * ((xx - cx) / s)
        if cls == 8:
            shade = shade * (1 - 0.25 * (np.sin(xx / max(s / 20, 1.0)) > 0.3))
        img[m == 1] = (col1 * shade[..., None])[m == 1]
        img[m == 2] = (col2 * shade[..., None])[m == 2]
        lab[m > 0] = cls  # later objects win
    # void contour: both pixels on each side of a label change -> 2 px band, like VOC
    edge = np.zeros_like(lab, bool)
    dh, dv = lab[:, 1:] != lab[:, :-1], lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= dh; edge[:, :-1] |= dh; edge[1:, :] |= dv; edge[:-1, :] |= dv
    lab[edge] = 255
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    return img, lab


def make_demo_voc(root=DEMO_DIR, num_train=120, num_val=40, seed=0, min_size=(80, 112), max_size=(128, 160),
                  num_small=4):
    """Write (once, deterministically) a synthetic dataset in the exact VOC2012 layout under root; return root.

    JPEG images, palette PNG labels with VOC's palette and 255 borders, split files, a few images smaller than the
    demo crop: every code path of the real dataset runs on it, on a machine that has none.
    """
    root = str(root)
    marker = os.path.join(root, ".demo_complete")
    split_dir = os.path.join(root, "ImageSets", "Segmentation")
    if os.path.exists(marker) and os.path.exists(os.path.join(split_dir, "val.txt")):
        return root
    for sub in ("JPEGImages", "SegmentationClass"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    os.makedirs(split_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette, k = voc_palette(), 0
    for split, n in (("train", num_train), ("val", num_val)):
        small = set(rng.choice(n, min(num_small, n), replace=False).tolist())
        ids = []
        for i in range(n):
            k += 1
            h = int(rng.integers(min_size[0], max_size[0] + 1))
            w = int(rng.integers(min_size[1], max_size[1] + 1))
            if i in small:  # below a 64x96 crop in one dimension, so crop filters have work to do
                h, w = (48, w) if sorted(small).index(i) % 2 == 0 else (h, 80)
            img, lab = _make_pair(h, w, rng)
            name = "demo_%06d" % k
            Image.fromarray(img).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=95)
            p = Image.frombytes("P", (w, h), lab.tobytes())  # raw indices, no colour conversion
            p.putpalette(palette)
            p.save(os.path.join(root, "SegmentationClass", name + ".png"))
            ids.append(name)
        with open(os.path.join(split_dir, split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(marker, "w") as f:  # written last: an interrupted run has no marker and is redone
        f.write("ok\n")
    return root


# -------------------------------------------------------------------------------------------------------- models
def bilinear_kernel(in_channels, out_channels, kernel_size):
    """The book's bilinear-interpolation weights for a transposed convolution: channel i -> channel i only."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = (torch.arange(kernel_size).reshape(-1, 1), torch.arange(kernel_size).reshape(1, -1))
    filt = (1 - torch.abs(og[0] - center) / factor) * (1 - torch.abs(og[1] - center) / factor)
    weight = torch.zeros((in_channels, out_channels, kernel_size, kernel_size))
    weight[range(in_channels), range(out_channels), :, :] = filt
    return weight


def backbone_state_dict(arch, weights_path=None):
    """ImageNet weights: --backbone-weights, the file next to the scripts or here, torchvision's cache, download."""
    url = BACKBONE_FILES[arch]
    filename = url.rsplit('/', 1)[1]
    if weights_path is not None:
        if not Path(weights_path).exists():
            raise UserError(f'--backbone-weights {weights_path} does not exist')
        candidates = [Path(weights_path)]
    else:
        hub = Path(torch.hub.get_dir()) / 'checkpoints' / filename
        candidates = [p for p in (HERE / filename, Path.cwd() / filename, hub) if p.exists()]
    if candidates:
        state = load_torch_file(candidates[0], what=f'{arch} weights')
    else:
        try:
            state = torch.hub.load_state_dict_from_url(url, progress=is_main_process())
        except Exception as err:
            raise UserError(f'no ImageNet {arch} weights here and the download failed ({error_line(err)}): put '
                            f'{url} next to the scripts, or pass --backbone-weights FILE, or train from scratch '
                            'with --no-pretrained') from None
    expected = getattr(torchvision.models, arch)(weights=None).state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise UserError(f'{candidates[0] if candidates else url} is not a torchvision {arch} state_dict: pass the '
                        f'file {filename} or --no-pretrained')
    return state


def resnet18_backbone(pretrained=False, weights_path=None):
    net = torchvision.models.resnet18(weights=None)
    if pretrained:
        net.load_state_dict(backbone_state_dict('resnet18', weights_path))
    return net


def fcn_resnet18(num_classes=21, pretrained=False, weights_path=None):
    """The book's FCN, layer for layer: resnet18 minus avgpool and fc, a 1x1 conv, a bilinear transposed conv."""
    pretrained_net = resnet18_backbone(pretrained, weights_path)
    net = nn.Sequential(*list(pretrained_net.children())[:-2])
    net.add_module('final_conv', nn.Conv2d(512, num_classes, kernel_size=1))
    net.add_module('transpose_conv', nn.ConvTranspose2d(num_classes, num_classes, kernel_size=64, padding=16,
                                                        stride=32))
    # The book's text Xavier-initialises the 1x1 conv, its code forgets; the seed does it: so do we.
    nn.init.xavier_uniform_(net.final_conv.weight)
    net.transpose_conv.weight.data.copy_(bilinear_kernel(num_classes, num_classes, 64))
    return net


def convrelu(in_channels, out_channels, kernel, padding):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU(inplace=True))


def pad_to_multiple(x, multiple=32):
    """Zero-pad (the mean colour, after normalisation) at the bottom and right to a multiple of the net's stride."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class ResNetUNet(nn.Module):
    """The seed's resnet18 U-Net. Pads any input to a multiple of 32 inside and crops back, same weights."""

    def __init__(self, n_class=21, pretrained=False, weights_path=None):
        super().__init__()
        self.base_model = resnet18_backbone(pretrained, weights_path)
        self.base_layers = list(self.base_model.children())
        self.layer0 = nn.Sequential(*self.base_layers[:3])     # 1/2, 64
        self.layer0_1x1 = convrelu(64, 64, 1, 0)
        self.layer1 = nn.Sequential(*self.base_layers[3:5])    # 1/4, 64
        self.layer1_1x1 = convrelu(64, 64, 1, 0)
        self.layer2 = self.base_layers[5]                       # 1/8, 128
        self.layer2_1x1 = convrelu(128, 128, 1, 0)
        self.layer3 = self.base_layers[6]                       # 1/16, 256
        self.layer3_1x1 = convrelu(256, 256, 1, 0)
        self.layer4 = self.base_layers[7]                       # 1/32, 512
        self.layer4_1x1 = convrelu(512, 512, 1, 0)
        self.upsample = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)
        self.conv_up3 = convrelu(256 + 512, 512, 3, 1)
        self.conv_up2 = convrelu(128 + 512, 256, 3, 1)
        self.conv_up1 = convrelu(64 + 256, 256, 3, 1)
        self.conv_up0 = convrelu(64 + 256, 128, 3, 1)
        self.conv_original_size0 = convrelu(3, 64, 3, 1)
        self.conv_original_size1 = convrelu(64, 64, 3, 1)
        self.conv_original_size2 = convrelu(64 + 128, 64, 3, 1)
        self.conv_last = nn.Conv2d(64, n_class, 1)

    def forward(self, input):
        h, w = input.shape[-2:]
        input = pad_to_multiple(input, 32)
        x_original = self.conv_original_size1(self.conv_original_size0(input))
        layer0 = self.layer0(input)
        layer1 = self.layer1(layer0)
        layer2 = self.layer2(layer1)
        layer3 = self.layer3(layer2)
        layer4 = self.layer4_1x1(self.layer4(layer3))
        x = self.conv_up3(torch.cat([self.upsample(layer4), self.layer3_1x1(layer3)], dim=1))
        x = self.conv_up2(torch.cat([self.upsample(x), self.layer2_1x1(layer2)], dim=1))
        x = self.conv_up1(torch.cat([self.upsample(x), self.layer1_1x1(layer1)], dim=1))
        x = self.conv_up0(torch.cat([self.upsample(x), self.layer0_1x1(layer0)], dim=1))
        x = self.conv_original_size2(torch.cat([self.upsample(x), x_original], dim=1))
        return self.conv_last(x)[..., :h, :w]


def deeplabv3(name, num_classes=21, pretrained=False, weights_path=None, aux_loss=False):
    """torchvision's DeepLabV3 (the tutorial's model); the ImageNet backbone comes by the same rules as resnet18."""
    from torchvision.models import segmentation
    arch = name.split('_')[1]
    net = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=num_classes,
                                      aux_loss=aux_loss)
    if pretrained:
        state = backbone_state_dict(arch, weights_path)
        net.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith('fc.')})
    return net

# Normalisation swaps (the tutorial's BatchNorm / InstanceNorm / GroupNorm / EvoNorm comparison)
NORMS = ('batch', 'instance', 'group', 'evo', 'evo_s0', 'evo_b0')


def num_groups(channels, max_groups=32):
    """The largest divisor of `channels` that is <= max_groups (32 when it divides, as in GroupNorm's paper)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class EvoNorm2dB0(nn.Module):
    """EvoNorm-B0 (Liu et al. 2020): y = x / max(sqrt(batch_var + eps), v1*x + sqrt(instance_var + eps)) * gamma + beta.

    The batch variance is tracked as a running average like BatchNorm (used in eval), so eval output
    does not depend on the batch. The max() makes the layer non-linear: no ReLU is needed after it.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.v1 = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        xf = x.float()  # statistics in fp32: squares overflow/lose precision under fp16 autocast
        if self.training:
            batch_var = xf.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            n = xf.numel() / xf.shape[1]
            with torch.no_grad():  # BatchNorm convention: the running estimate is the unbiased variance
                unbiased = batch_var.flatten() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            batch_var = self.running_var.view(1, -1, 1, 1).float()
        instance_var = xf.var(dim=(2, 3), unbiased=False, keepdim=True)
        denom = torch.maximum((batch_var + self.eps).sqrt(), self.v1 * xf + (instance_var + self.eps).sqrt())
        return (xf / denom * self.gamma + self.beta).to(x.dtype)


class EvoNorm2dS0(nn.Module):
    """EvoNorm-S0 (Liu et al. 2020): y = x * sigmoid(v1*x) / group_std(x) * gamma + beta.

    Only per-sample statistics (groups of channels x H x W), so train and eval behave alike and the output
    of a sample never depends on the rest of the batch; the swish-like numerator replaces the ReLU.
    """

    def __init__(self, num_features, groups=32, eps=1e-5):
        super().__init__()
        self.groups, self.eps = num_groups(num_features, groups), eps
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.v1 = nn.Parameter(torch.ones(1, num_features, 1, 1))

    def forward(self, x):
        xf = x.float()
        n, c, h, w = xf.shape
        grouped = xf.reshape(n, self.groups, -1)
        std = (grouped.var(dim=2, unbiased=False, keepdim=True) + self.eps).sqrt()
        std = std.expand_as(grouped).reshape(n, c, h, w)
        return (xf * torch.sigmoid(self.v1 * xf) / std * self.gamma + self.beta).to(x.dtype)


def _norm_like(bn, norm):
    """The replacement for one BatchNorm layer, keeping its affine part (pretrained gamma/beta) when it has one."""
    c = bn.num_features
    if norm == "instance":
        # track_running_stats=False: instance statistics in eval too. Fails on 1x1 maps (e.g. an image-pooling branch).
        new, weight, bias = nn.InstanceNorm2d(c, affine=True, track_running_stats=False), "weight", "bias"
    elif norm == "group":
        new, weight, bias = nn.GroupNorm(num_groups(c), c), "weight", "bias"
    elif norm == "evo_b0":
        new, weight, bias = EvoNorm2dB0(c, eps=bn.eps), "gamma", "beta"
    else:  # "evo" / "evo_s0"
        new, weight, bias = EvoNorm2dS0(c), "gamma", "beta"
    if bn.affine:
        with torch.no_grad():
            getattr(new, weight).copy_(bn.weight.view_as(getattr(new, weight)))
            getattr(new, bias).copy_(bn.bias.view_as(getattr(new, bias)))
    ref = next(iter(list(bn.parameters()) + list(bn.buffers())), None)
    return new if ref is None else new.to(ref.device)


def replace_norm(model, norm):
    """Swap every BatchNorm2d in `model` (recursively, in place) for `norm`; returns the model.

    norm: batch (no change) | instance | group | evo (= evo_s0) | evo_b0 | evo_s0.
    The BN's weight/bias are copied into the new layer's affine parameters so a pretrained backbone keeps its
    learned scale/shift (its running statistics cannot carry over: the new layers normalise differently).
    For the EvoNorm variants every nn.ReLU becomes nn.Identity, since EvoNorm carries its own non-linearity
    (as the tutorial did). Modules are replaced by attribute, so a torchvision BasicBlock's self.relu, used
    twice in forward (after bn1 and after the residual add), disappears at both places; functional F.relu
    calls inside a forward cannot be reached and stay.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}, expected one of {NORMS}")
    if norm == "batch":
        return model
    evo = norm.startswith("evo")
    for name, child in model.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            setattr(model, name, _norm_like(child, norm))
        elif evo and isinstance(child, nn.ReLU):
            setattr(model, name, nn.Identity())
        else:
            replace_norm(child, norm)
    return model


MODELS = ('fcn', 'resnet_unet', 'deeplabv3_resnet50', 'deeplabv3_resnet101')


def build_model(name, num_classes=21, pretrained=False, weights_path=None, norm='batch', aux_loss=False):
    """Every model by name; the checkpoint stores these arguments (model_args) to rebuild it with no flags."""
    if name == 'fcn':
        net = fcn_resnet18(num_classes, pretrained, weights_path)
    elif name == 'resnet_unet':
        net = ResNetUNet(num_classes, pretrained, weights_path)
    elif name in ('deeplabv3_resnet50', 'deeplabv3_resnet101'):
        net = deeplabv3(name, num_classes, pretrained, weights_path, aux_loss)
    else:
        raise UserError(f'unknown model {name!r}: choose one of {", ".join(MODELS)}')
    if norm not in NORMS:
        raise UserError(f'unknown norm {norm!r}: choose one of {", ".join(NORMS)}')
    if norm != 'batch':
        replace_norm(net, norm)
    return net


def model_output(out):
    """(main logits, aux logits or None): torchvision's segmentation models return a dict."""
    if isinstance(out, dict):
        return out['out'], out.get('aux')
    return out, None


# -------------------------------------------------------------------------------------------------------- losses
def loss(inputs, targets):
    """The book's loss: per-pixel cross entropy averaged over height and width, one value per example."""
    return F.cross_entropy(inputs, targets, reduction='none', ignore_index=IGNORE_INDEX).mean(1).mean(1)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017) for segmentation, per-pixel: -w[y] * (1 - p_y)^gamma * log p_y.

    Returns the N,H,W loss map (reduction 'none', 0 at ignored pixels) so the caller chooses the reduction,
    exactly like F.cross_entropy(..., reduction='none'); with gamma=0 the two are identical.
    """

    def __init__(self, gamma=2.0, weight=None, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.gamma = gamma
        self.ignore_index = ignore_index
        # a buffer so .to(device) and state_dict carry the class weights along with the model
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits, target):
        logp = F.log_softmax(logits.float(), dim=1)  # fp32: log p of rare classes underflows in half precision
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))  # gather needs an in-range index
        logp_y = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        # clamp: exp(log_softmax) can exceed 1 by an ulp, and a negative base breaks a fractional gamma
        focal = (1.0 - logp_y.exp()).clamp(min=0.0) ** self.gamma  # torch gives 0**0 == 1: gamma=0 is plain CE
        loss = -focal * logp_y
        if self.weight is not None:
            loss = loss * self.weight[safe_target]
        return torch.where(valid, loss, torch.zeros_like(loss))


def class_pixel_weights(counts, mode="inverse_log"):
    """Per-class loss weights from per-class pixel counts (void excluded).

    inverse_log (ENet, Paszke et al. 2016): w = 1 / ln(1.02 + freq); the 1.02 bounds the weight at ~50 so
    very rare classes do not dominate. median_freq (SegNet): w = median(freq) / freq.
    Weights are scaled so their mean over the classes seen in `counts` is 1 (the loss scale, hence the
    learning rate, stays comparable to the unweighted loss). Classes with count 0 get the largest weight of
    the seen classes: they may still appear in validation, and 1/ln(1.02) would be an arbitrary extreme.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    seen = counts > 0
    if not seen.any():
        return torch.ones_like(counts, dtype=torch.float32)
    freq = counts / counts.sum()
    if mode == "inverse_log":
        w = 1.0 / torch.log(1.02 + freq)
    elif mode == "median_freq":
        w = freq[seen].median() / freq.clamp(min=1e-12)
    else:
        raise ValueError(f"unknown class weight mode {mode!r}")
    w = w / w[seen].mean()
    w[~seen] = w[seen].max()
    return w.float()


def make_loss(name='ce', weight=None, gamma=2.0):
    """Per-example losses (mean over H, W) like the book's; the training step sums them over the batch."""
    if name == 'ce':
        return loss
    if name == 'weighted_ce':
        if weight is None:
            raise UserError('--loss weighted_ce needs class weights')
        return lambda inputs, targets: F.cross_entropy(inputs, targets, weight=weight.to(inputs.device),
                                                       reduction='none', ignore_index=IGNORE_INDEX).mean((1, 2))
    if name == 'focal':
        focal = FocalLoss(gamma=gamma, weight=weight)
        return lambda inputs, targets: focal(inputs, targets).mean((1, 2))
    raise UserError(f'unknown loss {name!r}: choose one of ce, weighted_ce, focal')


# -------------------------------------------------------------------------------------------------- augmentation
def _randint(high, generator):
    return int(torch.randint(high, (1,), generator=generator))


def cutmix_segmentation(images, labels, prob=0.5, alpha=1.0, generator=None):
    """CutMix (Yun et al. 2019) for segmentation: a box of a partner sample replaces the same box of each sample,
    image and label alike, so every pixel keeps its own label. Returns new tensors.

    One draw decides for the whole batch. The box has area ratio about 1 - lam, lam ~ Beta(alpha, alpha),
    centred uniformly and clipped to the frame. Permutation and boxes use `generator`; the Beta draw uses the
    global RNG (torch.distributions has no generator argument), so seed both for exact reproducibility.
    """
    src_images, src_labels = images, labels  # paste from the untouched inputs, never from an earlier paste
    images, labels = images.clone(), labels.clone()
    if prob <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return images, labels
    n, _, h, w = images.shape
    perm = torch.randperm(n, generator=generator).tolist()
    lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,))
    for i, j in enumerate(perm):
        ratio = math.sqrt(1.0 - float(lam[i]))
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = _randint(h, generator), _randint(w, generator)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images[i, :, y0:y1, x0:x1] = src_images[j, :, y0:y1, x0:x1]
        labels[i, y0:y1, x0:x1] = src_labels[j, y0:y1, x0:x1]
    return images, labels


def copyblob(images, labels, pairs, prob=0.5, generator=None):
    """CopyBlob (the tutorial's class-imbalance augmentation with a visual prior): paste the pixels of a rare
    class from another sample onto a plausible host class (e.g. a bicycle onto road). Returns new tensors.

    For each sample i and each (src_class, host_class) pair, with probability `prob`: pick another sample j
    containing src_class, take the bounding box of all its src_class pixels, and paste it where the box lies
    fully inside the frame and its centre pixel is host_class in sample i. Only pixels that are src_class in
    j are pasted (image and label), so the rest of the box, void included, is left as it was. Sources are
    the unmodified inputs, so blobs are never copied from an earlier paste; placement sees earlier pastes.
    """
    src_images, src_labels = images, labels
    images, labels = images.clone(), labels.clone()
    n, _, h, w = images.shape
    for i in range(n):
        for src, host in pairs:
            if float(torch.rand((), generator=generator)) >= prob:
                continue
            donors = [j for j in range(n) if j != i and bool((src_labels[j] == src).any())]
            if not donors:
                continue
            j = donors[_randint(len(donors), generator)]
            ys, xs = torch.nonzero(src_labels[j] == src, as_tuple=True)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            bh, bw = y1 - y0, x1 - x0
            if bh > h or bw > w:
                continue
            # every host pixel whose box (centred on it) fits the frame is a valid spot: no trial and error
            cys, cxs = torch.nonzero(labels[i] == host, as_tuple=True)
            fits = (cys >= bh // 2) & (cys - bh // 2 + bh <= h) & (cxs >= bw // 2) & (cxs - bw // 2 + bw <= w)
            cys, cxs = cys[fits], cxs[fits]
            if len(cys) == 0:
                continue
            k = _randint(len(cys), generator)
            ty, tx = int(cys[k]) - bh // 2, int(cxs[k]) - bw // 2
            mask = src_labels[j, y0:y1, x0:x1] == src
            target_img = images[i, :, ty:ty + bh, tx:tx + bw]
            target_img.copy_(torch.where(mask, src_images[j, :, y0:y1, x0:x1], target_img))
            labels[i, ty:ty + bh, tx:tx + bw][mask] = src
    return images, labels


# ------------------------------------------------------------------------------------------------------ training
def pick_device(name=None):
    """--device, else the GPU of this rank, else the CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device name: use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {name} asked for a GPU but PyTorch sees none: use --device cpu')
    return device


def amp_dtype(device, amp=None):
    """Mixed precision on CUDA by default: bf16 where the GPU has it (no scaler needed), else fp16."""
    if amp is None:
        amp = device.type == 'cuda'
    if not amp:
        return None
    if device.type != 'cuda':
        return torch.bfloat16      # CPU autocast is bf16 only
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(X, y, device, channels_last=False):
    X = normalize_image(X.to(device, non_blocking=True)) if X.dtype == torch.uint8 else X.to(device)
    if channels_last:
        X = X.contiguous(memory_format=torch.channels_last)
    return X, y.to(device, non_blocking=True).long()


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction. Pixels labelled ignore_index (or outside the classes) do not count."""

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, pred, target):
        n = self.num_classes
        target, pred = target.reshape(-1), pred.reshape(-1)
        k = (target >= 0) & (target < n) & (target != self.ignore_index)
        idx = n * target[k].to(torch.int64) + pred[k].to(torch.int64)
        self.mat += torch.bincount(idx, minlength=n ** 2).reshape(n, n).cpu()

    def all_reduce(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            mat = self.mat.to(dist_device())
            torch.distributed.all_reduce(mat)
            self.mat = mat.cpu()

    def compute(self):
        h = self.mat.double()
        diag, gt, pr = h.diag(), h.sum(1), h.sum(0)
        total = h.sum()
        acc = diag / gt                                         # NaN for a class absent from the ground truth
        iou = diag / (gt + pr - diag)                           # NaN for a class absent from both
        present = ~torch.isnan(iou)
        freq = gt / total if total > 0 else gt
        return {
            'pixel_acc': float(diag.sum() / total) if total > 0 else float('nan'),
            'mean_acc': float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any() else float('nan'),
            'miou': float(iou[present].mean()) if present.any() else float('nan'),
            'fwiou': float((freq[present] * iou[present]).sum()) if present.any() else float('nan'),
            'iou': iou.tolist(),
            'acc': acc.tolist(),
            'pixels': int(total),
        }


def dist_device():
    return torch.device('cuda', torch.cuda.current_device()) if torch.distributed.get_backend() == 'nccl' \
        else torch.device('cpu')


def all_reduce_sum(values, device):
    """Sums a list of numbers over all ranks (no-op in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def evaluate_crops(net, data_iter, device, num_classes, dtype=None, channels_last=False):
    """The per-epoch test figures on random crops (the book's test acc), plus mIoU from the same pixels."""
    net.eval()
    cm = ConfusionMatrix(num_classes)
    with torch.inference_mode(), autocast(device, dtype):
        for X, y in data_iter:
            X, y = to_device(X, y, device, channels_last)
            cm.update(model_output(net(X))[0].argmax(1), y)
    cm.all_reduce()
    return cm.compute()


def save_checkpoint(obj, path):
    """Temporary file, flush to disk, then rename: a kill at any moment leaves the previous checkpoint whole."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f'cannot write checkpoint {path} ({err.strerror or err}): free some disk space or pass '
                        '--save with a writable path') from None


def load_torch_file(path, what='checkpoint'):
    """torch.load with weights_only=True: plain tensors and numbers only, a pickle that runs code is refused."""
    path = Path(path)
    if not path.exists():
        raise UserError(f'{what} {path} does not exist: train first, or pass the right path')
    try:
        with warnings.catch_warnings():     # torch warns about old pickle protocols before refusing: one line only
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        text = str(err)
        if 'Weights only load failed' in text or 'Unsupported global' in text:
            raise UserError(f'{path} holds Python objects, not only tensors and numbers: refused for safety '
                            '(weights_only=True); use a checkpoint written by these scripts') from None
        raise UserError(f'{path} is not a readable {what} (truncated or corrupt: {error_line(err)}): '
                        'use another file, or retrain') from None


def check_writable(path):
    """Fail before hours of training, not after: the checkpoint's or picture's folder must be writable."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f'.write_test_{os.getpid()}'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as err:
        raise UserError(f'cannot write to {folder} ({err.strerror or err}): pass a writable path') from None


def plain(value):
    """Config values as plain types, so that torch.load(weights_only=True) opens the checkpoint."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def make_optimizer(name, params, lr, weight_decay):
    """The book's SGD has no momentum; the seed's improvement is plain Adam. Weight decay as an L2 term in both."""
    if name == 'sgd':
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == 'adam':
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f'unknown optimizer {name!r}: choose sgd or adam')


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, device, *, ckpt, save_path, num_classes,
               model=None, amp=None, scaler=None, accum_steps=1, channels_last=False, augment=None,
               curves_path=None, title='', earlier_history=()):
    """The book's train_ch13, plus what hours of GPU time need: mixed precision, accumulation, several GPUs,
    a checkpoint after every epoch, a stop on a non-finite loss, a clean Ctrl-C.

    Like the book, each step back-propagates the SUM of per-example losses over the (whole) batch. `net` may be
    compiled or wrapped in DDP; `model` is the plain module whose state_dict is saved. `ckpt` is the checkpoint
    dict of this stage (it carries history and epoch on resume).
    """
    from tqdm import tqdm
    model = net if model is None else model
    world, history = world_size(), ckpt['history']
    steps = len(train_iter) // accum_steps
    if steps == 0:
        raise UserError(f'--accum-steps {accum_steps} is more than the {len(train_iter)} batches of an epoch')
    seen, train_time = 0, 0.0
    try:
        for epoch in range(ckpt['epoch'], num_epochs):
            train_iter.sampler.set_epoch(epoch)
            torch.manual_seed(train_iter.sampler.seed * 1000 + epoch)   # augmentation: same draws after --resume
            net.train()
            totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, examples, correct, pixels
            bar = tqdm(total=steps, desc=f'epoch {epoch + 1}/{num_epochs}', leave=False,
                       disable=not is_main_process() or None)
            start = time.time()
            trainer.zero_grad(set_to_none=True)
            for i, (X, y) in enumerate(train_iter):
                if i >= steps * accum_steps:
                    break           # an incomplete last group: dropped, as the book drops a partial batch
                X, y = to_device(X, y, device, channels_last)
                if augment is not None:
                    X, y = augment(X, y)
                last = (i + 1) % accum_steps == 0
                sync = net.no_sync() if (not last and hasattr(net, 'no_sync')) else contextlib.nullcontext()
                with sync:
                    with autocast(device, amp):
                        out, aux = model_output(net(X))
                        l = loss(out, y)
                        if aux is not None:     # torchvision's DeepLabV3 auxiliary head, weighted as theirs
                            l = l + 0.4 * loss(aux, y)
                    l_sum = l.float().sum()
                    # DDP averages gradients over ranks: scale up so the update is the sum over the global batch
                    scaled = l_sum * world
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                with torch.no_grad():
                    valid = y != IGNORE_INDEX
                    totals += torch.stack([l_sum.detach().double(), torch.tensor(y.shape[0], device=device),
                                           ((out.argmax(1) == y) & valid).sum().double(), valid.sum().double()])
                if last:
                    if not math.isfinite(float(l_sum.detach())):
                        raise NonFiniteLoss(epoch + 1, (i + 1) // accum_steps, float(l_sum.detach()))
                    if scaler is not None:
                        scaler.step(trainer)
                        scaler.update()
                    else:
                        trainer.step()
                    trainer.zero_grad(set_to_none=True)
                    bar.update(1)
            bar.close()
            l_total, n, correct, pixels = all_reduce_sum(totals.tolist(), device)
            train_time += time.time() - start
            seen += n
            test = evaluate_crops(net, test_iter, device, num_classes, amp, channels_last)
            history.append({'epoch': epoch + 1, 'loss': l_total / n, 'train_acc': correct / max(pixels, 1),
                            'test_acc': test['pixel_acc'], 'test_miou': test['miou'],
                            'lr': trainer.param_groups[0]['lr'], 'seconds': time.time() - start})
            if not all(v.isfinite().all() for v in model.state_dict().values() if v.is_floating_point()):
                raise NonFiniteLoss(epoch + 1, steps, float('nan'))     # finite loss, broken weights: keep the last
            ckpt.update(epoch=epoch + 1, model=model.state_dict(), optimizer=trainer.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None)
            if is_main_process():
                save_checkpoint(ckpt, save_path)
                if curves_path:
                    plot_history(list(earlier_history) + history, curves_path, title)
            h = history[-1]
            log(f'epoch {epoch + 1}/{num_epochs}: loss {h["loss"]:.3f}, train acc {h["train_acc"]:.3f}, '
                f'test acc {h["test_acc"]:.3f}, test mIoU {h["test_miou"]:.3f} ({h["seconds"]:.0f} s)')
    except KeyboardInterrupt:
        done = ckpt['epoch']
        log(f'\ninterrupted: {save_path} holds {done} finished epoch(s); run the same command with --resume '
            'to continue')
        raise SystemExit(130) from None
    except NonFiniteLoss as err:
        kept = f'{save_path} (epoch {ckpt["epoch"]}) is kept' if ckpt['epoch'] else 'no checkpoint was written'
        raise UserError(f'the loss became {err.value} at epoch {err.epoch}, step {err.step}; {kept}: lower --lr, '
                        'or find the operation with --detect-anomaly') from None
    if history:
        h = history[-1]
        log(f'loss {h["loss"]:.3f}, train acc {h["train_acc"]:.3f}, test acc {h["test_acc"]:.3f}, '
            f'test mIoU {h["test_miou"]:.3f}')
    if train_time > 0:
        log(f'{seen / train_time:.1f} examples/sec on {[str(device)] * world}')
    return history


class NonFiniteLoss(Exception):
    def __init__(self, epoch, step, value):
        super().__init__(f'epoch {epoch} step {step}: {value}')
        self.epoch, self.step, self.value = epoch, step, value


# ------------------------------------------------------------------------------------------ evaluation/inference
def multiscale_predict(net, image, num_classes, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.2), flip=True,
                       stride=32):
    """Multi-scale (+ horizontal flip) test-time augmentation: average of softmax probabilities at the input size.

    image: normalised float tensor N,3,H,W (N=1 usual). Each scaled input is zero-padded at the bottom/right to
    a multiple of `stride` (a stride-32 net needs it; zero is the mean colour after normalisation) and the
    padding is cropped off the logits before they are resized back to H,W. The caller sets net.eval().
    Returns N,num_classes,H,W probabilities.
    """
    n, _, h, w = image.shape
    total = torch.zeros(n, num_classes, h, w, device=image.device, dtype=torch.float32)
    passes = 0
    with torch.inference_mode():
        for s in scales:
            sh, sw = max(1, round(h * s)), max(1, round(w * s))
            x = image if (sh, sw) == (h, w) else F.interpolate(image, size=(sh, sw), mode="bilinear",
                                                               align_corners=False)
            ph, pw = (-sh) % stride, (-sw) % stride
            for flipped in ((False, True) if flip else (False,)):
                xi = F.pad(x.flip(-1) if flipped else x, (0, pw, 0, ph))
                out = net(xi)
                if isinstance(out, dict):
                    out = out["out"]
                # the net may output at a lower resolution: crop the same fraction the padding took
                oh, ow = out.shape[-2:]
                out = out[..., :math.ceil(sh * oh / (sh + ph)), :math.ceil(sw * ow / (sw + pw))]
                out = F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=False)
                prob = out.softmax(dim=1)
                total += prob.flip(-1) if flipped else prob
                passes += 1
    return total / passes


def predict_logits(net, X):
    """Logits at the input's size for any input size: stride-32 nets get padding that is cropped away."""
    h, w = X.shape[-2:]
    return model_output(net(pad_to_multiple(X, 32)))[0][..., :h, :w]


def infer(net, X, num_classes, scales=None, test_size=None):
    """Scores at X's size: one pass, or multi-scale + flip averaged softmax. test_size resizes the input first
    (the tutorial evaluates Cityscapes at a smaller size) and the scores back."""
    h, w = X.shape[-2:]
    if test_size:
        X = F.interpolate(X, size=tuple(test_size), mode='bilinear', align_corners=False)
    out = multiscale_predict(net, X, num_classes, scales) if scales else predict_logits(net, X)
    if test_size:
        out = F.interpolate(out.float(), size=(h, w), mode='bilinear', align_corners=False)
    return out


def predict(net, img, device=None):
    """The book's predict: a uint8 3xHxW image -> HxW class indices (any size here, not only multiples of 32)."""
    device = device or next(net.parameters()).device
    X = normalize_image(img.to(device)).unsqueeze(0)
    with torch.inference_mode():
        return predict_logits(net, X).argmax(dim=1)[0].cpu()


def evaluate_full(net, dataset, device, num_classes, scales=None, amp=None, batch_size=8, num_workers=None,
                  test_size=None):
    """Confusion matrix over a whole split at each image's original size (labels are never resized).

    `dataset` gives whole uint8 images (crop_size=None, normalize=False). Workers decode; images of the same size
    (most of VOC is 500x375 or 375x500) go through the net together. scales: None for one forward pass, else
    multi-scale (+ flip) averaged softmax, one image at a time.
    """
    from tqdm import tqdm
    net.eval()
    cm = ConfusionMatrix(num_classes)
    workers = default_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=1 if scales else batch_size, collate_fn=list,
                                         sampler=SeededSampler(dataset, shuffle=False), num_workers=workers)
    with torch.inference_mode(), autocast(device, amp):
        for batch in tqdm(loader, desc='evaluating', leave=False, disable=not is_main_process() or None):
            by_size = {}
            for image, label in batch:
                by_size.setdefault(tuple(image.shape), []).append((image, label))
            for items in by_size.values():
                X = normalize_image(torch.stack([image for image, _ in items]).to(device))
                probs = infer(net, X, num_classes, scales, test_size)
                for pred, (_, label) in zip(probs.argmax(1).cpu(), items):
                    cm.update(pred, label)
    cm.all_reduce()
    return cm


# ------------------------------------------------------------------------------------------------------ pictures
def full_palette(colormap=None):
    """256x3 uint8: class colours, then black, with the void colour at 255."""
    palette = torch.zeros((256, 3), dtype=torch.uint8)
    colormap = VOC_COLORMAP if colormap is None else colormap
    palette[:len(colormap)] = torch.tensor(colormap, dtype=torch.uint8)
    palette[IGNORE_INDEX] = torch.tensor(VOID_COLOR, dtype=torch.uint8)
    return palette


def label2image(pred, colormap=None):
    """The book's label2image: HxW class indices -> HxWx3 uint8 colours (void drawn in VOC's void colour)."""
    return full_palette(colormap)[pred.long().clamp(0, 255).cpu()]


def pyplot():
    import matplotlib
    matplotlib.use('Agg')       # files only: works with no screen, in workers and over ssh
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    plt = pyplot()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches='tight')
    except OSError as err:
        raise UserError(f'cannot write {path} ({err.strerror or err}): pass a writable output path') from None
    finally:
        plt.close(fig)


def save_image_grid(path, rows, title, row_titles=None, col_titles=None, scale=2.0):
    """rows: lists of HxWx3 uint8 images (tensors or arrays). The book's show_images, saved to a file."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    h, w = np.asarray(rows[0][0]).shape[:2]
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(n_cols * scale * w / max(h, w) + 0.6, n_rows * scale * h / max(h, w) + 0.6))
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(np.asarray(row[c]))
            else:
                ax.axis('off')
            if col_titles and r == 0:
                ax.set_title(col_titles[c], fontsize=8)
            if row_titles and c == 0:
                ax.set_ylabel(row_titles[r], fontsize=8)
    fig.suptitle(title, fontsize=10, y=1.08 if col_titles else 0.98)   # above multi-line column titles
    save_figure(fig, path)


def plot_history(history, path, title):
    """Training curves, redrawn after every epoch so an interrupted run still has its picture."""
    plt = pyplot()
    x = list(range(1, len(history) + 1))     # a fine-tune stage continues the first stage's axis
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(x, [h['loss'] for h in history], label='train loss (per example)')
    ax1.set_xlabel('epoch')
    ax1.legend()
    for key, name in (('train_acc', 'train acc'), ('test_acc', 'test acc'), ('test_miou', 'test mIoU')):
        ax2.plot(x, [h[key] for h in history], label=name)
    ax2.set_xlabel('epoch')
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def save_confusion_matrix(cm, class_names, path, title):
    """Rows normalised: row i shows where the pixels of class i went."""
    plt = pyplot()
    m = cm.mat.double()
    m = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.35 * n + 3, 0.35 * n + 2.5))
    im = ax.imshow(m, cmap='Blues', vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel('predicted')
    ax.set_ylabel('ground truth')
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ what the four scripts share
# The two recipes (DESIGN.md) and the demo preset that makes each run in minutes on a CPU with no dataset.
RECIPES = {
    'origin': dict(title='FCN (d2l)', model='fcn', optimizer='sgd', lr=1e-3, weight_decay=1e-3, batch_size=32,
                   crop_size=[320, 480], epochs=30, finetune_epochs=0, finetune_lr=1e-5,
                   save='checkpoints/origin.pt', curves='pictures/origin_curves.png'),
    'my': dict(title='ResNetUNet', model='resnet_unet', optimizer='adam', lr=1e-4, weight_decay=1e-3,
               batch_size=32, crop_size=[320, 480], epochs=30, finetune_epochs=10, finetune_lr=1e-5,
               save='checkpoints/my.pt', curves='pictures/my_curves.png'),
}
DEMO_PICTURE_CROP = [80, 112]  # make_demo_voc's smallest image (after the size filter)
# No pretrained backbone on the demo, so the improved recipe's Adam runs 10x hotter (1e-3, then 1e-4); the book's
# SGD keeps its lr (its loss is summed over the batch, which already makes the step large).
DEMO_PRESETS = {
    'origin': dict(batch_size=8, crop_size=[64, 96], epochs=8),
    'my': dict(batch_size=8, crop_size=[64, 96], epochs=8, finetune_epochs=2, lr=1e-3, finetune_lr=1e-4),
}


def add_data_args(parser):
    g = parser.add_argument_group('data and machine')
    g.add_argument('--data-dir', help='the VOC2012 folder (default: VOC2012, VOCdevkit/VOC2012 or '
                   'data/VOCdevkit/VOC2012 next to the scripts); with --dataset cityscapes, the folder holding '
                   'leftImg8bit/ and gtFine/')
    g.add_argument('--download', action='store_true', help='fetch VOC2012 (2 GB) through torchvision into data/ '
                   '(or --data-dir) first (default: off)')
    g.add_argument('--demo', action='store_true', help='a small synthetic dataset in the exact VOC format '
                   '(data/demo) and a CPU-sized preset: for a machine with no dataset and no GPU (default: off)')
    g.add_argument('--dataset', choices=['voc', 'cityscapes'], help='default: voc (predict scripts: the '
                   "checkpoint's)")
    g.add_argument('--device', help='cpu, cuda or cuda:N (default: the GPU if there is one, else the CPU)')
    g.add_argument('--workers', type=int, help=f'DataLoader worker processes (default: min(4, CPUs), here '
                   f'{default_workers()})')
    g.add_argument('--seed', type=int, default=0, help='seed for weights, batch order and crops (default: 0)')
    g.add_argument('--void-as-background', action='store_true', help="the book's handling of VOC's void border "
                   '(255): counted as background instead of ignored (default: ignored)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, help='mixed precision (default: on with '
                   'CUDA, bf16 where the GPU has it else fp16 with a GradScaler; off on the CPU)')


def train_parser(recipe, description, techniques=False):
    """The flags of origin_train.py (techniques=False) and my_train.py; every default is stated in its help."""
    r, d = RECIPES[recipe], DEMO_PRESETS[recipe]
    p = argparse.ArgumentParser(description=description)
    add_data_args(p)
    g = p.add_argument_group('recipe')
    g.add_argument('--epochs', type=int, help=f'default: {r["epochs"]} (--demo: {d["epochs"]})')
    g.add_argument('--batch-size', type=int, help=f'examples per update, over all GPUs (default: {r["batch_size"]};'
                   f' --demo: {d["batch_size"]})')
    g.add_argument('--lr', type=float, help=f'learning rate (default: {r["lr"]:g}'
                   + (f'; --demo: {d["lr"]:g})' if 'lr' in d else ')'))
    g.add_argument('--weight-decay', type=float, help=f'default: {r["weight_decay"]:g}')
    g.add_argument('--crop-size', '--train-size', type=int, nargs=2, metavar=('H', 'W'), help=f'random training '
                   f'crop (default: '
                   f'{r["crop_size"][0]} {r["crop_size"][1]}; --demo: {d["crop_size"][0]} {d["crop_size"][1]})')
    g.add_argument('--no-pretrained', dest='pretrained', action='store_false', default=None,
                   help='random backbone weights (default: ImageNet weights; --demo: random)')
    g.add_argument('--backbone-weights', help='the ImageNet backbone file, e.g. resnet18-f37072fd.pth (default: '
                   "that file next to the scripts, else torchvision's cache or download)")
    g.add_argument('--save', help=f'checkpoint path (default: {r["save"]})')
    g.add_argument('--resume', action='store_true', help='continue the checkpoint(s) at --save to the planned '
                   'epochs (default: start anew; an existing checkpoint is kept as *.prev.pt)')
    if techniques:
        g.add_argument('--model', choices=MODELS, help=f'default: {r["model"]}')
        g.add_argument('--optimizer', choices=['sgd', 'adam'], help=f'default: {r["optimizer"]}')
        g.add_argument('--finetune-epochs', type=int, help=f'a second stage from the first stage\'s weights at '
                       f'--finetune-lr, saved as *_finetune.pt; 0 skips it (default: {r["finetune_epochs"]}; '
                       f'--demo: {d["finetune_epochs"]})')
        g.add_argument('--finetune-lr', type=float, help=f'default: {r["finetune_lr"]:g}; --demo: '
                       f'{d["finetune_lr"]:g}')
        t = p.add_argument_group('the tutorial\'s techniques')
        t.add_argument('--loss', default='ce', choices=['ce', 'weighted_ce', 'focal'], help='default: ce')
        t.add_argument('--class-weights', help='for weighted_ce/focal: "counts" (from the training labels\' pixel '
                       'counts), "tutorial" (its 19 Cityscapes weights) or a file of one weight per class (default: '
                       'counts for weighted_ce, none for focal)')
        t.add_argument('--focal-gamma', type=float, default=2.0, help='default: 2.0 (0 is cross entropy)')
        t.add_argument('--norm', default='batch', choices=NORMS, help='replace every BatchNorm2d (default: batch;'
                       ' evo = EvoNorm-S0)')
        t.add_argument('--aux-loss', action='store_true', help='DeepLabV3 auxiliary head, weight 0.4 (default: off)')
        t.add_argument('--cutmix', type=float, default=0.0, metavar='P', help='CutMix probability per batch '
                       '(default: 0)')
        t.add_argument('--copyblob', type=float, default=0.0, metavar='P', help='CopyBlob probability per image '
                       'and pair (default: 0)')
        t.add_argument('--copyblob-pairs', nargs='+', metavar='SRC:HOST', help='class pairs by name or index '
                       '(default: Cityscapes wall:sidewalk fence:sidewalk bus:road train:road; VOC '
                       f'{" ".join(VOC_COPYBLOB_PAIRS)})')
    s = p.add_argument_group('speed and scale')
    s.add_argument('--accum-steps', type=int, default=1, help='gradient accumulation: --batch-size 32 '
                   '--accum-steps 4 runs micro-batches of 8 with the update of 32 (default: 1)')
    s.add_argument('--channels-last', action=argparse.BooleanOptionalAction, help='default: on with CUDA')
    s.add_argument('--cudnn-benchmark', action=argparse.BooleanOptionalAction, default=True,
                   help='let cuDNN time its algorithms for the training shape (default: on; the first step then '
                   'takes seconds, about 30 s for the FCN\'s 64x64 transposed conv on an H200, for a gain we could '
                   'not tell from noise there: --no-cudnn-benchmark for short runs)')
    s.add_argument('--compile', action='store_true', help='torch.compile the model (default: off; measured on an '
                   'H200: +19%% images/s for the FCN, -29%% for the ResNetUNet)')
    s.add_argument('--sync-bn', action='store_true', help='with torchrun on GPUs: SyncBatchNorm (default: off)')
    s.add_argument('--detect-anomaly', action='store_true', help='autograd anomaly detection, to find the '
                   'operation behind a NaN (slow; default: off)')
    if not techniques:
        p.set_defaults(model=r['model'], optimizer=r['optimizer'], finetune_epochs=0, finetune_lr=r['finetune_lr'],
                       loss='ce', class_weights=None, focal_gamma=2.0, norm='batch', aux_loss=False, cutmix=0.0,
                       copyblob=0.0, copyblob_pairs=None)
    p.set_defaults(recipe=recipe)
    return p


VOC_COPYBLOB_PAIRS = ['bottle:diningtable', 'pottedplant:background', 'chair:background', 'boat:background']


def fill_defaults(args):
    """Flags left unset take the demo preset (with --demo) or the recipe's value."""
    r, d = RECIPES[args.recipe], DEMO_PRESETS[args.recipe]
    for key, value in r.items():
        if getattr(args, key, None) is None:
            setattr(args, key, d.get(key, value) if args.demo else value)
    if args.pretrained is None:
        args.pretrained = not args.demo
    if args.model == 'fcn' and any(side % 32 for side in args.crop_size):
        raise UserError(f'--crop-size {args.crop_size[0]} {args.crop_size[1]}: the FCN needs multiples of 32 (its '
                        'transposed conv upsamples exactly 32x; the book uses 320 480)')
    if args.dataset is None:
        args.dataset = 'voc'
    if args.demo and args.dataset != 'voc':
        raise UserError('--demo makes VOC-format data: drop --dataset cityscapes')
    for flag in ('epochs', 'batch_size', 'accum_steps'):
        if getattr(args, flag) < (0 if flag == 'epochs' else 1):
            raise UserError(f'--{flag.replace("_", "-")} must be positive')
    if args.batch_size % (args.accum_steps * world_size()):
        raise UserError(f'--batch-size {args.batch_size} must be a multiple of --accum-steps times the number of '
                        f'processes ({args.accum_steps} x {world_size()})')
    return args


def open_data(args, crop_size, normalize=True):
    """(train dataset, val dataset, class names, colormap) for --dataset/--data-dir/--demo/--download."""
    if args.dataset == 'cityscapes':
        if args.data_dir is None:
            raise UserError('--dataset cityscapes needs --data-dir, the folder holding leftImg8bit/ and gtFine/')
        return (CityscapesSegDataset(True, crop_size, args.data_dir, normalize),
                CityscapesSegDataset(False, crop_size, args.data_dir, normalize),
                CITYSCAPES_CLASSES, CITYSCAPES_COLORMAP)
    if args.demo:
        if is_main_process():
            make_demo_voc(DEMO_DIR)
        barrier()
        voc_dir = DEMO_DIR
    else:
        if args.download:
            if is_main_process():   # one download; the other ranks wait for it
                download_voc(DOWNLOAD_DIR if args.data_dir is None else Path(args.data_dir))
            barrier()
        voc_dir = find_voc_dir(args.data_dir)
    args.data_dir = str(voc_dir)
    return (VOCSegDataset(True, crop_size, voc_dir, args.void_as_background, normalize),
            VOCSegDataset(False, crop_size, voc_dir, args.void_as_background, normalize),
            VOC_CLASSES, VOC_COLORMAP)


def setup_distributed():
    """torchrun sets WORLD_SIZE: one process per GPU (nccl), or per CPU slot (gloo) for testing."""
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        if backend == 'nccl':
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
        torch.distributed.init_process_group(backend)
    elif torch.cuda.device_count() > 1 and world_size() == 1:
        log(f'note: {torch.cuda.device_count()} GPUs here, this run uses one; use them all with '
            f'torchrun --nproc_per_node={torch.cuda.device_count()} {Path(sys.argv[0]).name} ...')


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def class_weights_for(args, train_ds, class_names):
    """weighted_ce/focal weights: a file, the tutorial's Cityscapes table, or the training labels' frequencies
    (counted once at full size, cached beside the data, shown as a table and a bar chart)."""
    if args.class_weights == 'tutorial':
        if args.dataset != 'cityscapes':
            raise UserError('--class-weights tutorial holds the 19 Cityscapes weights: use it with --dataset '
                            'cityscapes')
        return torch.tensor(TUTORIAL_CITYSCAPES_WEIGHTS)
    if args.class_weights not in (None, 'counts'):
        try:
            weights = [float(v) for v in Path(args.class_weights).read_text().split()]
        except (OSError, ValueError) as err:
            raise UserError(f'--class-weights {args.class_weights}: cannot read numbers from it ({err})') from None
        if len(weights) != len(class_names):
            raise UserError(f'--class-weights {args.class_weights} has {len(weights)} numbers, the dataset '
                            f'{len(class_names)} classes')
        return torch.tensor(weights)
    counts = class_pixel_counts(train_ds, args)
    weights = class_pixel_weights(counts)
    log('class           pixels      share   weight')
    for name, c, w in zip(class_names, counts.tolist(), weights.tolist()):
        log(f'{name:<14}{int(c):>10}   {c / max(counts.sum().item(), 1):7.2%}   {w:6.3f}')
    if is_main_process():
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.bar(range(len(class_names)), (counts / counts.sum().clamp(min=1)).tolist())
        ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
        ax.set_ylabel('share of labelled pixels')
        ax.set_yscale('log')
        ax.set_title(f'class imbalance in the training labels ({data_title(args)})', fontsize=9)
        save_figure(fig, 'pictures/class_frequencies.png')
    return weights


TUTORIAL_CITYSCAPES_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                               0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


def class_pixel_counts(dataset, args):
    cache = Path(args.data_dir) / f'class_pixels_{args.dataset}_{"void0" if args.void_as_background else "void"}.json'
    fallback = Path('checkpoints') / cache.name
    for path in (cache, fallback):
        if path.exists():
            return torch.tensor(json.loads(path.read_text()), dtype=torch.float64)
    counts = torch.zeros(dataset.num_classes, dtype=torch.float64)
    for i in range(len(dataset)):
        label = dataset.read(i)[1]
        counts += torch.bincount(label[label != IGNORE_INDEX].reshape(-1), minlength=dataset.num_classes).double()
    for path in (cache, fallback):    # the dataset folder may be read-only
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(counts.tolist()))
            break
        except OSError:
            continue
    return counts


def parse_pairs(pairs, class_names, dataset):
    names = [n.replace(' ', '').replace('/', '') for n in class_names]
    if pairs is None:
        pairs = ['wall:sidewalk', 'fence:sidewalk', 'bus:road', 'train:road'] if dataset == 'cityscapes' \
            else VOC_COPYBLOB_PAIRS
    out = []
    for pair in pairs:
        try:
            src, host = pair.split(':')
            out.append(tuple(int(x) if x.isdigit() else names.index(x.replace(' ', '')) for x in (src, host)))
        except ValueError:
            raise UserError(f'--copyblob-pairs {pair!r}: expected SRC:HOST with class names or indices of '
                            f'{", ".join(names)}') from None
    return out


def data_title(args):
    return 'DEMO data (synthetic)' if args.demo else ('Cityscapes' if args.dataset == 'cityscapes' else 'VOC2012')


def recipe_title(config):
    """A column title: what was trained, how. From a checkpoint's config."""
    c = config
    text = f'{c["model"]} {c["optimizer"]} lr {c["lr"]:g}, {c["epochs"]} ep'
    if c.get('stage') == 'finetune':
        text += f' + {c["finetune_epochs"]} ep at {c["finetune_lr"]:g}'
    extras = [f'{k} {c[k]}' for k in ('loss', 'norm') if c.get(k) not in (None, 'ce', 'batch')]
    extras += [f'{k} {c[k]:g}' for k in ('cutmix', 'copyblob') if c.get(k)]
    return text + (f' ({", ".join(extras)})' if extras else '')


def finetune_path(save):
    save = Path(save)
    return save.with_name(save.stem + '_finetune' + save.suffix)


def run_training(args):
    """The whole of origin_train.py / my_train.py after parsing: data, model, one or two stages."""
    setup_distributed()
    fill_defaults(args)
    device = pick_device(args.device)
    amp = amp_dtype(device, args.amp)
    channels_last = device.type == 'cuda' if args.channels_last is None else args.channels_last
    if args.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark    # fixed crop shapes: timed once, reused
    for path in (args.save, args.curves):
        check_writable(path)
    pyplot()    # imported now: a Ctrl-C in the middle of matplotlib's first import cannot be handled cleanly
    torch.manual_seed(args.seed)
    train_ds, test_ds, class_names, _ = open_data(args, args.crop_size, normalize=False)
    num_classes = len(class_names)
    train_iter = make_loader(train_ds, args.batch_size // args.accum_steps, True, args.seed, args.workers)
    test_iter = make_loader(test_ds, args.batch_size // args.accum_steps, False, args.seed, args.workers)
    stages = [('train', args.epochs, args.lr, Path(args.save))]
    if args.finetune_epochs:
        stages.append(('finetune', args.finetune_epochs, args.finetune_lr, finetune_path(args.save)))
    resuming = args.resume and Path(args.save).exists()
    model_args = dict(name=args.model, num_classes=num_classes, norm=args.norm, aux_loss=args.aux_loss)
    model = build_model(pretrained=args.pretrained and not resuming, weights_path=args.backbone_weights,
                        **model_args)
    if args.sync_bn and world_size() > 1 and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if world_size() > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        net = torch.compile(net)
    weights = None
    if args.loss != 'ce' and (args.loss == 'weighted_ce' or args.class_weights):
        weights = class_weights_for(args, train_ds, class_names)
    loss_fn = make_loss(args.loss, weights, args.focal_gamma)
    augment = make_augment(args, class_names)
    earlier = []
    for stage, epochs, lr, path in stages:
        config = plain(dict(vars(args), stage=stage, data_title=data_title(args), class_names=class_names))
        ckpt = None
        if path.exists() and args.resume:
            ckpt = load_torch_file(path)
            if ckpt.get('model_args') != model_args:
                raise UserError(f'{path} was written for {ckpt.get("model_args")}, this run builds {model_args}: '
                                'pass the same flags, or another --save')
            model.load_state_dict(ckpt['model'])
            log(f'resuming {path} at epoch {ckpt["epoch"]} of {epochs}')
        elif path.exists() and is_main_process():
            os.replace(path, path.with_name(path.stem + '.prev' + path.suffix))
            log(f'{path} existed: kept as {path.with_name(path.stem + ".prev" + path.suffix)} (use --resume to '
                'continue it instead)')
        if ckpt is None:
            ckpt = dict(epoch=0, history=[], model_args=model_args, num_classes=num_classes)
        ckpt.update(config=config, epochs=epochs)
        trainer = make_optimizer(args.optimizer, model.parameters(), lr, args.weight_decay)
        scaler = torch.amp.GradScaler('cuda') if amp == torch.float16 else None
        if ckpt.get('optimizer'):
            trainer.load_state_dict(ckpt['optimizer'])
        if scaler is not None and ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        log(f'{stage}: {recipe_title(config)} on {data_title(args)}, {len(train_ds)} training examples, '
            f'device {device}{" x" + str(world_size()) if world_size() > 1 else ""}, '
            f'amp {amp if amp is None else str(amp).replace("torch.", "")}')
        if ckpt['epoch'] >= epochs:
            log(f'{path} has finished its {epochs} epochs')
        title = f'{recipe_title(config)} - {data_title(args)}'
        train_ch13(net, train_iter, test_iter, loss_fn, trainer, epochs, device, ckpt=ckpt, save_path=path,
                   num_classes=num_classes, model=model, amp=amp, scaler=scaler, accum_steps=args.accum_steps,
                   channels_last=channels_last, augment=augment, curves_path=args.curves, title=title,
                   earlier_history=earlier)
        earlier = earlier + ckpt['history']
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_augment(args, class_names):
    """CutMix and CopyBlob on the device batch (uint8 images are already normalised there: any dtype works)."""
    if not args.cutmix and not args.copyblob:
        return None
    pairs = parse_pairs(args.copyblob_pairs, class_names, args.dataset) if args.copyblob else []

    def augment(X, y):
        if args.copyblob:
            X, y = copyblob(X, y, pairs, args.copyblob)
        if args.cutmix:
            X, y = cutmix_segmentation(X, y, args.cutmix)
        return X, y
    return augment


def predict_parser(recipe, description, compare=False):
    """The flags of origin_predict.py and my_predict.py."""
    p = argparse.ArgumentParser(description=description)
    add_data_args(p)
    default = RECIPES[recipe]['save']
    if recipe == 'my':
        default = f'{finetune_path(default)} if it exists, else {default}'
    p.add_argument('inputs', nargs='*', help='image files or folders to segment: colour, overlay and label-id PNGs '
                   'go to --out-dir, one image at a time (default: none; the val pictures are drawn instead)')
    p.add_argument('--checkpoint', help=f'default: {default}')
    if compare:
        p.add_argument('--compare', nargs='+', metavar='CKPT', help='checkpoints side by side in '
                       'pictures/compare.png (default: checkpoints/origin.pt, checkpoints/my.pt and '
                       'checkpoints/my_finetune.pt, those that exist)')
    p.add_argument('--eval', action='store_true', help='metrics over the whole val split at original size: table '
                   'on stdout, *_results.txt/.json and *_confusion.png beside the checkpoint (default: off)')
    p.add_argument('--mst', action='store_true', help='multi-scale + flip inference (default: off)')
    p.add_argument('--scales', type=float, nargs='+', default=list(MST_SCALES),
                   help=f'scales for --mst (default: {" ".join(map(str, MST_SCALES))})')
    p.add_argument('--test-size', type=int, nargs=2, metavar=('H', 'W'), help='run the net on images resized to '
                   'H W, scores resized back to the label size (the tutorial\'s Cityscapes evaluation; default: '
                   'original size)')
    p.add_argument('--write-split', action='store_true', help='also segment every val image into --out-dir '
                   '(default: off)')
    p.add_argument('--out-dir', default='predictions', help='where segmented images go (default: predictions)')
    p.add_argument('--picture', default=f'pictures/{recipe}_out.png', help=f'the val picture (default: '
                   f'pictures/{recipe}_out.png)')
    p.add_argument('--num-images', type=int, default=4, help='val images in the pictures (default: 4, the book)')
    p.set_defaults(recipe=recipe)
    return p


MST_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.2)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def load_model(path, device):
    """A model rebuilt from its checkpoint alone: (net in eval mode on device, checkpoint dict)."""
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt or 'model' not in ckpt:
        raise UserError(f'{path} is not a checkpoint written by these scripts (no model_args): pass one from '
                        'origin_train.py or my_train.py')
    args = ckpt['model_args']
    net = build_model(**args)
    try:
        net.load_state_dict(ckpt['model'])
    except RuntimeError:
        raise UserError(f'{path}: its weights do not fit a {args["name"]} with {args["num_classes"]} classes '
                        '(an edited or foreign checkpoint): retrain, or pass the right file') from None
    return net.to(device).eval(), ckpt


def predict_data_args(args, ckpt):
    """Unset data flags take the checkpoint's, so `python my_predict.py` after `my_train.py --demo` just works."""
    cfg = ckpt['config']
    if args.dataset is None:
        args.dataset = cfg.get('dataset', 'voc')
    if not args.demo and args.data_dir is None:
        args.demo = bool(cfg.get('demo'))
        args.data_dir = cfg.get('data_dir')
    if not args.void_as_background:
        args.void_as_background = bool(cfg.get('void_as_background'))
    args.crop_size = cfg.get('crop_size', [320, 480])
    return args


def results_path(ckpt_path, suffix, mst=False):
    p = Path(ckpt_path)
    return p.with_name(f'{p.stem}_results{"_mst" if mst else ""}{suffix}')


def metrics_table(results, class_names):
    """The per-class table; a second column set appears when a multi-scale result is there too."""
    runs = [(name, r) for name, r in results if r is not None]
    head = f'{"class":<16}' + ''.join(f'{"IoU " + name:>16}{"acc " + name:>16}' for name, _ in runs)
    lines = [head]
    for c, cls in enumerate(class_names):
        lines.append(f'{cls:<16}' + ''.join(f'{r["iou"][c]:>16.4f}{r["acc"][c]:>16.4f}' for _, r in runs))
    for key, label in (('pixel_acc', 'pixel acc'), ('mean_acc', 'mean acc'), ('miou', 'mIoU'), ('fwiou', 'fwIoU')):
        lines.append(f'{label:<16}' + ''.join(f'{r[key]:>16.4f}{"":>16}' for _, r in runs))
    lines.append('nan: the class is absent from both prediction and ground truth; such classes are left out of '
                 'mIoU (and of mean acc when absent from the ground truth)')
    return '\n'.join(lines)


def evaluate_checkpoint(net, ckpt_path, args, val_full, class_names, device, amp):
    """--eval: the full val split at original size, table to stdout and files beside the checkpoint."""
    scales = args.scales if args.mst else None
    cm = evaluate_full(net, val_full, device, len(class_names), scales, amp, num_workers=args.workers,
                       test_size=args.test_size)
    result = dict(cm.compute(), checkpoint=str(ckpt_path), mst=bool(scales), scales=scales,
                  data=data_title(args), images=len(val_full), class_names=class_names)
    if is_main_process():
        other_path = results_path(ckpt_path, '.json', not args.mst)
        other = json.loads(other_path.read_text()) if other_path.exists() else None
        pair = [('mst', other), ('single', result)] if not args.mst else [('single', other), ('mst', result)]
        table = metrics_table(pair, class_names)
        print(f'\n{ckpt_path} on {len(val_full)} val images of {data_title(args)} at original size\n{table}')
        try:
            results_path(ckpt_path, '.json', args.mst).write_text(json.dumps(result, indent=1))
            results_path(ckpt_path, '.txt', args.mst).write_text(table + '\n')
        except OSError as err:
            raise UserError(f'cannot write results beside {ckpt_path} ({err.strerror or err})') from None
        save_confusion_matrix(cm, class_names, Path(ckpt_path).with_name(Path(ckpt_path).stem + '_confusion.png'),
                              f'{Path(ckpt_path).name}: mIoU {result["miou"]:.3f} - {data_title(args)}')
    return result


def known_metrics(ckpt_path, ckpt):
    """A column title's figures: full-resolution results if --eval wrote them, else the last epoch's crops."""
    path = results_path(ckpt_path, '.json')
    if path.exists():
        r = json.loads(path.read_text())
        return f'val acc {r["pixel_acc"]:.3f}, mIoU {r["miou"]:.3f}'
    if ckpt['history']:
        h = ckpt['history'][-1]
        return f'val crops: acc {h["test_acc"]:.3f}, mIoU {h["test_miou"]:.3f}'
    return 'untrained'


def segment_file(net, image, path, out_dir, colormap, device, scales, amp, test_size=None, inputs=()):
    """One uint8 image read from `path` -> <stem>_color.png, <stem>_overlay.png, <stem>_labels.png (class ids as a
    palette PNG) in out_dir; no output may be one of `inputs`."""
    X = normalize_image(image.to(device)).unsqueeze(0)
    with torch.inference_mode(), autocast(device, amp):
        pred = infer(net, X, len(colormap), scales, test_size).argmax(1)[0].cpu()
    color = label2image(pred, colormap).numpy()
    overlay = (0.5 * image.permute(1, 2, 0).numpy() + 0.5 * color).astype(np.uint8)
    ids = Image.frombytes('P', (pred.shape[1], pred.shape[0]), pred.to(torch.uint8).numpy().tobytes())
    ids.putpalette(full_palette(colormap).reshape(-1).tolist())
    stem = Path(path).stem
    outs = [(out_dir / f'{stem}_{kind}.png', img) for kind, img in
            (('color', Image.fromarray(color)), ('overlay', Image.fromarray(overlay)), ('labels', ids))]
    for out, img in outs:
        if out.resolve() in inputs:
            raise UserError(f'{out} is an input image: pass another --out-dir')
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for out, img in outs:
            img.save(out)
    except OSError as err:
        raise UserError(f'cannot write to {out_dir} ({err.strerror or err}): pass a writable --out-dir') from None


def image_files(inputs):
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            yield path
        else:
            raise UserError(f'{path} does not exist: pass image files or folders')


def segment_files(net, files, out_dir, colormap, device, scales, amp, test_size=None):
    """Streams: one image in memory at a time. Unreadable files are skipped with a warning, counted at the end."""
    done, skipped = 0, 0
    files = list(files)
    inputs = {Path(p).resolve() for p in files}     # no output may land on any input, not only its own
    for path in files:
        try:    # an unreadable input is skipped; a failed write stops the run (the next would fail too)
            image = image_to_tensor(open_image(path))
        except UserError as err:
            print(f'warning: skipped {path}: {error_line(err)}', file=sys.stderr)
            skipped += 1
            continue
        segment_file(net, image, path, Path(out_dir), colormap, device, scales, amp, test_size, inputs)
        done += 1
    log(f'segmented {done} image(s) into {out_dir}' + (f', skipped {skipped} unreadable' if skipped else ''))


def val_picture_rows(net, val, n, crop, colormap, device):
    """The book's picture: n val images cropped at (0, 0, h, w): image, prediction, ground truth."""
    rows = [[], [], []]
    for i in range(min(n, len(val))):
        image, label = val.read(i)
        X = torchvision.transforms.functional.crop(image, 0, 0, *crop)
        y = torchvision.transforms.functional.crop(label, 0, 0, *crop)
        rows[0].append(X.permute(1, 2, 0))
        rows[1].append(label2image(predict(net, X, device), colormap))
        rows[2].append(label2image(y, colormap))
    return rows


def run_predict(args):
    """The whole of origin_predict.py / my_predict.py after parsing."""
    device = pick_device(args.device)
    amp = amp_dtype(device, args.amp)
    path = args.checkpoint
    if path is None:
        path = RECIPES[args.recipe]['save']
        if args.recipe == 'my' and finetune_path(path).exists():
            path = finetune_path(path)
    net, ckpt = load_model(path, device)
    predict_data_args(args, ckpt)
    colormap = CITYSCAPES_COLORMAP if args.dataset == 'cityscapes' else VOC_COLORMAP
    if ckpt['num_classes'] != len(colormap):
        raise UserError(f'{path} predicts {ckpt["num_classes"]} classes, {args.dataset} has {len(colormap)}: pass '
                        'the matching --dataset or checkpoint')
    scales = args.scales if args.mst else None
    if args.inputs:
        segment_files(net, image_files(args.inputs), args.out_dir, colormap, device, scales, amp, args.test_size)
        if not (args.eval or args.write_split):
            return
    _, val, class_names, _ = open_data(args, args.crop_size)
    val_full = type(val)(False, None, args.data_dir, normalize=False,
                         **({} if args.dataset == 'cityscapes' else {'void_as_background': args.void_as_background}))
    # the book's picture crops (0, 0, 320, 480), its training crop; the demo's crop would cut its objects in half
    crop = DEMO_PICTURE_CROP if args.demo else args.crop_size
    checkpoints = [(Path(path), net, ckpt)]
    if getattr(args, 'compare', None) is not None or args.recipe == 'my':
        names = args.compare or [RECIPES['origin']['save'], RECIPES['my']['save'], finetune_path(RECIPES['my']['save'])]
        # the main checkpoint is usually one of them: loaded once, its predictions drawn once
        checkpoints = [checkpoints[0] if Path(p).resolve() == Path(path).resolve()
                       else (Path(p),) + load_model(p, device)
                       for p in names if args.compare or Path(p).exists()] or checkpoints
    if args.eval:
        for p, n, _ in checkpoints:
            evaluate_checkpoint(n, p, args, val_full, class_names, device, amp)
    if args.write_split:
        segment_files(net, (p for p, _ in val_full.items), args.out_dir, colormap, device, scales, amp,
                      args.test_size)
    if not is_main_process():
        return
    rows = val_picture_rows(net, val, args.num_images, crop, colormap, device)
    title = f'{recipe_title(ckpt["config"])}\n{known_metrics(path, ckpt)} - {data_title(args)}'
    save_image_grid(args.picture, rows, title, row_titles=['image', 'prediction', 'ground truth'])
    log(f'wrote {args.picture}')
    if args.recipe == 'my':
        columns, titles = [], ['image', 'ground truth']
        for p, n, c in checkpoints:
            columns.append(rows[1] if n is net else val_picture_rows(n, val, args.num_images, crop, colormap,
                                                                      device)[1])
            recipe = textwrap.fill(recipe_title(c['config']), 30)    # columns are narrow: wrap, do not overlap
            titles.append(f'{Path(p).name}\n{recipe}\n{known_metrics(p, c)}')
        images, truths = rows[0], rows[2]     # the same val crops as my_out.png, whatever the net
        rows = [[images[i], truths[i]] + [col[i] for col in columns] for i in range(len(images))]
        compare_path = Path(args.picture).with_name('compare.png')
        save_image_grid(compare_path, rows, f'side by side on {data_title(args)}', col_titles=titles)
        log(f'wrote {compare_path}')
