"""Pictures (and, with --eval, numbers) for the d2l FCN: pictures/origin_out.png, the book's 3-row grid.

    python origin_predict.py                  # after origin_train.py: data and model come from the checkpoint
    python origin_predict.py --eval           # pixel acc, mean acc, per-class IoU, mIoU, fwIoU over the val split
    python origin_predict.py photos/          # segment your own images into predictions/
"""
import argparse

import some_define as sd

CHECKPOINT, PICTURE = 'checkpoints/origin.pt', 'pictures/origin_out.png'


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sd.add_predict_args(parser, CHECKPOINT, PICTURE)
    return parser


def main():
    args = build_parser().parse_args()
    path = args.checkpoint or CHECKPOINT
    if args.export_onnx:
        return sd.export_onnx(path, args.export_onnx)     # the model only: no dataset needed
    net, ckpt, _, amp = sd.open_model(path, args.device, args.amp)
    scales = args.scales if args.mst else None
    tiling = sd.predict_tiling(ckpt['config'], args.tile, args.tile_overlap, args.whole_image)
    if args.inputs:
        sd.segment_files(net, sd.image_files(args.inputs), args.out_dir, sd.checkpoint_classes(ckpt), scales, amp,
                         args.test_size, args.mst_mode, tiling)
        if not (args.eval or args.write_split):
            return          # your own images only: no dataset needed

    data = sd.checkpoint_data(path, ckpt, args.dataset, args.data_dir, args.demo, args.void_as_background,
                              args.classes, args.val_share)
    val = sd.open_dataset(data, is_train=False, normalize=False)    # whole images: metrics at the original size
    colors = data.classes.colors
    if args.eval:
        sd.evaluate_checkpoint(net, path, val, data.title, scales, amp, args.test_size, args.workers, args.mst_mode,
                               tiling)
    if args.write_split:
        sd.segment_files(net, [image for image, _ in val.items], args.out_dir, data.classes, scales, amp,
                         args.test_size, args.mst_mode, tiling)
    if sd.is_main_process():    # the book's picture: three rows, image, prediction, ground truth
        crops = sd.val_crops(val, args.num_images, sd.picture_crop(ckpt['config']))
        title = f'{sd.recipe_title(ckpt["config"])}\n{sd.metrics_for_title(path, ckpt)} - {data.title}'
        sd.show_predictions(args.picture, crops, [[sd.predict(net, X) for X, _ in crops]], colors, title)


if __name__ == '__main__':
    sd.run_main(main)
