"""The improved recipe: ResNetUNet, Adam lr 1e-4 (weight decay 1e-3, batch 32) for 30 epochs, then 10 epochs at 1e-5
from those weights (a second checkpoint, *_finetune.pt). Every technique of the DeepLabV3 tutorial is a flag.

    python my_train.py --demo                                   # synthetic data, CPU, a few minutes
    python my_train.py                                          # the improved recipe on VOC2012
    python my_train.py --optimizer sgd --lr 1e-3 --finetune-epochs 0 --save checkpoints/unet_sgd.pt   # an ablation
    python my_train.py --model deeplabv3_resnet50 --loss focal --norm group --cutmix 0.5              # the tutorial
"""
import argparse

import torch

import some_define as sd

# The recipe: the published improvement of the book's chapter.
MODEL, OPTIMIZER = 'resnet_unet', 'adam'
NUM_EPOCHS, LR, WD = 30, 1e-4, 1e-3
BATCH_SIZE, CROP_SIZE = 32, [320, 480]
FINETUNE_EPOCHS, FINETUNE_LR = 10, 1e-5     # the second stage, from the first stage's weights
SAVE, CURVES = 'checkpoints/my.pt', 'pictures/my_curves.png'
FREQUENCIES = 'pictures/class_frequencies.png'      # drawn when class weights are counted
WEIGHTED_LOSSES = ('focal', 'dice', 'ce+dice')       # unweighted unless --class-weights is given
# --demo: a CPU and no dataset. Small crops and batches, 8 + 2 epochs, no ImageNet weights to download; from scratch
# Adam needs 10x the lr (1e-4 does not get far in 8 epochs).
DEMO = dict(epochs=8, batch_size=8, crop_size=[64, 96], pretrained=False, lr=1e-3, finetune_epochs=2,
            finetune_lr=1e-4)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sd.add_data_args(parser)
    g = sd.add_recipe_args(parser, NUM_EPOCHS, LR, WD, BATCH_SIZE, CROP_SIZE, SAVE, DEMO)
    g.add_argument('--model', choices=sd.MODELS, default=MODEL, help=f'default: {MODEL}')
    g.add_argument('--optimizer', choices=['sgd', 'adam'], default=OPTIMIZER, help=f'default: {OPTIMIZER}')
    g.add_argument('--finetune-epochs', type=int, default=FINETUNE_EPOCHS, help="a second stage from the first "
                   f"stage's weights at --finetune-lr, saved as *_finetune.pt; 0 skips it (default: {FINETUNE_EPOCHS};"
                   f" --demo: {DEMO['finetune_epochs']})")
    g.add_argument('--finetune-lr', type=float, default=FINETUNE_LR,
                   help=f'default: {FINETUNE_LR:g}; --demo: {DEMO["finetune_lr"]:g}')
    t = parser.add_argument_group("the tutorial's techniques")
    t.add_argument('--loss', default='ce', choices=sd.LOSSES, help='default: ce')
    t.add_argument('--class-weights', help='for weighted_ce, focal, dice, ce+dice: "counts" (from the training '
                   'labels\' pixel counts), "tutorial" (its 19 Cityscapes weights) or a file of one weight per class '
                   '(default: counts for weighted_ce, none for the others)')
    t.add_argument('--focal-gamma', type=float, default=2.0, help='default: 2.0 (0 is cross entropy)')
    t.add_argument('--norm', default='batch', choices=sd.NORMS, help='replace every BatchNorm2d (default: batch; '
                   'evo = EvoNorm-S0)')
    t.add_argument('--aux-loss', action='store_true', help='DeepLabV3 auxiliary head, weight 0.4 (default: off)')
    t.add_argument('--cutmix', type=float, default=0.0, metavar='P', help='CutMix probability per batch (default: 0)')
    t.add_argument('--copyblob', type=float, default=0.0, metavar='P', help='CopyBlob probability per image and '
                   'pair (default: 0)')
    t.add_argument('--copyblob-pairs', nargs='+', metavar='SRC:HOST', help='class pairs by name or index (default: '
                   f'Cityscapes {" ".join(sd.COPYBLOB_PAIRS["cityscapes"])}; VOC {" ".join(sd.COPYBLOB_PAIRS["voc"])})')
    sd.add_speed_args(parser)
    return parser


def get_args():
    return sd.parse_with_demo(build_parser(), DEMO)     # --demo: the DEMO recipe, where no flag says otherwise


def class_weights(args, train_ds, data):
    """--loss weighted_ce (or focal, dice, ce+dice with --class-weights): the tutorial's Cityscapes table, a file,
    or from the training labels' pixel counts (ENet's 1/ln(1.02 + share), shown as a table and a chart)."""
    names = data.classes.names
    if args.class_weights == 'tutorial':
        if data.kind != 'cityscapes':
            raise sd.UserError('--class-weights tutorial holds the 19 Cityscapes weights: use it with --dataset '
                               'cityscapes')
        return torch.tensor(sd.TUTORIAL_CITYSCAPES_WEIGHTS)
    if args.class_weights not in (None, 'counts'):
        return sd.read_class_weights(args.class_weights, len(names))
    counts, _ = sd.class_pixel_counts(train_ds, data.root)
    weights = sd.class_pixel_weights(counts)
    sd.log('class           pixels      share   weight')
    for name, c, w in zip(names, counts.tolist(), weights.tolist()):
        sd.log(f'{name:<14}{int(c):>10}   {c / max(counts.sum().item(), 1):7.2%}   {w:6.3f}')
    if sd.is_main_process():
        sd.plot_class_frequencies(counts, names, FREQUENCIES,
                                  f'class imbalance in the training labels ({data.title})')
    return weights


def main():
    args = get_args()
    sd.check_training_flags(args.model, args.crop_size, args.batch_size, args.accum_steps, args.epochs,
                            [args.save, CURVES, FREQUENCIES])
    device, amp, channels_last = sd.setup_run(args.device, args.amp, args.channels_last, args.cudnn_benchmark,
                                              args.detect_anomaly, args.seed)

    data = sd.find_data(args.dataset, args.data_dir, args.demo, args.download, args.void_as_background, args.classes,
                         args.val_share)
    train_iter, test_iter = sd.load_data_voc(args.batch_size // args.accum_steps, args.crop_size, data=data,
                                             seed=args.seed, num_workers=args.workers, device=device,
                                             channels_last=channels_last, on_device=args.data_on_device)
    model_args = dict(name=args.model, num_classes=len(data.classes.names), norm=args.norm, aux_loss=args.aux_loss)
    config = dict(vars(args), stage='train', data_dir=str(data.root), data_title=data.title)
    if args.resume and args.finetune_epochs:    # a fine-tune that would refuse this resume does so before stage 1 runs
        sd.check_later_stage(sd.finetune_path(args.save), dict(config, stage='finetune'))
    ckpt = sd.Checkpoint(args.save, model_args, config, data.classes, resume=args.resume, curves=CURVES,
                         keep_best=args.keep_best)
    # a resumed run's weights, or those of --init-from, replace the ImageNet ones: they need not be loaded
    model = sd.build_model(**model_args, pretrained=args.pretrained and not (ckpt.resuming or args.init_from),
                           weights_path=args.backbone_weights)
    if args.init_from:      # a trained model: what fits is loaded, a head of other classes starts anew
        sd.init_from(model, args.init_from, args.model, model_args['num_classes'])
    net = sd.place_model(model, device, channels_last, args.sync_bn, args.compile)
    weights = None
    if args.loss == 'weighted_ce' or (args.loss in WEIGHTED_LOSSES and args.class_weights):
        weights = class_weights(args, train_iter.dataset, data)
    loss = sd.make_loss(args.loss, weights, args.focal_gamma, device)
    pairs = sd.parse_pairs(args.copyblob_pairs, data.classes.names, data.kind) if args.copyblob else []
    augment = sd.batch_augment(args.cutmix, args.copyblob, pairs)

    def optimizer(lr):      # the improvement is plain Adam; --optimizer sgd is the book's SGD, for the ablation
        if args.optimizer == 'sgd':
            return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=args.weight_decay)
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)

    # Stage 1: Adam at lr 1e-4 for 30 epochs.
    sd.train_ch13(net, train_iter, test_iter, loss, optimizer(args.lr), args.epochs, [device], checkpoint=ckpt,
                  amp=amp, accum_steps=args.accum_steps, augment=augment)
    # Stage 2: 10 epochs at 1e-5 from stage 1's weights, with a fresh optimizer, into its own checkpoint.
    if args.finetune_epochs:
        ckpt = sd.Checkpoint(sd.finetune_path(args.save), model_args, dict(config, stage='finetune'), data.classes,
                             resume=args.resume, curves=CURVES, earlier=ckpt.history, keep_best=args.keep_best)
        sd.train_ch13(net, train_iter, test_iter, loss, optimizer(args.finetune_lr), args.finetune_epochs, [device],
                      checkpoint=ckpt, amp=amp, accum_steps=args.accum_steps, augment=augment)


if __name__ == '__main__':
    sd.run_main(main)
