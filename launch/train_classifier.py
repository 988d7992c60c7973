"""Train (or convert) the evaluation classifier of a config's data set, saved where runs look.

    python -m launch.train_classifier                                   # the digits, ResNet-18
    python -m launch.train_classifier --config=configs/split_fmnist.py --epochs=20
    python -m launch.train_classifier --arch=simple_cnn                 # the small CNN instead
    python -m launch.train_classifier --config=configs/split_fmnist.py \
        --from_torch=weights/cnn_fmnist/resnet.pth                      # the authors' ResNet-18

The architecture defaults to the config's `eval.classifier`. The classifier is written to
the user cache, `~/.cache/gdjax/classifiers/<arch>/<data set>_<size>px_<channels>ch` (or
under $GDJAX_CACHE_DIR; gdjax/eval/classifier.py), unless --output says otherwise; the test
accuracy is printed.
--from_torch converts a torchvision ResNet-18 state dict instead of training (needs torch).
"""

import os

from gdjax import xla_flags

xla_flags.set_defaults()  # before jax starts: XNNPACK on CPU, the compile cache

from absl import app, flags, logging  # noqa: E402

from gdjax import run  # noqa: E402
from gdjax.eval import classifier  # noqa: E402
from launch import common  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "split_digits.py")
common.define_config_flag(_DEFAULT_CONFIG, "Run config file[:variant].")
flags.DEFINE_enum("arch", None, list(classifier.ARCHITECTURES),
                  "Classifier architecture (default: the config's eval.classifier).")
flags.DEFINE_string("output", None, "Directory to save to (default: the config's classifier "
                    "directory, where the evaluation hook looks).")
flags.DEFINE_integer("epochs", None, "Training epochs (default: per architecture and data set).")
flags.DEFINE_integer("batch_size", None, "Batch size (default: per architecture and data set).")
flags.DEFINE_float("lr", None, "Adam learning rate (default: per architecture and data set).")
flags.DEFINE_string("from_torch", None, "Convert this torchvision ResNet-18 state dict (.pth) "
                    "instead of training.")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    settings = run.settings_from_config(f.config)
    arch = f.arch or settings.eval.classifier
    path = f.output or classifier.default_classifier_dir(settings.data, arch)
    if f.from_torch:
        if arch != classifier.RESNET18:
            raise app.UsageError("--from_torch reads a ResNet-18: use --arch=resnet18")
        _, meta = classifier.convert_torch_for_settings(settings, f.from_torch, path)
        print(f"converted {f.from_torch}: test accuracy {meta['test_accuracy']:.4f}; "
              f"saved to {path}")
        return
    _, meta = classifier.train_for_settings(settings, path, arch=arch, epochs=f.epochs,
                                            batch_size=f.batch_size, lr=f.lr)
    print(f"{meta['dataset']} {arch}: test accuracy {meta['test_accuracy']:.4f} after "
          f"{meta['epochs']} epochs ({meta['train_seconds']:.1f} s); saved to {path}")


if __name__ == "__main__":
    common.run(main)
