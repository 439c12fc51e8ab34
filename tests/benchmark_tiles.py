"""Peak memory of big photos: whole-image against sliding-window prediction. A script, not a test.

    python tests/benchmark_tiles.py                          # fcn and resnet_unet at 1, 12 and 24 MP
    python tests/benchmark_tiles.py --models fcn --sizes 1 12
    python tests/benchmark_tiles.py --max-gib 8              # skip the cases expected to need more than 8 GiB
    python tests/benchmark_tiles.py --models resnet_unet --sizes 12 --modes tiled

Each case runs in a fresh process (so each peak is its own): an untrained model (no dataset, no weights file) built
and placed as the predict scripts place it, one random photo-sized uint8 image, then some_define.predict on it,
whole or in windows of the book's training crop (320x480, a third of overlap; the predict scripts' default
windows). Then the script's three PNGs of it (segmentation_pictures). It prints peak RSS (getrusage) before the
prediction (Python, torch, the model, the image), after it, and after the pictures, and the seconds it took.
A whole-image case whose peak, extrapolated by pixels from the same model's 1 MP whole-image case (run first when
--sizes leaves it out), would pass --max-gib is skipped and said so.
"""
import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {1: (864, 1152), 12: (3024, 4032), 24: (4284, 5712)}     # MP: (H, W), 4:3 as a phone's camera
WINDOW = (320, 480)


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20      # KiB on Linux


def child(model, mp, tiled, threads):
    sys.path.insert(0, str(ROOT))
    import torch
    import some_define as sd
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = sd.fast_layers(sd.build_model(model, 21)).eval()
    h, w = SIZES[mp]
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    tiling = sd.Tiling(WINDOW, sd.TILE_OVERLAP, 'on' if tiled else 'off')
    before, start = peak_gib(), time.perf_counter()
    pred = sd.predict(net, image, tiling=tiling)
    seconds, after = time.perf_counter() - start, peak_gib()
    sd.segmentation_pictures(image, pred, sd.VOC)
    print(json.dumps(dict(before=before, predict=after, pictures=peak_gib(), seconds=seconds)))


def run_case(model, mp, tiled, threads, timeout):
    cmd = [sys.executable, __file__, '--child', model, str(mp), str(int(tiled)), '--threads', str(threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'over {timeout} s'}
    if res.returncode:
        return {'error': (res.stderr.strip().splitlines() or [f'exit {res.returncode}'])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['fcn', 'resnet_unet'])
    parser.add_argument('--sizes', nargs='+', type=int, default=sorted(SIZES), choices=sorted(SIZES),
                        help='megapixels (default: 1 12 24)')
    parser.add_argument('--modes', nargs='+', default=['whole', 'tiled'], choices=['whole', 'tiled'])
    parser.add_argument('--max-gib', type=float, default=16, help='skip whole-image cases expected above (default: 16)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads per case (default: 2)')
    parser.add_argument('--timeout', type=int, default=1800, help='seconds per case (default: 1800)')
    parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, mp, tiled = args.child
        return child(model, int(mp), tiled == '1', args.threads)

    import torch
    cpu = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.machine()) if Path('/proc/cpuinfo').exists() else ''
    print(f'# {datetime.date.today()}, {cpu}, {args.threads} threads, '
          f'torch {torch.__version__}, CPU; windows {WINDOW[0]}x{WINDOW[1]}, overlap 1/3; peak RSS in GiB')
    print(f'| model | image | prediction | before | after predict | after pictures | seconds |')
    print('|---|---|---|---|---|---|---|')
    for model in args.models:
        per_pixel = None            # (before, the whole image's growth per pixel), from its 1 MP case
        if 'whole' in args.modes and 1 not in args.sizes:
            r = run_case(model, 1, False, args.threads, args.timeout)
            per_pixel = r['before'], (r['pictures'] - r['before']) / (SIZES[1][0] * SIZES[1][1])
        for mp in args.sizes:
            h, w = SIZES[mp]
            for tiled in [mode == 'tiled' for mode in args.modes]:
                name = f'| {model} | {mp} MP ({w}x{h}) | {"tiled" if tiled else "whole"} |'
                expected = per_pixel and per_pixel[0] + per_pixel[1] * h * w
                if not tiled and expected and expected > args.max_gib:
                    print(f'{name} skipped: about {expected:.0f} GiB expected | | | |', flush=True)
                    continue
                r = run_case(model, mp, tiled, args.threads, args.timeout)
                if 'error' in r:
                    print(f'{name} failed: {r["error"]} | | | |', flush=True)
                    continue
                if not tiled and per_pixel is None:
                    per_pixel = r['before'], (r['pictures'] - r['before']) / (h * w)
                print(f'{name} {r["before"]:.2f} | {r["predict"]:.2f} | {r["pictures"]:.2f} | {r["seconds"]:.0f} |',
                      flush=True)


if __name__ == '__main__':
    main()
