"""A run's directory (its workdir): every path in it, its config.json, guarded writes.

    <workdir>/config.json                      the run's config, written first of all
    <workdir>/checkpoints/<step>/              Orbax checkpoints (gdjax/checkpoint.py)
    <workdir>/metrics/<stream>.jsonl           metric rows (gdjax/logs.py)
    <workdir>/tensorboard/, wandb_run_id       optional mirrors of the rows
    <workdir>/samples/experience_<k>.png       the sample grid after experience k
    <workdir>/samples/histogram_experience_<k>.png
    <workdir>/experience_params/experience_<k>/  the generator after experience k
    <workdir>/final_params/                    the generator at the end
    <workdir>/best_params/, best.json          the IID study's lowest-AUC student so far

The loop asks this module for paths and never builds one. `writing(what, resume_note)`
wraps the write of a run output: a full disk becomes a `DiskFullError` naming the output
and the checkpoint a rerun resumes from. `fingerprint` tells a run's config from another's;
`run_fingerprint` does so for a workdir's run, under code newer than the run (ADDED_KEYS).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping

import numpy as np

from gdjax import files

CONFIG_FILE = "config.json"
CHECKPOINTS, METRICS, SAMPLES = "checkpoints", "metrics", "samples"
EXPERIENCE_PARAMS, FINAL_PARAMS = "experience_params", "final_params"
BEST_PARAMS, BEST_FILE = "best_params", "best.json"  # gdjax/studies/iid.py
# What a run writes into its workdir; `wipe` deletes exactly these.
RUN_OUTPUTS = (CHECKPOINTS, METRICS, SAMPLES, "tensorboard", FINAL_PARAMS, EXPERIENCE_PARAMS,
               CONFIG_FILE, "wandb_run_id", BEST_PARAMS, BEST_FILE)
# Sections every gdjax run config has (configs/base.py): a config.json without them is
# another program's (a diffusers model's config.json, say).
SECTIONS = ("data", "model", "diffusion", "strategy", "train", "eval")


class DiskFullError(RuntimeError):
    """A metric row, sample grid or params file could not be written: the disk is full.

    The checkpoints are untouched; the message names the one a rerun resumes from.
    """


# ----------------------------------------------------------------------------- paths

def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINTS)


def metrics_dir(workdir: str) -> str:
    return os.path.join(workdir, METRICS)


def sample_grid(workdir: str, k: int) -> str:
    """The PNG grid of samples drawn after experience k (0-based)."""
    return os.path.join(workdir, SAMPLES, f"experience_{k}.png")


def histogram(workdir: str, k: int) -> str:
    """The PNG of the true and generated class frequencies after experience k."""
    return os.path.join(workdir, SAMPLES, f"histogram_experience_{k}.png")


def experience_params_dir(workdir: str, k: int) -> str:
    """Where the generator's params after experience k are kept (`eval.save_experience_params`)."""
    return os.path.join(workdir, EXPERIENCE_PARAMS, f"experience_{k}")


def final_params_dir(workdir: str) -> str:
    return os.path.join(workdir, FINAL_PARAMS)


def wipe(workdir: str) -> None:
    """Deletes a run's outputs (`RUN_OUTPUTS`) from `workdir`; other files stay."""
    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------- config.json

def fingerprint(config: Mapping[str, Any]) -> str:
    """The sha256 hex digest of a JSON-able dict (or ConfigDict), independent of key order;
    numpy scalars count as the Python numbers they hold."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# Config keys added to configs/base.py after runs were made without them, each with the value
# that does what the code before it did. A run whose config.json lacks such a key is the
# same run as a config holding that value there, so newer code resumes (or skips) it; any
# other value is another run. Add a key here only if that value reproduces the old code.
ADDED_KEYS = {"eval.every_steps": 0, "train.ema_decay": 0.0, "train.ema_teacher": False,
              # the solver's baselines: read only under their own solver.strategy
              "solver.er_buffer_size": 300, "solver.ewc_lambda": 1.0, "solver.si_lambda": 1.0,
              "solver.si_eps": 1e-7, "solver.lwf_alpha": [0.0, 0.5, 1.33333, 2.25, 3.2],
              "solver.lwf_temperature": 2.0,
              # the generator's regularisers (gdjax/regularisers.py)
              "strategy.regulariser": "none", "strategy.regulariser_weight": 0.0,
              "strategy.regulariser_batches": 0, "strategy.regulariser_eps": 0.01,
              # class-conditional models and replay
              "model.class_conditional": False, "strategy.teacher_guidance": 1.0,
              "train.label_dropout": 0.1, "eval.guidance_scale": 1.0,
              # the replay rows' timestep rule
              "strategy.replay_timesteps": "uniform", "strategy.replay_snr_gamma": 5.0,
              # the sampler's x0 clip
              "diffusion.clip_sample": True}


def comparable(config: Mapping[str, Any], stored: Mapping[str, Any] | None) -> dict:
    """`config` (a dict or ConfigDict) without the ADDED_KEYS that `stored` (a run's
    config.json; None: a new run) lacks and `config` holds at their old-code value."""
    config = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config,
                                   default=_json_default))
    for dotted, old_value in ADDED_KEYS.items():
        *sections, key = dotted.split(".")
        here, there = config, stored
        for name in sections:
            here = here.get(name, {}) if isinstance(here, dict) else {}
            there = there.get(name, {}) if isinstance(there, Mapping) else {}
        if stored is not None and key not in there and here.get(key, old_value) == old_value:
            here.pop(key, None)
    return config


def with_added_keys(config: Mapping[str, Any]) -> dict:
    """A run's config.json dict with every ADDED_KEYS key it lacks at its old-code value:
    runs of older and newer code side by side (a report's labels)."""
    config = json.loads(json.dumps(config, default=_json_default))
    for dotted, old_value in ADDED_KEYS.items():
        *sections, key = dotted.split(".")
        here = config
        for name in sections:
            here = here.setdefault(name, {})
        here.setdefault(key, old_value)
    return config


def run_fingerprint(workdir: str, config: Mapping[str, Any]) -> str:
    """The fingerprint of `config` as the run in `workdir` would have it: `comparable` to
    its config.json when it has one (checkpoints carry this, config.json is compared by it)."""
    stored = read_config(workdir) if os.path.isfile(config_path(workdir)) else None
    return fingerprint(comparable(config, stored))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{obj!r} (type {type(obj).__name__}) is not JSON-able")


def write_config(workdir: str, config: Mapping[str, Any]) -> None:
    """Writes config.json atomically: a kill mid-write must not leave a torn file that
    blocks the restart."""
    files.write_json(config_path(workdir), dict(config))


def read_config(workdir: str) -> dict:
    """The run's config.json as a dict; FileNotFoundError or ValueError, naming the file,
    if it is absent or not a gdjax run config."""
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir} has no config.json: not a gdjax run directory (launch/train.py writes "
            f"one when a run starts).")
    values = files.read_json(path, fix="not a gdjax run config")
    missing = [s for s in SECTIONS if not isinstance(values, dict)
               or not isinstance(values.get(s), dict)]
    if missing:
        raise ValueError(f"{path} is not a gdjax run config: it has no {', '.join(missing)} "
                         f"section(s) of configs/base.py.")
    return values


# ----------------------------------------------------------------------------- full disks

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, says the disk (or quota) is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        # Orbax and tensorstore re-raise OS errors as their own types, with the text kept.
        if any(os.strerror(code) in str(err) for code in _DISK_FULL):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def writing(what: str, resume_note: Callable[[], str], *, passes: tuple = ()):
    """Runs the write of a run output; a full disk raises DiskFullError naming `what` and
    `resume_note()` (the checkpoint a rerun resumes from). Other errors, and those of the
    types in `passes`, go through unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - orbax raises many types; only a full disk is ours
        if isinstance(e, (DiskFullError, *passes)) or not is_disk_full(e):
            raise
        raise DiskFullError(f"could not write {what}: the disk is full ({type(e).__name__}: "
                            f"{e}); {resume_note()}") from e
