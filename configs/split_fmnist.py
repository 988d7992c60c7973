"""Split Fashion-MNIST, 5 experiences x 2 classes, the paper's main benchmark.

`--config=configs/split_fmnist.py:generative_distillation` (see configs/base.py VARIANTS).
Data: the four IDX .gz files under data_dir/fashion_mnist/ (or source=tfds).
"""

from configs import base


def get_config(variant: str = "generative_distillation"):
    c = base.get_config()
    c.data.name = "fashion_mnist"
    return base.with_variant(c, variant, base.FMNIST_LAMBDAS)
