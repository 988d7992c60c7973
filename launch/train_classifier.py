"""Train the evaluation classifier of a config's data set and save it where runs look for it.

    python -m launch.train_classifier                                   # the digits
    python -m launch.train_classifier --config=configs/split_fmnist.py --epochs=20

It is written to `<data.data_dir>/classifiers/<data set>_<size>px_<channels>ch` (see
gdjax/eval/classifier.py) unless --output says otherwise; the test accuracy is printed.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from gdjax.eval import classifier

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "split_digits.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config file[:variant].",
                                lock_config=True)
flags.DEFINE_string("output", None, "Directory to save to (default: the config's classifier "
                    "directory, where the evaluation hook looks).")
flags.DEFINE_integer("epochs", None, "Training epochs (default: per data set).")
flags.DEFINE_integer("batch_size", None, "Batch size (default: per data set).")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")


def main(argv):
    del argv
    f = flags.FLAGS
    path = f.output or classifier.default_classifier_dir(f.config)
    _, meta = classifier.train_for_config(f.config, path, epochs=f.epochs,
                                          batch_size=f.batch_size, lr=f.lr)
    print(f"{meta['dataset']}: test accuracy {meta['test_accuracy']:.4f} after "
          f"{meta['epochs']} epochs ({meta['train_seconds']:.1f} s); saved to {path}")


if __name__ == "__main__":
    app.run(main)
