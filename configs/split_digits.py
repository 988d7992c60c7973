"""Split Digits: the embedded default, scikit-learn's 8x8 digits resized to 16x16.

A real, if small, reproduction that runs on 2 CPU cores in under 10 minutes, evaluation
included (shared/DIGITS.md): a 0.28 M-parameter UNet (attention in the mid block only), Adam
1e-3, batch 64 plus 64 replay rows, lambda 1, a 2-step teacher; evaluation with 10 DDIM
steps. 300 steps per experience where DIGITS.md took 400: XLA:CPU trains this model at
0.72x PyTorch's speed (BENCHMARKS.md), and 400 steps with the evaluation and the solver
came to 10 min 8 s.
"""

from configs import base

# launch/reproduce.py's schedule for the 12-run comparison: two thirds of the default run's
# generator steps, so that the sweep fits in 40 to 65 minutes on 2 CPU cores. The solver
# keeps its 10 epochs: an experience's 290 images are 19 steps an epoch at batch 16, and at
# 5 epochs (95 Adam steps from a reset optimizer) even the naive solver often fails to learn
# its current experience (it labels every image as one of the two new classes: accuracy
# 0.5); at 10 it still does at seed 42's second experience (README, "The paper's comparison
# on the digits").
SWEEP = {"steps_per_experience": 200}


def get_config(variant: str = "generative_distillation"):
    c = base.get_config()
    c.data.name = "digits"
    c.data.source = "sklearn"
    base.small_cpu_schedule(c)
    c.strategy.lambd = 1.0
    c.eval.fid = False  # Inception at 299 px costs ~0.3 s per image on a CPU core
    c.eval.train_classifier = True  # the digits' ResNet-18 trains in about a minute
    # ~290 images per experience: 10 epochs of 16 (180 steps, each replaying 16 images).
    # 40 steps of 64 were too few: the solver fell to one class once replay began.
    c.solver.epochs = 10
    c.solver.batch_size = 16
    return base.with_variant(c, variant)
