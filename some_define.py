"""Named building blocks for the d2l semantic-segmentation chapter, its ResNetUNet improvement and a segmentation
tutorial's techniques: this project's d2l/torch.py, holding no recipe (the four scripts do). Five parts, book first:
  1. The book, in chapter order: "Semantic Segmentation and the Dataset" (VOC_CLASSES, VOC_COLORMAP,
     read_voc_images, voc_colormap2label, voc_label_indices, voc_rand_crop, VOCSegDataset, load_data_voc),
     "Transposed Convolution" (bilinear_kernel), "Fully Convolutional Networks" (fcn_resnet18, the loss,
     train_batch_ch13, train_ch13, predict, label2image, the picture).
  2. The improvement: ResNetUNet, and its fine-tune's checkpoint.
  3. The tutorial's techniques: Cityscapes data and augmentation, DeepLabV3, Batch/Instance/Group/EvoNorm, focal
     and class-weighted losses, CutMix, CopyBlob, confusion matrix and mIoU, multi-scale and original-size evaluation.
  4. Your own data: class files, the images/ + masks/ folders, labelme2voc's layout, segmenting your photos.
  5. The machinery: errors and stops, torchrun and seeds, speed paths (fast equivalents of the book's layers, data
     kept on the device, mixed precision), finding and downloading data, weights files, file writes and checkpoints,
     devices, the ONNX export, pictures, flags, the demo-data generator.
A book block may call machinery defined further down. Where the book is wasteful, names and results stay, waste goes.
"""
import argparse
import collections
import contextlib
import copy
import datetime
import errno
import functools
import hashlib
import http.client
import io
import json
import math
import os
import posixpath
import shutil
import signal
import sys
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision
from PIL import ExifTags, Image, ImageDraw, ImageOps
from torch import nn
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2


# ======================================================================================================================
# 1. The book, in chapter order
# ======================================================================================================================
# -------------------------------------------------------------------------------- Semantic Segmentation and the Dataset
VOC_CLASSES = ['background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train',
               'tv/monitor']


VOC_COLORMAP = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128], [192, 0, 128],
                [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]]
IGNORE_INDEX = 255              # VOC's 'void' border and Cityscapes' unlabelled pixels: no loss, no metric
VOID_COLOR = [224, 224, 192]    # how VOC draws it (entry 255 of its palette)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NET_STRIDE = 32         # every net's coarsest feature map is 1/32 of its input: sizes are padded to multiples of it
# A class table: names, and one RGB colour per class (drawn in pictures; in an RGB label, the colour of the class).
Classes = collections.namedtuple('Classes', 'names colors')
VOC = Classes(VOC_CLASSES, VOC_COLORMAP)
# What a dataset lister finds: (image, label) path pairs, their source and advice (for messages), a value->class LUT.
SplitFiles = collections.namedtuple('SplitFiles', 'items source advice label_lut', defaults=(None,))


def read_voc_images(voc_dir, is_train=True):
    """The book's reader: a split's images and RGB labels as uint8 tensors, all in memory (VOCSegDataset: lazily)."""
    files = voc_files(voc_dir, is_train)
    features = [read_image(img, 'RGB', files.advice) for img, _ in files.items]
    labels = [read_image(label, 'RGB', files.advice) for _, label in files.items]
    return features, labels


def voc_files(voc_dir, is_train=True, val_share=None):
    """A split's (image, label) pairs, each checked to exist: the ids in ImageSets/Segmentation/train.txt or val.txt
    (a CVAT export's default.txt instead: cvat_split)."""
    folder = Path(voc_dir) / 'ImageSets' / 'Segmentation'
    txt = folder / ('train.txt' if is_train else 'val.txt')
    if val_share or (not txt.exists() and (folder / 'default.txt').exists()):
        split, ids = cvat_split(folder, txt, is_train, val_share)
    elif txt.exists():
        split, ids = txt, [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    else:
        raise UserError(f'split file {txt} is missing: the VOC2012 folder is incomplete, unpack the dataset again')
    if not ids:
        raise UserError(f'split file {txt} lists no ids: the VOC2012 folder is incomplete, unpack the dataset again')
    if not (Path(voc_dir) / 'JPEGImages').is_dir():
        raise UserError(f'{Path(voc_dir) / "JPEGImages"} is missing: put the images there (CVAT exports them when '
                        '"Save images" is ticked)')
    items = [voc_paths(voc_dir, name) for name in ids]
    for name, pair in zip(ids, items):
        for path in pair:
            if not path.exists():
                raise UserError(f'{path} is missing (id {name} of {split}): restore it or remove the id')
    return SplitFiles(items, split, f'remove its id from {split}')


def voc_paths(voc_dir, name):
    """An id's image and label: JPEGImages/<id>.jpg, or the suffix the image came with (CVAT keeps it)."""
    images = Path(voc_dir) / 'JPEGImages'
    found = (p for s in IMAGE_SUFFIXES for p in (images / f'{name}{s}', images / f'{name}{s.upper()}') if p.exists())
    return next(found, images / f'{name}.jpg'), Path(voc_dir) / 'SegmentationClass' / f'{name}.png'


def read_image(path, mode='RGB', advice='remove it'):
    """A file as a uint8 CxHxW tensor: 'RGB' as shown (a phone's portrait photo upright, as labelling tools show it),
    'UNCHANGED' as stored (a palette PNG's indices). PIL decodes: torchvision.io's decoders are deprecated in 0.29."""
    path = Path(path)
    if not path.exists():
        raise UserError(f'{path} is missing: restore it or {advice}')
    try:
        with Image.open(path) as img:
            if mode == 'RGB':
                ImageOps.exif_transpose(img, in_place=True)
            array = torch.from_numpy(np.array(img.convert('RGB') if mode == 'RGB' else img))
    except Exception as err:
        raise UserError(f'{path} cannot be read ({error_line(err)}): replace it or {advice}') from None
    return array.permute(2, 0, 1).contiguous() if array.ndim == 3 else array[None]


def voc_colormap2label(colormap=VOC_COLORMAP):
    """The book's mapping from RGB colour to class index, indexed as the book indexes it (ColormapLookup)."""
    return ColormapLookup(colormap)


class ColormapLookup:
    """The book's colormap2label: indexed by packed colours, (R * 256 + G) * 256 + B, it gives their classes. It holds
    one sorted entry a colour where the book fills a 256**3-entry table (128 MB); VOC's void colour gives 255 (the book:
    0), a colour of no class -1 (the book: 0, background)."""

    def __init__(self, colormap):
        colors = torch.tensor(list(colormap) + [VOID_COLOR], dtype=torch.int64)
        self.codes, order = ((colors[:, 0] * 256 + colors[:, 1]) * 256 + colors[:, 2]).sort()
        self.classes = torch.tensor(list(range(len(colormap))) + [IGNORE_INDEX])[order]

    def __getitem__(self, idx):     # a tensor or, as in the book, a NumPy array of packed colours
        idx = torch.as_tensor(idx, dtype=torch.int64)
        pos = torch.searchsorted(self.codes, idx).clamp(max=len(self.codes) - 1)
        return torch.where(self.codes[pos] == idx, self.classes[pos], -1)


def voc_label_indices(colormap, colormap2label):
    """The book's lookup: RGB label image (3xHxW) -> class indices (HxW int64), on any device."""
    colormap = colormap.to(torch.int64)
    idx = (colormap[0] * 256 + colormap[1]) * 256 + colormap[2]
    return colormap2label[idx]


def read_label(path, colormap2label=None, advice='remove it'):
    """Class indices (HxW int64) of a label PNG: palette (VOC's) or grey ones hold them, RGB ones are looked up."""
    label = read_image(path, 'UNCHANGED', advice)
    if label.shape[0] <= 2:         # palette or grey, perhaps with alpha
        return label[0].long()
    indices = voc_label_indices(label[:3], colormap2label or voc_colormap2label())
    if (indices < 0).any():
        y, x = (int(v) for v in (indices < 0).nonzero()[0])
        raise UserError(f'{path} has the colour {tuple(label[:3, y, x].tolist())} at x={x}, y={y}, which is no '
                        "class's colour: correct the label, or give the colour a class")
    return indices


def check_pair(image, label, img_path, label_path, num_classes):
    (h, w), (lh, lw) = image.shape[1:], label.shape
    if (h, w) != (lh, lw):
        with Image.open(img_path) as img:
            turn = quarter_turn(img)
        if turn and (lh, lw) == (w, h):     # a mask drawn by a tool that ignores the orientation
            raise UserError(f"{label_path} is {lw}x{lh} (width x height), the size of {img_path}'s stored pixels; "
                            f'{Path(img_path).name} is shown turned (EXIF orientation {turn}) as {w}x{h}: draw the '
                            'mask on the photo as shown')
        raise UserError(f'{label_path} is {lw}x{lh} but {img_path} is {w}x{h} (width x height): image and label must '
                        'have the same size')
    bad = ((label < 0) | (label >= num_classes)) & (label != IGNORE_INDEX)
    if bad.any():
        values = label[bad].unique().tolist()[:5]
        raise UserError(f'{label_path} holds label values {values} outside 0..{num_classes - 1} and '
                        f'{IGNORE_INDEX}: is it a label of this dataset?')


def quarter_turn(img):
    """An opened image's EXIF orientation if it shows the stored pixels turned a quarter (a phone's portrait photo)."""
    turn = Image.Image.getexif(img).get(ExifTags.Base.Orientation)     # the header only; PNG's own decodes pixels
    return turn if turn in (5, 6, 7, 8) else None


def voc_rand_crop(feature, label, height, width):
    """Randomly crop both feature and label images (the book's; seeded() at the caller makes it reproducible)."""
    rect = torchvision.transforms.RandomCrop.get_params(feature, (height, width))
    feature = torchvision.transforms.functional.crop(feature, *rect)
    label = torchvision.transforms.functional.crop(label, *rect)
    return feature, label


@functools.lru_cache(maxsize=8)
def imagenet_stats(device):
    """ImageNet's mean and std as 3x1x1 float32 tensors on `device`, made once (a copy per batch would make each step
    wait for it) and outside inference_mode, so that evaluation's first call still serves training."""
    with torch.inference_mode(False):
        return tuple(torch.tensor(v, device=device).view(-1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize_image(img):
    """uint8 or [0,1] float image(s) -> ImageNet-normalised float32: the one place images are normalised."""
    x = img.float() / 255 if img.dtype == torch.uint8 else img.float()
    mean, std = imagenet_stats(x.device)
    return (x - mean) / std


class SegDataset(torch.utils.data.Dataset):
    """The one dataset mechanism (VOC, Cityscapes, a user's folders): SplitFiles and a class table in, the book's items
    out, read lazily. crop_size=None gives whole images; with a crop, smaller images are dropped, as the book does,
    unless `augment` (the tutorial's transform) pads them. normalize=False: uint8 images and labels, to normalise and
    widen on the device. An item asked for as (index, seed), as SeededSampler hands them out, crops from that seed:
    the same crops whatever the number of workers, and a resumed run's crops are an uninterrupted one's."""

    def __init__(self, files, classes, crop_size=None, normalize=True, void_as_background=False, augment=False):
        self.classes, self.num_classes, self.advice = classes, len(classes.names), files.advice
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.normalize, self.void_as_background, self.augment = normalize, void_as_background, augment
        self.label_lut, self.colormap2label = files.label_lut, voc_colormap2label(classes.colors)
        self.items, self.sizes = files.items, None
        if self.crop_size is not None and not augment:
            self.items, self.sizes = self.large_enough(files)
        log(f'read {len(self.items)} examples')

    def large_enough(self, files):
        """The items at least as large as the crop, and their (height, width) as shown, from the image headers."""
        kept, sizes, largest = [], [], (0, 0)
        for img_path, label_path in files.items:
            try:
                with Image.open(img_path) as img:
                    w, h = img.size[::-1] if quarter_turn(img) else img.size
            except Exception as err:
                raise UserError(f'{img_path} cannot be read ({error_line(err)}): replace it or {self.advice}') from None
            largest = max(largest, (h, w))
            if h >= self.crop_size[0] and w >= self.crop_size[1]:
                kept.append((img_path, label_path))
                sizes.append((h, w))
        if not kept:
            raise UserError(f'every image listed in {files.source} is smaller than the crop {self.crop_size[0]}x'
                            f'{self.crop_size[1]} (largest {largest[0]}x{largest[1]}): pass a smaller --crop-size')
        return kept, sizes

    def __len__(self):
        return len(self.items)

    def normalize_image(self, img):     # the book's predict calls test_iter.dataset.normalize_image(img)
        return normalize_image(img)

    def read(self, idx):
        """(uint8 3xHxW image, int64 HxW label) at full size, checked."""
        img_path, label_path = self.items[idx]
        image = read_image(img_path, 'RGB', self.advice)
        label = read_label(label_path, self.colormap2label, self.advice)
        if self.label_lut is not None:
            label = self.label_lut[label.clamp(0, 255)]
        check_pair(image, label, img_path, label_path, self.num_classes)
        if self.void_as_background:
            label[label == IGNORE_INDEX] = 0
        return image, label

    def __getitem__(self, item):
        idx, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.read(idx)
        if self.crop_size is not None:
            with seeded(seed):
                if self.augment:
                    image, label = tutorial_augment(image, label, self.crop_size)
                else:
                    image, label = voc_rand_crop(image, label, *self.crop_size)
        if self.normalize:      # the book's pair: float32 image, int64 label
            return normalize_image(image), label
        return image, label.to(torch.uint8)     # 8x fewer label bytes to move: every class and 255 fit in a byte


class VOCSegDataset(SegDataset):
    """The book's dataset: a VOC split, read lazily. `classes`: another class table for data in the VOC layout;
    `val_share`: the share of a CVAT export's default.txt held out as val (cvat_split)."""

    def __init__(self, is_train, crop_size, voc_dir, *, classes=VOC, void_as_background=False, normalize=True,
                 val_share=None):
        super().__init__(voc_files(voc_dir, is_train, val_share), classes, crop_size, normalize, void_as_background)


def load_data_voc(batch_size, crop_size, *, data=None, seed=0, num_workers=None, device=None, channels_last=False,
                  on_device='auto'):
    """The book's two loaders of random crops: (train_iter, test_iter). The book's call, without `data`: VOC2012 where
    the scripts find it, its void border counted as background as the book's colormap2label counts it (the book's loss
    knows no ignored label). `data`: a DataSource (find_data) or a VOC2012 folder, void ignored (255) unless the
    DataSource says otherwise. With `device`, batches arrive there, from splits kept there (DeviceData) or streamed."""
    data = find_data(void_as_background=True) if data is None else data if isinstance(data, DataSource) else \
        DataSource('voc', Path(data), VOC, False, 'VOC2012')
    train = open_dataset(data, True, crop_size, normalize=device is None)
    test = open_dataset(data, False, crop_size, normalize=device is None)
    if data.classes not in (VOC, CITYSCAPES):      # a user's own classes: is every one labelled? (counted once)
        main_process_first(functools.partial(check_labelled_classes, train, data.root))
    train_iter = make_loader(train, batch_size, True, seed, num_workers)
    test_iter = make_loader(test, batch_size, False, seed, num_workers)
    if device is None:
        return train_iter, test_iter
    keep, why = data_on_device(on_device, device, (train, test))
    workers = train_iter.num_workers
    log(f'data: decoded once and kept on {device} ({why})' if keep else
        f'data: streamed, {f"{workers} DataLoader workers" if workers else "read in the main process"} ({why})')
    loader = DeviceData if keep else DeviceLoader
    return loader(train_iter, device, channels_last), loader(test_iter, device, channels_last)


def get_dataloader_workers():
    """The book's DataLoader workers (d2l: 4), here at most the CPUs."""
    return default_workers()


# ----------------------------------------------------------------------------------------------- Transposed Convolution
def bilinear_kernel(in_channels, out_channels, kernel_size):
    """The book's bilinear-interpolation weights for a transposed convolution: channel i -> channel i only."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = (torch.arange(kernel_size).reshape(-1, 1), torch.arange(kernel_size).reshape(1, -1))
    filt = (1 - torch.abs(og[0] - center) / factor) * (1 - torch.abs(og[1] - center) / factor)
    weight = torch.zeros((in_channels, out_channels, kernel_size, kernel_size))
    weight[range(in_channels), range(out_channels), :, :] = filt
    return weight


# ----------------------------------------------------------------------------------------- Fully Convolutional Networks
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
    nn.init.xavier_uniform_(net.final_conv.weight)     # the book's text asks for it; its code leaves it out
    net.transpose_conv.weight.data.copy_(bilinear_kernel(num_classes, num_classes, 64))
    return net


def cross_entropy_loss(inputs, targets, weight=None):
    """The book's loss: per-pixel cross entropy averaged over height and width, one value per example; ignored pixels
    count as 0. `weight`: the tutorial's per-class weights, already on the inputs' device (a copy stalls a step)."""
    return F.cross_entropy(inputs, targets, weight=weight, reduction='none', ignore_index=IGNORE_INDEX).mean(1).mean(1)


def try_all_gpus():
    """The book's device list: every GPU, or [cpu] where there is none."""
    devices = [torch.device(f'cuda:{i}') for i in range(torch.cuda.device_count())]
    return devices if devices else [torch.device('cpu')]


def train_batch_ch13(net, X, y, loss, trainer, devices=None, *, amp=None, scaler=None, step=True):
    """The book's step: the batch to devices[0] (when given), the SUM of its per-example losses back-propagated, then
    trainer.step(). Returns (loss sum, correct pixels), on the device: nothing waits for it. Beyond the book: mixed
    precision (`amp`, and fp16's GradScaler `scaler`), void pixels left out of the accuracy, the loss times the number
    of torchrun processes (DDP's average of their gradients is then the global batch's sum), and step=False, which
    only adds this batch's gradients (train_epoch steps once per accum_steps). Gradients are zeroed after the step
    where the book zeroes them before it: accumulated ones must survive the calls in between."""
    if devices:
        X, y = X.to(devices[0]), y.to(devices[0])
    net.train()
    with autocast(X.device, amp):
        out, aux = model_output(net(X))
        l = loss(out, y)
        if aux is not None:     # torchvision's DeepLabV3 auxiliary head, weighted as torchvision's references do
            l = l + AUX_WEIGHT * loss(aux, y)
    l_sum = l.float().sum()
    world = world_size()
    (scaler.scale(l_sum * world) if scaler is not None else l_sum * world).backward()
    if step:
        if scaler is not None:
            scaler.step(trainer)
            scaler.update()
        else:
            trainer.step()
        trainer.zero_grad(set_to_none=True)
    with torch.no_grad():
        return l_sum.detach(), ((out.argmax(1) == y) & (y != IGNORE_INDEX)).sum()


class NonFiniteLoss(Exception):
    """train_epoch's signal to train_ch13: the loss, or the weights after a step, became inf or nan (args: the step)."""


def train_epoch(net, batches, loss, trainer, amp=None, scaler=None, accum_steps=1, augment=None, seed=0):
    """One epoch of updates, each from accum_steps micro-batches (an incomplete last group is dropped, as the book
    drops a partial batch). Nothing waits for the device inside the loop: the sums stay there and the loss is checked
    once, at the end. `augment` draws from seed_for(seed, micro-batch, rank): a resumed epoch draws as before."""
    steps = len(batches) // accum_steps
    sums, examples, first_bad = 0, 0, None     # first_bad: the first step whose loss was not finite, on the device
    trainer.zero_grad(set_to_none=True)
    for i, (X, y) in enumerate(batches):
        if i >= steps * accum_steps:
            break
        if Terminated.received:
            raise Terminated()
        if augment is not None:
            X, y = augment(X, y, torch.Generator().manual_seed(seed_for(seed, i, rank())))
        last = (i + 1) % accum_steps == 0
        with net.no_sync() if (not last and hasattr(net, 'no_sync')) else contextlib.nullcontext():
            l_sum, correct = train_batch_ch13(net, X, y, loss, trainer, amp=amp, scaler=scaler, step=last)
        sums = sums + torch.stack([l_sum.double(), correct.double(), (y != IGNORE_INDEX).sum().double()])
        examples += y.shape[0]
        step = torch.where(l_sum.isfinite(), steps + 1, i // accum_steps + 1)
        first_bad = step if first_bad is None else torch.minimum(first_bad, step)
    if first_bad is not None and int(first_bad) <= steps:
        raise NonFiniteLoss(int(first_bad))
    if not bool(torch.stack([v.isfinite().all() for v in net.state_dict().values() if v.is_floating_point()]).all()):
        raise NonFiniteLoss(steps)    # a finite loss but broken weights: the last checkpoint stays
    l_total, correct, labelled = sums.tolist()
    return all_reduce_sum([l_total, examples, correct, labelled])


def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices=None, *, checkpoint=None, amp=None,
               accum_steps=1, augment=None):
    """The book's train_ch13 (loss, train acc, test acc each epoch; examples/sec at the end), plus what hours of GPU
    time need: a Checkpoint each epoch (None: none is written), mixed precision, accumulation, several processes, a
    stop on a non-finite loss, a clean Ctrl-C or SIGTERM. As in the book, a net not yet on devices[0] (default: every
    GPU, else the CPU) goes there (the fast layers swapped in) and the batches follow; `net` may be compiled or in DDP
    (place_model): the checkpoint holds the model inside."""
    from tqdm import tqdm
    figures = 'loss {loss:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}, test mIoU {test_miou:.3f}'
    devices = try_all_gpus() if devices is None else list(devices)
    if net_device(net) != devices[0]:       # the book's call: the net to the first GPU, on several as DataParallel
        net = place_model(net, devices[0])
    if len(devices) > 1 and world_size() == 1 and not isinstance(net, nn.DataParallel):
        net = nn.DataParallel(net, devices)
    if not isinstance(train_iter, DeviceLoader):    # the book's loaders: their batches follow the net
        train_iter, test_iter = (it if it is None else DeviceLoader(it, devices[0]) for it in (train_iter, test_iter))
    ckpt = checkpoint or Checkpoint(None)
    scaler = torch.amp.GradScaler(devices[0].type) if amp == torch.float16 else None
    if len(train_iter) // accum_steps == 0:
        raise UserError(f'--accum-steps {accum_steps} is more than the {len(train_iter)} batches of an epoch')
    ckpt.start(unwrapped(net), trainer, scaler, num_epochs, len(train_iter.dataset), amp)
    seen, train_time, run_seed = 0, 0.0, getattr(train_iter.sampler, 'seed', 0)
    try:
        for epoch in range(ckpt.epoch, num_epochs):
            run_epoch = ckpt.first_epoch + epoch    # a fine-tune continues the first stage's epochs, and its draws
            if hasattr(train_iter.sampler, 'set_epoch'):
                train_iter.sampler.set_epoch(run_epoch)
            torch.manual_seed(seed_for(run_seed, run_epoch, MODEL_DRAWS))     # the model's own (dropout)
            net.train()
            start = time.time()
            batches = tqdm(train_iter, desc=f'epoch {epoch + 1}/{num_epochs}', leave=False,
                           disable=not is_main_process() or None)
            l_total, n, correct, pixels = train_epoch(net, batches, loss, trainer, amp, scaler, accum_steps, augment,
                                                      seed_for(run_seed, run_epoch, AUGMENT_DRAWS))
            trained = time.time()
            train_time += trained - start
            seen += n
            test = evaluate_crops(net, test_iter, amp)
            ckpt.end_epoch(trainer, scaler, {
                'epoch': epoch + 1, 'loss': l_total / n, 'train_acc': correct / max(pixels, 1),
                'test_acc': test['pixel_acc'], 'test_miou': test['miou'], 'lr': trainer.param_groups[0]['lr'],
                'seconds': time.time() - start, 'train_seconds': trained - start,
                'eval_seconds': time.time() - trained})
            h = ckpt.history[-1]
            log(f'epoch {epoch + 1}/{num_epochs}: {figures.format(**h)} ({h["seconds"]:.0f} s)')
    except KeyboardInterrupt as stop:      # Ctrl-C, or SIGTERM from a scheduler (run_main makes it one)
        if ckpt.path is None:       # the book's call, in a notebook perhaps: its own KeyboardInterrupt
            raise
        log(f'\n{stop_name(stop)}: {ckpt.path} holds {ckpt.saved} finished epoch(s); run the same command with '
            '--resume to continue')
        raise SystemExit(stop_status(stop)) from None
    except NonFiniteLoss as err:
        kept = f'{ckpt.path} (epoch {ckpt.saved}) is kept' if ckpt.saved else 'no checkpoint was written'
        raise UserError(f'the loss became inf or nan at epoch {ckpt.epoch + 1}, step {err.args[0]}; {kept}: lower '
                        '--lr, or find the operation with --detect-anomaly') from None
    if ckpt.history:
        log(figures.format(**ckpt.history[-1]))
    if train_time > 0:
        log(f'{seen / train_time:.1f} examples/sec on {[str(d) for d in devices] * world_size()}')
    return ckpt.history


def evaluate_crops(net, data_iter, amp=None):
    """The per-epoch test figures on random crops (the book's test acc), plus mIoU from the same pixels."""
    net.eval()
    num_classes = getattr(data_iter.dataset, 'num_classes', None)     # (every process's, for all_reduce)
    cm = None if num_classes is None else ConfusionMatrix(num_classes)
    with torch.inference_mode(), autocast(net_device(net), amp):
        for X, y in data_iter:
            scores = model_output(net(X))[0]
            if cm is None:      # a dataset of the book's own code: the classes the net predicts
                cm = ConfusionMatrix(scores.shape[1])
            cm.update(scores.argmax(1), y)
    cm = cm or ConfusionMatrix(1)       # no batch at all: every figure NaN, as 0 / 0
    cm.all_reduce()
    return cm.compute()


def predict(net, img, scales=None, test_size=None, mst_mode='softmax', tiling=None):
    """The book's predict: uint8 image 3xHxW (batch Nx3xHxW) -> class indices HxW (NxHxW); `scales`, `tiling`:
    predict_scores. Tiled at the image's own size, the labels come an image and a band at a time (slide_labels)."""
    device, batch = net_device(net), img if img.ndim == 4 else img.unsqueeze(0)
    if tiling and not test_size and tiling.applies(*batch.shape[-2:]):
        pred = torch.cat([slide_labels(net, normalize_image(one[None].to(device)), tiling, scales, mst_mode)
                          for one in batch])
    else:
        X = normalize_image(batch.to(device))
        pred = predict_scores(net, X, scales, test_size, mode=mst_mode, tiling=tiling).argmax(dim=1).cpu()
    return pred if img.ndim == 4 else pred[0]


def palette(colors=VOC_COLORMAP):
    """256x3 uint8: the class colours, then VOC's palette (VOC's void colour at 255): label2image, PIL palettes."""
    return torch.tensor(list(colors) + palette_colors(256)[len(colors):], dtype=torch.uint8)


def label2image(pred, colormap=VOC_COLORMAP):
    """The book's label2image: HxW class indices -> HxWx3 uint8 colours (void drawn in VOC's void colour)."""
    return palette(colormap)[pred.long().clamp(0, 255).cpu()]


def val_crops(dataset, n, crop, min_share=0.02):
    """The book's picture material: n val (image, label) pairs cropped at (0, 0, h, w), preferring crops where objects
    (any class but the first) cover at least min_share: a picture of background shows nothing."""
    chosen, fallback = [], []
    for i in range(len(dataset)):
        image, label = dataset.read(i)
        if image.shape[1] >= crop[0] and image.shape[2] >= crop[1]:
            X, y = (torchvision.transforms.functional.crop(t, 0, 0, *crop) for t in (image, label))
            share = float(((y > 0) & (y != IGNORE_INDEX)).float().mean())
            (chosen if share >= min_share else fallback).append((X, y))
            if len(chosen) == n:
                break
    if not chosen + fallback:
        raise UserError(f'no val image is at least {crop[0]}x{crop[1]}: nothing to draw')
    return (chosen + fallback)[:n]


def show_predictions(path, crops, predictions, colors, title, names=None):
    """The book's picture of val crops ((image, label) pairs) and predictions (class maps, a list per net): one net
    gives rows image, prediction, ground truth; several (`names`) a row per image: image, ground truth, each net's."""
    images = [X.permute(1, 2, 0) for X, _ in crops]
    truths = [label2image(y, colors) for _, y in crops]
    drawn = [[label2image(p, colors) for p in preds] for preds in predictions]
    if names is None:
        save_image_grid(path, [images, drawn[0], truths], title, row_titles=['image', 'prediction', 'ground truth'])
    else:
        rows = [[images[i], truths[i]] + [d[i] for d in drawn] for i in range(len(crops))]
        save_image_grid(path, rows, title, col_titles=['image', 'ground truth'] + list(names))
    log(f'wrote {path}')


def save_image_grid(path, rows, title, row_titles=None, col_titles=None, scale=2.0):
    """rows: lists of HxWx3 uint8 images (tensors or arrays). The book's show_images, saved to a file."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    h, w = np.asarray(rows[0][0]).shape[:2]
    fig, axes = pyplot().subplots(n_rows, n_cols, squeeze=False,
                                  figsize=(n_cols * scale * w / max(h, w) + 0.6, n_rows * scale * h / max(h, w) + 0.6))
    for r, row in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set(xticks=[], yticks=[])
            if c < len(row):
                ax.imshow(np.asarray(row[c]))
            else:
                ax.axis('off')
            if col_titles and r == 0:
                ax.set_title(col_titles[c], fontsize=8)
            if row_titles and c == 0:
                ax.set_ylabel(row_titles[r], fontsize=8)
    fig.suptitle(title, fontsize=10, y=1.08 if col_titles else 0.98)   # above multi-line column titles
    save_figure(fig, path, 'pass another --picture')


# ======================================================================================================================
# 2. The improvement: the resnet18 U-Net, Adam, and a fine-tune at a tenth of the lr
# ======================================================================================================================
def convrelu(in_channels, out_channels, kernel, padding):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU(inplace=True))


class ResNetUNet(nn.Module):
    """The widely used resnet18 U-Net, the improvement's model; any input size works (run_padded)."""

    def __init__(self, n_class=21, pretrained=False, weights_path=None):
        super().__init__()
        self.base_model = resnet18_backbone(pretrained, weights_path)
        self.base_layers = list(self.base_model.children())
        self.base_model.fc.requires_grad_(False)    # registered but unused: DDP must not wait for its gradients
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
        return run_padded(self.forward_multiple_of_32, input)

    def forward_multiple_of_32(self, input):    # the published layout: sides must be multiples of 32
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
        return self.conv_last(x)


def run_padded(forward, x):
    """forward(x) for any input size: x zero-padded (the mean colour, after normalisation) at the bottom and right
    to a multiple of NET_STRIDE, the output cropped back by the same fraction (it may be coarser than the input)."""
    h, w = x.shape[-2:]
    if isinstance(h, int) and not (h % NET_STRIDE or w % NET_STRIDE):     # F.pad would copy the batch for nothing
        return forward(x)       # (an export's symbolic sizes always pad: that path serves every size)
    # the next multiples, written so that an export's symbolic sizes know them as multiples (-h % 32 hides it)
    ph, pw = ((side + NET_STRIDE - 1) // NET_STRIDE * NET_STRIDE for side in (h, w))
    out = forward(F.pad(x, (0, pw - w, 0, ph - h)))
    oh, ow = out.shape[-2:]
    return out[..., :(h * oh + ph - 1) // ph, :(w * ow + pw - 1) // pw]     # ceil(h * oh / ph), in integers


def finetune_path(save):
    """The fine-tune stage's checkpoint beside the first stage's: my.pt -> my_finetune.pt."""
    return Path(save).with_stem(Path(save).stem + '_finetune')


# ======================================================================================================================
# 3. The tutorial's techniques
# ======================================================================================================================
# ------------------------------------------------------------------------------------- Cityscapes data and augmentation
# Cityscapes / MiniCity (the tutorial's data): torchvision's class table gives the 19 train ids, names and colours.
CITYSCAPES_TRAIN_CLASSES = sorted((c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < 19),
                                  key=lambda c: c.train_id)
CITYSCAPES = Classes([c.name for c in CITYSCAPES_TRAIN_CLASSES], [list(c.color) for c in CITYSCAPES_TRAIN_CLASSES])
# labelIds -> the 19 train ids (every other id, 'ignore in eval' ones too, -> 255); back for predictions, 255 -> 0
CITYSCAPES_ID_TO_TRAINID = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
CITYSCAPES_ID_TO_TRAINID[[c.id for c in CITYSCAPES_TRAIN_CLASSES]] = torch.arange(len(CITYSCAPES_TRAIN_CLASSES))
CITYSCAPES_TRAINID_TO_ID = torch.zeros(256, dtype=torch.uint8)
CITYSCAPES_TRAINID_TO_ID[:len(CITYSCAPES_TRAIN_CLASSES)] = torch.tensor([c.id for c in CITYSCAPES_TRAIN_CLASSES])
# Neither can be downloaded without an account: what a user with an empty --data-dir is told.
CITYSCAPES_STEPS = ('Cityscapes needs a free account at https://www.cityscapes-dataset.com: download '
                    'gtFine_trainvaltest.zip (241 MB) and leftImg8bit_trainvaltest.zip (11 GB), unzip both into one '
                    'folder and pass it as --data-dir; for MiniCity (the tutorial\'s 200 train + 100 val images) run '
                    '`python arrange_images.py that/folder` in semantic-segmentation/ of '
                    'https://github.com/VIPriors/vipriors-challenges-toolkit and pass the minicity/ folder it writes')


def cityscapes_files(root, is_train=True):
    """leftImg8bit/<split>/[city/]<name>_leftImg8bit.png with gtFine/<same>, in city folders or MiniCity's flat
    layout. Labels: *_gtFine_labelIds.png mapped to the train ids, else the official scripts' *_labelTrainIds.png."""
    split = 'train' if is_train else 'val'
    image_dir = Path(root) / 'leftImg8bit' / split
    images = sorted(image_dir.rglob('*_leftImg8bit.png'))
    if not images:
        raise UserError(f'no Cityscapes {split} images (*_leftImg8bit.png) under {image_dir}: pass --data-dir to the '
                        f'folder that holds leftImg8bit/ and gtFine/; {CITYSCAPES_STEPS}')
    labels = {kind: [Path(root) / 'gtFine' / split / p.parent.relative_to(image_dir) /
                     p.name.replace('_leftImg8bit.png', f'_gtFine_{kind}.png') for p in images]
              for kind in ('labelIds', 'labelTrainIds')}
    for kind, lut in (('labelIds', CITYSCAPES_ID_TO_TRAINID), ('labelTrainIds', None)):
        if all(p.exists() for p in labels[kind]):
            return SplitFiles(list(zip(images, labels[kind])), image_dir, 'remove it', lut)
    first = next(p for p in labels['labelIds'] if not p.exists())
    raise UserError(f'{first} is missing (and not every image has a *_labelTrainIds.png instead): restore gtFine/')


class CityscapesSegDataset(SegDataset):
    """Cityscapes or MiniCity (cityscapes_files); training items get the tutorial's transform unless augment=False."""

    def __init__(self, is_train, crop_size, root, normalize=True, augment=None):
        augment = is_train if augment is None else augment
        super().__init__(cityscapes_files(root, is_train), CITYSCAPES, crop_size, normalize, augment=augment)


def tutorial_augment(image, label, crop_size):
    """The tutorial's training transform: random scale 0.75-2.0 (label nearest), a random crop (void padding where the
    image is smaller), a flip half the time, brightness, contrast, saturation each x0.7-1.3 (the global RNG's draws:
    seeded() at the caller)."""
    s = 0.75 + 1.25 * float(torch.rand(()))
    size = [round(image.shape[-2] * s), round(image.shape[-1] * s)]
    image = v2.functional.resize(tv_tensors.Image(image), size, antialias=True).as_subclass(torch.Tensor)
    label = v2.functional.resize(tv_tensors.Mask(label), size).as_subclass(torch.Tensor)
    pad = (0, max(crop_size[1] - size[1], 0), 0, max(crop_size[0] - size[0], 0))
    image, label = F.pad(image, pad), F.pad(label, pad, value=IGNORE_INDEX)
    image, label = voc_rand_crop(image, label, *crop_size)
    if float(torch.rand(())) < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    for adjust in (v2.functional.adjust_brightness, v2.functional.adjust_contrast, v2.functional.adjust_saturation):
        image = adjust(image, 0.7 + 0.6 * float(torch.rand(())))
    return image, label


# ---------------------------------------------------------------------------------------------- DeepLabV3 and the norms
MODELS = ('fcn', 'resnet_unet', 'deeplabv3_resnet50', 'deeplabv3_resnet101')
NORMS = ('batch', 'instance', 'group', 'evo', 'evo_s0', 'evo_b0')
AUX_WEIGHT = 0.4        # DeepLabV3's auxiliary loss, as torchvision's references weight it


def model_output(out):
    """(main scores, auxiliary scores or None): torchvision's segmentation models return a dict."""
    return (out['out'], out.get('aux')) if isinstance(out, dict) else (out, None)


# Normalisation swaps (the tutorial's BatchNorm / InstanceNorm / GroupNorm / EvoNorm comparison)
def num_groups(channels, max_groups=32):
    """The largest divisor of `channels` that is <= max_groups (32 when it divides, as in GroupNorm's paper)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class EvoNorm2dB0(nn.Module):
    """EvoNorm-B0 (Liu et al. 2020): y = x / max(sqrt(batch_var + eps), v1*x + sqrt(instance_var + eps)) * gamma + beta.
    The batch variance is a running average in eval, as BatchNorm's; the max() is the non-linearity (no ReLU)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.v1 = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer('running_var', torch.ones(num_features))

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
    """EvoNorm-S0 (Liu et al. 2020): y = x * sigmoid(v1*x) / group_std(x) * gamma + beta. Per-sample statistics
    only: train and eval alike, no sample depends on its batch; the swish-like numerator replaces the ReLU."""

    def __init__(self, num_features, groups=32, eps=1e-5):
        super().__init__()
        self.groups, self.eps = num_groups(num_features, groups), eps
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.v1 = nn.Parameter(torch.ones(1, num_features, 1, 1))

    def forward(self, x):
        xf = x.float()
        grouped = xf.reshape(len(xf), self.groups, -1)
        std = (grouped.var(dim=2, unbiased=False, keepdim=True) + self.eps).sqrt().expand_as(grouped).reshape(xf.shape)
        return (xf * torch.sigmoid(self.v1 * xf) / std * self.gamma + self.beta).to(x.dtype)


def _norm_like(bn, norm):
    """The replacement for one BatchNorm layer, keeping its affine part (pretrained gamma/beta) when it has one."""
    c = bn.num_features
    if norm == 'instance':
        # track_running_stats=False: instance statistics in eval too. Fails on 1x1 maps (e.g. an image-pooling branch).
        new = nn.InstanceNorm2d(c, affine=True, track_running_stats=False)
    elif norm == 'group':
        new = nn.GroupNorm(num_groups(c), c)
    else:  # "evo" / "evo_s0" / "evo_b0": the names are checked once, by the flags (NORMS)
        new = EvoNorm2dB0(c, eps=bn.eps) if norm == 'evo_b0' else EvoNorm2dS0(c)
    if bn.affine:
        with torch.no_grad():       # each norm's first two parameters are its scale and shift
            for mine, pretrained in zip(new.parameters(), (bn.weight, bn.bias)):
                mine.copy_(pretrained.view_as(mine))
    ref = next(iter(list(bn.parameters()) + list(bn.buffers())), None)
    return new if ref is None else new.to(ref.device)


def replace_norm(model, norm, replaced=None):
    """Every BatchNorm2d in `model` swapped in place for `norm` (evo is evo_s0), keeping a pretrained backbone's scale
    and shift (its running statistics cannot carry over). EvoNorm carries its own non-linearity: every nn.ReLU module
    becomes nn.Identity, as in the tutorial (F.relu calls stay). A layer under two parents (the U-Net's bn1 is
    base_model.bn1 and layer0[1]) gets one replacement: two would leave one without gradients, which stops DDP."""
    if norm == 'batch':
        return model
    evo, replaced = norm.startswith('evo'), {} if replaced is None else replaced
    for name, child in model.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            setattr(model, name, replaced.setdefault(child, _norm_like(child, norm)))
        elif evo and isinstance(child, nn.ReLU):
            setattr(model, name, nn.Identity())
        else:
            replace_norm(child, norm, replaced)
    return model


def build_model(name, num_classes=21, pretrained=False, weights_path=None, norm='batch', aux_loss=False):
    """Every model by name; a checkpoint stores these arguments (its model_args) to rebuild it with no flags."""
    if name == 'fcn':
        net = fcn_resnet18(num_classes, pretrained, weights_path)
    elif name == 'resnet_unet':
        net = ResNetUNet(num_classes, pretrained, weights_path)
    elif name in ('deeplabv3_resnet50', 'deeplabv3_resnet101'):     # torchvision's, the tutorial's model
        net = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                             num_classes=num_classes, aux_loss=aux_loss)
        if pretrained:      # the ImageNet backbone comes by the same rules as resnet18's
            state = backbone_state_dict(name.split('_')[1], weights_path)    # resnet50 / resnet101
            net.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith('fc.')})
    else:       # the flags allow no other name: a checkpoint written elsewhere
        raise UserError(f'unknown model {name!r}: choose one of {", ".join(MODELS)}')
    return replace_norm(net, norm)


# --------------------------------------------------------------------------------------------- losses and class weights
LOSSES = ('ce', 'weighted_ce', 'focal', 'dice', 'ce+dice')
DICE_EPS = 1e-7        # the floor of Dice's denominator, segmentation_models_pytorch's
# The tutorial's 19 Cityscapes class weights (--class-weights tutorial).
TUTORIAL_CITYSCAPES_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                               0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017) per pixel: -w[y] * (1 - p_y)^gamma * log p_y, as an N,H,W map (0 at
    ignored pixels) like F.cross_entropy(..., reduction='none'), which it equals at gamma=0."""

    def __init__(self, gamma=2.0, weight=None, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.gamma, self.ignore_index = gamma, ignore_index
        # a buffer: FocalLoss(...).to(device) moves the class weights, as for any module
        self.register_buffer('weight', None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits, target):
        logp = F.log_softmax(logits.float(), dim=1)  # fp32: log p of rare classes underflows in half precision
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))  # gather needs an in-range index
        logp_y = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        # clamp: exp(log_softmax) can exceed 1 by an ulp, and a negative base breaks a fractional gamma
        focal = (1.0 - logp_y.exp()).clamp(min=0.0) ** self.gamma  # torch gives 0**0 == 1: gamma=0 is plain CE
        weight = 1.0 if self.weight is None else self.weight[safe_target]
        return torch.where(valid, -focal * logp_y * weight, torch.zeros_like(logp_y))


def dice_loss(logits, target, weight=None, ignore_index=IGNORE_INDEX):
    """Multiclass soft Dice loss over the whole batch, one number, as segmentation_models_pytorch's
    DiceLoss(mode='multiclass', from_logits=True, ignore_index=255) computes it: for each class c,
    1 - 2 sum(p_c t_c) / (sum p_c + sum t_c) over the batch's labelled pixels (ignored ones are in neither sum), 0
    for a class no labelled pixel has; then the mean over all classes, or with `weight` the weighted mean
    sum(w_c loss_c) / sum(w_c). In fp32 whatever the autocast: sums over a whole batch lose digits in half precision.
    The per-class sums are scattered by label (no one-hot tensor the size of the logits)."""
    p = logits.float().log_softmax(1).exp()
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))      # gather and scatter need in-range indices
    p = p * valid.unsqueeze(1)
    num_classes, index = p.shape[1], safe.reshape(-1)
    intersection = p.new_zeros(num_classes).scatter_add(0, index, p.gather(1, safe.unsqueeze(1)).reshape(-1))
    labelled = p.new_zeros(num_classes).scatter_add(0, index, valid.reshape(-1).to(p.dtype))
    dice = intersection / (0.5 * (p.sum((0, 2, 3)) + labelled)).clamp_min(DICE_EPS)
    loss = (1.0 - dice) * (labelled > 0)
    return loss.mean() if weight is None else (loss * weight).sum() / weight.sum()


def make_loss(name='ce', weight=None, gamma=2.0, device=None):
    """A per-example loss by name (LOSSES), averaged over H and W like the book's; weights moved to `device` once.
    Dice is one number for the batch, given to each of its examples: the batch's sum, which train_batch_ch13
    back-propagates, is then batch size x Dice, on the scale of the book's summed cross entropy, and the reported
    loss per example is the Dice loss. ce+dice adds the two (with `weight`, both weighted), as
    segmentation_models_pytorch's and mmsegmentation's users combine them."""
    weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32).to(device)
    if name == 'ce':
        return cross_entropy_loss
    if name == 'weighted_ce':
        if weight is None:
            raise UserError('--loss weighted_ce needs class weights')
        return lambda inputs, targets: cross_entropy_loss(inputs, targets, weight)
    if name in ('dice', 'ce+dice'):
        def dice_per_example(inputs, targets):
            dice = dice_loss(inputs, targets, weight).expand(inputs.shape[0])
            return dice + cross_entropy_loss(inputs, targets, weight) if name == 'ce+dice' else dice
        return dice_per_example
    focal = FocalLoss(gamma=gamma, weight=weight)      # 'focal': the flags allow no other name (LOSSES)
    return lambda inputs, targets: focal(inputs, targets).mean(1).mean(1)


def class_pixel_counts(dataset, cache_dir):
    """(labelled pixels per class, ignored pixels) over a whole split at full size: counted once, then read from a
    JSON file in cache_dir (or checkpoints/, where cache_dir is read-only) named after what it depends on."""
    n = dataset.num_classes
    # Every mask by path, size and time: another split, crop filter or an edited mask is counted again.
    masks = [(str(p), s.st_size, s.st_mtime_ns) for p, s in ((p, Path(p).stat()) for _, p in dataset.items)]
    key = json.dumps([dataset.classes, masks, dataset.void_as_background, dataset.label_lut is not None,
                      'and the ignored pixels'])
    name = f'class_pixels_{hashlib.sha1(key.encode()).hexdigest()[:10]}.json'
    candidates = (Path(cache_dir) / name, Path('checkpoints') / name)
    cached = [json.loads(path.read_text()) for path in candidates if path.exists()]
    counts = torch.tensor(cached[0] if cached else [0] * (n + 1), dtype=torch.float64)
    for i in range(0 if cached else len(dataset)):
        label = dataset.read(i)[1].reshape(-1)
        counts += torch.bincount(torch.where(label == IGNORE_INDEX, n, label), minlength=n + 1).double()
    for path in [] if cached else candidates:   # a cache: where none can be written, it is counted again next time
        with contextlib.suppress(UserError):
            write_atomically(path, lambda f: f.write(json.dumps(counts.tolist()).encode()), '')
            break
    return counts[:n], float(counts[n])


def class_pixel_weights(counts):
    """Per-class loss weights from pixel counts (void excluded): ENet's 1 / ln(1.02 + share), bounded at ~50 so that
    very rare classes do not dominate, scaled to mean 1 over the seen classes (the lr stays comparable to the
    unweighted loss's). Unseen classes get the largest seen weight: they may still appear in validation."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    seen = counts > 0
    if not seen.any():
        return torch.ones_like(counts, dtype=torch.float32)
    w = 1.0 / torch.log(1.02 + counts / counts.sum())
    w = w / w[seen].mean()
    w[~seen] = w[seen].max()
    return w.float()


def read_class_weights(path, num_classes):
    """--class-weights FILE: one number per class."""
    try:
        weights = [float(v) for v in Path(path).read_text().split()]
    except (OSError, ValueError) as err:
        raise UserError(f'--class-weights {path}: cannot read numbers from it ({err})') from None
    if len(weights) != num_classes:
        raise UserError(f'--class-weights {path} has {len(weights)} numbers, the dataset {num_classes} classes')
    return torch.tensor(weights)


def plot_class_frequencies(counts, class_names, path, title):
    """The share of labelled pixels per class, on a log scale (class imbalance at a glance)."""
    fig, ax = pyplot().subplots(figsize=(10, 3.5))
    ax.bar(range(len(class_names)), (counts / counts.sum().clamp(min=1)).tolist())
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set(ylabel='share of labelled pixels', yscale='log')
    ax.set_title(title, fontsize=9)
    save_figure(fig, path, 'run the script from a folder where pictures/ can be written')


# -------------------------------------------------------------------------------------------------- CutMix and CopyBlob
# CopyBlob's (rare class : plausible host) pairs: the tutorial's for Cityscapes; VOC's bottle stands on a table.
COPYBLOB_PAIRS = {'cityscapes': ['wall:sidewalk', 'fence:sidewalk', 'bus:road', 'train:road'],
                  'voc': ['bottle:diningtable', 'pottedplant:background', 'chair:background', 'boat:background']}


def _randint(high, generator):
    return int(torch.randint(high, (1,), generator=generator))


def cutmix_segmentation(images, labels, prob=0.5, alpha=1.0, generator=None):
    """CutMix (Yun et al. 2019) for segmentation: a box of a partner sample replaces the same box of each sample, image
    and label alike; one draw decides for the batch. The box's area is about 1 - lam, lam ~ Beta(alpha, alpha), centred
    uniformly, clipped to the frame. Draws from `generator` (the Beta's via NumPy: torch.distributions takes none)."""
    src_images, src_labels = images, labels  # paste from the untouched inputs, never from an earlier paste
    images, labels = images.clone(), labels.clone()
    if prob <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return images, labels
    n, _, h, w = images.shape
    perm = torch.randperm(n, generator=generator).tolist()
    lam = np.random.default_rng(_randint(2 ** 62, generator)).beta(alpha, alpha, n)
    for i, j in enumerate(perm):
        ratio = math.sqrt(1.0 - float(lam[i]))
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = _randint(h, generator), _randint(w, generator)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images[i, :, y0:y1, x0:x1] = src_images[j, :, y0:y1, x0:x1]
        labels[i, y0:y1, x0:x1] = src_labels[j, y0:y1, x0:x1]
    return images, labels


def blob_boxes(masks):
    """(n, 4) boxes (y0, y1, x0, x1), ends exclusive, of each mask's True pixels (y1 0 if none), with no device sync."""
    extents = []
    for hit in (masks.any(2), masks.any(1)):        # rows and columns holding the blob
        first, after_last = hit.int().argmax(1), hit.shape[1] - hit.flip(1).int().argmax(1)
        extents += [first, torch.where(hit.any(1), after_last, 0)]
    return torch.stack(extents, 1)


def copyblob(images, labels, pairs, prob=0.5, generator=None):
    """CopyBlob (the tutorial's class-imbalance augmentation with a visual prior): a rare class pasted onto a plausible
    host (a bus onto road). For each (src, host) pair and sample i, with probability `prob`: the src pixels of another
    sample j, pasted where their bounding box fits the frame centred on a host pixel of i (drawn uniformly), from the
    unmodified inputs. Draws from `generator`; the device is read once per pair (which samples hold src)."""
    src_images, src_labels = images, labels     # torch.where below makes new tensors: the inputs stay untouched
    n, _, h, w = images.shape
    ys, xs = torch.arange(h, device=labels.device).view(1, h, 1), torch.arange(w, device=labels.device).view(1, 1, w)
    for src, host in pairs:
        boxes = blob_boxes(src_labels == src)
        holders = [j for j, (_, y1, _, _) in enumerate(boxes.tolist()) if y1]     # the pair's one host read
        plan = []       # per sample: donor, uniform draw for the spot, whether it pastes
        for i in range(n):
            donors = [j for j in holders if j != i]
            if float(torch.rand((), generator=generator)) >= prob or not donors:
                plan.append((i, 0.0, 0))
            else:
                plan.append((donors[_randint(len(donors), generator)], float(torch.rand((), generator=generator)), 1))
        plan = torch.tensor(plan, dtype=torch.float64)     # to the device without waiting: pinned memory on CUDA
        plan = (plan.pin_memory() if labels.is_cuda else plan).to(labels.device, non_blocking=True)
        donor, pastes = plan[:, 0].long(), plan[:, 2].bool()
        y0, y1, x0, x1 = boxes[donor].unbind(1)
        bh, bw = (y1 - y0).view(n, 1, 1), (x1 - x0).view(n, 1, 1)
        # the spots: host pixels whose box, centred on them, fits the frame; the k-th of them, k uniform
        fits = (ys >= bh // 2) & (ys - bh // 2 + bh <= h) & (xs >= bw // 2) & (xs - bw // 2 + bw <= w)
        spots = ((labels == host) & fits).view(n, -1)
        count = spots.sum(1)
        k = (plan[:, 1] * count).long()
        spot = torch.searchsorted(spots.long().cumsum(1), (k + 1).view(n, 1)).view(n).clamp(max=h * w - 1)
        ty, tx = (spot // w).view(n, 1, 1) - bh // 2, (spot % w).view(n, 1, 1) - bw // 2
        # every pixel of sample i takes the donor's pixel at the same offset from the box, where that is src_class
        sy, sx = (ys - ty + y0.view(n, 1, 1)).clamp(0, h - 1), (xs - tx + x0.view(n, 1, 1)).clamp(0, w - 1)
        inside = (ys >= ty) & (ys < ty + bh) & (xs >= tx) & (xs < tx + bw)
        donor_labels = src_labels[donor.view(n, 1, 1), sy, sx]
        paste = inside & (donor_labels == src) & (pastes & (count > 0)).view(n, 1, 1)
        labels = torch.where(paste, donor_labels, labels)
        donor_images = src_images[donor.view(n, 1, 1), :, sy, sx].permute(0, 3, 1, 2)
        images = torch.where(paste.unsqueeze(1), donor_images, images)
    return images, labels


def parse_pairs(pairs, class_names, dataset='voc'):
    """--copyblob-pairs SRC:HOST ... by class name or index -> [(src, host)]; None gives the dataset's defaults."""
    names = [n.replace(' ', '').replace('/', '') for n in class_names]
    if pairs is None and dataset not in COPYBLOB_PAIRS:
        raise UserError('--copyblob on your own classes needs --copyblob-pairs SRC:HOST (class names), e.g. the '
                        f'rare class onto the class it sits on: {names[-1]}:{names[0]}')
    out = []
    for pair in COPYBLOB_PAIRS[dataset] if pairs is None else pairs:
        try:
            src, host = pair.split(':')
            out.append(tuple(int(x) if x.isdigit() else names.index(x.replace(' ', '')) for x in (src, host)))
        except ValueError:
            raise UserError(f'--copyblob-pairs {pair!r}: expected SRC:HOST with class names or indices of '
                            f'{", ".join(names)}') from None
    return out


def batch_augment(cutmix=0.0, copyblob_prob=0.0, pairs=()):
    """augment(X, y, generator): CopyBlob, then CutMix, on a normalised batch of any dtype, draws from `generator`."""
    if not cutmix and not copyblob_prob:
        return None

    def augment(X, y, generator):
        if copyblob_prob:
            X, y = copyblob(X, y, pairs, copyblob_prob, generator)
        if cutmix:
            X, y = cutmix_segmentation(X, y, cutmix, generator=generator)
        return X, y
    return augment


# ------------------------------------------------------------ evaluation: confusion matrix, mIoU, multi-scale inference
MST_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.2)     # multi-scale inference, each also flipped
MST_MODES = ('softmax', 'tutorial')     # how multi-scale inference combines its passes (predict_scores)
TILE_ABOVE_PIXELS = 2048 * 2048     # larger images are predicted window by window unless --whole-image: Cityscapes'
                                    # 2048x1024 stays whole, a phone photo's activations would not fit
TILE_OVERLAP = 1 / 3                # mmsegmentation's slide configs: 512 windows at stride 341, 256 at 170


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction. Pixels labelled ignore_index (or outside the classes) do not count."""

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, pred, target):
        """Adds a batch on the predictions' device; only bincount (which needs its output's size) waits for it."""
        n = self.num_classes
        target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
        counted = (target >= 0) & (target < n) & (target != self.ignore_index)
        idx = torch.where(counted, n * target + pred, n * n)        # the pixels not counted: one more bin, dropped
        counts = torch.bincount(idx, minlength=n * n + 1)[:n * n].view(n, n)
        self.mat = self.mat.to(counts.device) + counts

    def all_reduce(self):
        self.mat = torch.tensor(all_reduce_sum(self.mat.tolist()), dtype=torch.int64)   # float64: exact to 2**53

    def compute(self):
        h = self.mat.cpu().double()
        diag, gt, pr, total = h.diag(), h.sum(1), h.sum(0), h.sum()
        acc = diag / gt                                         # NaN for a class absent from the ground truth
        iou = diag / (gt + pr - diag)                           # NaN for a class absent from both
        present = ~torch.isnan(iou)
        return {        # with no pixel or no class, 0 / 0 and the mean of nothing are NaN
            'pixel_acc': float(diag.sum() / total),
            'mean_acc': float(acc[~torch.isnan(acc)].mean()),
            'miou': float(iou[present].mean()),
            'fwiou': float((gt[present] / total * iou[present]).sum()) if present.any() else float('nan'),
            'iou': iou.tolist(),
            'acc': acc.tolist(),
            'pixels': int(total),
        }


@torch.inference_mode()
def predict_scores(net, X, scales=None, test_size=None, flip=True, mode='softmax', tiling=None):
    """Class scores (N,C,H,W) at the size of normalised images X (N,3,H,W): the logits of one pass, or with `scales` the
    softmax of every scale (and its horizontal flip) resized to H,W and averaged. mode='tutorial' as the tutorial's
    code: raw scores averaged (a pass with large scores outvotes the others), align_corners=True, scaled sizes rounded
    down. test_size: the net sees X at that size (the tutorial's Cityscapes evaluation). tiling: a Tiling that applies
    to that size runs all this window by window (slide_scores). The caller sets net.eval()."""
    h, w = X.shape[-2:]
    if test_size:
        X = F.interpolate(X, size=tuple(test_size), mode='bilinear', align_corners=False)
    if tiling and tiling.applies(*X.shape[-2:]):
        out = slide_scores(net, X, tiling, scales, flip, mode)
    else:
        out = image_scores(net, X, scales, flip, mode)
    if test_size:
        out = F.interpolate(out.float(), size=(h, w), mode='bilinear', align_corners=False)
    return out


def image_scores(net, X, scales=None, flip=True, mode='softmax'):
    """predict_scores of X as the net sees it, in one piece."""
    def scores_of(x):
        return run_padded(lambda padded: model_output(net(padded))[0], x)
    if not scales:
        out = scores_of(X)
    else:
        sh, sw = X.shape[-2:]
        tutorial = mode == 'tutorial'
        out = 0
        for s in scales:
            size = tuple(max(1, math.floor(side * s) if tutorial else round(side * s)) for side in (sh, sw))
            x = X if size == (sh, sw) else F.interpolate(X, size=size, mode='bilinear', align_corners=tutorial)
            for flipped in ((False, True) if flip else (False,)):
                scores = scores_of(x.flip(-1) if flipped else x)
                scores = F.interpolate(scores.float(), size=(sh, sw), mode='bilinear', align_corners=tutorial)
                scores = scores if tutorial else scores.softmax(1)
                out = out + (scores.flip(-1) if flipped else scores)
        out = out / (len(scales) * (2 if flip else 1))
    return out


class Tiling(collections.namedtuple('Tiling', 'size overlap mode', defaults=(TILE_OVERLAP, 'auto'))):
    """Sliding-window prediction, as mmsegmentation's slide mode: windows of `size` (H, W) overlapping by `overlap`
    of a side; mode 'on' tiles every image, 'auto' those over TILE_ABOVE_PIXELS, 'off' none."""

    def stride(self):
        return tuple(max(1, math.floor(side * (1 - self.overlap))) for side in self.size)

    def applies(self, h, w):
        return self.mode == 'on' or (self.mode == 'auto' and h * w > TILE_ABOVE_PIXELS)


def window_starts(length, window, stride):
    """Where the windows along a side start: every `stride` pixels, the last one shifted back to end at the border
    (so every window is whole and every pixel is covered); one window at 0 when the side is not longer than it."""
    last = max(length - window, 0)
    return [min(start, last) for start in range(0, last + stride, stride)]


def window_counts(length, window, starts):
    """How many windows cover each pixel of a side; a pixel's count is its row's times its column's."""
    counts = torch.zeros(length)
    for start in starts:
        counts[start:start + window] += 1
    return counts


def slide_bands(X, tiling, scores_of):
    """The scores of X (N,3,H,W) averaged over the windows that cover each pixel, a band of rows at a time: rows above
    the next row of windows are final, so only one window's height of the score map is ever held (the whole map of
    a phone photo runs to gigabytes). scores_of(window) gives the window's scores at its size."""
    (h, w), stride = X.shape[-2:], tiling.stride()
    wh, ww = min(tiling.size[0], h), min(tiling.size[1], w)
    rows, cols = window_starts(h, wh, stride[0]), window_starts(w, ww, stride[1])
    count_h, count_w = window_counts(h, wh, rows).to(X.device), window_counts(w, ww, cols).to(X.device)
    held = None                 # the sums of rows y .. y + wh, the first of them carried from the row of windows above
    for y, below in zip(rows, rows[1:] + [h]):
        for x in cols:
            scores = scores_of(X[..., y:y + wh, x:x + ww]).float()
            if held is None:
                held = scores.new_zeros(scores.shape[:2] + (wh, w))
            held[..., x:x + ww] += scores
        yield held[..., :below - y, :] / (count_h[y:below, None] * count_w)
        carried = held[..., below - y:, :]
        held = torch.cat([carried, carried.new_zeros(carried.shape[:2] + (below - y, w))], dim=2)


def slide_scores(net, X, tiling, scales=None, flip=True, mode='softmax'):
    """predict_scores window by window: each window through image_scores (every scale and flip of it), the windows'
    scores summed into a score map and divided by how many windows cover each pixel. Whole in memory: predict takes
    the labels band by band instead."""
    return torch.cat(list(slide_bands(X, tiling, lambda window: image_scores(net, window, scales, flip, mode))), dim=2)


@torch.inference_mode()
def slide_labels(net, X, tiling, scales=None, mode='softmax'):
    """The argmax of slide_scores, taken a band of rows at a time: the whole score map is never held."""
    bands = slide_bands(X, tiling, lambda window: image_scores(net, window, scales, mode=mode))
    return torch.cat([band.argmax(dim=1).cpu() for band in bands], dim=1)


def evaluate_full(net, dataset, scales=None, amp=None, test_size=None, num_workers=None, batch_size=8,
                  mst_mode='softmax', tiling=None):
    """Confusion matrix over a whole split at each image's original size (labels are never resized). `dataset` gives
    whole uint8 images (crop_size=None, normalize=False); images of the same size (most of VOC is 500x375 or 375x500)
    go through the net together, multi-scale one image at a time."""
    from tqdm import tqdm
    net.eval()
    cm = ConfusionMatrix(dataset.num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1 if scales else batch_size, collate_fn=list,
                                         sampler=SeededSampler(dataset, shuffle=False), worker_init_fn=quiet_worker,
                                         num_workers=default_workers() if num_workers is None else num_workers)
    with torch.inference_mode(), autocast(net_device(net), amp):
        for batch in tqdm(guarded_batches(loader), desc='evaluating', total=len(loader), leave=False,
                          disable=not is_main_process() or None):
            by_size = {}
            for image, label in batch:
                by_size.setdefault(tuple(image.shape), []).append((image, label))
            for items in by_size.values():
                images = torch.stack([image for image, _ in items])
                preds = predict(net, images, scales, test_size, mst_mode, tiling)
                for pred, (_, label) in zip(preds, items):
                    cm.update(pred, label)
    cm.all_reduce()
    return cm


def results_path(ckpt_path, suffix, mst=False):
    p = Path(ckpt_path)
    return p.with_name(f'{p.stem}_results{"_mst" if mst else ""}{suffix}')


def metrics_table(results, class_names):
    """The per-class table; a second column set appears when a multi-scale result is there too."""
    runs = [(name, r) for name, r in results if r is not None]
    head = f'{"class":<16}' + ''.join(f'{"IoU " + name:>16}{"acc " + name:>16}' for name, _ in runs)
    lines = [head] + [f'{cls:<16}' + ''.join(f'{r["iou"][c]:>16.4f}{r["acc"][c]:>16.4f}' for _, r in runs)
                      for c, cls in enumerate(class_names)]
    for key, label in (('pixel_acc', 'pixel acc'), ('mean_acc', 'mean acc'), ('miou', 'mIoU'), ('fwiou', 'fwIoU')):
        lines.append(f'{label:<16}' + ''.join(f'{r[key]:>16.4f}{"":>16}' for _, r in runs))
    lines.append('nan: the class is absent from both prediction and ground truth; such classes are left out of '
                 'mIoU (and of mean acc when absent from the ground truth)')
    return '\n'.join(lines)


def evaluate_checkpoint(net, ckpt_path, dataset, title, scales=None, amp=None, test_size=None, num_workers=None,
                        mst_mode='softmax', tiling=None):
    """--eval: a whole split at original size (evaluate_full); the table to stdout, beside the single-scale (or
    multi-scale) one when that exists, and *_results.txt/.json and *_confusion.png beside the checkpoint."""
    cm = evaluate_full(net, dataset, scales, amp, test_size, num_workers, mst_mode=mst_mode, tiling=tiling)
    names = dataset.classes.names
    result = dict(cm.compute(), checkpoint=str(ckpt_path), mst=bool(scales), scales=scales,
                  mst_mode=mst_mode if scales else None, data=title, images=len(dataset), class_names=names)
    if not is_main_process():
        return result
    other_path = results_path(ckpt_path, '.json', not scales)
    other = json.loads(other_path.read_text()) if other_path.exists() else None
    table = metrics_table([('single', other), ('mst', result)] if scales else [('mst', other), ('single', result)],
                          names)
    print(f'\n{ckpt_path} on {len(dataset)} val images of {title} at original size\n{table}')
    advice = 'the results go beside the checkpoint: copy it to a writable folder with room and pass --checkpoint'
    for suffix, text in (('.json', json.dumps(result, indent=1)), ('.txt', table + '\n')):
        write_atomically(results_path(ckpt_path, suffix, bool(scales)), lambda f: f.write(text.encode()), advice)
    save_confusion_matrix(cm, names, Path(ckpt_path).with_name(Path(ckpt_path).stem + '_confusion.png'),
                          f'{Path(ckpt_path).name}: mIoU {result["miou"]:.3f} - {title}', advice)
    return result


def save_confusion_matrix(cm, class_names, path, title, advice):
    """Rows normalised: row i shows where the pixels of class i went."""
    m = cm.mat.cpu().double()
    m = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    n = len(class_names)
    fig, ax = pyplot().subplots(figsize=(0.35 * n + 3, 0.35 * n + 2.5))
    im = ax.imshow(m, cmap='Blues', vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set(xlabel='predicted', ylabel='ground truth')
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path, advice)


# ======================================================================================================================
# 4. Your own data
# ======================================================================================================================
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def palette_colors(n):
    """The first n colours of VOC's palette (its label PNGs carry them): VOC_COLORMAP, more, VOID_COLOR at 255."""
    k = np.arange(8)[:, None]       # bits 3k, 3k+1 and 3k+2 of a class index give bit 7-k of red, green and blue
    index = np.arange(n)[:, None, None]
    return (((index >> (3 * k + np.arange(3))) & 1) << (7 - k)).sum(1).tolist()


def read_classes(path):
    """A class table from a file: one class a line, `name` or `name R G B` (blank lines and # comments skipped), a
    CSV with a name,r,g,b header (class_dict.csv), or CVAT's labelmap.txt (`name:R,G,B:parts:actions`). Classes
    without a colour get palette colours not taken yet; 255 (VOC's void colour) is left to ignored pixels."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except OSError as err:
        raise UserError(f'--classes {path} cannot be read ({err.strerror or err}): pass a class file') from None
    csv = bool(lines) and lines[0].replace(' ', '').lower().startswith('name,r,g,b')
    labelmap = not csv and all(line.count(':') == 3 for line in lines if line and not line.startswith('#'))
    names, colors = [], []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith('#') or (csv and n == 1):
            continue
        if labelmap:
            name, color = line.split(':')[:2]
            parts = [name, *color.split(',')] if color.strip() else [name]
        else:
            parts = line.split(',')[:4] if csv else line.rsplit(maxsplit=3) if line.split()[-1].isdigit() else [line]
        parts = [p.strip() for p in parts]
        rgb = parts[1:]
        if not ((len(parts) == 1 and not csv) or (len(rgb) == 3 and all(v.isdigit() and int(v) < 256 for v in rgb))):
            form = '`name:R,G,B::`' if labelmap else '`name,r,g,b`' if csv else '`name` or `name R G B`'
            raise UserError(f'{path} line {n}: {line!r} is not {form} (0-255)')
        names.append(parts[0])
        colors.append([int(v) for v in rgb] or None)       # None: a palette colour below
    free = (c for c in palette_colors(255) if c not in colors and c != VOID_COLOR)
    colors = [c or next(free) for c in colors]
    problem = f'{len(names)} classes (2 to 255 work)' if not 2 <= len(names) <= 255 else next(
        (f'{x} appears twice' for xs in (names, colors) for i, x in enumerate(xs) if x in xs[:i]), None)
    if problem or VOID_COLOR in colors:
        raise UserError(f'{path}: {problem or f"{VOID_COLOR} is the colour of ignored pixels (VOC void)"}: correct '
                        'the class file')
    return Classes(names, colors)


def cvat_split(folder, txt, is_train, val_share):
    """(default.txt, ids) of CVAT's export of a task without subsets: with `val_share`, that share of its ids held
    out as val (held_out)."""
    default = folder / 'default.txt'
    if val_share and txt.exists():
        raise UserError(f'{txt} exists: --val-share is for {default.name} alone, drop it')
    if not val_share:
        raise UserError(f'{folder} has {default.name} but no {txt.name} (a CVAT export of a task without subsets): '
                        f'pass --val-share 0.2 to hold a seeded fifth of it out as val, or split {default.name} into '
                        'train.txt and val.txt')
    if not default.exists():
        raise UserError(f'split file {default} is missing: --val-share splits a CVAT export\'s default.txt, drop it')
    ids = [line.strip() for line in default.read_text().splitlines() if line.strip()]
    return default, held_out(ids, is_train, val_share, default)


def held_out(ids, is_train, val_share, source):
    """The train or val side of `ids` (from the file or folder `source`, for messages): the share `val_share` of them
    held out as val, drawn with a fixed seed (the same ids whatever --seed, so that predict finds the same val)."""
    k = round(val_share * len(ids))
    if not 0 < k < len(ids):
        raise UserError(f'--val-share {val_share:g} holds {k} of the {len(ids)} ids of {source} out: pass a share '
                        'that leaves ids for both train and val, e.g. 0.2')
    held = set(np.random.default_rng(0).choice(len(ids), k, replace=False).tolist())
    return [name for i, name in enumerate(ids) if (i in held) != is_train]


# labelme's examples/semantic_segmentation/labelme2voc.py writes class_names.txt (`_background_` first; its labels
# file's `__ignore__`, value -1, is dropped there and stored as 255 in the label PNGs), JPEGImages/<name>.jpg, label
# PNGs of class indices in VOC's palette in SegmentationClass/ (SegmentationClassPNG/ in versions whose
# SegmentationClass/ holds the .npy arrays) and SegmentationClassVisualization/; no split file.
LABELME_VAL_SHARE = 0.2     # the share of a labelme export held out as val unless --val-share says otherwise


def is_labelme(root):
    """labelme2voc's output: class_names.txt and no VOC split files."""
    return (Path(root) / 'class_names.txt').is_file() and not (Path(root) / 'ImageSets').exists()


def labelme_classes(path):
    """labelme2voc's class_names.txt: one name a line, `__ignore__` dropped (255 is ignored anyway), `_background_`
    named background, colours from VOC's palette (labelme's label PNGs carry it)."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as err:
        raise UserError(f'{path} cannot be read ({err.strerror or err}): write it again with labelme2voc') from None
    names = ['background' if n == '_background_' else n for n in names if n and n != '__ignore__']
    if len(names) < 2:
        raise UserError(f'{path} names {len(names)} classes: labelme2voc writes _background_ and one class a line')
    return Classes(names, palette_colors(len(names)))


def labelme_files(root, is_train=True, val_share=LABELME_VAL_SHARE):
    """labelme2voc's (JPEGImages/<name>.jpg, label PNG) pairs, `val_share` of them held out as val (held_out)."""
    root = Path(root)
    labels = root / 'SegmentationClassPNG'
    labels = labels if labels.is_dir() else root / 'SegmentationClass'
    names = sorted(p.stem for p in labels.glob('*.png'))
    if not names:
        raise UserError(f'{labels} holds no label PNGs: {root} has class_names.txt (labelme2voc\'s layout), so '
                        'run labelme2voc on the annotated folder again')
    items = [(root / 'JPEGImages' / f'{name}.jpg', labels / f'{name}.png')
             for name in held_out(names, is_train, val_share, labels)]
    for image, label in items:
        if not image.exists():
            raise UserError(f'{image} is missing, the image of {label}: restore it, or move the label away')
    return SplitFiles(items, labels, 'move it and its pair away')


def folder_files(root, is_train=True):
    """A user's folder: images/<split>/<name>.jpg (or .png, ...), each with its mask masks/<split>/<name>.png."""
    split = 'train' if is_train else 'val'
    image_dir, mask_dir = Path(root) / 'images' / split, Path(root) / 'masks' / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise UserError(f'{folder} is not a folder: --dataset folder reads DIR/images/{{train,val}}/ and the '
                            'masks of the same names from DIR/masks/{train,val}/')
    images, masks = {}, {p.stem: p for p in sorted(mask_dir.glob('*.png'))}
    for path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if path.stem in images:
            raise UserError(f'{path} and {images[path.stem]} share a name: keep one')
        if path.stem not in masks:
            raise UserError(f'{path} has no mask {mask_dir / path.stem}.png: add it, or move the image away')
        images[path.stem] = path
    for stem, mask in masks.items():
        if stem not in images:
            raise UserError(f'{mask} has no image {image_dir / stem}.jpg (or .png, ...): add it, or move the mask away')
    if not images:
        raise UserError(f'no images in {image_dir} (.jpg, .png, ...): put the {split} images there')
    return SplitFiles([(images[stem], masks[stem]) for stem in sorted(images)], image_dir, 'move it and its pair away')


def check_labelled_classes(dataset, cache_dir):
    """Masks saved as 0/255 (a common way for one class) train background only, 255 being 'ignore': say so."""
    counts, ignored = class_pixel_counts(dataset, cache_dir)
    missing = [name for name, c in zip(dataset.classes.names, counts.tolist()) if c == 0]
    share = ignored / max(float(counts.sum()) + ignored, 1)
    if missing and share >= 0.01:      # 1% or more of the training pixels ignored
        log(f'warning: {", ".join(missing)} {"has" if len(missing) == 1 else "have"} no labelled pixel in the '
            f'training masks, while 255 (ignored) covers {share:.1%} of them: masks saved as 0/255 mean "background '
            '/ ignore" here; save them as 0/1 (class indices) or in the classes\' colours')


def image_files(inputs):
    """The image files among `inputs` (files, and the images directly inside folders)."""
    for path in map(Path, inputs):
        if not path.exists():
            raise UserError(f'{path} does not exist: pass image files or folders')
        yield from sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]


def segment_files(net, files, out_dir, classes, scales=None, amp=None, test_size=None, mst_mode='softmax',
                  tiling=None):
    """Each image -> out_dir/<stem>_{color,overlay,labels}.png, one in memory at a time. An unreadable file is
    skipped with a warning; no output may replace an input; a failed write stops the run (the next would fail too)."""
    files, out_dir, done, skipped = list(files), Path(out_dir), 0, 0
    inputs = {Path(p).resolve() for p in files}
    for path in files[rank()::world_size()]:
        try:
            image = read_image(path)
        except UserError as err:
            print(f'warning: skipped {error_line(err)}', file=sys.stderr)
            skipped += 1
            continue
        with autocast(net_device(net), amp):
            pred = predict(net, image, scales, test_size, mst_mode, tiling)
        outs = {f'{Path(path).stem}_{kind}.png': pic for kind, pic in segmentation_pictures(image, pred, classes)}
        for name in outs:
            if (out_dir / name).resolve() in inputs:
                raise UserError(f'{out_dir / name} is an input image: pass another --out-dir')
        for name, picture in outs.items():
            write_atomically(out_dir / name, functools.partial(picture.save, format='PNG'), 'pass another --out-dir')
        done += 1
    done, skipped = (int(n) for n in all_reduce_sum([done, skipped]))
    log(f'segmented {done} image(s) into {out_dir}' + (f', skipped {skipped} unreadable' if skipped else ''))


def segmentation_pictures(image, pred, classes):
    """(kind, PIL image) of a prediction; labelIds: what Cityscapes' scripts and the tutorial's challenge read. The
    overlay is torchvision's draw_segmentation_masks at alpha 0.5 (each pixel in one class's mask), computed in uint8:
    its class-by-class masks and float copies would outweigh a tiled prediction of a big photo."""
    colors = classes.colors
    color = label2image(pred, colors)
    overlay = half_blend(image.permute(1, 2, 0), color)
    ids = Image.frombytes('P', (pred.shape[1], pred.shape[0]), pred.to(torch.uint8).numpy().tobytes())
    ids.putpalette(palette(colors).reshape(-1).tolist())
    pictures = [('labelIds', Image.fromarray(CITYSCAPES_TRAINID_TO_ID[pred.long()].numpy()))] \
        if classes == CITYSCAPES else []
    return [('color', Image.fromarray(color.numpy())), ('overlay', Image.fromarray(overlay.numpy())),
            ('labels', ids)] + pictures


def half_blend(a, b):
    """(a + b) // 2 of two uint8 tensors without widening them: what a * 0.5 + b * 0.5 gives, cast back to uint8."""
    return (a >> 1) + (b >> 1) + (a & b & 1)


# ======================================================================================================================
# 5. The machinery
# ======================================================================================================================
# ----------------------------------------------------------------------------------------------------- errors and stops
class UserError(Exception):
    """A mistake the user can fix. The scripts print its single line and exit with status 2."""


def error_line(err):
    """The one line worth showing: DataLoader workers re-raise our error wrapped in their traceback text."""
    lines = str(err).strip().splitlines()
    line = lines[-1].strip() if lines else type(err).__name__
    return line.split('UserError: ', 1)[1] if line.startswith(('UserError: ', 'some_define.UserError: ')) else line


class Terminated(KeyboardInterrupt):
    """SIGTERM, what SLURM and Kubernetes send before they kill a job: stops a run exactly as Ctrl-C does."""
    received = False    # also checked between training steps: a raise that lands in a __del__ is swallowed there
    hold = False        # True while a batch is handed over (guarded_batches): the stop waits for it


def raise_terminated(signum, frame):
    Terminated.received = True
    if not Terminated.hold:
        raise Terminated()


def quiet_unraisable(unraisable, default=sys.unraisablehook):
    """A stop in a finaliser (a DataLoader iterator's __del__): no "Exception ignored" traceback, the script's line."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        default(unraisable)


def stop_name(stop):
    return 'terminated (SIGTERM)' if isinstance(stop, Terminated) else 'interrupted'


def stop_status(stop):
    """The shell's exit status of a process stopped by that signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


def run_main(main):
    """Runs main(): a user mistake, Ctrl-C or SIGTERM ends it in one line, not a traceback; closes torchrun's group."""
    previous, sys.unraisablehook = signal.signal(signal.SIGTERM, raise_terminated), quiet_unraisable
    Terminated.received = False     # a stop belongs to the run it stopped (several runs in one process: the tests)
    try:
        main()
    except UserError as err:
        print(f'error: {error_line(err)}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        log(f'\n{stop_name(stop)}')
        sys.exit(stop_status(stop))
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = sys.__unraisablehook__
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------ torchrun's processes, seeds
# Every random draw comes from seed_for(--seed, epoch, one of these, ...): a resumed run draws an uninterrupted one's.
CROP_DRAWS, MODEL_DRAWS, AUGMENT_DRAWS = 0, 1, 2   # the items' crops, the model's own (dropout), CutMix/CopyBlob


def rank():
    """This process's number among torchrun's (RANK, set before its process group starts); 0 without torchrun."""
    return int(os.environ.get('RANK', '0'))


def is_main_process():
    return rank() == 0


def world_size():
    return int(os.environ.get('WORLD_SIZE', '1'))


def log(*args, **kwargs):
    """print, from rank 0 only: with torchrun every rank runs the same script."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def dist_device():
    return torch.device('cuda', torch.cuda.current_device()) if torch.distributed.get_backend() == 'nccl' \
        else torch.device('cpu')


def all_reduce_sum(values):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def main_process_first(work, timeout=None):
    """Runs work() in rank 0 while the others wait in a gloo group of their own (with `timeout` when the work may
    outlast the process group's). When it fails, every process stops: rank 0 with its error, the others quietly."""
    failure = None
    if is_main_process():
        try:
            work()
        except BaseException as err:     # noqa: BLE001 - re-raised below, once the others know
            failure = err
    if torch.distributed.is_initialized():
        group = torch.distributed.new_group(backend='gloo', **({'timeout': timeout} if timeout else {}))
        failed = torch.tensor([failure is not None], dtype=torch.int32)
        torch.distributed.all_reduce(failed, group=group)
        if failed.item() and failure is None:
            raise SystemExit(2)
    if failure is not None:
        raise failure


@contextlib.contextmanager
def seeded(seed):
    """The global CPU RNG, which the book's blocks draw from, seeded for the draws inside, then put back as it was (the
    model's own draws go on undisturbed); seed None: the RNG as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


def seed_for(*keys):
    """One 63-bit seed from several whole numbers (NumPy's SeedSequence mixes them: nearby keys, unrelated seeds)."""
    return int(np.random.SeedSequence([k % 2 ** 64 for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def setup_distributed(device=None):
    """Under torchrun, nccl for a process on a GPU, gloo on the CPU (`--device cpu` too: nccl has no CPU tensors)."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if pick_device(device).type == 'cuda' else 'gloo')
    elif torch.cuda.device_count() > 1 and world_size() == 1:
        log(f'note: {torch.cuda.device_count()} GPUs here, this run uses one; use them all with '
            f'torchrun --nproc_per_node={torch.cuda.device_count()} {Path(sys.argv[0]).name} ...')


# ---------------------------------------------------------------------------------------------------------- speed paths
class ShuffleConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with a kernel twice its stride (the FCN's 64/32) as a 2x2 convolution to out_channels x
    stride x stride channels, pixel_shuffle(stride) and a crop: each output pixel gets the same 2x2 input neighbours
    times the same weights (forward and gradients equal up to float rounding), and cuDNN has no large kernel to tune."""

    def forward(self, x, output_size=None):
        s, p, (cin, cout) = self.stride[0], self.padding[0], self.weight.shape[:2]
        if output_size is not None or self.kernel_size != (2 * s, 2 * s) or self.stride != (s, s) \
                or self.padding != (p, p) or self.output_padding != (0, 0) or self.groups != 1 \
                or self.dilation != (1, 1):
            return super().forward(x, output_size)
        # kernel row 32*u + r (u = 0, 1) meets input row a - u at output row 32*a + r: a 2x2 conv over the flipped u
        weight = self.weight.view(cin, cout, 2, s, 2, s).permute(1, 3, 5, 0, 2, 4).flip(4, 5)
        bias = None if self.bias is None else self.bias.repeat_interleave(s * s)
        y = F.pixel_shuffle(F.conv2d(x, weight.reshape(cout * s * s, cin, 2, 2), bias, padding=1), s)
        return y[..., p:y.shape[-2] - p, p:y.shape[-1] - p]


@functools.lru_cache(maxsize=64)
def interpolation_matrix(n, dtype=torch.float64, device=None):
    """(2n x n) weights of F.interpolate's x2 bilinear upsample (align_corners=True) along one axis, cached on
    `device` (a copy from the host would make each step wait). Half-precision weights are multiples of the dtype's
    unit in [0.5, 1): rows sum to exactly 1, a flat region keeps its value (rounded one by one, bf16: 1 +- 0.002)."""
    with torch.inference_mode(False):     # made during evaluation, it still serves training's backward
        pos = torch.arange(2 * n, dtype=torch.float64, device=device) * ((n - 1) / (2 * n - 1))
        low = pos.floor().long().clamp(max=n - 1)
        frac, rows = pos - low, torch.arange(2 * n, device=device)
        if dtype.itemsize < 4:
            unit = 2 / torch.finfo(dtype).eps       # 1 / (the spacing of numbers in [0.5, 1))
            frac = (frac * unit).round() / unit
        matrix = torch.zeros(2 * n, n, dtype=torch.float64, device=device)
        matrix[rows, low] += 1 - frac
        matrix[rows, (low + 1).clamp(max=n - 1)] += frac
        return matrix.to(dtype)


def upsample2x(x):
    """F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True) as two matrix products, whose backward
    is two more: no atomic adds, which make CUDA's own backward slow in bf16 (pytorch/pytorch#140096)."""
    n, c, h, w = x.shape
    rows, cols = interpolation_matrix(h, x.dtype, x.device), interpolation_matrix(w, x.dtype, x.device)
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return rows @ x @ cols.T
    y = (rows @ x.permute(0, 2, 3, 1).reshape(n, h, w * c)).reshape(n * 2 * h, w, c)
    return (cols @ y).reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class Upsample2x(nn.Upsample):
    """The U-Net's x2 nn.Upsample: upsample2x on CUDA, nn.Upsample's own on the CPU (no atomics problem there)."""
    everywhere = False      # True (a switch for the tests): the CUDA branch on any device

    def forward(self, x):
        if x.is_cuda or self.everywhere:
            return upsample2x(x)
        return super().forward(x)


def fast_layers(model):
    """The book's layers become their faster subclasses in place (same parameters, state_dict and results), so
    checkpoints load either way and an optimizer made before keeps its parameters."""
    for module in model.modules():
        if type(module) is nn.ConvTranspose2d:
            module.__class__ = ShuffleConvTranspose2d       # its forward falls back where the kernel does not fit
        elif type(module) is nn.Upsample and module.scale_factor in (2, 2.0) and module.mode == 'bilinear' \
                and module.align_corners:
            module.__class__ = Upsample2x
    return model


class SeededSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler (one process or many) that also hands each item a crop seed drawn from (seed, epoch): the
    same --seed gives the same batches and crops whatever the worker count, and a resumed run sees what an
    uninterrupted one saw. For evaluation the ranks deal out the first eval_limit items (0 or None: all) unpadded."""

    def __init__(self, dataset, shuffle, seed=0, eval_limit=None):
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=True)
        self.eval_indices = range(self.rank, eval_limit or len(dataset), self.num_replicas)

    def __iter__(self):
        indices = super().__iter__() if self.shuffle else self.eval_indices
        gen = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, CROP_DRAWS))
        seeds = torch.randint(0, 2 ** 62, (len(self.dataset),), generator=gen).tolist()
        return iter([(i, seeds[i]) for i in indices])

    def __len__(self):
        return super().__len__() if self.shuffle else len(self.eval_indices)


def quiet_worker(worker_id):
    """A SIGTERM to the whole job (SLURM's) ends a worker as Ctrl-C does: no "DataLoader worker is killed" error."""
    signal.signal(signal.SIGTERM, raise_terminated)


def default_workers():
    return min(4, os.cpu_count() or 1)


def make_loader(dataset, batch_size, is_train, seed=0, num_workers=None):
    """The book's loaders: shuffled for training, the last partial batch dropped (an evaluation split under one batch
    is kept whole). Training's `batch_size` is split among ranks; evaluation's batches are twice as large (no
    gradients kept, and eval-mode BatchNorm scores images alone)."""
    workers = default_workers() if num_workers is None else num_workers
    sampler = SeededSampler(dataset, shuffle=is_train, seed=seed, eval_limit=len(dataset) // batch_size * batch_size)
    per_rank = max(1, batch_size // sampler.num_replicas) if is_train else 2 * batch_size
    if is_train and len(dataset) // sampler.num_replicas < per_rank:
        raise UserError(f'only {len(dataset)} training examples for a batch of {batch_size}: '
                        'pass a smaller --batch-size or a smaller --crop-size')
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, drop_last=is_train, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), worker_init_fn=quiet_worker,
        generator=torch.Generator().manual_seed(seed))    # its draws leave the model's RNG alone (see train_ch13)


def to_device(X, y, device, channels_last=False):
    """A batch on the device: uint8 images normalised there (4x less to copy than float32), labels widened."""
    X = normalize_image(X.to(device, non_blocking=True)) if X.dtype == torch.uint8 else X.to(device)
    if channels_last:
        X = X.contiguous(memory_format=torch.channels_last)
    return X, y.to(device, non_blocking=True).long()


class DeviceLoader:
    """A DataLoader's uint8 batches, delivered on the device by to_device; len, dataset and sampler are its own."""

    def __init__(self, loader, device, channels_last=False):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for X, y in guarded_batches(self.loader):
            yield to_device(X, y, self.device, self.channels_last)


def guarded_batches(loader):
    """The loader's batches, with a SIGTERM held back while each is handed over from a DataLoader worker (a stop in
    the middle of that leaves the worker a broken connection, and a traceback): the stop comes right after."""
    batches = iter(loader)
    while True:
        Terminated.hold = True
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            Terminated.hold = False
        if Terminated.received:
            raise Terminated()
        yield batch


class DeviceData(DeviceLoader):
    """A split decoded once (in the loader's workers) and kept on the device at full size as uint8: each epoch cuts
    the loader's own crops there (the item's seed from the same SeededSampler), without decoding a JPEG again."""

    def __init__(self, loader, device, channels_last=False):
        super().__init__(loader, device, channels_last)
        whole = copy.copy(loader.dataset)       # the same items, uncropped, as uint8 image and label
        whole.crop_size, whole.normalize = None, False
        whole = torch.utils.data.DataLoader(whole, batch_size=None, num_workers=loader.num_workers,
                                            worker_init_fn=quiet_worker,
                                            generator=torch.Generator())    # the global seed stays the model's
        self.decoded = [(image.to(device), label.to(device)) for image, label in whole]

    def __iter__(self):
        items, size = list(self.sampler), self.loader.batch_size
        for start in range(0, len(items) - size + 1 if self.loader.drop_last else len(items), size):
            crops = []
            for i, seed in items[start:start + size]:
                with seeded(seed):
                    crops.append(voc_rand_crop(*self.decoded[i], *self.dataset.crop_size))
            yield to_device(*torch.utils.data.default_collate(crops), self.device, self.channels_last)


def data_on_device(choice, device, datasets):
    """--data-on-device auto|on|off: (whether the splits go to the device, why); auto: up to 1/4 of free GPU memory."""
    need = sum(4 * h * w for ds in datasets for h, w in ds.sizes or [])
    if choice == 'off':
        return False, 'asked for'
    if any(ds.augment or ds.sizes is None for ds in datasets):
        if choice == 'on':
            raise UserError("--data-on-device on: the tutorial's augmentation (Cityscapes training) runs in the "
                            'DataLoader workers: pass --data-on-device off')
        return False, "the tutorial's augmentation runs in the DataLoader workers"
    if choice == 'on':
        return True, f'asked for, {need / 2 ** 30:.2f} GiB'
    if device.type != 'cuda':
        return False, 'auto: no GPU'
    free = torch.cuda.mem_get_info(device)[0]
    return need <= free / 4, (f'auto: the decoded splits take {need / 2 ** 30:.2f} GiB, the GPU has '
                              f'{free / 2 ** 30:.1f} GiB free')


def amp_dtype(device, amp=None):
    """Mixed precision, on CUDA by default: bf16 from compute capability 8.0 on (no scaler needed), else fp16 with a
    GradScaler (T4, V100: cuDNN has no bf16 convolutions; is_bf16_supported() counts the slow emulation). CPU: bf16."""
    if not (device.type == 'cuda' if amp is None else amp):
        return None
    if device.type == 'cuda' and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def autocast(device, dtype):
    """Mixed precision in `dtype`, or nothing at all when it is None (a device without autocast then works too)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- where the data is
HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / 'data'                                    # --download and --demo write here
# Where a run's data is; kind: voc, cityscapes, folder or labelme; val_share: the share held out (--val-share)
DataSource = collections.namedtuple('DataSource', 'kind root classes void_as_background title val_share',
                                    defaults=(None,))


def find_data(kind='voc', data_dir=None, demo=None, download=False, void_as_background=False, classes=None,
              val_share=None):
    """The DataSource of the data flags. --demo and --download write their data once (under torchrun in rank 0, while
    the others wait). Without `classes` (a class file) a VOC layout's labelmap.txt (a CVAT export) gives the classes;
    a folder with class_names.txt and no ImageSets/ is labelme2voc's output (labelme_files)."""
    if val_share and (demo or kind != 'voc'):
        raise UserError(f'--val-share splits the VOC layout\'s ImageSets/Segmentation/default.txt: drop it with '
                        f'--{"demo" if demo else "dataset " + kind}')
    if kind == 'cityscapes':
        if demo or classes:
            raise UserError(f'--{"demo" if demo else "classes"} does not go with --dataset cityscapes: drop it')
        if data_dir is None:
            raise UserError('--dataset cityscapes needs --data-dir, the folder holding leftImg8bit/ and gtFine/; '
                            + CITYSCAPES_STEPS)
        return DataSource('cityscapes', Path(data_dir), CITYSCAPES, False, 'Cityscapes')
    if demo:
        folder = demo == 'folder' or kind == 'folder'
        main_process_first(make_demo_folder if folder else make_demo_voc)
        if folder:
            return DataSource('folder', DEMO_FOLDER, read_classes(DEMO_FOLDER / 'classes.txt'), void_as_background,
                              'DEMO data (synthetic, folder layout)')
        return DataSource('voc', DEMO_DIR, VOC, void_as_background, 'DEMO data (synthetic)')
    if kind == 'folder':
        if data_dir is None:
            raise UserError('--dataset folder needs --data-dir, the folder holding images/, masks/ and classes.txt')
        root = Path(data_dir)
        found = [root / name for name in ('classes.txt', 'class_dict.csv') if (root / name).exists()]
        if not classes and not found:
            raise UserError(f'{root / "classes.txt"} is missing: write one class a line (`name`, or `name R G B` for '
                            'colour masks), background first, or pass --classes FILE')
        return DataSource('folder', root, read_classes(classes or found[0]), void_as_background, root.name)
    if data_dir is not None and not download and is_labelme(data_dir):
        root = Path(data_dir)
        return DataSource('labelme', root, read_classes(classes) if classes else labelme_classes(
            root / 'class_names.txt'), void_as_background, root.name, val_share or LABELME_VAL_SHARE)
    voc = find_voc_dir(data_dir, missing_ok=download)
    if download and voc:
        log(f'VOC2012 is already in {voc}: --download has nothing to fetch')
    elif download:  # 2 GB may take longer than the process group's timeout (nccl's: 10 minutes)
        main_process_first(functools.partial(download_voc, DATA_DIR if data_dir is None else Path(data_dir)),
                           timeout=datetime.timedelta(hours=6))
    root = voc or find_voc_dir(data_dir)
    classes = classes or (root / 'labelmap.txt' if (root / 'labelmap.txt').exists() else None)
    return DataSource('voc', root, read_classes(classes) if classes else VOC, void_as_background,
                      root.name if classes else 'VOC2012', val_share)


def open_dataset(data, is_train, crop_size=None, normalize=True):
    """The training or validation split of a DataSource."""
    if data.kind == 'cityscapes':
        return CityscapesSegDataset(is_train, crop_size, data.root, normalize)
    if data.kind == 'voc':
        return VOCSegDataset(is_train, crop_size, data.root, classes=data.classes, normalize=normalize,
                             void_as_background=data.void_as_background, val_share=data.val_share)
    files = labelme_files(data.root, is_train, data.val_share) if data.kind == 'labelme' else \
        folder_files(data.root, is_train)
    return SegDataset(files, data.classes, crop_size, normalize, data.void_as_background)


def find_voc_dir(data_dir=None, missing_ok=False):
    """The VOC2012 folder in --data-dir or next to the scripts; None when there is none and missing_ok (--download)."""
    if data_dir is not None:
        candidates = [Path(data_dir) / sub for sub in ('', 'VOC2012', 'VOCdevkit/VOC2012')]
    else:
        candidates = [HERE / 'VOC2012', HERE / 'VOCdevkit' / 'VOC2012', DATA_DIR / 'VOCdevkit' / 'VOC2012']
    found = next((path for path in candidates if (path / 'ImageSets' / 'Segmentation').is_dir()), None)
    if found or missing_ok:
        return found
    where = data_dir if data_dir is not None else ' or '.join(str(c) for c in candidates)
    raise UserError(f'no VOC2012 dataset at {where} (needs ImageSets/Segmentation, JPEGImages, SegmentationClass): '
                    'pass --data-dir to it, --download to fetch it (2 GB), or --demo for a small synthetic one')


# ----------------------------------------------------------------------------------------------------- the VOC download
# PASCAL VOC 2012 trainval (--download), tried in this order: the book's own mirror (d2l's DATA_HUB['voc2012']),
# Oxford's current address, Oxford's old address (the one torchvision's VOCSegmentation uses).
VOC_TAR = 'VOCtrainval_11-May-2012.tar'
VOC_SOURCES = ('http://d2l-data.s3-accelerate.amazonaws.com/' + VOC_TAR,
               'https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/' + VOC_TAR,
               'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/' + VOC_TAR)
# The tar's published checksums: md5 (torchvision's VOCSegmentation), sha256 (its prototype datasets), sha1 (d2l)
VOC_TAR_CHECKSUMS = {'size': 1999639040, 'md5': '6cd6e144f989b92b3379bac3b3de84fd',
                     'sha256': 'e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb',
                     'sha1': '4e443f8a2eca6b1dac8a6c57641b67dd40621a49'}
DOWNLOAD_TIMEOUT = 60           # seconds a silent connection is waited for before the next source is tried


def download_voc(root, sources=VOC_SOURCES, checksums=VOC_TAR_CHECKSUMS):
    """PASCAL VOC 2012 trainval into root/VOCdevkit/VOC2012, once, from a tar the user put at root/VOC_TAR (checked,
    no network) or from fetch_voc_tar. The tar stays: whether its 2 GB go is the user's choice."""
    root = Path(root)
    voc, tar = root / 'VOCdevkit' / 'VOC2012', root / VOC_TAR
    with download_lock(root / f'{VOC_TAR}.lock'):
        if (voc / 'ImageSets' / 'Segmentation' / 'val.txt').exists():
            return
        if voc.exists():
            raise UserError(f'{voc} exists without ImageSets/Segmentation/val.txt (an unpacking that did not '
                            'finish?): move or delete it and rerun with --download')
        if not tar.exists():
            fetch_voc_tar(tar, sources, checksums)
        elif differs := tar_mismatch(tar, checksums):
            raise UserError(f'{tar} is not the VOC2012 trainval tar ({differs}): put a copy whose md5 is '
                            f'{checksums["md5"]} in its place, or move it away and rerun with --download')
        unpack_voc_tar(tar, voc)
    log(f'VOC2012 is in {voc}; {tar} is kept (delete it to free {checksums["size"] / 1e9:.1f} GB)')


@contextlib.contextmanager
def download_lock(path):
    """An exclusive flock on `path` (NFS honours it across nodes): a second run on the folder says so and waits. The
    file stays, empty: deleting it would let a waiter lock a file no longer there while a third run locks a new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, 'a')
    except OSError as err:
        raise download_write_error(path, err) from None
    with f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:     # Windows: no flock, one --download at a time is the user's care
            pass
        except BlockingIOError:
            log(f'another --download of this folder holds {path}: waiting for it to finish ...')
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def fetch_voc_tar(tar, sources, checksums):
    """Downloads tar through tar + '.part' from the first source that delivers the checked file. A source that errors
    leaves its bytes for the next one to continue: the checksums decide at the end."""
    part = tar.with_name(tar.name + '.part')
    if part.exists() and part.stat().st_size >= checksums['size']:    # a run killed while checking it
        differs = keep_checked(part, tar, checksums)
        if not differs:
            return
        log(f'{part}, left by an earlier run, fails the checksums ({differs}): deleted, downloading it again')
    errors = []
    for url in sources:
        try:
            fetch_part(url, part, checksums['size'])
        except (OSError, http.client.HTTPException) as err:    # refused, HTTP error, timeout, cut, not HTTP
            reason = (f'HTTP {err.code} {err.reason}' if isinstance(err, urllib.error.HTTPError) else
                      error_line(err.reason) if isinstance(err, urllib.error.URLError) else
                      error_line(err) if isinstance(err, OSError) else repr(err))     # BadStatusLine('...')
        else:
            differs = keep_checked(part, tar, checksums)
            if not differs:
                return
            reason = f'a file that fails the checksums, deleted: {differs}'
        errors.append(f'{url} ({reason})')
        log(f'{url} failed: {reason}')
    kept = (f'; {part} ({part.stat().st_size} of {checksums["size"]} bytes) is kept so that a rerun continues it'
            if part.exists() else '')
    raise UserError(f'could not download VOC2012 from any source: {"; ".join(errors)}. Download {VOC_TAR} by any '
                    f'means (any copy whose md5 is {checksums["md5"]}), put it at {tar} and rerun with --download '
                    f'(or unpack it and pass --data-dir){kept}')


def keep_checked(part, tar, checksums):
    """Renames part to tar when it passes the checksums and returns ''; else deletes it and returns what differs."""
    differs = tar_mismatch(part, checksums)
    if differs:
        part.unlink()
    else:
        os.replace(part, tar)
    return differs


def fetch_part(url, part, size):
    """Appends url's bytes to part from the byte resume_from gives. What is not the tar is refused before a byte is
    written; network faults and malformed answers raise OSError or HTTPException, part holding every byte received."""
    from tqdm import tqdm
    response, have = resume_from(url, part)
    with response:
        fields = response.headers.get_all('Content-Length', [])
        lengths = {value.strip() for field in fields for value in field.split(',')}    # proxies repeat one: N, N
        if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
            raise ConnectionError(f'sends a malformed Content-Length: {", ".join(fields)}')
        length = have + int(lengths.pop()) if lengths else None
        if length is not None and length != size:          # another file: not worth 2 GB of disk
            raise ConnectionError(f'serves {length} bytes where the tar has {size}')
        chunk = response.read(min(1 << 20, size - have))
        if not have and not opens_a_tar(chunk):
            raise ConnectionError(f'sends {(response.headers.get("Content-Type") or "a body").split(";")[0]} '
                                  'without a tar header (a captive portal\'s or a proxy\'s page?)')
        try:
            out = open(part, 'ab' if have else 'wb')
        except OSError as err:
            raise download_write_error(part, err, kept=part if have else None) from None
        with out, tqdm(total=size, initial=have, desc=part.name, unit='B', unit_scale=True, unit_divisor=1024,
                       disable=not is_main_process() or None) as bar:
            while chunk:
                try:    # flushed: the .part on disk holds exactly the bytes a rerun continues after
                    out.write(chunk)
                    out.flush()
                except OSError as err:      # a full disk: closed first, so that the with's close cannot raise again
                    with contextlib.suppress(OSError):
                        out.close()
                    raise download_write_error(part, err, kept=part) from None
                have += len(chunk)
                bar.update(len(chunk))
                chunk = response.read(min(1 << 20, size - have))
    if have < size:
        raise ConnectionError(f'the connection closed after {have} of {size} bytes')


def resume_from(url, part):
    """url's answer to a request for the bytes after part's, and the byte its body starts at: part's size for a 206
    from there, else 0. A 200 (Range ignored) is the whole file; other answers (S3's and Apache's 416 to a Range at or
    past their end, a 206 of other bytes) are asked again without a Range, as a rerun would get them again."""
    have = part.stat().st_size if part.exists() else 0
    if have:
        with open(part, 'rb') as f:
            if not opens_a_tar(f.read(262)):     # a web page: nothing worth continuing
                log(f'{part} does not start with a tar header: starting again from byte 0')
                return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT), 0
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers={'Range': f'bytes={have}-'}),
                                              timeout=DOWNLOAD_TIMEOUT)
        except urllib.error.HTTPError as err:
            if err.code != 416:
                raise
            response = err
        answer = response.headers.get('Content-Range')
        if response.status == 206 and (answer or '').startswith(f'bytes {have}-'):
            return response, have
        log(f'{url} does not continue {part.name} (HTTP {response.status}, Content-Range {answer}): '
            'starting again from byte 0')
        if response.status == 200:
            return response, 0
        response.close()
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT), 0


def opens_a_tar(head):
    """Whether bytes start a tar: every tar header, GNU's and POSIX's, says 'ustar' at byte 257."""
    return head[257:262] == b'ustar'


def download_write_error(path, err, kept=None):
    """write_error for the download's files, saying what is kept for a rerun."""
    note = f'; {kept} is kept so that a rerun with --download continues' if kept else ''
    return write_error(path, err, f'pass --data-dir another folder (the tar takes 2 GB, unpacked 2 GB more){note}')


def tar_mismatch(path, checksums):
    """What differs from the published checksums ('' when nothing does): the size, else the hashes, in one pass."""
    log(f'checking {path} ...')
    size = path.stat().st_size
    if size != checksums['size']:
        return f'size {size} bytes, not {checksums["size"]}'
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in checksums if name != 'size'}
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            for h in hashes.values():
                h.update(block)
    differ = [name for name, h in hashes.items() if h.hexdigest() != checksums[name]]
    return (f'{", ".join(differ)} differ{"s" if len(differ) == 1 else ""}: {differ[0]} '
            f'{hashes[differ[0]].hexdigest()}, not {checksums[differ[0]]}') if differ else ''


def unpack_voc_tar(tar, voc):
    """Unpacks tar's VOCdevkit/VOC2012 as voc, every member checked first, through a scratch folder that moves into
    place last: an interrupted run never leaves a half folder that looks complete."""
    scratch = voc.parent.parent / '.VOCtrainval-unpacking'
    # tarfile's 'data' filter (Python 3.12, 3.11.4, 3.10.12) checks again while extracting: links through links
    safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
    log(f'unpacking {tar} ...')
    try:
        shutil.rmtree(scratch, ignore_errors=True)      # what an interrupted run left
        with tarfile.open(tar) as archive:
            archive.extractall(scratch, safe_voc_members(archive), **safe)
        voc.parent.mkdir(exist_ok=True)
        os.replace(scratch / 'VOCdevkit' / 'VOC2012', voc)
    except tarfile.TarError as err:
        raise UserError(f'could not unpack {tar} ({error_line(err)}): nothing was unpacked; get a copy whose md5 is '
                        f'{VOC_TAR_CHECKSUMS["md5"]}') from None
    except OSError as err:
        raise download_write_error(voc, err, kept=tar) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def safe_voc_members(archive):
    """The members under VOCdevkit/VOC2012 once every member passed unsafe_member, else a TarError as tarfile's own."""
    members = archive.getmembers()
    # every link, also those listed after a member that goes through them: extraction order makes no difference
    links = [PurePosixPath(m.name).parts for m in members if m.issym() or m.islnk()]
    for member in members:
        if why := unsafe_member(member, links):
            raise tarfile.TarError(f'it holds {member.name!r}, {why}')
    voc = [m for m in members if PurePosixPath(m.name).parts[:2] == ('VOCdevkit', 'VOC2012')]
    if not voc:
        raise tarfile.TarError('it holds no VOCdevkit/VOC2012 folder')
    return voc


def unsafe_member(member, links):
    """Why extracting member could write outside the target folder ('' when it cannot). `links`: the parts of every
    link's name; a link through a link is refused, as a lexical check cannot follow it."""
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return 'an absolute path'
    if '..' in path.parts:
        return "a path with '..'"
    if any(len(path.parts) > len(link) and path.parts[:len(link)] == link for link in links):
        return 'a path through a link'
    if member.issym() or member.islnk():
        # a symbolic link's target is relative to its folder, a hard link's to the top of the tar
        target = PurePosixPath(path.parent if member.issym() else '', member.linkname)
        normal = posixpath.normpath(str(target))
        if target.is_absolute() or normal == '..' or normal.startswith('../'):
            return f'a link to {member.linkname!r} outside the folder'
        if any(target.parts[:len(link)] == link for link in links):
            return f'a link to {member.linkname!r} through a link'
    if member.isdev():
        return 'a device file'
    return ''


# -------------------------------------------------------------------------------------------------------- weights files
# ImageNet backbones: the weights API's files, looked for next to the scripts first (the improvement's instruction)
BACKBONE_WEIGHTS = {arch: torchvision.models.get_model_weights(arch).IMAGENET1K_V1
                    for arch in ('resnet18', 'resnet50', 'resnet101')}


def load_torch_file(path, what='checkpoint', advice='train first, or pass a checkpoint these scripts wrote'):
    """torch.load with weights_only=True (a pickle that runs code is refused); refusals name `what`, then `advice`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{what} {path} {"is a folder" if path.is_dir() else "does not exist"}: {advice}')
    try:
        with warnings.catch_warnings():     # torch warns about old pickle protocols before refusing: one line only
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        text = str(err)
        if 'Weights only load failed' in text or 'Unsupported global' in text:
            raise UserError(f'{path} holds Python objects, not only tensors and numbers: refused for safety '
                            f'(weights_only=True); {advice}') from None
        raise UserError(f'{path} is not a readable {what} (truncated or corrupt: {error_line(err)}): '
                        f'{advice}') from None


def check_named_hash(path, instead='pass --no-pretrained'):
    """A file under a name torchvision publishes, `<name>-<first hex digits of its sha256>.pth`, must hash to that
    prefix: a wrong file under the right name (a 580 KB one circulates as resnet18-f37072fd.pth) stops here, in one
    line, which offers its URL or `instead`. Other names (a user's resnet18-20240115.pth) carry no hash: only their
    keys and shapes are checked."""
    published = {w.url.rsplit('/', 1)[1]: w.url for name in torchvision.models.list_models()
                 for w in torchvision.models.get_model_weights(name)}
    match = torch.hub.HASH_REGEX.search(path.name)
    if path.name not in published or not match or not path.is_file():     # a folder: load_torch_file says so
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()     # read whole, as torch.load reads it next
    if not digest.startswith(match.group(1)):
        raise UserError(f'{path} ({path.stat().st_size:,} bytes) is not the file its name says: its sha256 should '
                        f'start with {match.group(1)}, it starts with {digest[:8]}: replace it with '
                        f'{published[path.name]}, or {instead}')


def backbone_state_dict(arch, weights_path=None):
    """ImageNet weights: --backbone-weights, else the file next to the scripts, in the working folder or in
    torchvision's cache, else a download there, read with weights_only=True (torch.hub's loader unpickles anything)."""
    url = BACKBONE_WEIGHTS[arch].url
    filename = url.rsplit('/', 1)[1]
    cached = Path(torch.hub.get_dir()) / 'checkpoints' / filename
    path = Path(weights_path) if weights_path else next(
        (p for p in (HERE / filename, Path.cwd() / filename) if p.exists()), cached)
    if not weights_path and not path.exists():     # a missing --backbone-weights FILE: load_torch_file says so
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), torch.hub.HASH_REGEX.search(filename).group(1),
                                           progress=is_main_process())
        except Exception as err:
            raise UserError(f'no ImageNet {arch} weights here and the download failed ({error_line(err)}): put '
                            f'{url} next to the scripts, or pass --backbone-weights FILE, or train from '
                            'scratch with --no-pretrained') from None
    check_named_hash(path)
    advice = f'pass torchvision\'s {filename} ({url}), or --no-pretrained'
    state = load_torch_file(path, f'{arch} weights file', advice)
    with torch.device('meta'):      # the expected names and shapes, without allocating or drawing random numbers
        expected = getattr(torchvision.models, arch)(weights=None).state_dict()
    # torchvision's files are 2017 state dicts, without the *.num_batches_tracked that BatchNorm's loading fills in
    needed = {k for k in expected if not k.endswith('.num_batches_tracked')}
    if not isinstance(state, dict) or not needed <= set(state) <= set(expected) or any(
            getattr(state[k], 'shape', None) != expected[k].shape for k in state):
        raise UserError(f'{path} is not a torchvision {arch} state_dict: {advice}')
    return state


# Starting from a trained model (--init-from): one of these scripts' checkpoints, or a torchvision segmentation file
INIT_ADVICE = ('pass a checkpoint these scripts wrote, or a torchvision segmentation weights file such as '
               'deeplabv3_resnet50_coco-cd0a2569.pth')
COCO_FILES = {name: torchvision.models.get_model_weights(name).COCO_WITH_VOC_LABELS_V1.url.rsplit('/', 1)[1]
              for name in ('deeplabv3_resnet50', 'deeplabv3_resnet101')}      # 21 VOC classes, trained on COCO


def init_state(path):
    """--init-from's tensors, read with weights_only=True: a checkpoint's `model` (ours; torchvision's references
    save theirs so too) or a plain state_dict (torchvision's published files), whose name is hash-checked."""
    path = Path(path)
    check_named_hash(path, 'drop --init-from')
    state = load_torch_file(path, '--init-from file', INIT_ADVICE)
    if isinstance(state, dict) and isinstance(state.get('model'), dict):
        state = state['model']
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path} holds no state_dict (tensors by name): {INIT_ADVICE}')
    return state


def init_from(model, path, name, num_classes):
    """Loads, in place, every tensor of the file whose name and shape are the model's; the others stay as built, so
    a head of another class count starts fresh (torchvision's COCO files fine-tuned to a user's classes). One line
    says how much was loaded and what was left; a file that fits nothing is the file of another model."""
    state, own = init_state(path), model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if all(k.endswith('.num_batches_tracked') for k in fits):   # BatchNorm's counters alone hold no weights
        coco = f", or torchvision's {COCO_FILES[name]}" if name in COCO_FILES else ''
        raise UserError(f'{path} fits nothing in a {name}: none of its tensors has a name and shape of this model '
                        f"(it holds {short_names(state)}), it is another model's: pass a checkpoint of a {name}{coco}")
    model.load_state_dict(fits, strict=False)
    log(init_report(path, state, own, fits, num_classes))


def init_report(path, state, own, fits, num_classes):
    """`--init-from FILE: loaded N of M tensors; left as built ... (21 classes in the file, 6 here); unused from the
    file: ...`, the tensors named in groups. BatchNorm's counters are not counted: they hold no weights."""
    weights = [k for k in own if not k.endswith('.num_batches_tracked')]
    reshaped = [k for k in weights if k in state and k not in fits]
    left = []
    if reshaped:    # a head of another class count: its first dimension is the classes
        theirs = {state[k].shape[0] for k in reshaped
                  if state[k].dim() and own[k].dim() and own[k].shape[0] == num_classes}
        why = f'{theirs.pop()} classes in the file, {num_classes} here' if len(theirs) == 1 else 'other shapes there'
        left.append(f'{short_names(reshaped)} ({why})')
    absent = [k for k in weights if k not in state]
    if absent:
        left.append(f'{short_names(absent)} (not in the file)')
    unused = [k for k in state if k not in own and not k.endswith('.num_batches_tracked')]
    text = f'--init-from {path}: loaded {sum(k in fits for k in weights)} of {len(weights)} tensors; '
    text += f'left as built {", ".join(left)}' if left else 'nothing left as built'
    return text + (f'; unused from the file: {short_names(unused)}' if unused else '')


def short_names(names, most=4):
    """Tensor names grouped by their first part: written out where a group is small, else `part.* (count)`."""
    groups = {}
    for name in names:
        groups.setdefault(name.split('.')[0], []).append(name)
    return ', '.join(', '.join(group) if len(group) <= most else f'{first}.* ({len(group)})'
                     for first, group in groups.items())


# ------------------------------------------------------------------------------------------ file writes and checkpoints
def write_error(path, err, advice):
    """The one report of a failed write: a UserError with the file, the reason, the remedy that fits it and `advice`.
    The reason is the OSError behind err (torch's zip writer raises its own RuntimeError while one is handled)."""
    path, cause = Path(path), next((e for e in (err, err.__context__, err.__cause__) if isinstance(e, OSError)), err)
    code = getattr(cause, 'errno', None)
    blocker = next((p for p in (*reversed(path.parents), path) if p.is_file()), None) \
        if code in (errno.ENOTDIR, errno.EEXIST) else None
    remedy = ('free some disk space' if code in (errno.ENOSPC, errno.EDQUOT) else
              f'{blocker} is a file where a folder must be: move it' if blocker else
              f'make {next(p for p in path.parents if p.exists())} writable' if code in (errno.EACCES, errno.EPERM)
              else '')
    reason = getattr(cause, 'strerror', None) or error_line(cause)
    return UserError(f'cannot write {path} ({reason}): {remedy + ", or " if remedy else ""}{advice}')


def sync_folder(folder):
    """A rename is durable once the folder is fsynced: else a power cut can bring back the old file (or none).
    Windows opens no folder, some filesystems refuse its fsync (EINVAL): there the OS keeps the entry its own way."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:     # Windows: a folder is not a file to open
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomically(path, write, advice):
    """Every file the scripts write: write(f) fills a binary temporary file beside `path`, renamed over it once on
    disk: a kill, power cut, full disk or read-only folder leaves the old file whole (or none), never a partial one."""
    path = Path(path)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')      # two runs writing one file do not collide
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())    # the data on disk before the name points at it
        os.replace(tmp, path)
        sync_folder(path.parent)    # and the name on disk: a checkpoint is durable before the run goes on
    except BaseException as err:    # noqa: BLE001 - the partial file goes, whatever stopped the write
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(err, Exception):
            raise
        raise write_error(path, err, advice) from None


def save_checkpoint(obj, path):
    """torch.save through write_atomically: a failed save leaves the previous checkpoint whole and says so."""
    kept = f'; {path} still holds the last finished epoch' if Path(path).exists() else ''
    write_atomically(path, lambda f: torch.save(obj, f), f'pass --save a path on a disk with room{kept}: run the '
                     'same command with --resume to continue')


# --resume continues a run exactly, so every flag its checkpoint records must match, deny by default: a flag added later
# is refused until it is named here. These change where and how fast the same numbers are computed (another device,
# kernel, layout or worker count rounds differently or not at all; the recipe, the draws and the data stay) or where
# the file now lies. --amp is not among them: it changes the precision of every step, and fp16 keeps GradScaler state.
RESUME_MAY_CHANGE = ('workers', 'device', 'data_on_device', 'channels_last', 'cudnn_benchmark', 'compile',
                     'detect_anomaly', 'download', 'save')
# A stage's checkpoint may also see its own length extended (never below the epochs it finished) and what only a
# later stage uses; a fine-tune's base (--epochs, its --finetune-lr) is its recipe.
STAGE_MAY_CHANGE = {'train': ('epochs', 'finetune_epochs', 'finetune_lr'), 'finetune': ('finetune_epochs',)}
STAGE_EPOCHS = {'train': 'epochs', 'finetune': 'finetune_epochs'}
NOT_COMPARED = ('resume', 'flag_defaults')      # how a resume starts, and the bookkeeping below
# What a resume takes from its checkpoint: how the run started (--init-from cannot be given beside --resume).
RESUME_KEEPS = ('init_from',)
Change = collections.namedtuple('Change', 'key was now allowed recorded')


def flag_name(key):
    return {'pretrained': '--no-pretrained', 'stage': 'the stage', 'data_title': 'the data'}.get(
        key, '--' + key.replace('_', '-'))


def shown_value(value):
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, (list, tuple)):
        return ' '.join(map(shown_value, value))
    return 'unset' if value is None else f'{value:g}' if isinstance(value, float) else str(value)


def resume_changes(saved_config, config, finished=0):
    """What differs between a checkpoint's config and this run's, as Changes. A key the checkpoint lacks (it
    predates the flag) is taken as the flag's default (config['flag_defaults']): `recorded` False says so."""
    defaults, missing = config.get('flag_defaults') or {}, object()
    stage = config.get('stage', 'train')
    changes = []
    for key in [k for k in {**saved_config, **config} if k not in NOT_COMPARED]:
        recorded = key in saved_config
        was, now = saved_config.get(key, defaults.get(key, missing)), config.get(key, missing)
        if was == now and recorded:
            continue
        allowed = key in RESUME_MAY_CHANGE or key in STAGE_MAY_CHANGE.get(stage, ())
        if key == STAGE_EPOCHS.get(stage) and now is not missing:
            allowed = allowed and now >= finished
        changes.append(Change(key, None if was is missing else was, None if now is missing else now,
                              allowed or was == now, recorded))
    return changes


def check_resume(path, saved, config, say=True):
    """--resume's check of a checkpoint's state `saved` against this run's config: one UserError naming every
    refused change with both values, before anything is loaded; with `say`, one line naming the allowed ones."""
    stage = config.get('stage', 'train')
    changes = resume_changes(saved.get('config') or {}, config, saved.get('epoch', 0))

    def was(c):
        return f'was {shown_value(c.was)}' if c.recorded else \
            f'was not recorded (the checkpoint predates it: taken as its default, {shown_value(c.was)})'
    refused = [f'{flag_name(c.key)} {was(c)}, now {shown_value(c.now)}' + (
        f' (fewer than the {saved.get("epoch")} epochs it has finished)' if c.key == STAGE_EPOCHS.get(stage) else '')
        for c in changes if not c.allowed]
    if refused:
        raise UserError(f'--resume {path}: {"; ".join(refused)}: a resume continues exactly, so start a new --save, '
                        "or resume with the checkpoint's flags")
    moved = [f'{flag_name(c.key)} {shown_value(c.now)} (was {shown_value(c.was)})' for c in changes if c.recorded]
    predates = [flag_name(c.key) for c in changes if not c.recorded]
    if say and (moved or predates):
        log(f'resuming {path}' + (f' with {", ".join(moved)}' if moved else '') + (
            f'; it predates {", ".join(predates)}: taken as the default' if predates else ''))


def check_later_stage(path, config):
    """Refuses a resume whose later stage's checkpoint would refuse it, before the first stage trains on."""
    if Path(path).exists():
        check_resume(path, load_torch_file(path), config, say=False)


def best_path(path):
    """--keep-best's file beside a stage's checkpoint: my.pt -> my_best.pt, my_finetune.pt -> my_finetune_best.pt."""
    return Path(path).with_stem(Path(path).stem + '_best')


class Checkpoint:
    """One training stage's file, in plain types for torch.load(weights_only=True), with model_args to rebuild the
    model. Made before the model: `resuming` says whether an existing file is continued (its weights then replace the
    ImageNet ones, which are not loaded). `earlier`: the stage before's history (a fine-tune's curves continue it).
    `keep_best`: also *_best.pt, the epoch of the best test mIoU so far, written after the checkpoint (which records
    that epoch as `best`, so a resume mends a stop between the two writes).
    Checkpoint(None), the book's train_ch13 call: the history is kept, nothing is written or printed at the start."""

    def __init__(self, path, model_args=None, config=None, classes=None, resume=False, curves=None, earlier=(),
                 keep_best=False):
        self.path = None if path is None else Path(path)
        self.model, self.curves, self.earlier = None, curves, list(earlier)
        self.best_path = best_path(self.path) if keep_best and self.path is not None else None
        self.first_epoch = len(self.earlier)    # the run's epoch number of this stage's first
        self.state = dict(epoch=0, history=[], model_args=model_args,
                          num_classes=model_args and model_args['num_classes'])
        self.resuming = resume and self.path is not None and self.path.exists()
        if self.resuming:
            self.state = load_torch_file(self.path)
            saved_config = self.state.get('config') or {}
            if config is not None:
                config = dict(config, **{k: saved_config[k] for k in RESUME_KEEPS if k in saved_config})
            if self.state.get('model_args') != model_args:
                raise UserError(f'{path} was written for {self.state.get("model_args")}, this run builds '
                                f'{model_args}: pass the same flags, or another --save')
            if config is not None:
                check_resume(self.path, self.state, config)
            self.state.pop('kept_as', None)
            self.resume_best()
        elif self.path is not None and self.path.exists() and is_main_process():
            prev = self.path.with_name(self.path.stem + '.prev' + self.path.suffix)
            try:
                os.replace(self.path, prev)
            except OSError as err:
                raise write_error(prev, err, f'pass --resume to continue {path}, or another --save') from None
            log(f'{path} existed: kept as {prev} (use --resume to continue it instead)')
        self.saved = self.epoch     # the epochs the file on disk holds
        self.title = config and f'{recipe_title(config)} - {config["data_title"]}'
        self.state.update(config=config, classes=classes and classes._asdict())

    @property
    def epoch(self):
        return self.state['epoch']

    @property
    def history(self):
        return self.state['history']

    def resume_best(self):
        """A stop between end_epoch's two writes leaves *_best.pt behind the best epoch the checkpoint records: the
        checkpoint then holds that epoch, and the copy is written as end_epoch would have (the loaded state as is)."""
        best = self.state.get('best')
        if self.best_path is None or not best or not is_main_process():
            return
        kept = load_torch_file(self.best_path)['epoch'] if self.best_path.exists() else 0
        if kept >= best['epoch']:
            return
        if best['epoch'] != self.epoch:
            log(f'{self.best_path} lacks epoch {best["epoch"]} (its weights are gone): it keeps the best from here on')
            return
        save_checkpoint(dict(self.state, kept_as='best'), self.best_path)
        log(f'{self.best_path}: epoch {best["epoch"]} written (the run stopped before it)')

    def start(self, model, trainer, scaler, num_epochs, examples, amp):
        """The model's weights, the optimizer's (and GradScaler's) state when resuming; the stage's first line."""
        self.model, autocast_name = model, str(amp).replace('torch.', '') if amp else 'off'
        if self.resuming and self.state.get('autocast', autocast_name) != autocast_name:
            raise UserError(f'--resume {self.path}: mixed precision was {self.state["autocast"]}, now '
                            f'{autocast_name} (--amp follows --device unless given): pass --amp or --no-amp as it ran')
        if self.resuming:
            model.load_state_dict(self.state['model'])
        if self.state.get('optimizer'):
            trainer.load_state_dict(self.state['optimizer'])
        if scaler is not None and self.state.get('scaler'):
            scaler.load_state_dict(self.state['scaler'])
        if self.epoch:
            log(f'resuming {self.path} at epoch {self.epoch} of {num_epochs}')
        world, stage = world_size(), self.state['config'] and self.state['config']['stage']
        if self.title:
            log(f'{stage}: {self.title.replace(" - ", " on ", 1)}, {examples} training examples, device '
                f'{net_device(model)}{" x" + str(world) if world > 1 else ""}, amp {str(amp).replace("torch.", "")}')
        if self.epoch >= num_epochs:
            log(f'{self.path} has finished its {num_epochs} epochs')
        self.state.update(epochs=num_epochs, autocast=autocast_name)

    def end_epoch(self, trainer, scaler, record):
        """Adds the epoch's figures and writes the file (rank 0), then the best copy if this epoch beats the best so
        far (a tie keeps the earlier epoch; a NaN mIoU, no test batch, never counts), then the curves."""
        self.history.append(record)
        best, miou = self.state.get('best'), record['test_miou']
        improved = math.isfinite(miou) and (best is None or miou > best['test_miou'])
        if improved:
            self.state['best'] = dict(epoch=record['epoch'], test_miou=miou)
        self.state.update(epoch=record['epoch'], model=self.model.state_dict(), optimizer=trainer.state_dict(),
                          scaler=scaler.state_dict() if scaler is not None else None)
        if is_main_process() and self.path is not None:
            save_checkpoint(self.state, self.path)
            self.saved = self.epoch
            if improved and self.best_path is not None:
                save_checkpoint(dict(self.state, kept_as='best'), self.best_path)
            if self.curves:
                plot_history(self.earlier + self.history, self.curves, self.title, self.first_epoch)


# --------------------------------------------------------------------------------------------------- devices and models
def pick_device(name=None):
    """--device, else the GPU of this process (torchrun's LOCAL_RANK), else the CPU. A GPU becomes the current one,
    so that nothing lands on GPU 0 by default (a CUDA context there costs every process memory)."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device name: use cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {name} asked for a GPU but PyTorch sees none: use --device cpu')
        if device.index is None:
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    return device


def net_device(net):
    return next(net.parameters()).device


def setup_run(device=None, amp=None, channels_last=None, cudnn_benchmark=True, detect_anomaly=False, seed=0):
    """torchrun's process group and the seed of the initial weights (batches and crops draw from (seed, epoch));
    returns (device, mixed-precision dtype or None, channels_last), each default decided by the device."""
    device = pick_device(device)
    setup_distributed(device)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = cudnn_benchmark    # fixed crop shapes: timed once, reused
    torch.autograd.set_detect_anomaly(detect_anomaly)
    pyplot()    # imported now: a Ctrl-C in the middle of matplotlib's first import cannot be handled cleanly
    return device, amp_dtype(device, amp), device.type == 'cuda' if channels_last is None else channels_last


def place_model(model, device, channels_last=False, sync_bn=False, compile=False):
    """Moves the model to the device (in place, with its fast_layers) and returns what the loop runs: the model, wrapped
    in DistributedDataParallel under torchrun, compiled with compile=True. Checkpoints keep saving the model."""
    if sync_bn and world_size() > 1 and device.type == 'cuda':
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fast_layers(model).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    device_ids = [device.index] if device.type == 'cuda' else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids) if world_size() > 1 else model
    return torch.compile(net) if compile else net


def unwrapped(net):
    """The model inside what place_model returns (compiled: ._orig_mod; DistributedDataParallel: .module), or the
    book's DataParallel."""
    net = getattr(net, '_orig_mod', net)
    return net.module if isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else net


def open_model(path, device=None, amp=None):
    """A predict script's start: (net in eval mode, its checkpoint, the device, the mixed-precision dtype or None).
    Under torchrun the processes share the work: each evaluates its part of the split, the figures are summed."""
    device = pick_device(device)
    setup_distributed(device)
    return load_model(path, device) + (device, amp_dtype(device, amp))


def load_model(path, device):
    """A model rebuilt from its checkpoint alone: (net with its fast_layers, in eval mode on device; checkpoint)."""
    net, ckpt = rebuild_model(path)
    return fast_layers(net).to(device).eval(), ckpt


def rebuild_model(path):
    """(the checkpoint's model with the book's layers, on the CPU, in eval mode; the checkpoint dict)."""
    ckpt = load_torch_file(path)
    missing = [key for key in ('model_args', 'model', 'classes', 'config')
               if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise UserError(f'{path} is not a checkpoint written by these scripts (no {", ".join(missing)}): pass one '
                        'from origin_train.py or my_train.py')
    args = ckpt['model_args']
    net = build_model(**args)
    try:
        net.load_state_dict(ckpt['model'])
    except RuntimeError:
        raise UserError(f'{path}: its weights do not fit a {args["name"]} with {args["num_classes"]} classes '
                        '(an edited or foreign checkpoint): retrain, or pass the right file') from None
    return net.eval(), ckpt


def checkpoint_data(path, ckpt, kind=None, data_dir=None, demo=None, void_as_background=False, classes=None,
                    val_share=None):
    """The DataSource a checkpoint was trained on, with its class table, unless flags say otherwise (so `python
    my_predict.py` after `my_train.py --demo` needs none), checked against the classes the checkpoint predicts."""
    cfg = ckpt['config']
    if not demo and data_dir is None:
        demo, data_dir, val_share = cfg.get('demo'), cfg.get('data_dir'), val_share or cfg.get('val_share')
    data = find_data(kind or cfg.get('dataset', 'voc'), data_dir, demo, False,
                     void_as_background or bool(cfg.get('void_as_background')), classes, val_share)
    data = data if classes else data._replace(classes=checkpoint_classes(ckpt))
    if ckpt['num_classes'] != len(data.classes.names):
        raise UserError(f'{path} predicts {ckpt["num_classes"]} classes, {data.kind} has {len(data.classes.names)}: '
                        'pass the matching --dataset, --classes or checkpoint')
    return data


def checkpoint_classes(ckpt):
    """The class table a checkpoint predicts (its names and colours)."""
    return Classes(**ckpt['classes'])


# ---------------------------------------------------------------------------------------------------------- ONNX export
ONNX_PACKAGES = 'pip install onnx onnxruntime onnxscript'
ONNX_EXAMPLE = (2, 3, 100, 150)    # what the export traces; no side of 1, which torch.export special-cases
ONNX_CHECKS = ((1, 3, 97, 131), (2, 3, 150, 75))      # batch and sizes the file is checked on, none a multiple
ONNX_TOLERANCE = 1e-4   # the largest difference from PyTorch, relative to the largest logit


class ImageToLogits(nn.Module):
    """What the ONNX file computes: float RGB images in [0, 1], (N,3,H,W) of any batch and size -> class logits
    (N,C,H,W). The ImageNet normalisation and run_padded's padding and crop are inside, so that a program without
    PyTorch feeds the image as read. Only the main head's scores are returned: DeepLabV3's auxiliary head, a training
    aid, computes nothing the output needs, and the exporter leaves it out of the file."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        imagenet_stats(torch.device('cpu'))     # cached now: made under the export, they would be its fake tensors

    def forward(self, image):
        return predict_scores(self.net, normalize_image(image))


def export_onnx(ckpt_path, onnx_path):
    """--export-onnx: the checkpoint's model as ImageToLogits in an ONNX file, batch, height and width dynamic.
    The book's layers are exported (ONNX's ConvTranspose and Resize, which every runtime has), not the speed layers
    (fast_layers); onnxruntime runs the file on ONNX_CHECKS against PyTorch with the speed layers, as the predict
    scripts run it. A file that fails the check is never written; the write is atomic."""
    try:
        import onnx  # noqa: F401 - torch.onnx's exporter needs both
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(f'--export-onnx needs onnx, onnxruntime and onnxscript: {ONNX_PACKAGES}') from None
    net, ckpt = rebuild_model(ckpt_path)
    dims = {'image': {0: torch.export.Dim('batch'), 2: torch.export.Dim('height'), 3: torch.export.Dim('width')}}
    with contextlib.redirect_stdout(io.StringIO()):     # the exporter's progress lines
        program = torch.onnx.export(ImageToLogits(net).eval(), (torch.rand(ONNX_EXAMPLE),), dynamo=True,
                                    input_names=['image'], output_names=['logits'], dynamic_shapes=dims)
    proto = program.model_proto
    proto.metadata_props.add(key='classes', value=json.dumps(ckpt['classes']))     # names and colours, for a program
    model = proto.SerializeToString()
    session = onnxruntime.InferenceSession(model, providers=['CPUExecutionProvider'])
    worst, scale = onnx_difference(session, ImageToLogits(fast_layers(net)).eval())
    line = (f'onnxruntime vs PyTorch on {" and ".join("x".join(map(str, s)) for s in ONNX_CHECKS)}: max abs '
            f'difference {worst:.2e}, relative {worst / scale:.2e}')
    if worst > ONNX_TOLERANCE * scale:
        raise UserError(f'{ckpt_path}: the ONNX export differs from PyTorch ({line}): nothing written; report it')
    write_atomically(onnx_path, lambda f: f.write(model), 'pass --export-onnx a path in a writable folder')
    log(f'wrote {onnx_path} ({ckpt["model_args"]["name"]}, {ckpt["num_classes"]} classes; {line})')


def onnx_difference(session, model):
    """(max abs difference between the session's logits and the model's on ONNX_CHECKS, max abs logit)."""
    worst, scale = 0.0, 0.0
    for k, shape in enumerate(ONNX_CHECKS):
        image = torch.rand(shape, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            expected = model(image)
        try:
            got = torch.from_numpy(session.run(None, {'image': image.numpy()})[0])
        except Exception as err:    # noqa: BLE001 - onnxruntime's own errors have no common base class
            raise UserError(f'the ONNX export fails on {"x".join(map(str, shape))} ({error_line(err)}): nothing '
                            'written; report it') from None
        if got.shape != expected.shape:
            raise UserError(f'the ONNX export gives {tuple(got.shape)} for {"x".join(map(str, shape))}, PyTorch '
                            f'{tuple(expected.shape)}: nothing written; report it')
        worst, scale = max(worst, float((got - expected).abs().max())), max(scale, float(expected.abs().max()))
    return worst, scale


# ------------------------------------------------------------------------------------------------------------- pictures
def pyplot():
    import matplotlib
    matplotlib.use('Agg')       # files only: works with no screen, in workers and over ssh
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, advice):
    try:
        write_atomically(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:], dpi=100, bbox_inches='tight'),
                         advice)
    finally:
        pyplot().close(fig)


def plot_history(history, path, title, stage_start=0):
    """Training curves, redrawn after every epoch so an interrupted run still has its picture. A fine-tune's epochs
    follow the first `stage_start` ones behind a dashed line labelled with its lr: the jump it gives shows."""
    x = list(range(1, len(history) + 1))
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(10, 3.5))
    for ax in (ax1, ax2):
        ax.set_xlabel('epoch')
        if stage_start:
            ax.axvline(stage_start + 0.5, color='grey', linestyle='--', linewidth=1)
    if stage_start and len(history) > stage_start:
        ax2.text(stage_start + 0.5, 0.03, f' fine-tune, lr {history[stage_start]["lr"]:g}', color='grey', fontsize=8)
    ax1.plot(x, [h['loss'] for h in history], label='train loss (per example)')
    for key, name in (('train_acc', 'train acc'), ('test_acc', 'test acc'), ('test_miou', 'test mIoU')):
        ax2.plot(x, [h[key] for h in history], label=name)
    ax2.set_ylim(0, 1)
    ax1.legend()
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, "run the script from a folder where pictures/ can be written; this epoch's checkpoint is "
                'written: run the same command with --resume to continue')


def recipe_title(config):
    """A picture title from a checkpoint's config: what was trained, how."""
    text = f'{config["model"]} {config["optimizer"]} lr {config["lr"]:g}, {config["epochs"]} ep'
    if config.get('stage') == 'finetune':
        text += f' + {config["finetune_epochs"]} ep at {config["finetune_lr"]:g}'
    extras = [f'{k} {config[k]}' for k in ('loss', 'norm') if config.get(k) not in (None, 'ce', 'batch')]
    extras += [f'{k} {config[k]:g}' for k in ('cutmix', 'copyblob') if config.get(k)]
    extras += [f'from {Path(config["init_from"]).name}'] if config.get('init_from') else []
    return text + (f' ({", ".join(extras)})' if extras else '')


def metrics_for_title(ckpt_path, ckpt):
    """A picture title's figures: full-resolution results if --eval wrote them, else the last epoch's crops; a
    --keep-best file says which epoch it holds."""
    path = results_path(ckpt_path, '.json')
    best = f', best epoch {ckpt["epoch"]} of {ckpt.get("epochs")}' if ckpt.get('kept_as') == 'best' else ''
    if path.exists():
        r = json.loads(path.read_text())
        return f'val acc {r["pixel_acc"]:.3f}, mIoU {r["miou"]:.3f}{best}'
    if ckpt['history']:
        h = ckpt['history'][-1]
        return f'val crops: acc {h["test_acc"]:.3f}, mIoU {h["test_miou"]:.3f}{best}'
    return 'untrained'


def picture_crop(config):
    """The pictures' crop: the training crop (the book's); for the demo its smallest image (its crop halves shapes)."""
    return DEMO_MIN_SIZE if config.get('demo') else config['crop_size']


# ---------------------------------------------------------------------------------------------------------------- flags
def parse_with_demo(parser, demo):
    """parser.parse_args(); with --demo, parsed again with the script's `demo` recipe as defaults (flags given still
    win). --backbone-weights is used even where the recipe trains from scratch; beside --no-pretrained: an error.
    --init-from starts a new run from a file's weights: beside --resume or --backbone-weights, an error.
    args.flag_defaults: every flag's default (the recipe's, or --demo's), for check_resume."""
    args = parser.parse_args()
    if args.demo:
        parser.set_defaults(**demo)
        args = parser.parse_args()
    if getattr(args, 'init_from', None) and args.resume:
        raise UserError('--init-from and --resume contradict each other: --resume continues the checkpoint at --save '
                        '(an interrupted --init-from run too), --init-from starts a new run: drop one')
    if getattr(args, 'init_from', None) and args.backbone_weights:
        raise UserError('--init-from and --backbone-weights contradict each other: the --init-from file holds the '
                        'backbone too: drop one')
    if getattr(args, 'backbone_weights', None) and not args.pretrained:
        if '--no-pretrained' in sys.argv:
            raise UserError('--backbone-weights and --no-pretrained contradict each other: drop one')
        args.pretrained = True
    # recorded with the config: a resume takes a flag its checkpoint predates as the flag's default
    args.flag_defaults = {a.dest: parser.get_default(a.dest) for a in parser._actions if a.dest != 'help'}
    return args


def add_data_args(parser, dataset_default='voc'):
    g = parser.add_argument_group('data and machine')
    g.add_argument('--data-dir', metavar='DIR', help="the dataset's folder, see --dataset (default: VOC2012, "
                   'VOCdevkit/VOC2012 or data/VOCdevkit/VOC2012 next to the scripts)')
    g.add_argument('--download', action='store_true', help='fetch VOCtrainval_11-May-2012.tar (2 GB) into data/ (or '
                   '--data-dir) unless it is there, check and unpack it; resumes on rerun (default: off)')
    g.add_argument('--demo', nargs='?', const='voc', choices=['voc', 'folder'], help='a small synthetic dataset in '
                   'data/demo/ (VOC layout, or --demo folder) and a CPU-sized recipe (default: off)')
    g.add_argument('--dataset', choices=['voc', 'cityscapes', 'folder'], default=dataset_default, help='voc: the '
                   "VOC layout, or labelme2voc's (class_names.txt); cityscapes: DIR/leftImg8bit/ and DIR/gtFine/; "
                   'folder: DIR/images/{train,val}/, '
                   f'DIR/masks/{{train,val}}/, DIR/classes.txt (default: {dataset_default or "from the checkpoint"})')
    g.add_argument('--classes', metavar='FILE', help='`name` or `name R G B` lines, a class_dict.csv or a labelmap.txt '
                   "(default: DIR/labelmap.txt, else VOC's 21; folder: DIR/classes.txt; labelme: DIR/class_names.txt; "
                   "predict: the checkpoint's)")
    g.add_argument('--val-share', type=float, metavar='SHARE', help='a CVAT export with only ImageSets/Segmentation/'
                   'default.txt, or a labelme export: hold this share out as val, e.g. 0.2 (default: none, train.txt '
                   f'and val.txt are read; labelme: {LABELME_VAL_SHARE:g})')
    g.add_argument('--device', help='cpu, cuda or cuda:N (default: the GPU if there is one, else the CPU)')
    g.add_argument('--workers', type=int, help=f'DataLoader workers (default: min(4, CPUs), here {default_workers()})')
    g.add_argument('--seed', type=int, default=0, help='seed for weights, batch order and crops (default: 0)')
    g.add_argument('--void-as-background', action='store_true', help="the book's handling of VOC's void border "
                   '(255): counted as background instead of ignored (default: ignored)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, help='bf16/fp16 autocast (default: on with CUDA)')


def add_recipe_args(parser, epochs, lr, weight_decay, batch_size, crop_size, save, demo):
    """The recipe's flags, defaulting to the script's constants; `demo` is the script's --demo override."""
    def shown(value):       # a crop as H W
        return ' '.join(map(shown, value)) if isinstance(value, list) else f'{value:g}'

    def default(key, value):
        return f'default: {shown(value)}' + (f'; --demo: {shown(demo[key])}' if key in demo else '')
    g = parser.add_argument_group('recipe (the constants at the top of the script)')
    g.add_argument('--epochs', type=int, default=epochs, help=default('epochs', epochs))
    g.add_argument('--lr', type=float, default=lr, help=f'learning rate ({default("lr", lr)})')
    g.add_argument('--weight-decay', type=float, default=weight_decay, help=default('weight_decay', weight_decay))
    g.add_argument('--batch-size', type=int, default=batch_size, help='examples per update, over all processes ('
                   + default('batch_size', batch_size) + ')')
    g.add_argument('--crop-size', type=int, nargs=2, default=crop_size, metavar=('H', 'W'),
                   help=f'random training crop ({default("crop_size", crop_size)})')
    g.add_argument('--no-pretrained', dest='pretrained', action='store_false', help='random backbone weights '
                   '(default: ImageNet weights; --demo: random)')
    g.add_argument('--backbone-weights', help='the ImageNet backbone file, e.g. resnet18-f37072fd.pth, used with '
                   "--demo too (default: that file next to the scripts, else torchvision's cache or download)")
    g.add_argument('--init-from', metavar='FILE', help="start from a trained model: a checkpoint of these scripts "
                   "(any classes) or torchvision's deeplabv3_resnet50_coco-cd0a2569.pth / "
                   'deeplabv3_resnet101_coco-586e9e4e.pth; tensors of matching name and shape are loaded, a head of '
                   'other classes starts anew (default: none, the ImageNet backbone)')
    g.add_argument('--save', default=save, help=f'checkpoint path (default: {save})')
    g.add_argument('--resume', action='store_true', help='continue the checkpoint(s) at --save to the planned '
                   'epochs with the same recipe flags (default: start anew; an existing checkpoint is kept as '
                   '*.prev.pt)')
    g.add_argument('--keep-best', action='store_true', help='also keep *_best.pt beside each checkpoint: the epoch '
                   'with the best test mIoU (default: off)')
    return g


def add_speed_args(parser):
    s = parser.add_argument_group('speed and scale')
    s.add_argument('--accum-steps', type=int, default=1, help='gradient accumulation: --batch-size 32 '
                   '--accum-steps 4 runs micro-batches of 8 with the update of 32 (default: 1)')
    s.add_argument('--data-on-device', choices=['auto', 'on', 'off'], default='auto', help='keep decoded splits '
                   'on the device; off: DataLoader workers (default: auto: on if they fit in 1/4 of free GPU memory)')
    s.add_argument('--channels-last', action=argparse.BooleanOptionalAction, help='default: on with CUDA')
    s.add_argument('--cudnn-benchmark', action=argparse.BooleanOptionalAction, default=True,
                   help='cuDNN times its algorithms for the training shape (default: on; its first step takes seconds)')
    s.add_argument('--compile', action='store_true', help='torch.compile the model (default: off)')
    s.add_argument('--sync-bn', action='store_true', help='with torchrun on GPUs: SyncBatchNorm (default: off)')
    s.add_argument('--detect-anomaly', action='store_true', help='find the operation behind a NaN (slow; default: off)')


def add_predict_args(parser, checkpoint, picture):
    """The flags of both predict scripts; `checkpoint` and `picture` are the script's defaults (as help text)."""
    add_data_args(parser, dataset_default=None)
    parser.add_argument('inputs', nargs='*', help='image files or folders to segment: colour, overlay and label-id '
                        'PNGs go to --out-dir, one image at a time (default: none; the val pictures are drawn)')
    parser.add_argument('--checkpoint', help=f'default: {checkpoint}')
    parser.add_argument('--export-onnx', metavar='FILE', help='write the model to FILE in ONNX (float RGB in [0, 1] '
                        'of any batch and size -> logits), check it with onnxruntime, and stop (default: off)')
    parser.add_argument('--eval', action='store_true', help='metrics over the whole val split at original size: '
                        'table on stdout, *_results.txt/.json and *_confusion.png beside the checkpoint (default: off)')
    parser.add_argument('--mst', action='store_true', help='multi-scale + flip inference (default: off)')
    parser.add_argument('--scales', type=float, nargs='+', default=list(MST_SCALES),
                        help=f'scales for --mst (default: {" ".join(map(str, MST_SCALES))})')
    parser.add_argument('--mst-mode', choices=MST_MODES, default=MST_MODES[0], help='softmax: probabilities '
                        f"averaged; tutorial: raw scores averaged, as the tutorial's code (default: {MST_MODES[0]})")
    parser.add_argument('--test-size', type=int, nargs=2, metavar=('H', 'W'), help='resize the images to H W, the '
                        "scores back (the tutorial's Cityscapes evaluation; default: original size)")
    tiles = parser.add_mutually_exclusive_group()
    tiles.add_argument('--tile', type=int, nargs=2, metavar=('H', 'W'), help='predict every image window by window '
                       "(sliding windows, overlapping scores averaged; default: windows of the checkpoint's training "
                       f'crop, on images over {TILE_ABOVE_PIXELS} pixels only)')
    tiles.add_argument('--whole-image', action='store_true', help='never tile: the net sees each image whole, '
                       'however large (default: off)')
    parser.add_argument('--tile-overlap', type=overlap_fraction, default=TILE_OVERLAP, metavar='FRACTION',
                        help=f'how much of a window its neighbour covers, 0 to below 1 (default: {TILE_OVERLAP:.3g})')
    parser.add_argument('--write-split', action='store_true', help='segment all val images to --out-dir (default: off)')
    parser.add_argument('--out-dir', default='predictions', help='where segmented images go (default: predictions)')
    parser.add_argument('--picture', default=picture, help=f'the val picture (default: {picture})')
    parser.add_argument('--num-images', type=int, default=4, help='val images in the pictures (default: 4, the book)')


def overlap_fraction(text):
    """--tile-overlap's type: a fraction of a window, 0 (windows side by side) to below 1 (a stride of 0)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f'{text}: a fraction of a window, at least 0 and below 1')
    return value


def predict_tiling(config, tile=None, overlap=TILE_OVERLAP, whole_image=False):
    """The predict flags' Tiling: --tile's windows on every image; without it windows of the checkpoint's training
    crop (mmsegmentation's slide mode uses its crop size) on images too large to go whole; none with --whole-image."""
    if tile and min(tile) < 1:
        raise UserError(f'--tile {tile[0]} {tile[1]}: a window needs at least one pixel a side')
    mode = 'off' if whole_image else 'on' if tile else 'auto'
    return Tiling(tuple(tile or config['crop_size']), overlap, mode)


def check_training_flags(model, crop_size, batch_size, accum_steps, epochs, outputs=()):
    """Fail before hours of training, not after: flags that cannot work together, output folders that refuse writes."""
    for folder in {Path(path).parent for path in outputs}:
        probe = folder / f'.write_test_{os.getpid()}'
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b'')
            probe.unlink()
        except OSError as err:
            raise write_error(folder, err, 'pass a path in a writable folder') from None
    if model == 'fcn' and any(side % NET_STRIDE for side in crop_size):
        raise UserError(f'--crop-size {crop_size[0]} {crop_size[1]}: the FCN needs multiples of {NET_STRIDE} (its '
                        'transposed conv upsamples exactly 32x; the book uses 320 480)')
    for flag, value, least in (('--epochs', epochs, 0), ('--batch-size', batch_size, 1),
                               ('--accum-steps', accum_steps, 1)):
        if value < least:
            raise UserError(f'{flag} {value}: it must be {least} or more')
    if batch_size % (accum_steps * world_size()):
        raise UserError(f'--batch-size {batch_size} must be a multiple of --accum-steps times the number of '
                        f'processes ({accum_steps} x {world_size()})')


# --------------------------------------------------------------------------------------------------- the demo generator
DEMO_DIR = DATA_DIR / 'demo' / 'VOC2012'
DEMO_FOLDER = DATA_DIR / 'demo' / 'folder'                  # the same demo data, laid out as a user's own
DEMO_MIN_SIZE = (80, 112)       # the demo's smallest regular image: its pictures show this much of each
DEMO_CLASSES = (1, 3, 7, 8, 15)  # aeroplane, bird, car, cat, person: simple shapes a small net learns in minutes


def _draw_object(cls, cx, cy, s, size, rng):
    """Return (part mask: 0 outside, 1 main part, 2 secondary part, main colour, secondary colour)."""
    m = Image.new('L', size, 0)
    d = ImageDraw.Draw(m)

    def jit(color):     # each object's colour varies a little
        return np.clip(np.array(color) + rng.integers(-20, 21, 3), 0, 255)
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
    dh = np.pad(lab[:, 1:] != lab[:, :-1], ((0, 0), (1, 1)))    # a change between columns j-1 and j at [:, j]
    dv = np.pad(lab[1:] != lab[:-1], ((1, 1), (0, 0)))
    lab[dh[:, 1:] | dh[:, :-1] | dv[1:] | dv[:-1]] = 255
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    return img, lab


def make_demo_voc(root=DEMO_DIR, num_train=120, num_val=40, seed=0, min_size=DEMO_MIN_SIZE, max_size=(128, 160),
                  num_small=4, sizes=None):
    """Write (once, deterministically) a synthetic dataset in the exact VOC2012 layout under root. A few images are
    smaller than the demo crop: every code path of the real dataset runs on it. `sizes`: (h, w) to draw from instead."""
    root = Path(root)
    marker, split_dir = root / '.demo_complete', root / 'ImageSets' / 'Segmentation'
    if marker.exists() and (split_dir / 'val.txt').exists():
        return root
    for folder in (root / 'JPEGImages', root / 'SegmentationClass', split_dir):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pil_palette = palette(VOC_COLORMAP).reshape(-1).tolist()
    for split, n, first in (('train', num_train, 1), ('val', num_val, num_train + 1)):
        small = set(rng.choice(n, min(num_small, n), replace=False).tolist())
        ids = [f'demo_{first + i:06d}' for i in range(n)]
        for i, name in enumerate(ids):
            h, w = sizes[int(rng.integers(len(sizes)))] if sizes else \
                [int(rng.integers(low, high + 1)) for low, high in zip(min_size, max_size)]
            if i in small:  # below a 64x96 crop in one dimension, so crop filters have work to do
                h, w = (48, w) if sorted(small).index(i) % 2 == 0 else (h, 80)
            img, lab = _make_pair(h, w, rng)
            Image.fromarray(img).save(root / 'JPEGImages' / f'{name}.jpg', quality=95)
            p = Image.frombytes('P', (w, h), lab.tobytes())  # raw indices, no colour conversion
            p.putpalette(pil_palette)
            p.save(root / 'SegmentationClass' / f'{name}.png')
        (split_dir / f'{split}.txt').write_text('\n'.join(ids) + '\n')
    marker.write_text('ok\n')      # written last: an interrupted run has no marker and is redone
    return root


# The folder demo's own class table: the same five shapes under their own names and colours.
DEMO_FOLDER_CLASSES = Classes(['background', 'plane', 'bird', 'car', 'cat', 'person'],
                              [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]])


def make_demo_folder(root=DEMO_FOLDER):
    """The demo data (once) as a user's own: images/, RGB masks (void borders in VOC's void colour), classes.txt."""
    root = Path(root)
    if (root / '.demo_complete').exists():
        return root
    voc = make_demo_voc(DEMO_DIR)
    to_folder = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    to_folder[[0, *DEMO_CLASSES]] = torch.arange(len(DEMO_CLASSES) + 1)
    colors = palette(DEMO_FOLDER_CLASSES.colors)
    for split, is_train in (('train', True), ('val', False)):
        for folder in ('images', 'masks'):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for image, label in voc_files(voc, is_train).items:
            shutil.copy(image, root / 'images' / split / image.name)
            Image.fromarray(colors[to_folder[read_label(label)]].numpy()).save(root / 'masks' / split / label.name)
    (root / 'classes.txt').write_text(''.join(f'{name} {r} {g} {b}\n' for name, (r, g, b) in zip(*DEMO_FOLDER_CLASSES)))
    (root / '.demo_complete').write_text('ok\n')     # written last: an interrupted run has no marker and is redone
    return root
