"""Split MNIST, 5 experiences x 2 classes, with the Fashion-MNIST settings.

Data: the four IDX .gz files under data_dir/mnist/ (or source=tfds).
"""

from configs import base


def get_config(variant: str = "generative_distillation"):
    c = base.get_config()
    c.data.name = "mnist"
    return base.with_variant(c, variant, base.FMNIST_LAMBDAS)
