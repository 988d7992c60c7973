"""Split Digits: the embedded default, scikit-learn's 8x8 digits resized to 16x16.

A real, if small, reproduction that runs on 2 CPU cores in minutes (shared/DIGITS.md):
a 0.27 M-parameter UNet (attention in the mid block only), Adam 1e-3, batch 64 plus 64 replay rows, 400 steps per
experience, lambda 1, a 2-step teacher; evaluation with 10 DDIM steps.
"""

from configs import base


def get_config(variant: str = "generative_distillation"):
    c = base.get_config()
    c.data.name = "digits"
    c.data.source = "sklearn"
    c.data.image_size = 16
    c.model.name = "digits"
    c.strategy.lambd = 1.0
    c.train.batch_size = 64
    c.train.steps_per_experience = 400
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.eval.num_samples = 1000
    c.eval.batch_size = 500
    c.eval.fid = False  # Inception at 299 px costs ~0.3 s per image on a CPU core
    # ~290 images per experience: 10 epochs of 16 (180 steps, each replaying 16 images).
    # 40 steps of 64 were too few: the solver fell to one class once replay began.
    c.solver.epochs = 10
    c.solver.batch_size = 16
    return base.with_variant(c, variant)
