"""Converts a diffusers UNet2DModel directory into a gdjax params checkpoint.

    python -m launch.convert --src <diffusers model or pipeline dir> --dst <orbax dir>
"""

from absl import flags

from gdjax import convert, unet
from launch import common

_SRC = flags.DEFINE_string("src", None, "diffusers UNet2DModel (or pipeline) directory.", required=True)
_DST = flags.DEFINE_string("dst", None, "Output directory for the gdjax checkpoint.", required=True)


def main(argv):
    del argv
    config, params = convert.load_diffusers_checkpoint(_SRC.value)
    convert.save_params(_DST.value, params, config)
    print(f"converted {_SRC.value} -> {_DST.value}: {unet.param_count(params):,} parameters")


if __name__ == "__main__":
    common.run(main)
