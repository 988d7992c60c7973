"""One process of the multi-process train-step test (tests/test_distributed.py).

    python -m tests.distributed_worker --process_id=0 --num_processes=2 --port=12345 --out=DIR
    python -m tests.distributed_worker ... --loop_workdir=W    # a whole continual.train run

Every process builds the same global ('data',) mesh over all devices of all processes,
keeps only its own rows of each global batch (`local_rows`), assembles the global batch
with `shard_batch`, and runs the compiled full-generation-distillation step for `STEPS`
steps. It writes `DIR/process_<i>.npz`: the loss and gradient norm of each step, the rows
it fed, and the final params gathered to the host.

The test imports `run` to compute its one-device reference in its own process (`mesh=None`:
plain jit, no sharding), so both sides share the constants, data and model below.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

T0 = time.time()  # progress lines carry the seconds since start: a hang shows where

STEPS = 3
BATCH = 8  # global rows per step; divisible by the 4 devices of 2 processes x 2
SEED = 0
EXAMPLES = 24  # 3 batches per epoch: each step sees other rows
LEARNING_RATE = 1e-3


def dataset() -> np.ndarray:
    """The images every process holds in full (as a real run holds its data set)."""
    return np.random.default_rng(SEED).uniform(-1, 1, (EXAMPLES, 16, 16, 1)).astype(np.float32)


def flat_params(params) -> dict[str, np.ndarray]:
    """{'path/to/leaf': host array} for a pytree of (fully replicated or host) arrays."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


def build(mesh):
    """(step fn, initial student state, teacher params) for the tiny UNet; mesh may be None."""
    import jax
    from gdjax import strategies, unet
    from gdjax.schedule import make_schedule
    from gdjax.strategies import StrategyConfig
    from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step

    cfg = unet.get_unet_config("tiny")
    model = unet.UNet(cfg)

    def apply_fn(params, x, t):
        return model.apply({"params": params}, x, t)

    opt = make_optimizer(OptimConfig(learning_rate=LEARNING_RATE))
    # A 2-step teacher: its reverse process is a lax.scan over sharded rows inside the step.
    strategy = StrategyConfig(strategies.FULL_GENERATION, lambd=0.7, teacher_steps=2)
    step = make_train_step(apply_fn=apply_fn, schedule=make_schedule(), strategy=strategy,
                           optimizer=opt, mesh=mesh)
    state = init_state(unet.init_params(cfg, jax.random.key(0)), opt, experience=1)
    teacher = unet.init_params(cfg, jax.random.key(1))
    return step, state, teacher


def run(mesh, sharding, rows: slice):
    """Runs STEPS steps feeding this process's `rows` of each global batch.

    `mesh=None` (with `sharding=None`, `rows=slice(None)`): the whole batch, plain jit.
    Returns (losses [STEPS], gradient norms [STEPS], fed rows [STEPS, rows, 16, 16, 1],
    final params gathered to this host).
    """
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from gdjax import data as gdata

    images = dataset()
    labels = np.zeros(len(images), np.int32)
    step, state, teacher = build(mesh)
    if mesh is not None:
        # Host values, the same on every process, placed replicated on the global mesh.
        state, teacher = jax.device_put((state, teacher), NamedSharding(mesh, P()))
    # Replicated outputs span every process (not fully addressable, so no device_get):
    # process_allgather hands each host the global value.
    to_host = (jax.device_get if mesh is None
               else lambda tree: multihost_utils.process_allgather(tree, tiled=True))
    losses, grad_norms, fed = [], [], []
    for s in range(STEPS):
        local = gdata.host_batch(images, labels, s, batch_size=BATCH, seed=SEED, experience=1,
                                 rows=rows)
        fed.append(local["image"])
        batch = {"image": local["image"]}
        if sharding is not None:
            batch = gdata.shard_batch(batch, sharding, batch_size=BATCH)
        state, metrics = step(state, teacher, batch, jax.random.key(3))
        m = to_host(metrics)
        losses.append(m["loss"])
        grad_norms.append(m["grad_norm"])
        print(f"step {s} done at {time.time() - T0:.1f} s", flush=True)
    params = to_host(state.params)
    return np.stack(losses), np.stack(grad_norms), np.stack(fed), params


def loop_config():
    """A tiny 2-experience digits run (the test compares it with one process)."""
    from tests.helpers import tiny_config
    c = tiny_config()
    c.solver.enabled = False
    c.eval.save_experience_params = False
    return c


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--loop_workdir", default="")
    args = parser.parse_args()

    import jax

    if args.num_processes > 1:
        # XLA:CPU needs a cross-process collectives backend for the gradient all-reduce;
        # gloo is jax 0.10's default, set here so that a changed default cannot break it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                                   num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=60)
    assert jax.process_count() == args.num_processes, jax.process_count()
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} "
          f"of {jax.device_count()} devices, ready at {time.time() - T0:.1f} s", flush=True)
    from gdjax import data as gdata
    from jax.sharding import AxisType

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    sharding = gdata.data_sharding(mesh)
    rows = gdata.local_rows(sharding, BATCH)
    losses, grad_norms, fed, params = run(mesh, sharding, rows)
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"), losses=losses,
             grad_norms=grad_norms, fed=fed,
             rows=np.array([rows.start, rows.stop]),
             local_devices=jax.local_device_count(), global_devices=jax.device_count(),
             **{f"param:{k}": v for k, v in flat_params(params).items()})
    print(f"process {args.process_id}: steps done, losses {losses.tolist()}", flush=True)
    if args.loop_workdir:  # then a whole run in the same processes (one start for both)
        from gdjax import continual
        continual.train(loop_config(), args.loop_workdir)  # one workdir, shared by both
        print(f"process {args.process_id}: loop done at {time.time() - T0:.1f} s", flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
