"""The d2l chapter's FCN recipe: resnet18 FCN, SGD lr 1e-3, weight decay 1e-3, batch 32, 320x480 crops, 30 epochs.

    python origin_train.py --demo          # no dataset, no GPU: synthetic VOC-format data, a few minutes on a CPU
    python origin_train.py                 # VOC2012 next to the script (or --data-dir / --download), on the GPU
Then origin_predict.py draws pictures/origin_out.png from the checkpoint.
"""
import some_define as sd


def main():
    parser = sd.train_parser('origin', __doc__.split('\n')[0])
    sd.run_training(parser.parse_args())


if __name__ == '__main__':
    sd.run_main(main)
