"""Pictures (and, with --eval, numbers) for the d2l FCN: pictures/origin_out.png, the book's 3-row grid.

    python origin_predict.py                  # after origin_train.py: data and model come from the checkpoint
    python origin_predict.py --eval           # pixel acc, mean acc, per-class IoU, mIoU, fwIoU over the val split
    python origin_predict.py photos/          # segment your own images into predictions/
"""
import some_define as sd


def main():
    sd.run_predict(sd.predict_parser('origin', __doc__.split('\n')[0]).parse_args())


if __name__ == '__main__':
    sd.run_main(main)
