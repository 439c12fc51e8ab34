"""The improved recipe: ResNetUNet, Adam lr 1e-4 (weight decay 1e-3, batch 32) for 30 epochs, then 10 epochs at 1e-5
from those weights (a second checkpoint, *_finetune.pt). Every technique of the DeepLabV3 tutorial is a flag.

    python my_train.py --demo                                   # synthetic data, CPU, a few minutes
    python my_train.py                                          # the improved recipe on VOC2012
    python my_train.py --optimizer sgd --lr 1e-3 --finetune-epochs 0 --save checkpoints/unet_sgd.pt   # an ablation
    python my_train.py --model deeplabv3_resnet50 --loss focal --norm group --cutmix 0.5              # the tutorial
"""
import some_define as sd


def main():
    parser = sd.train_parser('my', __doc__.split('\n')[0], techniques=True)
    sd.run_training(parser.parse_args())


if __name__ == '__main__':
    sd.run_main(main)
