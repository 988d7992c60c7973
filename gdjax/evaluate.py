"""Re-evaluation of a saved run: rebuild its config, score each saved generator again.

`evaluate_run(workdir, base_config)` rebuilds the run's config from its `config.json`
(`config_from_json`: the values applied onto `base_config`, the project's
`configs/base.get_config()`), builds the run (`continual.build`), and for every saved
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
import json
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax

from gdjax import continual
from gdjax import data as gdata
from gdjax.convert import GDJAX_CONFIG_FILE, restore_params
from gdjax.eval import hooks
from gdjax.logs import read_metrics, replace_stream

log = logging.getLogger(__name__)

STREAM = "evaluation"
EXPERIENCE_PARAMS = "experience_params"
FINAL_PARAMS = "final_params"
_EXPERIENCE_DIR = re.compile(r"^experience_(\d+)$")
# Sections every gdjax run config has (configs/base.py); a config.json without them is
# another program's (a diffusers model's config.json, say).
SECTIONS = ("data", "model", "diffusion", "strategy", "train", "eval")


# ----------------------------------------------------------------------------- the config

def read_config_json(workdir: str) -> dict:
    """The run's config.json as a dict; raises, naming the file, if it is absent or not a
    gdjax run config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir} has no config.json: not a gdjax run directory (launch/train.py writes "
            f"one when a run starts); pass the --workdir of a run.")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): not a gdjax run config.") from e
    missing = [s for s in SECTIONS if not isinstance(values, dict)
               or not isinstance(values.get(s), dict)]
    if missing:
        raise ValueError(f"{path} is not a gdjax run config: it has no {', '.join(missing)} "
                         f"section(s) of configs/base.py; pass the --workdir of a gdjax run.")
    return values


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
    path = os.path.join(workdir, "config.json")
    return config_from_json(read_config_json(workdir), base_config, where=path)


# ----------------------------------------------------------------------------- saved params

def _is_params_dir(path: str) -> bool:
    # save_params writes unet_config.json last: without it the save never finished.
    return os.path.isfile(os.path.join(path, GDJAX_CONFIG_FILE))


def saved_params(workdir: str, num_experiences: int) -> dict[int, str]:
    """experience index -> directory of the generator saved after that experience.

    `experience_params/experience_<k>/` when the run saved any, else `final_params/` as
    the last experience. Raises FileNotFoundError naming the directories if neither exists.
    """
    root = os.path.join(workdir, EXPERIENCE_PARAMS)
    found = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _EXPERIENCE_DIR.match(name)
            if match and _is_params_dir(os.path.join(root, name)):
                found[int(match.group(1))] = os.path.join(root, name)
    final = os.path.join(workdir, FINAL_PARAMS)
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


def _restore(path: str, run: continual.Run):
    unet_config, params = restore_params(path)
    if dataclasses.replace(unet_config, dtype=run.unet_config.dtype) != run.unet_config:
        raise ValueError(f"{path} holds a UNet {unet_config}, but the run's config.json says "
                         f"model.name={run.config.model.name!r}, a {run.unet_config}.")
    return jax.device_put(params, run.replicated)


# ----------------------------------------------------------------------------- rows

def end_step(run: continual.Run, k: int) -> int:
    """The global train step at the end of experience k (the step of its checkpoint)."""
    return sum(continual.num_steps(run, j) for j in range(k + 1))


def write_rows(workdir: str, rows: Sequence[dict]) -> None:
    """Puts `rows` (each with "step" and "experience") into metrics/evaluation.jsonl,
    replacing the rows of the same experiences; atomic, sorted by experience."""
    new = {row["experience"]: row for row in rows}
    kept = [r for r in read_metrics(workdir, STREAM) if r.get("experience") not in new]
    replace_stream(workdir, STREAM,
                   sorted(kept + list(new.values()), key=lambda r: r.get("experience", -1)))


def _hook_for(config, eval_hook: Callable | None) -> Callable:
    hook = eval_hook if eval_hook is not None else hooks.default_eval_hook(config)
    if hook is None:
        raise FileNotFoundError(
            f"no evaluation classifier for data.name={config.data.name!r}: train one with "
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
    run = continual.build(config, workdir)
    saved = saved_params(workdir, len(run.experiences))
    chosen = _choose(saved, experiences, workdir)
    hook = _hook_for(config, eval_hook)
    rows = []
    for k in chosen:
        log.info("evaluating %s after experience %d (%s)", workdir, k, saved[k])
        metrics = hook(run, k, _restore(saved[k], run))
        rows.append({"step": end_step(run, k), "experience": k,
                     "classes_seen": len(gdata.seen_classes(run.experiences, k)),
                     "num_samples": config.eval.num_samples, "eval_steps": config.eval.steps,
                     **metrics})
        write_rows(workdir, rows)  # after each one: a kill keeps the finished experiences
    return rows
