"""Checks a run config's values before anything is loaded or compiled.

The config files (configs/*.py) are locked ConfigDicts, so a misspelt key already fails
there; this module checks the values and their combinations, and names the fix.
"""

from __future__ import annotations

import math

from gdjax import losses, strategies
from gdjax.eval.classifier import ARCHITECTURES

MODES = ("continual", "iid", "iid_distill")
IID_DISTILL_STRATEGIES = (strategies.GAUSSIAN, strategies.FULL_GENERATION,
                          strategies.PARTIAL_GENERATION)
DTYPES = ("float32", "bfloat16")
ON_NAN = ("stop", "skip")
FID_AT = ("all", "last")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(section, names: tuple, prefix: str) -> None:
    for name in names:
        value = section[name]
        _require(isinstance(value, int) and value > 0,
                 f"{prefix}.{name}={value!r} must be a positive integer.")


def _finite(section, names: tuple, prefix: str, *, low: float | None = None) -> None:
    """Real numbers that are not NaN or inf (and >= low when given)."""
    for name in names:
        value = section[name]
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        _require(ok and (low is None or value >= low),
                 f"{prefix}.{name}={value!r} must be a finite number"
                 + (f" >= {low}." if low is not None else "."))


def validate_config(config) -> None:
    """Raises ValueError naming the first bad key, its value and what would be valid."""
    for section in ("data", "model", "diffusion", "strategy", "train", "eval", "solver", "log"):
        _require(section in config, f"the config has no '{section}' section: start from "
                                    f"configs/base.py get_config().")
    s, t, e, d = config.strategy, config.train, config.eval, config.data
    strategies.StrategyConfig(name=s.name).validate()
    _require(t.mode in MODES, f"train.mode={t.mode!r} is unknown; use one of {MODES}.")
    _require(t.criterion in losses.CRITERIA,
             f"train.criterion={t.criterion!r} is unknown; use one of {losses.CRITERIA}.")
    _require(t.on_nan in ON_NAN, f"train.on_nan={t.on_nan!r} is unknown; use one of {ON_NAN}.")
    if t.mode == "iid_distill":
        _require(s.name in IID_DISTILL_STRATEGIES,
                 f"train.mode='iid_distill' distils with strategy.name in "
                 f"{IID_DISTILL_STRATEGIES}, not {s.name!r}.")
    if t.mode == "iid":
        _require(s.name == strategies.NAIVE,
                 f"train.mode='iid' trains on all the data at once: set strategy.name='naive' "
                 f"(got {s.name!r}).")
    _require(config.model.dtype in DTYPES,
             f"model.dtype={config.model.dtype!r} is unknown; use one of {DTYPES}.")
    _positive(d, ("image_size", "channels", "n_experiences", "prefetch"), "data")
    for section, name in (("data", "flip"), ("data", "drop_last"), ("train", "reset_optimizer"),
                          ("strategy", "weight_replay_loss")):
        value = config[section][name]
        _require(isinstance(value, bool), f"{section}.{name}={value!r} must be True or False.")
    _positive(t, ("batch_size", "log_every", "checkpoint_every", "max_to_keep"), "train")
    _positive(e, ("steps", "num_samples", "batch_size", "grid_samples"), "eval")
    _require(e.fid_at in FID_AT, f"eval.fid_at={e.fid_at!r} is unknown; use one of {FID_AT}.")
    _require(isinstance(e.train_classifier, bool) and isinstance(e.fid, bool),
             f"eval.fid={e.fid!r} and eval.train_classifier={e.train_classifier!r} must be "
             f"True or False.")
    _require(e.classifier in ARCHITECTURES,
             f"eval.classifier={e.classifier!r} is unknown; use one of {ARCHITECTURES} "
             f"(the network that labels samples and gives fd_classifier's features).")
    _require(t.steps_per_experience > 0 or t.epochs_per_experience > 0,
             "set train.steps_per_experience or train.epochs_per_experience to a positive value.")
    _require(isinstance(config.seed, int) and 0 <= config.seed < 2**31,
             f"seed={config.seed!r} must be an integer in 0..2**31 - 1.")
    _finite(t, ("learning_rate", "grad_clip"), "train")  # grad_clip <= 0: no clipping
    _require(t.learning_rate > 0, f"train.learning_rate={t.learning_rate} must be > 0.")
    _finite(e, ("eta",), "eval", low=0.0)
    _finite(s, ("lambd", "teacher_eta"), "strategy", low=0.0)
    _require(1 <= e.steps <= config.diffusion.num_train_timesteps,
             f"eval.steps={e.steps} must be in 1..{config.diffusion.num_train_timesteps}.")
    _require(s.er_buffer_size > 0, f"strategy.er_buffer_size={s.er_buffer_size} must be > 0.")
    _validate_solver(config.solver)
    strategies.StrategyConfig(
        name=s.name, lambd=s.lambd, replay_start_timestep=s.replay_start_timestep,
        teacher_steps=s.teacher_steps, teacher_eta=s.teacher_eta,
        replay_size=s.replay_size).validate(config.diffusion.num_train_timesteps)


SOLVER_STRATEGIES = ("auto", "naive", "cumulative", "generative_replay")


def _validate_solver(v) -> None:
    _require(v.strategy in SOLVER_STRATEGIES,
             f"solver.strategy={v.strategy!r} is unknown; use one of {SOLVER_STRATEGIES}.")
    _positive(v, ("epochs", "batch_size"), "solver")
    _finite(v, ("learning_rate", "temperature"), "solver")
    _require(v.learning_rate > 0 and v.temperature > 0,
             f"solver.learning_rate={v.learning_rate} and solver.temperature={v.temperature} "
             f"must be > 0.")
    _require(isinstance(v.replay_size, int) and v.replay_size >= 0,
             f"solver.replay_size={v.replay_size!r} must be an integer >= 0 (0: batch size).")


def define_config_flag(default: str, help_string: str):
    """`--config` as a locked ml_collections config file flag (launch/*.py).

    ml_collections applies `--config.x.y=...` overrides while the flag is defined and
    reports a misspelt key with a three-part traceback; this turns that into one line
    naming the override, the suggestion and where the keys are defined (exit status 1).
    """
    import sys

    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file("config", default, help_string, lock_config=True)
    except (AttributeError, KeyError) as e:
        raise SystemExit(_unknown_key_message(str(e), sys.argv[1:])) from None


def _unknown_key_message(error: str, argv: list[str]) -> str:
    # ml_collections' text, nested in reprs: "'\\'batchsize\\'\\nDid you mean ...?'"
    text = error.replace("\\n", "\n").replace("\\'", "'").strip("'\"")
    key, _, hint = text.partition("\n")
    key = key.strip("'\"").split('"')[1] if key.startswith("Key") else key.strip("'\"")
    given = [a for a in argv if a.startswith("--config.")
             and key in a.split("=", 1)[0][len("--config."):].split(".")]
    where = f" in {given[0]}" if given else ""
    return (f"gdjax: unknown config key {key!r}{where}. {hint.strip()} "
            f"Every key is defined, with its default, in configs/base.py.").replace("  ", " ")
