"""Defaults shared by every gdjax run: the paper's Split Fashion-MNIST settings (REFERENCE §4).

Each benchmark file imports `get_config` from here, overrides what differs and picks a
strategy variant: `--config=configs/split_fmnist.py:generative_distillation`.
"""

from ml_collections import ConfigDict

# Variant names accepted after the ':' of --config, and the strategy each one selects.
VARIANTS = {
    "naive": "naive",
    "cumulative": "cumulative",
    "er": "er",
    "generative_replay": "no_distillation",
    "no_distillation": "no_distillation",
    "generative_distillation": "full_generation_distillation",
    "full_generation_distillation": "full_generation_distillation",
    "partial_generation_distillation": "partial_generation_distillation",
    "gaussian_distillation": "gaussian_distillation",
    "gaussian_symmetry_distillation": "gaussian_symmetry_distillation",
    "lwf_distillation": "lwf_distillation",
    # beyond the paper: the teacher's intermediate samples (gdjax/strategies.py), at full
    # generation distillation's lambda
    "trajectory_distillation": "trajectory_distillation",
}
# Variants with a generator regulariser (gdjax/regularisers.py, at CLoG's weights): naive
# fine-tuning plus L2, EWC, MAS or SI, CLoG's regularisation baselines.
REGULARISED_VARIANTS = {"naive_l2": "l2", "naive_ewc": "ewc", "naive_mas": "mas",
                        "naive_si": "si"}
VARIANTS.update({name: "naive" for name in REGULARISED_VARIANTS})


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 42

    c.data = ConfigDict(dict(
        name="fashion_mnist",   # digits | mnist | fashion_mnist | cifar10 | image_folder
        source="raw",           # sklearn | raw (IDX / CIFAR files) | tfds | folder
        data_dir="./data",
        image_size=32,
        channels=1,
        n_experiences=5,
        class_order=(),         # (): drawn from the seed as avalanche's nc_benchmark does
        flip=False,             # random horizontal flips (CIFAR-10): generator, solver, ER
        drop_last=False,        # False: keep each epoch's last, partial batch (the reference)
        prefetch=2,             # batches made and placed ahead by a background thread; 0: none
    ))
    c.model = ConfigDict(dict(
        name="ddim_medium",     # a named UNet config of gdjax/unet.py
        dtype="float32",        # compute dtype; parameters stay float32
        class_conditional=False,  # True: the UNet embeds class labels (one per class of the
                                # data set, plus a null label for classifier-free guidance);
                                # replay rows carry labels balanced over the teacher's classes
    ))
    c.diffusion = ConfigDict(dict(
        beta_schedule="linear",
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        rescale_zero_snr=True,
        clip_sample=True,       # DDIM clips its x0 estimate to [-1, 1] (the reference, and
                                # diffusers' default); False: unclipped, everywhere it samples
    ))
    c.strategy = ConfigDict(dict(
        name="full_generation_distillation",
        lambd=3.0,
        weight_replay_loss=True,
        replay_start_timestep=0,
        teacher_steps=2,
        teacher_eta=0.0,
        replay_size=0,          # 0: the batch size
        er_buffer_size=1000,
        teacher_guidance=1.0,   # conditional replay: the teacher's guidance scale (1: none)
        # The replay rows' timesteps: uniform (the reference) | min_snr (probability
        # proportional to min(SNR(t), gamma) / SNR(t): uniform over the noisy steps, thinning
        # out where the teacher's prediction is nearly the noise itself; ER keeps uniform)
        replay_timesteps="uniform",
        replay_snr_gamma=5.0,
        # The generator's regularisation baselines (gdjax/regularisers.py, CLoG's set), with
        # any strategy: none | l2 | ewc | mas | si; the loss gains weight * sum importance *
        # (params - previous experience's params)^2
        regulariser="none",
        regulariser_weight=0.0,  # 0: CLoG's for the method (l2 500, ewc 5e4, mas 2.5, si 5)
        regulariser_batches=0,  # ewc / mas: batches measuring the importance; 0: an epoch
        regulariser_eps=0.01,   # si: the damping of its importance (CLoG's)
    ))
    c.train = ConfigDict(dict(
        mode="continual",       # continual | iid | iid_distill
        batch_size=128,
        epochs_per_experience=100,
        steps_per_experience=0,  # > 0 overrides epochs_per_experience
        learning_rate=2e-4,
        grad_clip=1.0,
        criterion="mse",        # mse | smooth_l1 | min_snr | min_snr_reference
        log_every=50,
        checkpoint_every=1000,
        max_to_keep=2,
        teacher_dir="",         # iid_distill: an Orbax params directory (launch/convert.py)
        on_nan="stop",          # stop: raise at the bad step | skip: drop non-finite updates
        reset_optimizer=True,   # Adam afresh each experience (the reference); False: carry it
        steps_per_call=1,       # k > 1: k steps per dispatch (lax.scan), for small models on
                                # accelerators; logs, checkpoints and results as with 1
        ema_decay=0.0,          # > 0: an exponential moving average of the params, updated in
                                # the step; it is what the evaluation scores and saves
        ema_teacher=False,      # True: the average, not the params, becomes the next
                                # experience's teacher (MAGD's EMA teacher)
        label_dropout=0.1,      # model.class_conditional: the chance a row's label becomes
                                # the null label (classifier-free guidance's training)
    ))
    c.eval = ConfigDict(dict(
        steps=10,
        eta=0.0,
        num_samples=10000,
        batch_size=500,
        grid_samples=100,
        save_experience_params=True,  # experience_params/experience_<k>, for launch/evaluate
        fid=True,               # Inception FID/KID when the converted weights are present
        fid_at="all",           # all: after every experience | last: after the last only
        inception_dir="",       # "": $GDJAX_INCEPTION_DIR or ~/.cache/gdjax/inception
        classifier="resnet18",  # resnet18 (REFERENCE §7) | simple_cnn: labels the samples
        train_classifier=False,  # train a missing evaluation classifier at first use
        every_steps=0,          # > 0: also evaluate every that many steps within an
                                # experience (rows in metrics/eval.jsonl); 0: at its end only
        guidance_scale=1.0,     # model.class_conditional: samples are asked for by label,
                                # balanced over the classes seen, guided at this scale
    ))
    # The classifier trained beside the generator (REFERENCE §6), continual mode only.
    c.solver = ConfigDict(dict(
        enabled=True,
        strategy="auto",        # auto (follows the generator) | naive | cumulative |
                                # generative_replay; the classifier's own baselines, no
                                # generator replay: er | ewc | si | lwf (avalanche's)
        epochs=20,
        batch_size=128,
        learning_rate=1e-3,
        temperature=2.0,
        replay_size=0,          # 0: the batch size; replay images come from eval.steps DDIM steps
        replay_loss="forward",  # forward: KD's -sum p_teacher log p_student | reference: the
                                # authors' -sum p_student log p_teacher (README: the solver)
        replay_pool=0,          # 0: fresh replay images every step (the reference) | N: N
                                # images drawn once per experience, visited every epoch
        # The baselines, at the authors' values (configs/strategy/cnn_w_*.json):
        er_buffer_size=300,     # er: real images kept, an equal share per experience
        ewc_lambda=1.0,         # ewc: the penalty's weight ("separate" mode)
        si_lambda=1.0,          # si: the penalty's weight (lambda / 2 * omega * dtheta^2)
        si_eps=1e-7,            # si: the damping of the importance
        lwf_alpha=(0.0, 0.5, 1.33333, 2.25, 3.2),  # lwf: per experience; the last repeats
        lwf_temperature=2.0,    # lwf: the distillation's softmax temperature
    ))
    c.log = ConfigDict(dict(
        tensorboard=True,
        wandb=False,
    ))
    # Locked: a benchmark file or a --config.x override that names a key not defined here
    # (a typo) is an error instead of a silently ignored new field.
    c.lock()
    return c


# The lambda each strategy ran with in the authors' experiments (their launch scripts and
# report filters; REFERENCE §4): Split Fashion-MNIST (also used for Split MNIST), and Split
# CIFAR-10, where the strategies without a value of their own take full generation's.
FMNIST_LAMBDAS = {
    "no_distillation": 1.0,
    "full_generation_distillation": 3.0,
    "partial_generation_distillation": 5.0,
    "gaussian_distillation": 24.0,
    "gaussian_symmetry_distillation": 12.0,
    "lwf_distillation": 0.25,
}
CIFAR10_LAMBDAS = {
    "no_distillation": 1.0,
    "full_generation_distillation": 0.75,
    "partial_generation_distillation": 0.75,
    "gaussian_distillation": 8.0,
    "gaussian_symmetry_distillation": 0.75,
    "lwf_distillation": 1.25,
}


def small_cpu_schedule(c: ConfigDict) -> ConfigDict:
    """The 2-CPU-core schedule shared by the digits and the reduced Fashion-MNIST: the
    digits' 0.28 M-parameter UNet at 16x16, batch 64 (plus 64 replay rows) at Adam 1e-3 for
    300 steps per experience, rows every 50 steps, a checkpoint every 150, evaluation on
    1000 samples 500 at a time."""
    c.data.image_size = 16
    c.model.name = "digits"
    c.train.batch_size = 64
    c.train.steps_per_experience = 300
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.checkpoint_every = 150
    c.eval.num_samples = 1000
    c.eval.batch_size = 500
    return c


def with_variant(config: ConfigDict, variant: str | None,
                 lambdas: dict[str, float] | None = None) -> ConfigDict:
    """Selects the strategy named by `variant` (None or "": keep the config's own) and, when
    `lambdas` (strategy name -> lambda) has one for it, that strategy's lambda."""
    if variant:
        if variant not in VARIANTS:
            raise ValueError(f"unknown config variant {variant!r}; use one of: {', '.join(VARIANTS)}")
        config.strategy.name = VARIANTS[variant]
        if variant in REGULARISED_VARIANTS:
            config.strategy.regulariser = REGULARISED_VARIANTS[variant]
    if lambdas and config.strategy.name in lambdas:
        config.strategy.lambd = lambdas[config.strategy.name]
    return config
