"""The d2l chapter's FCN recipe: resnet18 FCN, SGD lr 1e-3, weight decay 1e-3, batch 32, 320x480 crops, 30 epochs.

    python origin_train.py --demo          # no dataset, no GPU: synthetic VOC-format data, a few minutes on a CPU
    python origin_train.py                 # VOC2012 next to the script (or --data-dir / --download), on the GPU
Then origin_predict.py draws pictures/origin_out.png from the checkpoint.
"""
import argparse

import torch

import some_define as sd

# The recipe. The book's cell reads `num_epochs, lr, wd = 5, 0.001, 1e-3`; the published improvement's pictures of
# this baseline train 30 epochs.
NUM_EPOCHS, LR, WD = 30, 1e-3, 1e-3
BATCH_SIZE, CROP_SIZE = 32, [320, 480]
SAVE, CURVES = 'checkpoints/origin.pt', 'pictures/origin_curves.png'
# --demo: a CPU and no dataset. Small crops and batches, 8 epochs, no ImageNet weights to download; the book's lr
# stays (its loss is summed over the batch, which already makes the steps large).
DEMO = dict(epochs=8, batch_size=8, crop_size=[64, 96], pretrained=False)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sd.add_data_args(parser)
    sd.add_recipe_args(parser, NUM_EPOCHS, LR, WD, BATCH_SIZE, CROP_SIZE, SAVE, DEMO)
    sd.add_speed_args(parser)
    return parser


def get_args():
    return sd.parse_with_demo(build_parser(), DEMO)     # --demo: the DEMO recipe, where no flag says otherwise


def main():
    args = get_args()
    sd.check_training_flags('fcn', args.crop_size, args.batch_size, args.accum_steps, args.epochs, [args.save, CURVES])
    device, amp, channels_last = sd.setup_run(args.device, args.amp, args.channels_last, args.cudnn_benchmark,
                                              args.detect_anomaly, args.seed)

    data = sd.find_data(args.dataset, args.data_dir, args.demo, args.download, args.void_as_background, args.classes,
                         args.val_share)
    train_iter, test_iter = sd.load_data_voc(args.batch_size // args.accum_steps, args.crop_size, data=data,
                                             seed=args.seed, num_workers=args.workers, device=device,
                                             channels_last=channels_last, on_device=args.data_on_device)
    num_classes = len(data.classes.names)
    config = dict(vars(args), model='fcn', optimizer='sgd', stage='train', data_dir=str(data.root),
                  data_title=data.title)
    model_args = dict(name='fcn', num_classes=num_classes, norm='batch', aux_loss=False)    # what rebuilds it
    ckpt = sd.Checkpoint(args.save, model_args, config, data.classes, resume=args.resume, curves=CURVES,
                         keep_best=args.keep_best)
    # a resumed run's weights, or those of --init-from, replace the ImageNet ones: they need not be loaded
    model = sd.fcn_resnet18(num_classes, args.pretrained and not (ckpt.resuming or args.init_from),
                            args.backbone_weights)
    if args.init_from:      # a trained FCN: what fits is loaded, a head of other classes starts anew
        sd.init_from(model, args.init_from, 'fcn', num_classes)
    net = sd.place_model(model, device, channels_last, args.sync_bn, args.compile)     # DDP/compiled when asked
    loss = sd.cross_entropy_loss
    trainer = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sd.train_ch13(net, train_iter, test_iter, loss, trainer, args.epochs, [device], checkpoint=ckpt, amp=amp,
                  accum_steps=args.accum_steps)


if __name__ == '__main__':
    sd.run_main(main)
