"""launch/device_check.sh, the prepared accelerator check, dry-run at tiny sizes on the CPU
(DEVICE_CHECK_DRY_RUN=1): every command it will run on a device works and writes its
files, before any device time is spent on it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # about 5 minutes on 2 cores: `python -m pytest -q -m slow tests`
def test_device_check_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DEVICE_CHECK_DRY_RUN="1", JAX_PLATFORMS="cpu",
               PYTHON=sys.executable, DEVICE_CHECK_DIR=str(tmp_path / "no_stage"))
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "device_check.sh")], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"device check done: {out}" in done.stdout
    names = sorted(os.listdir(out))
    assert names == ["bench_b8.json", "bench_b8.txt", "bench_float32.json", "bench_float32.txt",
                     "bench_k8.json", "bench_k8.txt", "bench_prefetch.json",
                     "bench_prefetch.txt", "project.txt", "versions.txt"]
    bench = json.loads((out / "bench_float32.json").read_text())
    rows = {(s["row"], s["framework"]) for s in bench["summary"]}
    for row in ("plain step (B)", "generative distillation", "generative replay",
                "gaussian distillation", "sampling (DDIM 10)"):
        assert {(row, "gdjax"), (row, "pytorch")} <= rows
    fed = {s["row"] for s in json.loads((out / "bench_prefetch.json").read_text())["summary"]}
    assert {"plain step, pipeline, prefetch 2", "plain step, pipeline, no prefetch"} <= fed
    k8 = json.loads((out / "bench_k8.json").read_text())
    assert k8["config"]["steps_per_call"] == 8 and k8["config"]["dtype"] == "bfloat16"
    assert json.loads((out / "bench_b8.json").read_text())["config"]["batch"] == 8
    project = (out / "project.txt").read_text()
    assert "generative_distillation" in project and "**all**" in project
    assert "jax" in (out / "versions.txt").read_text()
