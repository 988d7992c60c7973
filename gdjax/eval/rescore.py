"""Re-scoring a saved run: rebuild its config, score each saved generator again.

`evaluate_run(workdir, base_config)` rebuilds the run's config from its `config.json`
(`config_from_json`: the values applied onto `base_config`, the project's
`configs/base.get_config()`), builds the run (`run.build`), and for every saved
generator, `experience_params/experience_<k>/` (or `final_params/` as the last experience when
a run saved none of those), calls the evaluation hook `hook(run, k, params)`. Each result
becomes one row `{"step", "experience", "classes_seen", "num_samples", "eval_steps",
**metrics}` of the stream `metrics/evaluation.jsonl`, apart from the training-time rows of
`metrics/experience.jsonl`. The stream is rewritten atomically after every experience; a
re-evaluated experience replaces its old row, rows of other experiences stay. `step` is the
global train step at the end of experience k, as in the experience rows. The default hook
also redraws `samples/histogram_experience_<k>.png`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax

from gdjax import rundir
from gdjax import data as gdata
from gdjax.convert import GDJAX_CONFIG_FILE, restore_params
from gdjax.eval import hooks
from gdjax.logs import read_metrics, replace_stream
from gdjax.run import Run, build

log = logging.getLogger(__name__)

STREAM = "evaluation"
_EXPERIENCE_DIR = re.compile(r"^experience_(\d+)$")


# ----------------------------------------------------------------------------- the config

def read_config_json(workdir: str) -> dict:
    """The run's config.json (`rundir.read_config`), its errors saying what to pass."""
    try:
        return rundir.read_config(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{e} Pass the --workdir of a gdjax run.") from None


def _as_tuples(value):
    # JSON has no tuples: lists come back where the config held tuples.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _apply(config, values: Mapping[str, Any], prefix: str, where: str) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in config:
            raise ValueError(f"{where} sets {name}, which configs/base.py does not have: a "
                             f"config of another project or another gdjax version.")
        current = config[key]
        if isinstance(value, dict):
            if not hasattr(current, "items"):
                raise ValueError(f"{where}: {name} is a section there but a value here.")
            _apply(current, value, f"{name}.", where)
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = _as_tuples(value)
        try:
            config[key] = value
        except TypeError as e:
            raise ValueError(f"{where}: {name}={value!r} does not fit configs/base.py's "
                             f"{type(current).__name__} value ({e}).") from e


def config_from_json(values: Mapping[str, Any], base_config, *, where: str = "config.json"):
    """`base_config` (a ConfigDict, changed in place and returned) with `values` applied.

    Keys the values lack keep the base's defaults (a run older than the key); keys the base
    lacks are an error naming `where`.
    """
    _apply(base_config, values, "", where)
    return base_config


def load_config(workdir: str, base_config):
    """The config of the run in `workdir`, rebuilt from its config.json onto `base_config`."""
    return config_from_json(read_config_json(workdir), base_config,
                            where=rundir.config_path(workdir))


# ----------------------------------------------------------------------------- saved params

def _is_params_dir(path: str) -> bool:
    # save_params writes unet_config.json last: without it the save never finished.
    return os.path.isfile(os.path.join(path, GDJAX_CONFIG_FILE))


def saved_params(workdir: str, num_experiences: int) -> dict[int, str]:
    """experience index -> directory of the generator saved after that experience.

    `experience_params/experience_<k>/` when the run saved any, else `final_params/` as
    the last experience. Raises FileNotFoundError naming the directories if neither exists.
    """
    root = os.path.dirname(rundir.experience_params_dir(workdir, 0))
    found = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _EXPERIENCE_DIR.match(name)
            if match and _is_params_dir(rundir.experience_params_dir(workdir, int(match[1]))):
                found[int(match.group(1))] = rundir.experience_params_dir(workdir, int(match[1]))
    final = rundir.final_params_dir(workdir)
    if not found and _is_params_dir(final):
        found[num_experiences - 1] = final
    if not found:
        raise FileNotFoundError(
            f"no saved generator in {workdir}: neither {root}/experience_<k>/ nor {final}/ "
            f"holds params. The run must finish an experience first (resume it with "
            f"`python -m launch.train --workdir {workdir}` and its config).")
    return dict(sorted(found.items()))


def _choose(saved: dict[int, str], experiences: Sequence[int] | None, workdir: str) -> list[int]:
    if experiences is None:
        return list(saved)
    absent = sorted(set(experiences) - set(saved))
    if absent:
        raise ValueError(f"{workdir} has no saved generator for experience(s) {absent}; "
                         f"saved: {list(saved)} (0-based).")
    return sorted(set(experiences))


def _restore(path: str, run: Run):
    unet_config, params = restore_params(path)
    want = run.settings.unet
    if dataclasses.replace(unet_config, dtype=want.dtype) != want:
        raise ValueError(f"{path} holds a UNet {unet_config}, but the run's config.json says "
                         f"model.name={run.settings.config['model']['name']!r}, a {want}.")
    return jax.device_put(params, run.replicated)


# ----------------------------------------------------------------------------- rows

def end_step(run: Run, k: int) -> int:
    """The global train step at the end of experience k (the step of its checkpoint)."""
    return sum(run.num_steps(j) for j in range(k + 1))


def write_rows(workdir: str, rows: Sequence[dict]) -> None:
    """Puts `rows` (each with "step" and "experience") into metrics/evaluation.jsonl,
    replacing the rows of the same experiences; atomic, sorted by experience."""
    new = {row["experience"]: row for row in rows}
    kept = [r for r in read_metrics(workdir, STREAM) if r.get("experience") not in new]
    replace_stream(workdir, STREAM,
                   sorted(kept + list(new.values()), key=lambda r: r.get("experience", -1)))


def _hook_for(run: Run, eval_hook: Callable | None) -> Callable:
    hook = eval_hook if eval_hook is not None else hooks.default_eval_hook(run.settings)
    if hook is None:
        raise FileNotFoundError(
            f"no evaluation classifier for data.name={run.settings.data.name!r}: train one with "
            f"`python -m launch.train_classifier --config <the run's config>` first.")
    return hook


def evaluate_run(workdir: str, base_config, *, experiences: Sequence[int] | None = None,
                 num_samples: int | None = None, eval_hook: Callable | None = None) -> list[dict]:
    """Evaluates the run's saved generators (all, or those of `experiences`); returns the rows
    written to metrics/evaluation.jsonl.

    `base_config` is `configs.base.get_config()` (gdjax does not import configs/);
    `num_samples` overrides `eval.num_samples`; `eval_hook` defaults to
    `hooks.default_eval_hook(config)`.
    """
    config = load_config(workdir, base_config)
    if num_samples is not None:
        config.eval.num_samples = num_samples
    run = build(config, workdir)
    saved = saved_params(workdir, len(run.experiences))
    chosen = _choose(saved, experiences, workdir)
    hook = _hook_for(run, eval_hook)
    rows = []
    for k in chosen:
        log.info("evaluating %s after experience %d (%s)", workdir, k, saved[k])
        metrics = hook(run, k, _restore(saved[k], run))
        rows.append({"step": end_step(run, k), "experience": k,
                     "classes_seen": len(gdata.seen_classes(run.experiences, k)),
                     "num_samples": run.settings.eval.num_samples,
                     "eval_steps": run.settings.eval.steps,
                     **metrics})
        write_rows(workdir, rows)  # after each one: a kill keeps the finished experiences
    return rows
