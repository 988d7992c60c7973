"""A grid of runs (strategy variants x seeds) from one base config, then their report.

`run_sweep` trains every (variant, seed) pair into `<root>/<variant>_seed<seed>` one after
another and writes the report of all of them into `<root>/report`. Every run is an ordinary
resumable gdjax run, so a sweep killed at any moment and started again with the same
arguments skips the finished runs, resumes the interrupted one from its last checkpoint and
ends with the same report. `launch/reproduce.py` is its command line.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Callable, Sequence

log = logging.getLogger(__name__)


def make_runs(config_for: Callable, variants: Sequence[str],
              seeds: Sequence) -> list[tuple[str, object]]:
    """[("<variant>_seed<seed>", config)]: `config_for(variant)` (a fresh config with that
    variant's strategy and its lambda, e.g. a config file's `get_config(variant)` plus the
    command line's overrides) for each variant, with each seed."""
    runs = []
    for variant in variants:
        for seed in seeds:
            c = copy.deepcopy(config_for(variant))
            c.seed = int(seed)
            runs.append((f"{variant}_seed{seed}", c))
    return runs


def run_sweep(runs: Sequence[tuple[str, object]], root: str, *,
              train_fn: Callable | None = None, hook_fn: Callable | None = None) -> dict:
    """Trains (or resumes, or skips) every (name, config) run into `<root>/<name>`, then
    writes `<root>/report`; returns the report's written paths.

    `train_fn(config, workdir, eval_hook=...)` defaults to `continual.train` and
    `hook_fn(config)` to the default evaluation hook.
    """
    from gdjax import continual, report
    from gdjax.eval import hooks
    names = [name for name, _ in runs]
    if not runs or len(set(names)) != len(names):
        raise ValueError(f"a sweep needs runs with distinct names, got {names}")
    train_fn = train_fn or continual.train
    hook_fn = hook_fn or hooks.default_eval_hook
    workdirs, started = [], time.monotonic()
    for i, (name, config) in enumerate(runs):
        workdir = os.path.join(root, name)
        log.warning("sweep: run %d/%d %s (%s elapsed)", i + 1, len(runs), name,
                    _minutes(time.monotonic() - started))
        train_fn(config, workdir, eval_hook=hook_fn(config))
        workdirs.append(workdir)
    paths = report.write_report(workdirs, os.path.join(root, "report"))
    log.warning("sweep: %d runs and the report in %s", len(runs),
                _minutes(time.monotonic() - started))
    return paths


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
