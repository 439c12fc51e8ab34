"""Pictures for the improved model and the side-by-side comparison: pictures/my_out.png and pictures/compare.png
(every checkpoint given, each column titled with its recipe and its val figures).

    python my_predict.py                      # after my_train.py (and origin_train.py for the comparison)
    python my_predict.py --eval --mst         # full val metrics, multi-scale + flip, beside single-scale ones
    python my_predict.py --compare checkpoints/origin.pt checkpoints/unet_sgd.pt checkpoints/my.pt
    python my_predict.py photos/ --mst        # segment your own images into predictions/
"""
import some_define as sd


def main():
    sd.run_predict(sd.predict_parser('my', __doc__.split('\n')[0], compare=True).parse_args())


if __name__ == '__main__':
    sd.run_main(main)
