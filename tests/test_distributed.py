"""Two processes joined by `jax.distributed` train exactly like one.

Two local CPU processes (2 fake devices each, gloo collectives) share one global ('data',)
mesh of 4 devices; each builds only its own rows of every global batch (`local_rows`),
assembles the global batch with `shard_batch`, and runs the compiled full-generation-
distillation step, whose teacher reverse process (a `lax.scan`) runs on the sharded replay
rows. The reference is the same steps on the whole batch in this process, plain `jax.jit`
on one device, no mesh. The processes run `tests/distributed_worker.py`.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from gdjax import unet
from tests import distributed_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, LOCAL_DEVICES = 2, 2
# Two processes started per run of this file: `python -m pytest -q -m slow tests`.
pytestmark = pytest.mark.slow
TIMEOUT_S = 180  # measured ~35 s on 2 busy cores; a lost peer otherwise hangs in a collective


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """This process's env (conftest's fast-compile flag included), with 2 CPU devices each."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}").strip())


def output_of(logs) -> str:
    """The end of each process's stdout and stderr, for a failure message."""
    tails = (pathlib.Path(p).read_text()[-3000:] for p in logs)
    return "\n".join(f"--- process {i}, last 3000 chars ---\n{t}" for i, t in enumerate(tails))


def start_processes(out, *extra):
    """Runs the worker in PROCESSES processes; fails with their output unless all exit 0."""
    port = free_port()
    logs = [str(out / f"process_{i}.log") for i in range(PROCESSES)]
    procs = []
    for i in range(PROCESSES):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.distributed_worker", f"--process_id={i}",
                 f"--num_processes={PROCESSES}", f"--port={port}", f"--out={out}", *extra],
                cwd=ROOT, env=worker_env(), stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {PROCESSES} processes did not finish in {TIMEOUT_S} s\n"
                    + output_of(logs))
    finally:
        for p in procs:  # only ours, by handle; a no-op for those already done
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0] * PROCESSES, f"exit codes {codes}\n" + output_of(logs)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The directory of one 2-process launch: each process's npz of its steps, then `shared/`,
    the workdir of a whole run both processes share; fails with their output."""
    out = tmp_path_factory.mktemp("distributed")
    start_processes(out, f"--loop_workdir={out / 'shared'}")
    return out


@pytest.fixture(scope="module")
def results(launch):
    """{process id: its npz} of the launch's steps."""
    return {i: dict(np.load(launch / f"process_{i}.npz")) for i in range(PROCESSES)}


@pytest.fixture(scope="module")
def reference():
    """The same steps on the whole batch, one device, no mesh, in this process."""
    losses, grad_norms, fed, params = worker.run(None, None, slice(None))
    return {"losses": losses, "grad_norms": grad_norms, "fed": fed,
            **{f"param:{k}": v for k, v in worker.flat_params(params).items()}}


def params_of(result) -> dict:
    return {k[len("param:"):]: v for k, v in result.items() if k.startswith("param:")}


def test_each_process_feeds_only_its_own_rows(results, reference):
    half = worker.BATCH // PROCESSES
    for i, r in results.items():
        assert (int(r["local_devices"]), int(r["global_devices"])) == (
            LOCAL_DEVICES, PROCESSES * LOCAL_DEVICES)
        np.testing.assert_array_equal(r["rows"], [i * half, (i + 1) * half])
    # Together the processes fed exactly the rows of the one-process batches.
    fed = np.concatenate([results[i]["fed"] for i in range(PROCESSES)], axis=1)
    np.testing.assert_array_equal(fed, reference["fed"])


def test_two_processes_train_like_one(results, reference):
    first = results[0]
    # Every process holds the same replica of the replicated outputs, bit for bit.
    for r in list(results.values())[1:]:
        for key in first:
            if key not in ("rows", "fed"):
                np.testing.assert_array_equal(r[key], first[key], err_msg=key)
    # Loss and gradient norm: the all-reduce only reorders float sums (measured relative
    # differences <= 1.7e-6 and <= 4e-7).
    np.testing.assert_allclose(first["losses"], reference["losses"], rtol=1e-5)
    np.testing.assert_allclose(first["grad_norms"], reference["grad_norms"], rtol=1e-5)

    got, want = params_of(first), params_of(reference)
    assert got.keys() == want.keys()
    init = worker.flat_params(unet.init_params(unet.get_unet_config("tiny"), jax.random.key(0)))
    # Adam moves every coordinate by ~lr per step whatever its gradient's size, so rounding
    # in a near-zero gradient becomes a visible move. The attention key biases have an exactly
    # zero gradient (softmax ignores a constant per query): rounding alone decides their
    # direction, so they are left to the norm check below (measured up to 2.3e-5 apart).
    for name in sorted(got):
        if not name.endswith("to_k/bias"):
            # 2e-5 is 0.7% of the 3e-3 that 3 Adam steps at lr 1e-3 can move (measured 7.5e-6).
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=2e-5,
                                       err_msg=name)
    # The whole update: a missing cross-process gradient reduction changes it by O(1).
    update = lambda p: np.concatenate([(p[k] - init[k]).ravel() for k in sorted(init)])
    delta, delta_ref = update(got), update(want)
    rel = np.linalg.norm(delta - delta_ref) / np.linalg.norm(delta_ref)
    assert rel < 1e-3, f"relative difference of the 3-step update {rel:.2e} (measured ~1e-4)"


def test_a_whole_run_on_two_processes_writes_once_and_ends_like_one(launch, tmp_path):
    """continual.train on 2 processes sharing one workdir: process 0 writes the checkpoints,
    rows and params; the run ends like one process's (Adam rounding as above)."""
    from gdjax import continual
    from gdjax.convert import restore_params
    from gdjax.logs import read_metrics
    shared, alone = launch / "shared", str(tmp_path / "alone")
    continual.train(worker.loop_config(), alone)
    rows, want = read_metrics(shared, "train"), read_metrics(alone, "train")
    assert [r["step"] for r in rows] == [r["step"] for r in want] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want], rtol=1e-4)
    got = worker.flat_params(restore_params(shared / "final_params")[1])
    ref = worker.flat_params(restore_params(os.path.join(alone, "final_params"))[1])
    for name in ref:
        if not name.endswith("to_k/bias"):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert sorted(os.listdir(shared / "checkpoints")) == sorted(
        os.listdir(os.path.join(alone, "checkpoints")))
