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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sd.add_predict_args(parser, f'{FINETUNED} if it exists, else {SAVE}', PICTURE)
    parser.add_argument('--compare', nargs='+', metavar='CKPT', help='checkpoints side by side in '
                        f'pictures/compare.png (default: {", ".join(COMPARE)}, those that exist)')
    args = parser.parse_args()
    path = Path(args.checkpoint or (FINETUNED if FINETUNED.exists() else SAVE))
    device = sd.pick_device(args.device)
    amp = sd.amp_dtype(device, args.amp)
    models = {path.resolve(): (path,) + sd.load_model(path, device)}    # each checkpoint loaded (and drawn) once
    for p in args.compare or [p for p in COMPARE if Path(p).exists()]:
        models.setdefault(Path(p).resolve(), (Path(p),) + sd.load_model(p, device))
    _, net, ckpt = models[path.resolve()]
    columns = [models[Path(p).resolve()] for p in args.compare or COMPARE if Path(p).resolve() in models]
    for p, _, c in columns:     # a column must predict the same classes, on the same images
        if sd.checkpoint_classes(c) != sd.checkpoint_classes(ckpt):
            sd.log(f'{p} is left out of the comparison: it predicts other classes than {path}')
    columns = [col for col in columns if sd.checkpoint_classes(col[2]) == sd.checkpoint_classes(ckpt)] \
        or [models[path.resolve()]]
    scales = args.scales if args.mst else None
    if args.inputs:
        sd.segment_inputs(net, ckpt, args.inputs, args.out_dir, scales, amp, args.test_size)
    if args.inputs and not (args.eval or args.write_split):
        return              # your own images only: no dataset needed

    data = sd.checkpoint_data(path, ckpt, args.dataset, args.data_dir, args.demo, args.void_as_background,
                              args.classes)
    val, colors = sd.open_dataset(data, is_train=False, normalize=False), data.classes.colors
    for p, n, _ in columns if args.eval else []:
        sd.evaluate_checkpoint(n, p, val, data.title, scales, amp, args.test_size, args.workers)
    if args.write_split:
        sd.segment_files(net, [image for image, _ in val.items], args.out_dir, colors, scales, amp, args.test_size)
    if not sd.is_main_process():
        return
    crop = sd.DEMO_MIN_SIZE if ckpt['config'].get('demo') else ckpt['config']['crop_size']
    images, predictions, truths = sd.val_picture_rows(net, val, args.num_images, crop, colors)
    title = f'{sd.recipe_title(ckpt["config"])}\n{sd.known_metrics(path, ckpt)} - {data.title}'
    sd.save_image_grid(args.picture, [images, predictions, truths], title,
                       row_titles=['image', 'prediction', 'ground truth'])
    sd.log(f'wrote {args.picture}')

    # compare.png: the same val crops, one column per checkpoint, titled with its recipe and figures
    titles, by_column = ['image', 'ground truth'], []
    for p, n, c in columns:
        by_column.append(predictions if n is net else sd.val_picture_rows(n, val, args.num_images, crop, colors)[1])
        titles.append(f'{p.name}\n{textwrap.fill(sd.recipe_title(c["config"]), 30)}\n{sd.known_metrics(p, c)}')
    rows = [[images[i], truths[i]] + [column[i] for column in by_column] for i in range(len(images))]
    compare = Path(args.picture).with_name('compare.png')
    sd.save_image_grid(compare, rows, f'side by side on {data.title}', col_titles=titles)
    sd.log(f'wrote {compare}')


if __name__ == '__main__':
    sd.run_main(main)
