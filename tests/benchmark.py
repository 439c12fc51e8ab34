"""Speed and memory figures for the README: a script, not a test (pytest does not collect it).

    python tests/benchmark.py                      # everything, on the GPU if there is one
    python tests/benchmark.py --device cuda --compile
    python tests/benchmark.py --quick              # tiny sizes: checks that it all runs (1-2 minutes on 2 CPU cores)
    python tests/benchmark.py --parts loader       # only the loader's memory / throughput (CPU-bound)
    python tests/benchmark.py --parts recipe --baseline 447185c     # whole recipes, against an older commit

It prints a table and writes it to benchmark_results.md (--out), naming the machine. Five parts
(accuracy and recipe only when asked for):
  loader  one training epoch of VOCSegDataset through make_loader (lazy: file names in memory, decoding in the
          workers) against the book's way (the whole split read into memory and normalised to float32 tensors up
          front, labels as RGB images, its 256**3 colour table), at two dataset sizes of synthetic VOC-sized
          (500x375) images. Each measurement runs in a fresh process, so each peak is its own: peak RSS of the main
          process, of the largest DataLoader worker (getrusage RUSAGE_CHILDREN), and the peak of the process
          tree's total PSS (shared pages counted once), sampled from /proc every 50 ms.
  train   training images/s of fcn and resnet_unet: the book's plain loop (float32 images and int64 labels from
          pageable memory, fp32, NCHW) against the fast path (uint8 images and labels as make_loader gives them,
          pinned on CUDA, normalised and widened on the device; mixed precision per some_define.amp_dtype,
          channels_last, cudnn.benchmark, optionally torch.compile). Synthetic batches: the model step only.
  infer   ms per 500x375 image: one forward pass against multi-scale (8 scales) + flip inference.
  accuracy  does the fast path learn as well? origin_train.py and my_train.py --demo, each run plain
          (--no-amp --no-channels-last) and fast (--amp --channels-last) with a few seeds (--seeds), every
          checkpoint then evaluated the same way (fp32, whole demo val split at original size). The seeds give
          the noise to judge the difference by. Not in the default parts: it trains 4 x seeds models. With
          --baseline, the baseline's code trains the same demo recipes too, evaluated alike.
  recipe  whole recipes as a user runs them: origin_train.py (--epochs, default the book's 30) then my_train.py
          (--epochs + --finetune-epochs, default 30 + 10) on synthetic data with VOC's counts (--images 1464
          training, 1449 validation) and a VOC-like size mix (76% of the images at least 320x480, as the book's
          1114 of 1464). Wall time from the command's start to its last checkpoint, split into start-up and data
          preparation, the first epoch's extra time (warm-up), steady training and evaluation (from the per-epoch
          times the checkpoints record), and training images/s. Each recipe runs with this code's defaults, with
          --data-on-device off (streaming), and with --baseline's code (an older commit or checkout), in one run.
"""
import argparse
import concurrent.futures
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import my_train  # noqa: E402  (the recipes, as the scripts write them)
import origin_train  # noqa: E402
import some_define as sd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOC_HW = (375, 500)         # a typical VOC image: 500x375 (width x height)
# VOC's mix of sizes, roughly: 70% 500x375, 6% 500x333 (both kept by a 320x480 crop), 18% portrait 375x500 and 6%
# 500x281 (both dropped): 76% kept, as the book's 1114 of 1464.
VOC_SIZE_MIX = [(375, 500)] * 35 + [(333, 500)] * 3 + [(500, 375)] * 9 + [(281, 500)] * 3
MARK = 'BENCHMARK_JSON '


# ---------------------------------------------------------------------------------------------- machine and memory
def machine_description(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    cores = os.cpu_count()
    with contextlib.suppress(AttributeError):
        cores = f'{len(os.sched_getaffinity(0))} usable of {os.cpu_count()}'
    mem = ''
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(next(l for l in Path('/proc/meminfo').read_text().splitlines() if l.startswith('MemTotal')).split()[1])
        mem = f', {kb / 2 ** 20:.0f} GiB RAM'
    gpu = 'none'
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device if device.type == 'cuda' else 0)
        gpu = f'{p.name} ({p.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}'
    load = ''
    with contextlib.suppress(OSError, AttributeError):
        load = f'; load average {os.getloadavg()[0]:.1f} at the start'
    return (f'CPU: {cpu}, {cores} cores{mem}; GPU: {gpu}; torch {torch.__version__} (intra-op '
            f'threads: {torch.get_num_threads()}), torchvision {torchvision.__version__}, '
            f'Python {platform.python_version()}{load}')


def _proc_children(pid):
    kids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f'/proc/{entry}/stat').read_text()
                if int(stat.rsplit(')', 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


def _proc_memory_kb(pid):
    """(rss, pss) in kB from /proc/pid/smaps_rollup; (0, 0) when the process has gone."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines():
            if line.startswith('Rss:'):
                rss = int(line.split()[1])
            elif line.startswith('Pss:'):
                pss = int(line.split()[1])
    return rss, pss


class TreeMemorySampler(threading.Thread):
    """Peak total PSS (and RSS) of this process and its children, sampled every `interval` seconds."""

    def __init__(self, interval=0.05):
        super().__init__(daemon=True)
        self.interval, self.peak_pss_kb, self.peak_rss_kb = interval, 0, 0
        self.stop_event = threading.Event()

    def sample(self):
        me = os.getpid()
        totals = [_proc_memory_kb(p) for p in [me] + _proc_children(me)]
        self.peak_rss_kb = max(self.peak_rss_kb, sum(r for r, _ in totals))
        self.peak_pss_kb = max(self.peak_pss_kb, sum(p for _, p in totals))

    def run(self):
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join()
        self.sample()


def mib(kb):
    return f'{kb / 1024:,.0f} MiB'


# ---------------------------------------------------------------------------------------------------------- loader
class BookVOCSegDataset(torch.utils.data.Dataset):
    """d2l's VOCSegDataset as the book writes it: the split read and normalised in __init__ and kept in memory."""

    def __init__(self, is_train, crop_size, voc_dir):
        self.transform = torchvision.transforms.Normalize(mean=sd.IMAGENET_MEAN, std=sd.IMAGENET_STD)
        self.crop_size = crop_size
        features, labels = sd.read_voc_images(voc_dir, is_train=is_train)
        self.features = [self.normalize_image(feature) for feature in self.filter(features)]
        self.labels = self.filter(labels)
        self.colormap2label = book_colormap2label()
        print('read ' + str(len(self.features)) + ' examples')

    def normalize_image(self, img):
        return self.transform(img.float() / 255)

    def filter(self, imgs):
        return [img for img in imgs if img.shape[1] >= self.crop_size[0] and img.shape[2] >= self.crop_size[1]]

    def __getitem__(self, idx):
        feature, label = sd.voc_rand_crop(self.features[idx], self.labels[idx], *self.crop_size)
        return feature, book_label_indices(label, self.colormap2label)

    def __len__(self):
        return len(self.features)


def book_colormap2label():
    colormap2label = torch.zeros(256 ** 3, dtype=torch.long)
    for i, colormap in enumerate(sd.VOC_COLORMAP):
        colormap2label[(colormap[0] * 256 + colormap[1]) * 256 + colormap[2]] = i
    return colormap2label


def book_label_indices(colormap, colormap2label):
    colormap = colormap.permute(1, 2, 0).numpy().astype('int32')
    idx = ((colormap[:, :, 0] * 256 + colormap[:, :, 1]) * 256 + colormap[:, :, 2])
    return colormap2label[idx]


def loader_child(args):
    """One loader measurement in this (fresh) process; prints one JSON line."""
    sampler = TreeMemorySampler()
    sampler.start()
    start = time.perf_counter()
    if args.mode == 'book':
        dataset = BookVOCSegDataset(True, tuple(args.crop), args.root)
        loader = torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers)
    else:
        dataset = sd.VOCSegDataset(True, tuple(args.crop), args.root, normalize=False)
        loader = sd.make_loader(dataset, args.batch_size, True, seed=0, num_workers=args.workers)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    images = 0
    for X, y in loader:
        images += X.shape[0]
    epoch = time.perf_counter() - start
    del loader, X, y             # shuts the (persistent) workers down and reaps them: RUSAGE_CHILDREN sees them
    gc.collect()
    time.sleep(0.2)
    sampler.stop()
    result = dict(mode=args.mode, dataset=len(dataset), images=images, setup_s=setup, epoch_s=epoch,
                  main_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  worker_rss_kb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  tree_pss_kb=sampler.peak_pss_kb, tree_rss_kb=sampler.peak_rss_kb)
    print(MARK + json.dumps(result), flush=True)


def make_data(data_root, n):
    root = Path(data_root) / f'voc_{n}' / 'VOC2012'
    t = time.perf_counter()
    sd.make_demo_voc(root, num_train=n, num_val=8, min_size=VOC_HW, max_size=VOC_HW, num_small=0)
    if time.perf_counter() - t > 1:
        print(f'  generated {n} synthetic {VOC_HW[1]}x{VOC_HW[0]} images in {time.perf_counter() - t:.0f} s',
              flush=True)
    return root


def run_loader_part(args, cfg, data_root):
    rows = []
    for n in cfg['sizes']:
        root = make_data(data_root, n)
        for mode in ('lazy', 'book'):
            cmd = [sys.executable, str(Path(__file__).resolve()), '--child-loader', '--root', str(root), '--mode',
                   mode, '--batch-size', str(cfg['loader_batch']), '--crop', *map(str, cfg['loader_crop']),
                   '--workers', str(args.workers)] + (['--threads', str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith(MARK)), None)
            if proc.returncode != 0 or line is None:
                print(f'  loader {mode} on {n} images failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}')
                continue
            r = json.loads(line[len(MARK):])
            r['rate'] = r['images'] / r['epoch_s'] if r['epoch_s'] > 0 else float('nan')
            rows.append(r)
            print(f'  loader {mode:4} {n:5} images: {r["rate"]:7.1f} images/s, setup {r["setup_s"]:.1f} s, '
                  f'main RSS {mib(r["main_rss_kb"])}, tree PSS {mib(r["tree_pss_kb"])}', flush=True)
    names = {'lazy': 'lazy (make_loader, uint8)', 'book': "book's (in-memory float32)"}
    table = ['| loader | dataset images | epoch images/s | setup s | peak RSS main | peak RSS largest worker '
             '| peak PSS all processes |', '|---|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        table.append(f'| {names[r["mode"]]} | {r["dataset"]} | {r["rate"]:.1f} | {r["setup_s"]:.1f} | '
                     f'{mib(r["main_rss_kb"])} | {mib(r["worker_rss_kb"]) if args.workers else "-"} | '
                     f'{mib(r["tree_pss_kb"])} |')
    note = (f'One training epoch, batch {cfg["loader_batch"]}, crop {cfg["loader_crop"][0]}x{cfg["loader_crop"][1]}, '
            f'{args.workers} DataLoader workers for both, synthetic {VOC_HW[1]}x{VOC_HW[0]} JPEG/PNG pairs; each row '
            'a fresh process. Lazy batches are uint8 (normalised later on the device); the book\'s are float32 and '
            'its setup reads and normalises the whole split (plus its 128 MiB 256**3 colour table). RSS counts '
            'shared pages in every process; PSS shares them out, so the last column is the real total.')
    return '## Loader\n\n' + note + '\n\n' + '\n'.join(table) + '\n'


# ----------------------------------------------------------------------------------------------------------- train
def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure_train(model_name, fast, device, batch, crop, steps, warmup, use_compile):
    torch.manual_seed(0)
    model = sd.fast_layers(sd.build_model(model_name, num_classes=21)).to(device)     # as the scripts place it
    amp = sd.amp_dtype(device) if fast else None
    channels_last = fast
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if (fast and use_compile) else model
    if model_name == 'fcn':     # each model with its script's optimizer
        trainer = torch.optim.SGD(model.parameters(), lr=origin_train.LR, weight_decay=origin_train.WD)
    else:
        trainer = torch.optim.Adam(model.parameters(), lr=my_train.LR, weight_decay=my_train.WD)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    torch.backends.cudnn.benchmark = fast
    images = torch.randint(0, 256, (batch, 3) + tuple(crop), dtype=torch.uint8)
    labels = torch.randint(0, 21, (batch,) + tuple(crop))
    if fast:    # what make_loader hands over: uint8 images and labels, pinned on CUDA; normalised on the device
        host_x, host_y = images, labels.to(torch.uint8)
        if device.type == 'cuda':
            host_x, host_y = host_x.pin_memory(), host_y.pin_memory()
    else:       # the book's loader: float32 images and int64 labels in pageable memory
        host_x, host_y = sd.normalize_image(images), labels
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    model.train()

    def step():
        if fast:
            X, y = sd.to_device(host_x, host_y, device, channels_last)
        else:
            X, y = host_x.to(device), host_y.to(device)
        sd.train_batch_ch13(net, X, y, sd.cross_entropy_loss, trainer, amp=amp, scaler=scaler)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    return dict(model=model_name, fast=fast, amp=str(amp).replace('torch.', '') if amp else 'off',
                channels_last=channels_last, compile=bool(fast and use_compile), rate=batch * steps / elapsed,
                warm_s=warm_s, peak_gpu=peak)


def run_train_part(args, cfg, device):
    rows = []
    for model_name in ('fcn', 'resnet_unet'):
        for fast in (False, True):
            r = measure_train(model_name, fast, device, cfg['train_batch'], cfg['train_crop'], cfg['train_steps'],
                              cfg['train_warmup'], args.compile)
            rows.append(r)
            print(f'  train {model_name:11} {"fast" if fast else "plain":5}: {r["rate"]:7.1f} images/s', flush=True)
            gc.collect()
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    table = ['| model | path | AMP | channels_last | compile | images/s | speed-up | warm-up s | peak GPU memory |',
             '|---|---|---|---|---|---:|---:|---:|---:|']
    for r in rows:
        base = next(b for b in rows if b['model'] == r['model'] and not b['fast'])
        table.append(f'| {r["model"]} | {"fast" if r["fast"] else "plain fp32 (book)"} | {r["amp"]} | '
                     f'{"on" if r["channels_last"] else "off"} | {"on" if r["compile"] else "off"} | '
                     f'{r["rate"]:.1f} | {r["rate"] / base["rate"]:.2f}x | {r["warm_s"]:.1f} | '
                     f'{mib(r["peak_gpu"] / 1024) if r["peak_gpu"] is not None else "-"} |')
    h, w = cfg['train_crop']
    note = (f'{device.type.upper()}, batch {cfg["train_batch"]}, crop {h}x{w}, {cfg["train_steps"]} timed step(s) '
            f'after {cfg["train_warmup"]} warm-up step(s); synthetic batches (model step only, no data loading); each '
            "model with its recipe's optimiser (fcn: SGD, resnet_unet: Adam).")
    if device.type == 'cpu':
        note += (' On the CPU some_define.amp_dtype turns mixed precision off, so the fast path here differs only '
                 'by channels_last and uint8 input; the GPU figures are the ones that matter (batch 32, 320x480). '
                 "The crop is about half the book's 320x480 in each side, kept to multiples of 32 as the FCN needs.")
    return '## Training throughput\n\n' + note + '\n\n' + '\n'.join(table) + '\n'


# ------------------------------------------------------------------------------------------------------- inference
def measure_infer(model_name, device, hw, reps, scales, warmup=True):
    torch.manual_seed(0)
    net = sd.fast_layers(sd.build_model(model_name, num_classes=21)).to(device).eval()     # as load_model does
    amp = sd.amp_dtype(device)
    image = torch.randint(0, 256, (3,) + tuple(hw), dtype=torch.uint8)
    X = sd.normalize_image(image.to(device)).unsqueeze(0)
    out = {}
    for mode in ('single', 'mst'):
        def once():
            with torch.inference_mode(), sd.autocast(device, amp):
                if mode == 'single':
                    pred = sd.predict_scores(net, X).argmax(1)
                else:
                    pred = sd.predict_scores(net, X, scales).argmax(1)
            return pred.cpu()
        if warmup or mode == 'single':
            assert once().shape[-2:] == tuple(hw)        # warm-up
        sync(device)
        n = reps if mode == 'single' else max(1, reps // 4)
        start = time.perf_counter()
        for _ in range(n):
            once()
        sync(device)
        out[mode] = 1000 * (time.perf_counter() - start) / n
    return dict(model=model_name, amp=str(amp).replace('torch.', '') if amp else 'off', **out)


def run_infer_part(args, cfg, device):
    rows = []
    for model_name in ('fcn', 'resnet_unet'):
        r = measure_infer(model_name, device, cfg['infer_hw'], cfg['infer_reps'], sd.MST_SCALES,
                          warmup=not args.quick)
        rows.append(r)
        print(f'  infer {model_name:11}: single {r["single"]:8.1f} ms, multi-scale + flip {r["mst"]:8.1f} ms',
              flush=True)
    h, w = cfg['infer_hw']
    table = ['| model | AMP | single scale ms/image | 8 scales + flip ms/image | ratio |', '|---|---|---:|---:|---:|']
    for r in rows:
        table.append(f'| {r["model"]} | {r["amp"]} | {r["single"]:.1f} | {r["mst"]:.1f} | '
                     f'{r["mst"] / r["single"]:.1f}x |')
    note = (f'{device.type.upper()}, one {w}x{h} image at a time (batch 1), argmax included; scales '
            f'{" ".join(map(str, sd.MST_SCALES))}, each also flipped (16 passes).')
    return '## Inference\n\n' + note + '\n\n' + '\n'.join(table) + '\n'


# -------------------------------------------------------------------------------------------------------- accuracy
def train_demo(recipe, fast, seed, device, folder, quick, code=ROOT):
    """One demo training in its own folder (its curves picture lands there); the checkpoint to evaluate. `code`:
    the checkout whose scripts run (this one, or --baseline's); fast=None: that code's defaults."""
    folder.mkdir(parents=True)
    cmd = [sys.executable, str(Path(code) / f'{recipe}_train.py'), '--demo', '--seed', str(seed), '--device',
           str(device), '--save', str(folder / 'ckpt.pt'), '--workers', '1']
    if fast is not None:
        cmd += ['--amp', '--channels-last'] if fast else ['--no-amp', '--no-channels-last']
    if quick:
        cmd += ['--epochs', '1'] + (['--finetune-epochs', '0'] if recipe == 'my' else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    (folder / 'log.txt').write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}')
    finetuned = sd.finetune_path(folder / 'ckpt.pt')
    return (finetuned if finetuned.exists() else folder / 'ckpt.pt'), time.perf_counter() - start


def run_accuracy_part(args, cfg, device):
    sd.make_demo_voc(sd.DEMO_DIR)          # written once here, before the parallel runs read it
    val = sd.VOCSegDataset(False, None, sd.DEMO_DIR, normalize=False)
    work = Path(tempfile.mkdtemp(prefix='seg_accuracy_'))
    baseline = baseline_tree(args.baseline, work) if args.baseline else None
    chosen = args.paths or ['plain', 'fast'] + (['baseline'] if baseline else [])
    if 'baseline' in chosen and not baseline:
        raise sd.UserError('--paths baseline needs --baseline REV_OR_DIR')
    paths = [{'plain': False, 'fast': True, 'baseline': 'baseline'}[p] for p in chosen]
    plan = [(recipe, fast, seed) for recipe in ('origin', 'my') for fast in paths for seed in cfg['seeds']]
    rows = []
    try:
        with concurrent.futures.ThreadPoolExecutor(cfg['jobs']) as pool:
            futures = {key: pool.submit(train_demo, key[0], None if key[1] == 'baseline' else key[1], key[2], device,
                                        work / '_'.join(map(str, key)), args.quick,
                                        baseline if key[1] == 'baseline' else ROOT) for key in plan}
            for (recipe, fast, seed), future in futures.items():
                path, seconds = future.result()
                net, _ = sd.load_model(path, device)
                m = sd.evaluate_full(net, val, num_workers=0).compute()
                rows.append(dict(recipe=recipe, fast=fast, seed=seed, acc=m['pixel_acc'], miou=m['miou'],
                                 seconds=seconds))
                print(f'  accuracy {recipe:6} {PATH_NAMES[fast]:5} seed {seed}: pixel acc '
                      f'{m["pixel_acc"]:.3f}, mIoU {m["miou"]:.3f} ({seconds:.0f} s)', flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ['| recipe | path | mIoU per seed | mean mIoU | pixel acc per seed | mean pixel acc |',
             '|---|---|---|---:|---|---:|']
    for recipe in ('origin', 'my'):
        for fast in paths:
            rs = [r for r in rows if r['recipe'] == recipe and r['fast'] == fast]
            miou, acc = [r['miou'] for r in rs], [r['acc'] for r in rs]
            table.append(f'| {recipe} | {PATH_NAMES[fast]} | '
                         f'{" ".join(f"{v:.3f}" for v in miou)} | {sum(miou) / len(miou):.3f} | '
                         f'{" ".join(f"{v:.3f}" for v in acc)} | {sum(acc) / len(acc):.3f} |')
    amp = sd.amp_dtype(device, True)
    note = (f'{device.type.upper()}, the --demo presets{" cut to 1 epoch (--quick)" if args.quick else ""}, seeds '
            f'{" ".join(map(str, cfg["seeds"]))}; fast = --amp ({str(amp).replace("torch.", "")}) --channels-last, '
            'plain = --no-amp --no-channels-last' + (f'; baseline = {args.baseline}\'s code with its defaults'
                                                      if baseline else '') +
            '. Every checkpoint evaluated alike (by this code): fp32, the 40 synthetic demo val images at original '
            'size, mIoU over the classes present. The spread between seeds is the noise.')
    return '## Accuracy of the fast path (demo data)\n\n' + note + '\n\n' + '\n'.join(table) + '\n'


PATH_NAMES = {False: 'plain fp32', True: 'fast (amp, channels_last)', 'baseline': 'baseline code'}


# ---------------------------------------------------------------------------------------------------------- recipe
def baseline_tree(spec, work):
    """--baseline: a folder holding another checkout, or a git revision of this repository exported into `work`."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    tree = Path(work) / f'baseline_{spec}'
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(['git', '-C', str(ROOT), 'archive', spec], capture_output=True)
    if archive.returncode != 0:
        raise sd.UserError(f'--baseline {spec}: neither a folder nor a git revision here '
                           f'({archive.stderr.decode().strip()})')
    subprocess.run(['tar', '-x', '-C', str(tree)], input=archive.stdout, check=True)
    return tree


def run_recipe(code, script, data_dir, folder, extra):
    """One script run as a user runs it, in its own folder: wall seconds to its last checkpoint, and the split."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(code) / script), '--data-dir', str(data_dir), '--no-pretrained'] + extra
    start = time.time()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    (folder / f'{script}.log').write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}')
    ckpts = sorted(folder.glob('checkpoints/*.pt'), key=lambda p: p.stat().st_mtime)
    wall = ckpts[-1].stat().st_mtime - start
    history = [h for p in ckpts for h in sd.load_torch_file(p)['history']]
    train = [h.get('train_seconds') for h in history]
    evals = [h.get('eval_seconds') for h in history]
    row = dict(wall=wall, epochs=len(history), images=None, split=None)
    if None not in train and len(train) > 1:
        steady = sorted(train[1:])[len(train[1:]) // 2]          # the median epoch after the first
        row['split'] = dict(prep=wall - sum(train) - sum(evals), warmup=train[0] - steady,
                            steady=sum(train) - (train[0] - steady), eval=sum(evals))
    speed = [line for line in proc.stdout.splitlines() if 'examples/sec' in line]
    row['images'] = sum(float(line.split()[0]) for line in speed) / max(len(speed), 1)
    return row


def run_recipe_part(args, cfg, device, data_root):
    root = Path(data_root) / f'voc_recipe_{cfg["recipe_images"]}' / 'VOC2012'
    t = time.perf_counter()
    n_val = round(cfg['recipe_images'] * 1449 / 1464)
    sd.make_demo_voc(root, num_train=cfg['recipe_images'], num_val=n_val, num_small=0, sizes=VOC_SIZE_MIX)
    print(f'  data: {cfg["recipe_images"]} + {n_val} synthetic VOC-sized images ({time.perf_counter() - t:.0f} s)',
          flush=True)
    work = Path(tempfile.mkdtemp(prefix='seg_recipe_'))
    chosen = args.configs or ['defaults', 'streaming'] + (['baseline'] if args.baseline else [])
    if 'baseline' in chosen and not args.baseline:
        raise sd.UserError('--configs baseline needs --baseline REV_OR_DIR')
    configs = [(name, ROOT, flags) for name, flags in (('defaults', []), ('streaming', ['--data-on-device', 'off']))
               if name in chosen]
    if 'baseline' in chosen:
        configs.append((f'baseline {args.baseline}', baseline_tree(args.baseline, work), []))
    epochs, finetune = cfg['recipe_epochs'], cfg['recipe_finetune']
    scripts = [('origin_train.py', ['--epochs', str(epochs)] + cfg['recipe_args']),
               ('my_train.py', ['--epochs', str(epochs), '--finetune-epochs', str(finetune)] + cfg['recipe_args'])]
    rows = []
    try:
        for name, code, flags in configs:
            for script, extra in scripts:
                r = run_recipe(code, script, root, work / f'{len(rows)}', extra + flags + ['--device', str(device)])
                rows.append(dict(r, config=name, script=script))
                print(f'  recipe {script:15} {name}: {r["wall"]:.1f} s to the last checkpoint', flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ['| script | code (streaming: --data-on-device off) | wall s (to last checkpoint) | vs defaults '
             '| start-up + data s | warm-up s '
             '| steady training s | evaluation s | training images/s |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        base = next((b for b in rows if b['script'] == r['script'] and b['config'] == 'defaults'), r)
        sp = r['split']
        parts = ' | '.join(f'{sp[k]:.1f}' for k in ('prep', 'warmup', 'steady', 'eval')) if sp else '- | - | - | -'
        table.append(f'| {r["script"]} | {r["config"]} | {r["wall"]:.1f} | {r["wall"] / base["wall"]:.2f}x | '
                     f'{parts} | {r["images"]:.1f} |')
    note = (f'{device.type.upper()}; origin_train.py {epochs} epochs, my_train.py {epochs} + {finetune}; '
            f'{cfg["recipe_images"]} training and {n_val} validation synthetic images (VOC-like sizes), '
            f'--no-pretrained (the weights do not change the speed) {" ".join(cfg["recipe_args"])}. '
            'Start-up + data = wall minus the epochs '
            "(imports, decoding, the model); warm-up = the first epoch's training time minus a steady epoch's; "
            'images/s as the scripts report it (training only; my_train.py: the mean of its two stages).')
    return '## Whole recipes\n\n' + note + '\n\n' + '\n'.join(table) + '\n'


# ------------------------------------------------------------------------------------------------------------ main
def settings(args, device):
    gpu = device.type == 'cuda'
    acc = dict(seeds=args.seeds or ([0] if args.quick else [0, 1, 2]),
               jobs=max(1, args.jobs or (min(8, (os.cpu_count() or 1) // 2) if gpu else 1)),
               recipe_images=args.images or (24 if args.quick else 1464),
               recipe_epochs=args.epochs if args.epochs is not None else (2 if args.quick else 30),
               recipe_finetune=args.finetune_epochs if args.finetune_epochs is not None else (1 if args.quick else 10),
               recipe_args=(args.script_args if args.script_args is not None else
                            '--batch-size 4 --crop-size 160 256' if args.quick else '').split())
    if args.quick:
        return dict(sizes=args.sizes or [16, 48], loader_batch=8, loader_crop=[320, 480],
                    train_batch=4 if gpu else 1, train_crop=[160, 240] if gpu else [64, 64],
                    train_steps=3 if gpu else 1, train_warmup=2 if gpu else 1, infer_hw=[48, 64],
                    infer_reps=4 if gpu else 1, **acc)
    return dict(sizes=args.sizes or [100, 1000], loader_batch=32, loader_crop=[320, 480],
                train_batch=32 if gpu else 4, train_crop=[320, 480] if gpu else [160, 256],   # fcn: multiples of 32
                train_steps=20 if gpu else 5, train_warmup=5 if gpu else 1, infer_hw=list(VOC_HW),
                infer_reps=20 if gpu else 4, **acc)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--device', help='cpu, cuda or cuda:N (default: the GPU if there is one)')
    p.add_argument('--quick', action='store_true', help='tiny sizes: a check that everything runs (default: off)')
    p.add_argument('--parts', nargs='+', choices=['loader', 'train', 'infer', 'accuracy', 'recipe'],
                   default=['loader', 'train', 'infer'], help='default: loader train infer (accuracy trains 4 x '
                   'seeds demo models: minutes on a GPU, most of an hour on 2 CPU cores)')
    p.add_argument('--seeds', type=int, nargs='+', help='accuracy: seeds per recipe and path (default: 0 1 2; '
                   '--quick: 0)')
    p.add_argument('--paths', nargs='+', choices=['plain', 'fast', 'baseline'], help='accuracy: what to train '
                   '(default: plain fast, and baseline with --baseline; on a CPU "fast" is bf16 autocast there)')
    p.add_argument('--jobs', type=int, help='accuracy: trainings at once (default: min(8, CPUs / 2) with a GPU, '
                   'else 1)')
    p.add_argument('--sizes', type=int, nargs='+', help='loader dataset sizes (default: 100 1000; --quick: 16 48)')
    p.add_argument('--images', type=int, help="recipe: training images (default: VOC's 1464; --quick: 24)")
    p.add_argument('--epochs', type=int, help="recipe: epochs of each script (default: the book's 30; --quick: 2)")
    p.add_argument('--finetune-epochs', type=int, help="recipe: my_train.py's second stage (default: 10; --quick: 1)")
    p.add_argument('--script-args', help='recipe: flags added to every script run, e.g. "--batch-size 8 --crop-size '
                   '160 256" to fit a CPU (default: none, the recipes as they are; --quick: that example with batch 4)')
    p.add_argument('--configs', nargs='+', choices=['defaults', 'streaming', 'baseline'], help='recipe: which '
                   'runs (default: defaults streaming, and baseline with --baseline): split them over several calls '
                   'where one may only run minutes')
    p.add_argument('--baseline', metavar='REV_OR_DIR', help='recipe and accuracy: also run this git revision (or '
                   'checkout folder) of the scripts, with its own defaults (default: none)')
    p.add_argument('--workers', type=int, default=sd.default_workers(),
                   help=f'DataLoader workers for both loaders (default: min(4, CPUs) = {sd.default_workers()})')
    p.add_argument('--threads', type=int, help="torch.set_num_threads for the main process (default: torch's, "
                   'one per core; on a CPU shared with other busy processes 1 can be many times faster)')
    p.add_argument('--compile', action='store_true', help='torch.compile the fast training path (default: off)')
    p.add_argument('--data-root', help='keep the generated datasets here and reuse them (default: a temporary '
                   'folder, deleted at the end)')
    p.add_argument('--out', default='benchmark_results.md', help='markdown file (default: benchmark_results.md)')
    # the loader measurement's own process
    p.add_argument('--child-loader', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--root', help=argparse.SUPPRESS)
    p.add_argument('--mode', choices=['lazy', 'book'], help=argparse.SUPPRESS)
    p.add_argument('--batch-size', type=int, help=argparse.SUPPRESS)
    p.add_argument('--crop', type=int, nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_benchmark(args):
    device = sd.pick_device(args.device)
    cfg = settings(args, device)
    machine = machine_description(device)
    print(machine, flush=True)
    data_root = Path(args.data_root) if args.data_root else Path(tempfile.mkdtemp(prefix='seg_benchmark_'))
    sections = []
    start = time.perf_counter()
    try:
        parts = {'loader': lambda: run_loader_part(args, cfg, data_root),
                 'train': lambda: run_train_part(args, cfg, device),
                 'infer': lambda: run_infer_part(args, cfg, device),
                 'accuracy': lambda: run_accuracy_part(args, cfg, device),
                 'recipe': lambda: run_recipe_part(args, cfg, device, data_root)}
        for name, run in parts.items():
            if name in args.parts:
                print(f'{name} ...', flush=True)
                sections.append(run())
    finally:
        if not args.data_root:
            shutil.rmtree(data_root, ignore_errors=True)
    header = (f'# Benchmark{" (--quick: tiny sizes, a smoke run, not figures to quote)" if args.quick else ""}\n\n'
              f'{machine}\n\n`python {" ".join(sys.argv)}` on {datetime.datetime.now():%Y-%m-%d %H:%M}, '
              f'{time.perf_counter() - start:.0f} s in all.\n')
    text = '\n'.join([header] + sections)
    print('\n' + text)
    try:
        Path(args.out).write_text(text)
        print(f'wrote {args.out}')
    except OSError as err:
        print(f'cannot write {args.out}: {err}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    cli = parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if cli.child_loader:
        loader_child(cli)
    else:
        sd.run_main(lambda: run_benchmark(cli))
