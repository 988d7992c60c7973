"""Converts the FID Inception-v3 weights (a PyTorch .pth file) into gdjax's Orbax format.

    python -m launch.convert_inception --src weights-inception-2015-12-05-6726825d.pth
    python -m launch.convert_inception --src pt_inception-2015-12-05-6726825d.pth --dst <dir>

The file is torch-fidelity's or pytorch-fid's port of the TF 2015-12-05 Inception graph (the
URLs are in gdjax/eval/inception.py). --dst defaults to where FID looks for the weights,
$GDJAX_INCEPTION_DIR or ~/.cache/gdjax/inception. Reading the .pth needs torch; using the
converted weights does not.
"""

from absl import app, flags

from gdjax.eval import inception

_SRC = flags.DEFINE_string("src", None, "The Inception weight file (.pth).", required=True)
_DST = flags.DEFINE_string("dst", None, "Output directory (default: $GDJAX_INCEPTION_DIR or "
                           "~/.cache/gdjax/inception).")


def main(argv):
    del argv
    dst = inception.convert_file(_SRC.value, _DST.value)
    print(f"converted {_SRC.value} -> {dst}: Inception-v3 pool features "
          f"({inception.FEATURE_DIM}) for FID")


if __name__ == "__main__":
    app.run(main)
