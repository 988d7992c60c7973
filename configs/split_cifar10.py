"""Split CIFAR-10, 5 experiences x 2 classes: the 3-channel model, 200 epochs, batch 64.

Data: cifar-10-python.tar.gz (or its extracted folder) under data_dir (or source=tfds).
"""

from configs import base


def get_config(variant: str = "generative_distillation"):
    c = base.get_config()
    c.data.name = "cifar10"
    c.data.channels = 3
    c.data.flip = True
    c.model.name = "ddim_medium_3ch"
    c.train.batch_size = 64
    c.train.epochs_per_experience = 200
    c.eval.steps = 20
    return base.with_variant(c, variant, base.CIFAR10_LAMBDAS)
