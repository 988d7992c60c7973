"""A run: typed settings built once from a ConfigDict, then what they call for.

    config (configs/*.py, a locked ConfigDict)
      -> settings_from_config(config) -> Settings   frozen dataclasses, each validated once
      -> build(settings, workdir)     -> Run        data, experiences, model, schedule, ...

Each section of the config becomes its own frozen dataclass and validates itself on
construction (`DataSettings`, `TrainSettings`, `EvalSettings`, the model's `UNetConfig`,
the `StrategyConfig`, `OptimConfig` and `SolverConfig` of the compiled steps);
`settings_from_config` adds only the checks that span sections. Nothing downstream reads
the ConfigDict again: `Settings.config` keeps it as a plain dict, for config.json and the
fingerprint that tells a resumed run from another one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gdjax import data as gdata
from gdjax import losses, regularisers, strategies, unet
from gdjax.data import memory
from gdjax.eval import CLASSIFIERS, sampling
from gdjax.eval.solver import SOLVER_STRATEGIES, ReplayLabels, SolverConfig
from gdjax.schedule import BETA_SCHEDULES, Schedule, make_schedule, schedule_arrays
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, make_optimizer, make_train_step

MODES = ("continual", "iid", "iid_distill")
IID_DISTILL_STRATEGIES = (strategies.GAUSSIAN, strategies.GAUSSIAN_SYMMETRY,
                          strategies.NO_DISTILLATION, strategies.FULL_GENERATION,
                          strategies.PARTIAL_GENERATION, strategies.TRAJECTORY)
DTYPES = ("float32", "bfloat16")
ON_NAN = ("stop", "skip")
FID_AT = ("all", "last")
# solver.strategy: "auto" follows the generator (the classifier baselines train as their
# generator does; every other generator strategy replays from its previous generator).
SOLVER_CHOICES = ("auto",) + SOLVER_STRATEGIES
AUTO_SOLVER = {strategies.NAIVE: "naive", strategies.CUMULATIVE: "cumulative"}
SECTIONS = ("data", "model", "diffusion", "strategy", "train", "eval", "solver", "log")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(obj, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{prefix}.{name}={value!r} must be a positive integer.")


def _finite(obj, prefix: str, *names: str, low: float | None = None) -> None:
    """Real numbers that are not NaN or inf (and >= low when given)."""
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (low is None or value >= low)
        _require(ok, f"{prefix}.{name}={value!r} must be a finite number"
                 + (f" >= {low}." if low is not None else "."))


def _bools(obj, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, bool), f"{prefix}.{name}={value!r} must be True or False.")


def _one_of(value, choices, key: str, what: str = "") -> None:
    _require(value in choices, f"{key}={value!r} is unknown; use one of {choices}{what}.")


# ----------------------------------------------------------------------------- sections

@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The `data` section: which images, how they are cut into experiences and batched."""

    name: str
    source: str
    data_dir: str | None
    image_size: int
    channels: int
    n_experiences: int
    class_order: tuple[int, ...]
    flip: bool
    drop_last: bool
    prefetch: int

    def __post_init__(self):
        _positive(self, "data", "image_size", "channels", "n_experiences")
        _require(isinstance(self.prefetch, int) and not isinstance(self.prefetch, bool)
                 and self.prefetch >= 0, f"data.prefetch={self.prefetch!r} must be an integer "
                 ">= 0 (batches made ahead in a background thread; 0: none).")
        _bools(self, "data", "flip", "drop_last")
        _one_of(self.source, gdata.SOURCES, "data.source")


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """The `diffusion` section: the noise schedule (gdjax/schedule.py)."""

    beta_schedule: str
    num_train_timesteps: int
    beta_start: float
    beta_end: float
    rescale_zero_snr: bool
    clip_sample: bool

    def __post_init__(self):
        _one_of(self.beta_schedule, BETA_SCHEDULES, "diffusion.beta_schedule")
        _bools(self, "diffusion", "clip_sample")
        # schedule_arrays checks the numbers and names the bad one, on the host (a run
        # with bad data must stop before anything is placed on a device or compiled)
        schedule_arrays(**self.schedule_args())

    def schedule_args(self) -> dict:
        """This section's arguments of `schedule.make_schedule` / `schedule_arrays`."""
        return dict(beta_schedule=self.beta_schedule,
                    num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, rescale_zero_snr=self.rescale_zero_snr)

    def schedule(self) -> Schedule:
        return _schedule(self)


@functools.lru_cache(maxsize=8)
def _schedule(d: DiffusionSettings) -> Schedule:
    return make_schedule(**d.schedule_args(), clip_sample=d.clip_sample)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The `train` section, but for the optimizer's numbers (`OptimConfig`)."""

    mode: str
    batch_size: int
    epochs_per_experience: int
    steps_per_experience: int
    criterion: str
    log_every: int
    checkpoint_every: int
    max_to_keep: int
    teacher_dir: str
    on_nan: str
    reset_optimizer: bool
    steps_per_call: int
    ema_decay: float
    ema_teacher: bool
    label_dropout: float

    def __post_init__(self):
        _one_of(self.mode, MODES, "train.mode")
        _one_of(self.criterion, losses.CRITERIA, "train.criterion")
        _one_of(self.on_nan, ON_NAN, "train.on_nan")
        _positive(self, "train", "batch_size", "log_every", "checkpoint_every", "max_to_keep",
                  "steps_per_call")
        _bools(self, "train", "reset_optimizer", "ema_teacher")
        _require(isinstance(self.ema_decay, (int, float)) and not isinstance(self.ema_decay, bool)
                 and 0.0 <= self.ema_decay < 1.0,
                 f"train.ema_decay={self.ema_decay!r} must be in [0, 1) (0: no moving average).")
        _require(isinstance(self.label_dropout, (int, float))
                 and not isinstance(self.label_dropout, bool)
                 and 0.0 <= self.label_dropout < 1.0,
                 f"train.label_dropout={self.label_dropout!r} must be in [0, 1) (the chance "
                 "a label becomes the null label, for classifier-free guidance).")
        _require(not self.ema_teacher or self.ema_decay > 0,
                 "train.ema_teacher=True takes the moving average as the next teacher: set "
                 "train.ema_decay in (0, 1) too.")
        _require(self.steps_per_experience > 0 or self.epochs_per_experience > 0,
                 "set train.steps_per_experience or train.epochs_per_experience to a "
                 "positive value.")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The `eval` section: sample grids, the evaluation after each experience, FID."""

    steps: int
    eta: float
    num_samples: int
    batch_size: int
    grid_samples: int
    save_experience_params: bool
    fid: bool
    fid_at: str
    inception_dir: str
    classifier: str
    train_classifier: bool
    every_steps: int
    guidance_scale: float

    def __post_init__(self):
        _positive(self, "eval", "steps", "num_samples", "batch_size", "grid_samples")
        _require(isinstance(self.every_steps, int) and not isinstance(self.every_steps, bool)
                 and self.every_steps >= 0, f"eval.every_steps={self.every_steps!r} must be "
                 "an integer >= 0 (evaluate every that many steps within an experience; 0: "
                 "only at its end).")
        _finite(self, "eval", "eta", "guidance_scale", low=0.0)
        _bools(self, "eval", "save_experience_params", "fid", "train_classifier")
        _one_of(self.fid_at, FID_AT, "eval.fid_at")
        _one_of(self.classifier, CLASSIFIERS, "eval.classifier",
                " (the network that labels samples and gives fd_classifier's features)")


@dataclasses.dataclass(frozen=True)
class LogSettings:
    tensorboard: bool
    wandb: bool

    def __post_init__(self):
        _bools(self, "log", "tensorboard", "wandb")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run is configured with, typed and checked."""

    seed: int
    data: DataSettings
    unet: unet.UNetConfig
    diffusion: DiffusionSettings
    strategy: StrategyConfig
    optim: OptimConfig
    train: TrainSettings
    eval: EvalSettings
    solver: SolverConfig | None  # None: no classifier trained beside the generator
    log: LogSettings
    config: dict = dataclasses.field(compare=False, repr=False)  # the ConfigDict, as JSON
    # strategy.regulariser*: the generator's L2 / EWC / MAS / SI (gdjax/regularisers.py)
    regulariser: regularisers.RegConfig = regularisers.RegConfig()
    # model.class_conditional: the UNet embeds labels (num_class_embeds, the last one the
    # null label), set by `build` once the data set's classes are known
    class_conditional: bool = False

    @property
    def null_label(self) -> int | None:
        """A class-conditional UNet's null label (its last embedding); None: unconditional."""
        n = self.unet.num_class_embeds
        return None if n is None else n - 1

    @property
    def schedule(self) -> Schedule:
        return self.diffusion.schedule()


# ----------------------------------------------------------------------------- builders

def _section(cls, section, **overrides):
    """`cls` from the ConfigDict `section`, field by field (plus `overrides`)."""
    values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


def _strategy(s, num_train_timesteps: int) -> StrategyConfig:
    cfg = StrategyConfig(name=s.name, lambd=s.lambd, weight_replay_loss=s.weight_replay_loss,
                         replay_start_timestep=s.replay_start_timestep,
                         teacher_steps=s.teacher_steps, teacher_eta=s.teacher_eta,
                         replay_size=s.replay_size, er_buffer_size=s.er_buffer_size,
                         teacher_guidance=s.teacher_guidance,
                         replay_timesteps=s.replay_timesteps,
                         replay_snr_gamma=s.replay_snr_gamma)
    cfg.check_timesteps(num_train_timesteps)
    return cfg


def _regulariser(s) -> regularisers.RegConfig:
    return regularisers.RegConfig(name=s.regulariser, weight=s.regulariser_weight,
                                  batches=s.regulariser_batches, eps=s.regulariser_eps)


def _solver(config) -> SolverConfig | None:
    s = config.solver
    _one_of(s.strategy, SOLVER_CHOICES, "solver.strategy")
    if not s.enabled or config.train.mode != "continual":
        return None
    strategy = s.strategy
    if strategy == "auto":
        strategy = AUTO_SOLVER.get(config.strategy.name, "generative_replay")
    return SolverConfig(strategy=strategy, epochs=s.epochs, batch_size=s.batch_size,
                        learning_rate=s.learning_rate, temperature=s.temperature,
                        gen_steps=config.eval.steps, replay_size=s.replay_size,
                        replay_loss=s.replay_loss, replay_pool=s.replay_pool,
                        er_buffer_size=s.er_buffer_size, ewc_lambda=s.ewc_lambda,
                        si_lambda=s.si_lambda, si_eps=s.si_eps,
                        lwf_alpha=tuple(s.lwf_alpha), lwf_temperature=s.lwf_temperature)


def settings_from_config(config) -> Settings:
    """The typed `Settings` of a run ConfigDict; ValueError naming the first bad key, its
    value and what would be valid (checks within a section run as its dataclass is built,
    those across sections here). The solver's head has 10 classes until `build` counts the
    data set's."""
    for section in SECTIONS:
        _require(section in config, f"the config has no '{section}' section: start from "
                                    f"configs/base.py get_config().")
    _require(isinstance(config.seed, int) and 0 <= config.seed < 2**31,
             f"seed={config.seed!r} must be an integer in 0..2**31 - 1.")
    _one_of(config.model.dtype, DTYPES, "model.dtype")
    _require(isinstance(config.model.class_conditional, bool),
             f"model.class_conditional={config.model.class_conditional!r} must be True or False.")
    d = config.data
    data = _section(DataSettings, d, data_dir=d.data_dir or None,
                    class_order=tuple(d.class_order))
    diffusion = _section(DiffusionSettings, config.diffusion)
    train = _section(TrainSettings, config.train)
    evaluation = _section(EvalSettings, config.eval)
    t = config.train
    optim = OptimConfig(learning_rate=t.learning_rate, grad_clip=t.grad_clip)
    strategy = _strategy(config.strategy, diffusion.num_train_timesteps)
    model = unet.get_unet_config(config.model.name, dtype=config.model.dtype)
    settings = Settings(
        seed=config.seed, data=data, unet=model, diffusion=diffusion, strategy=strategy,
        optim=optim, train=train, eval=evaluation, solver=_solver(config),
        log=_section(LogSettings, config.log), config=config_as_json(config),
        regulariser=_regulariser(config.strategy),
        class_conditional=config.model.class_conditional)
    _check_across_sections(settings)
    return settings


def _check_across_sections(s: Settings) -> None:
    u, d = s.unet, s.data
    _require((u.sample_size, u.in_channels) == (d.image_size, d.channels),
             f"model.name={s.config['model']['name']!r} takes {u.sample_size}px images with "
             f"{u.in_channels} channel(s), but data.image_size={d.image_size}, "
             f"data.channels={d.channels}: make them agree.")
    _require(s.eval.steps <= s.diffusion.num_train_timesteps,
             f"eval.steps={s.eval.steps} must be in 1..{s.diffusion.num_train_timesteps}.")
    name = s.strategy.name
    if s.train.mode == "iid_distill":
        _require(name in IID_DISTILL_STRATEGIES,
                 f"train.mode='iid_distill' distils with strategy.name in "
                 f"{IID_DISTILL_STRATEGIES}, not {name!r}.")
    if s.class_conditional:
        _require(s.train.mode != "iid_distill",
                 "model.class_conditional=True is not supported with train.mode='iid_distill' "
                 "(its teacher is an unconditional model): set model.class_conditional=False.")
    if s.regulariser.enabled:
        _require(s.train.mode == "continual",
                 f"strategy.regulariser={s.regulariser.name!r} holds the generator to its "
                 f"previous experiences: it needs train.mode='continual' (got "
                 f"{s.train.mode!r}); set strategy.regulariser='none'.")
    if s.train.mode == "iid":
        _require(name == strategies.NAIVE,
                 f"train.mode='iid' trains on all the data at once: set strategy.name='naive' "
                 f"(got {name!r}).")


def config_as_json(config) -> dict:
    """A ConfigDict as the plain dict config.json holds (tuples become lists)."""
    import json

    return json.loads(json.dumps(config.to_dict(), default=str))


# ----------------------------------------------------------------------------- the run

@functools.lru_cache(maxsize=None)
def model_apply_fn(config: unet.UNetConfig) -> Callable:
    """apply_fn(params, x, t) for a UNet config; one stable function per config (jit cache).

    A class-conditional config (num_class_embeds) gives apply_fn(params, x, t, labels=None):
    labels [B], or None for the null label's (the unconditional) prediction, so that every
    caller that asks for no label (the solver's replay, FLOP counts) still works."""
    model = unet.UNet(config)
    if config.num_class_embeds is None:
        def apply_fn(params, x, t):
            return model.apply({"params": params}, x, t)

        return apply_fn
    null_label = config.num_class_embeds - 1

    def conditional_apply_fn(params, x, t, labels=None):
        if labels is None:
            labels = jnp.full((x.shape[0],), null_label, jnp.int32)
        return model.apply({"params": params}, x, t, labels)

    return conditional_apply_fn


@dataclasses.dataclass
class Run:
    """What a run is made of, built once from its settings (no compilation)."""

    settings: Settings
    workdir: str
    train: gdata.ImageSplit
    test: gdata.ImageSplit
    experiences: list
    sharding: NamedSharding  # the batch sharding; its mesh holds every device
    optimizer: Any
    apply_fn: Callable

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.sharding.mesh, P())

    @property
    def schedule(self) -> Schedule:
        return self.settings.schedule

    @property
    def image_shape(self) -> tuple:
        d = self.settings.data
        return (d.image_size, d.image_size, d.channels)

    def experience_data(self, k: int) -> gdata.ImageSplit:
        """The training data of experience k (all experiences so far for `cumulative`)."""
        if self.settings.strategy.name == strategies.CUMULATIVE:
            return self.train.select(gdata.seen_classes(self.experiences, k))
        return self.train.select(self.experiences[k])

    def num_steps(self, k: int) -> int:
        """Generator steps in experience k: train.steps_per_experience, or its epochs."""
        t = self.settings.train
        if t.steps_per_experience > 0:
            return t.steps_per_experience
        return t.epochs_per_experience * gdata.steps_per_epoch(
            len(self.experience_data(k)), t.batch_size, drop_last=self.settings.data.drop_last)

    def uses_replay(self, k: int) -> bool:
        """Whether experience k trains with the strategy's replay half."""
        if self.settings.train.mode == "iid_distill":
            return True
        return k > 0 and self.settings.strategy.name not in (strategies.NAIVE,
                                                             strategies.CUMULATIVE)

    def step(self, with_replay: bool, steps: int = 1):
        """The compiled train step: plain (first experience) or with the replay half;
        `steps` > 1 runs that many in one call (`make_train_step`, train.steps_per_call)."""
        s = self.settings
        # The plain step is the same for every strategy: share its compilation.
        strategy = s.strategy if with_replay else StrategyConfig(strategies.NAIVE)
        return _compiled_step(s.unet, s.diffusion, strategy, s.optim, s.train.criterion,
                              with_replay, self.sharding.mesh, s.train.mode == "iid_distill",
                              s.train.on_nan, steps, float(s.train.ema_decay), s.regulariser,
                              s.null_label, float(s.train.label_dropout))

    def regulariser_batches(self, k: int) -> int:
        """The batches EWC / MAS measure experience k's importance on: strategy.
        regulariser_batches, or one epoch of the experience's data."""
        s = self.settings
        return s.regulariser.batches or gdata.steps_per_epoch(
            len(self.experience_data(k)), s.train.batch_size, drop_last=s.data.drop_last)

    def importance_fn(self):
        """The jitted importance of one batch for EWC / MAS (`regularisers.make_importance_fn`)."""
        s = self.settings
        return _compiled_importance(s.unet, s.diffusion, s.regulariser, s.train.criterion)

    def memory_batch(self, buffer, k: int, step: int, rows: int) -> dict:
        """ER's memory rows of `step` of experience k, flipped like the real rows:
        {"memory": images}, plus {"replay_label": their labels} for a conditional model."""
        s = self.settings
        out = {"memory": memory.memory_rows(self.train.images, buffer, rows=rows, seed=s.seed,
                                            experience=k, step=step, flip=s.data.flip)}
        if s.class_conditional:
            out["replay_label"] = memory.memory_labels(self.train.labels, buffer, rows=rows,
                                                       seed=s.seed, experience=k, step=step)
        return out

    def replay_labels(self, k: int, step: int, rows: int) -> np.ndarray:
        """Conditional replay's labels at `step` of experience k: balanced over the classes
        of experiences 0..k-1, the teacher's (`memory.replay_labels`)."""
        return memory.replay_labels(gdata.seen_classes(self.experiences, k - 1), rows=rows,
                                    seed=self.settings.seed, experience=k, step=step)

    def solver_replay_labels(self, k: int):
        """What the solver's replay in experience k asks a class-conditional previous
        generator for (`solver.ReplayLabels`: the classes of experiences 0..k-1, balanced,
        guided at strategy.teacher_guidance as the generator's own replay is); None for an
        unconditional model or the first experience."""
        s = self.settings
        if not s.class_conditional or k == 0:
            return None
        return ReplayLabels(gdata.seen_classes(self.experiences, k - 1),
                            s.null_label, float(s.strategy.teacher_guidance))

    def sample_labels(self, k: int):
        """The labels evaluation samples after experience k are asked for (a conditional
        model: the classes seen so far, row i the (i mod n)-th, guided at
        eval.guidance_scale); None for an unconditional model."""
        s = self.settings
        if not s.class_conditional:
            return None
        return sampling.SampleLabels(gdata.seen_classes(self.experiences, k), s.null_label,
                                     float(s.eval.guidance_scale))

    def batches(self, k: int, start: int, total: int, groups=None) -> gdata.Prefetcher:
        """The prefetched, sharded batches of steps start..total-1 of experience k (with
        ER's memory rows); `groups`: see `gdata.batch_iterator` (padded to
        train.steps_per_call)."""
        s, data = self.settings, self.experience_data(k)
        extra = None
        rows = s.strategy.replay_size or s.train.batch_size
        if s.strategy.name == strategies.ER and self.uses_replay(k):
            buffer = memory.buffer_indices(self.train.labels, self.experiences, k,
                                           size=s.strategy.er_buffer_size, seed=s.seed)
            extra = lambda step: self.memory_batch(buffer, k, step, rows)  # noqa: E731
        elif s.class_conditional and self.uses_replay(k) and s.strategy.name in \
                strategies.TEACHER_STRATEGIES and s.strategy.name != strategies.LWF:
            extra = lambda step: {"replay_label": self.replay_labels(k, step, rows)}  # noqa: E731
        return gdata.batch_iterator(data.images, data.labels, batch_size=s.train.batch_size,
                                    seed=s.seed, experience=k, start_step=start,
                                    num_steps=total, flip=s.data.flip,
                                    drop_last=s.data.drop_last, sharding=self.sharding,
                                    prefetch=s.data.prefetch, extra=extra, groups=groups,
                                    group_size=s.train.steps_per_call)

    @functools.cached_property
    def test_uint8(self) -> gdata.ImageSplit:
        """The test split as the reference's FID sees its real images: uint8, resized by
        PIL (`gdata.load_uint8_split`); read on first use."""
        d = self.settings.data
        return gdata.load_uint8_split(d.name, source=d.source, data_dir=d.data_dir,
                                      image_size=d.image_size, channels=d.channels)


@functools.lru_cache(maxsize=16)
def _compiled_step(unet_config, diffusion, strategy, optim, criterion, with_replay, mesh,
                   distill_only, on_nan, steps=1, ema_decay=0.0,
                   regulariser=regularisers.RegConfig(), null_label=None, label_dropout=0.0):
    """One jitted step per distinct setting, kept across runs in a process (sweeps, tests)."""
    return make_train_step(apply_fn=model_apply_fn(unet_config), schedule=diffusion.schedule(),
                           strategy=strategy, optimizer=make_optimizer(optim),
                           criterion=criterion, with_replay=with_replay, mesh=mesh,
                           distill_only=distill_only, on_nan=on_nan, steps=steps,
                           ema_decay=ema_decay, regulariser=regulariser,
                           null_label=null_label, label_dropout=label_dropout)


@functools.lru_cache(maxsize=8)
def _compiled_importance(unet_config, diffusion, regulariser, criterion):
    return regularisers.make_importance_fn(regulariser, model_apply_fn(unet_config),
                                           diffusion.schedule(), criterion)


def load_data(d: DataSettings) -> tuple[gdata.ImageSplit, gdata.ImageSplit]:
    """(train, test) of the data settings, preprocessed (gdjax/data/pipeline.py)."""
    return gdata.load_dataset(d.name, source=d.source, data_dir=d.data_dir,
                              image_size=d.image_size, channels=d.channels)


def build(config, workdir: str) -> Run:
    """The run of `config` (a ConfigDict, or ready `Settings`): its settings, checked before
    any data is read, then data, experiences and the batch sharding over every device;
    nothing is compiled or written."""
    settings = config if isinstance(config, Settings) else settings_from_config(config)
    sharding = gdata.data_sharding()
    devices = sharding.mesh.shape["data"]
    gdata.check_batch_size(settings.train.batch_size, devices, "train.batch_size")
    if settings.strategy.replay_size:  # the replay rows are sharded like the batch
        gdata.check_batch_size(settings.strategy.replay_size, devices, "strategy.replay_size")
    train, test = load_data(settings.data)
    if settings.solver is not None:  # the solver's head: every class of the data set
        solver = dataclasses.replace(settings.solver, num_classes=max(train.classes) + 1)
        settings = dataclasses.replace(settings, solver=solver)
    if settings.class_conditional and settings.unet.num_class_embeds is None:
        # every class of the data set, then the null label
        model = dataclasses.replace(settings.unet, num_class_embeds=max(train.classes) + 2)
        settings = dataclasses.replace(settings, unet=model)
    order = gdata.resolve_class_order(len(train.classes), seed=settings.seed,
                                      fixed_order=settings.data.class_order or None)
    n_exp = settings.data.n_experiences if settings.train.mode == "continual" else 1
    return Run(settings=settings, workdir=workdir, train=train, test=test,
               experiences=gdata.make_experiences(order, n_exp), sharding=sharding,
               optimizer=make_optimizer(settings.optim),
               apply_fn=model_apply_fn(settings.unet))
