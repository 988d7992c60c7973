"""The paper's studies (launch/study.py): `--study=configs/studies.py:<name>`.

Each study takes its runs from a run config (`--config`, default the digits) and its own
settings from here, overridable as `--study.key=value` (tuples as `--study.seeds="(42,69)"`).
The defaults are sized for 2 CPU cores on the digits and the reduced Fashion-MNIST (each
study's run time: README, "The paper's studies"); at paper scale on an accelerator, raise
the step counts and samples and use `--study.metric=fid` (Inception-v3).

- iid_distillation: a teacher trained on every class (train.mode="iid") distilled into fresh
  students by each method; AUC of the metric over generation steps (gdjax/studies/iid.py).
- sampling_cost: one trained model's metric and sampling time against DDIM steps, and the
  metric's spread against the number of samples (gdjax/studies/sampling.py).
- lambda: each strategy's continual run at each lambda; every metric against lambda
  (gdjax/studies/lambdas.py).
- replay_steps: continual runs at each DDIM step count of the solver's replay (and of the
  evaluation's samples); the solver's accuracy and forgetting, and the generator's metric,
  against the steps, and the accuracy against the metric (gdjax/studies/replay_steps.py).
"""

from ml_collections import ConfigDict

STUDIES = ("iid_distillation", "sampling_cost", "lambda", "replay_steps")


def _teacher(c: ConfigDict) -> None:
    # The model the IID and sampling studies start from: train.mode="iid" on every class,
    # as many steps as the default digits run takes over its 5 experiences.
    c.teacher_training_steps = 1500


def get_config(name: str = "iid_distillation") -> ConfigDict:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; use one of: {', '.join(STUDIES)} "
                         f"(--study=configs/studies.py:<name>)")
    c = ConfigDict()
    c.name = name
    c.metric = "fd_classifier"  # fd_classifier (any machine) | fid (Inception-v3 weights)
    if name == "iid_distillation":
        _teacher(c)
        c.methods = ("gaussian_distillation", "gaussian_symmetry_distillation",
                     "no_distillation", "full_generation_distillation",
                     "partial_generation_distillation")
        c.seeds = (42, 69)
        c.student_steps = 300
        c.eval_every = 50
        c.generation_steps = (2, 5, 10, 20)  # the authors' AUC points
        c.num_samples = 500
        c.teacher_steps = 2  # the curves' teacher step count (the continual runs')
        c.teacher_steps_sweep = (1, 2, 5, 10, 20)  # the generative methods' AUC curve
    elif name == "sampling_cost":
        _teacher(c)
        c.params_dir = ""  # a gdjax params directory (a run's final_params); "": the
        #                    IID teacher, trained into <root>/teacher
        c.generation_steps = (1, 2, 5, 10, 20, 50, 100)
        c.num_samples = 1000
        c.sample_counts = (100, 200, 500, 1000, 2000, 5000)
        c.repeats = 5
        c.count_steps = 20  # DDIM steps of the samples-count curve (the authors')
    elif name == "replay_steps":
        c.strategies = ("full_generation_distillation",)
        c.generation_steps = (2, 5, 10, 20)  # the authors' (their --generation_steps)
        c.seeds = (42,)
    else:
        c.seeds = (42,)
        # The authors' ranges (REFERENCE §4), a few points each.
        c.lambdas = ConfigDict(dict(
            full_generation_distillation=(0.1, 0.5, 1.0, 2.0, 3.0),
            gaussian_distillation=(1.0, 4.0, 12.0, 28.0),
            partial_generation_distillation=(1.0, 2.0, 5.0, 8.0),
            lwf_distillation=(0.1, 0.25, 0.75, 1.75),
        ))
    c.lock()
    return c
