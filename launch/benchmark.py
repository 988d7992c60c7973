"""Speed study: gdjax and the PyTorch baseline side by side on one machine and config.

    python -m launch.benchmark --model=ddim_medium --batch=32 --iters=5 --warmup=1 \
        [--json=out.json] [--skip_torch] [--dtype=float32|bfloat16] [--rows=plain,sampling]

Prints a markdown table (see gdjax/benchmark.py for the rows and how FLOPs are counted)
and, with --json, writes every raw timing, the versions, the hardware and this command.
"""

import os

from gdjax import xla_flags

xla_flags.set_cpu_defaults()  # before jax starts: XNNPACK convolutions on CPU

from absl import app, flags  # noqa: E402

from gdjax import benchmark  # noqa: E402
from launch import common  # noqa: E402

_ROW_KEYS = {"plain": benchmark.PLAIN, "plain2b": benchmark.PLAIN_2B, "gd": benchmark.GD,
             "replay": benchmark.REPLAY, "gaussian": benchmark.GAUSSIAN,
             "sampling": benchmark.SAMPLE, "fed": benchmark.FED,
             "fed_inline": benchmark.FED_INLINE}
_DEFAULT_ROWS = ["plain", "plain2b", "gd", "replay", "gaussian", "sampling"]

flags.DEFINE_string("model", "ddim_medium", "UNet config name (gdjax.unet.get_unet_config).")
flags.DEFINE_integer("batch", 32, "Batch B (replay rows: B as well).")
flags.DEFINE_integer("iters", 5, "Timed calls per row.")
flags.DEFINE_integer("warmup", 1, "Untimed calls per row after compilation.")
flags.DEFINE_integer("teacher_steps", 2, "Teacher DDIM steps of the replay rows.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides.")
flags.DEFINE_list("rows", _DEFAULT_ROWS, f"Rows to time, of {list(_ROW_KEYS)} (fed, "
                  "fed_inline: the plain step fed by the input pipeline with and without "
                  "its prefetch; gdjax only).")
flags.DEFINE_bool("skip_torch", False, "Time gdjax only.")
flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads (the CPU cores).")
flags.DEFINE_string("json", None, "Where to write the raw results.")
flags.DEFINE_integer("steps_per_call", 1, "gdjax's train rows: steps per dispatch "
                     "(train.steps_per_call); times are per step.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.rows) - set(_ROW_KEYS))
    if unknown:
        raise app.UsageError(f"--rows: unknown {unknown}; use {list(_ROW_KEYS)}")
    cfg = benchmark.BenchConfig(
        model=FLAGS.model, batch=FLAGS.batch, iters=FLAGS.iters, warmup=FLAGS.warmup,
        teacher_steps=FLAGS.teacher_steps, dtype=FLAGS.dtype, torch=not FLAGS.skip_torch,
        torch_threads=FLAGS.threads,
        steps_per_call=FLAGS.steps_per_call, rows=tuple(_ROW_KEYS[r] for r in FLAGS.rows))
    result = benchmark.run(cfg)
    print(result["table"])
    print(f"load average (1, 5, 15 min): start {result['load_average_start']}, "
          f"end {result['load_average_end']}")
    if FLAGS.json:
        benchmark.write_json(result, FLAGS.json)


if __name__ == "__main__":
    common.run(main)
