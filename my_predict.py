"""Pictures for the improved model and the side-by-side comparison: pictures/my_out.png and pictures/compare.png
(every checkpoint given, each column titled with its recipe and its val figures).

    python my_predict.py                      # after my_train.py (and origin_train.py for the comparison)
    python my_predict.py --eval --mst         # full val metrics, multi-scale + flip, beside single-scale ones
    python my_predict.py --compare checkpoints/origin.pt checkpoints/unet_sgd.pt checkpoints/my.pt
    python my_predict.py photos/ --mst        # segment your own images into predictions/
"""
import argparse
import textwrap
from pathlib import Path

import some_define as sd

SAVE, PICTURE = 'checkpoints/my.pt', 'pictures/my_out.png'
FINETUNED = sd.finetune_path(SAVE)
COMPARE = ['checkpoints/origin.pt', SAVE, str(FINETUNED)]     # the default columns, those that exist


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sd.add_predict_args(parser, f'{FINETUNED} if it exists, else {SAVE}', PICTURE)
    parser.add_argument('--compare', nargs='+', metavar='CKPT', help='checkpoints side by side in '
                        f'pictures/compare.png (default: {", ".join(COMPARE)}, those that exist)')
    return parser


def main():
    args = build_parser().parse_args()
    path = Path(args.checkpoint or (FINETUNED if FINETUNED.exists() else SAVE))
    if args.export_onnx:
        return sd.export_onnx(path, args.export_onnx)     # the model only: no dataset needed
    net, ckpt, device, amp = sd.open_model(path, args.device, args.amp)
    scales = args.scales if args.mst else None
    tiling = sd.predict_tiling(ckpt['config'], args.tile, args.tile_overlap, args.whole_image)
    if args.inputs:
        sd.segment_files(net, sd.image_files(args.inputs), args.out_dir, sd.checkpoint_classes(ckpt), scales, amp,
                         args.test_size, args.mst_mode, tiling)
    if args.inputs and not (args.eval or args.write_split):
        return              # your own images only: no dataset needed

    data = sd.checkpoint_data(path, ckpt, args.dataset, args.data_dir, args.demo, args.void_as_background,
                              args.classes, args.val_share)
    val, colors = sd.open_dataset(data, is_train=False, normalize=False), data.classes.colors
    columns = []            # compare.png's checkpoints: those that predict the same classes (this one loaded once)
    for p in map(Path, args.compare or [p for p in COMPARE if Path(p).exists()]):
        n, c = (net, ckpt) if p.resolve() == path.resolve() else sd.load_model(p, device)
        if sd.checkpoint_classes(c) == data.classes:
            columns.append((p, n, c))
        else:
            sd.log(f'{p} is left out of the comparison: it predicts other classes than {path}')
    columns = columns or [(path, net, ckpt)]
    for p, n, _ in columns if args.eval else []:
        sd.evaluate_checkpoint(n, p, val, data.title, scales, amp, args.test_size, args.workers, args.mst_mode,
                               tiling)
    if args.write_split:
        sd.segment_files(net, [image for image, _ in val.items], args.out_dir, data.classes, scales, amp,
                         args.test_size, args.mst_mode, tiling)
    if not sd.is_main_process():
        return

    # my_out.png, the book's picture; compare.png, the same val crops with one column per checkpoint
    crops = sd.val_crops(val, args.num_images, sd.picture_crop(ckpt['config']))
    predictions = {id(n): [sd.predict(n, X) for X, _ in crops] for n in
                   [net] + [n for _, n, _ in columns]}      # each net once, the main one among them
    title = f'{sd.recipe_title(ckpt["config"])}\n{sd.metrics_for_title(path, ckpt)} - {data.title}'
    sd.show_predictions(args.picture, crops, [predictions[id(net)]], colors, title)
    names = [f'{p.name}\n{textwrap.fill(sd.recipe_title(c["config"]), 30)}\n{sd.metrics_for_title(p, c)}'
             for p, _, c in columns]
    sd.show_predictions(Path(args.picture).with_name('compare.png'), crops, [predictions[id(n)] for _, n, _ in columns],
                        colors, f'side by side on {data.title}', names)


if __name__ == '__main__':
    sd.run_main(main)
