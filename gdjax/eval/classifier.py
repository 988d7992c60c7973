"""The small CNN that labels generated images (and, later, the "solver" of REFERENCE §6).

`SimpleCNN` follows the baseline's layer list; its 128-d globally max-pooled activations are
the features of the Fréchet and kernel distances reported as `fd_classifier`/`kid_classifier`.
Here: building and training it on an `ImageSplit` (inputs in [-1, 1], deterministic from a
seed), batched jitted inference, and saving / loading it with Orbax plus a small JSON record
(`classifier.json`) of what it was trained on. The evaluation classifier of a config lives in
`default_classifier_dir(config)`; `python -m launch.train_classifier --config ...` writes it.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from gdjax import data as gdata
from gdjax.eval import metrics

META_FILE = "classifier.json"
PARAMS_DIR = "params"
FEATURE_DIM = 128
# How the evaluation classifier trains when the caller does not say. The digits (1438 images)
# take batches of 32: more updates per epoch reach ~99% test accuracy in ~20 s on 2 CPU cores,
# where batches of 128 needed 30 epochs for 98.9%. Other data sets get the solver's settings
# (REFERENCE §6: 20 epochs, batch 128).
DEFAULT_TRAINING = {"digits": {"epochs": 20, "batch_size": 32}}
_FALLBACK_TRAINING = {"epochs": 20, "batch_size": 128}


def max_pool_2x2(x):
    """2x2 max pooling, stride 2, odd edges dropped (torch's MaxPool2d(2) floor mode).

    A reshape-and-max rather than `nn.max_pool`: same values, but its gradient is a cheap
    mask instead of XLA's select-and-scatter, which made CPU training steps several times
    slower.
    """
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SimpleCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv128-pool-conv1x1(128)-global max pool-linear, with ReLUs
    and dropout 0.25 after each pool (REFERENCE §6). Inputs NHWC in [-1, 1], any channels."""

    num_classes: int = 10
    dropout_rate: float = 0.25

    def setup(self):
        self.conv1 = nn.Conv(32, (3, 3), padding=1)
        self.conv2 = nn.Conv(32, (3, 3), padding="VALID")
        self.conv3 = nn.Conv(64, (3, 3), padding=1)
        self.conv4 = nn.Conv(128, (3, 3), padding="VALID")
        self.conv5 = nn.Conv(FEATURE_DIM, (1, 1))
        self.dropout = nn.Dropout(self.dropout_rate)
        self.head = nn.Dense(self.num_classes)

    def features(self, x, *, train: bool = False):
        """[N, 128]: the penultimate activations (after the last dropout when training)."""
        drop = lambda h: self.dropout(h, deterministic=not train)
        x = nn.relu(self.conv2(nn.relu(self.conv1(x))))
        x = drop(max_pool_2x2(x))
        x = nn.relu(self.conv4(nn.relu(self.conv3(x))))
        x = drop(max_pool_2x2(x))
        x = nn.relu(self.conv5(x)).max(axis=(1, 2))
        return drop(x)

    def logits_and_features(self, x, *, train: bool = False):
        h = self.features(x, train=train)
        return self.head(h), h

    def __call__(self, x, *, train: bool = False):
        return self.logits_and_features(x, train=train)[0]


def init_classifier(rng: jax.Array, image_shape: tuple, num_classes: int):
    """Fresh SimpleCNN parameters for images of `image_shape` (H, W, C)."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    return SimpleCNN(num_classes=num_classes).init(rng, x)["params"]


def num_classes_of(params) -> int:
    return int(params["head"]["kernel"].shape[-1])


# ----------------------------------------------------------------------------- training

@functools.lru_cache(maxsize=None)
def _train_step(num_classes: int, lr: float):
    """(jitted step, optimizer) for cross-entropy training; cached, so retraining (the
    solver trains once per experience) reuses the compiled step."""
    model, optimizer = SimpleCNN(num_classes=num_classes), optax.adam(lr)

    def loss_fn(params, images, labels, rng):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state, images, labels, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, optimizer


def train_classifier(train: gdata.ImageSplit, *, seed: int, epochs: int, batch_size: int = 128,
                     lr: float = 1e-3, num_classes: int | None = None):
    """SimpleCNN params trained with Adam and cross-entropy on `train` (images in [-1, 1]).

    Each epoch visits a permutation drawn from (seed, epoch) in full batches (the remainder
    is dropped, so the step compiles once); dropout keys are folded from the seed and step.
    """
    if len(train) == 0 or epochs < 1:
        raise ValueError(f"need training data and epochs >= 1, got {len(train)} images, "
                         f"{epochs} epochs")
    num_classes = num_classes or int(train.labels.max()) + 1
    batch_size = min(batch_size, len(train))
    step_fn, optimizer = _train_step(num_classes, float(lr))
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = init_classifier(init_key, train.images.shape[1:], num_classes)
    opt_state = optimizer.init(params)
    step = 0
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        for i in range(len(train) // batch_size):
            rows = order[i * batch_size:(i + 1) * batch_size]
            rng = jax.random.fold_in(dropout_key, step)
            params, opt_state, _ = step_fn(params, opt_state, train.images[rows],
                                           train.labels[rows], rng)
            step += 1
    return params


# ----------------------------------------------------------------------------- inference

@jax.jit
def _logits_and_features(params, images):
    model = SimpleCNN(num_classes=num_classes_of(params))
    return model.apply({"params": params}, images, method=SimpleCNN.logits_and_features)


def classify(params, images, *, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, classes], features float32 [N, 128]) of images NHWC in [-1, 1].

    Runs `batch_size` images at a time (fewer: the next power of two above N), padding the
    last batch, so the network compiles for a handful of shapes whatever the set sizes.
    """
    images = np.asarray(images, np.float32)
    n = len(images)
    if n == 0:
        raise ValueError("classify needs at least one image")
    batch_size = min(batch_size, 1 << (n - 1).bit_length())
    logits, feats = [], []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.float32)])
        out_logits, out_feats = jax.device_get(_logits_and_features(params, batch))
        logits.append(out_logits[:len(batch) - pad])
        feats.append(out_feats[:len(batch) - pad])
    return np.concatenate(logits), np.concatenate(feats)


def evaluate_accuracy(params, split: gdata.ImageSplit, *, batch_size: int = 500) -> float:
    """Accuracy of the classifier on `split`."""
    logits, _ = classify(params, split.images, batch_size=batch_size)
    return metrics.accuracy(logits, split.labels)


# ----------------------------------------------------------------------------- saving

def save_classifier(path: str, params, meta: dict[str, Any]) -> None:
    """Writes params (Orbax) and `meta` (JSON; needs num_classes, image_size, channels).

    The JSON is written last, atomically: a directory without it is an unfinished save
    and `load_classifier` treats it as missing.
    """
    missing = {"num_classes", "image_size", "channels"} - set(meta)
    if missing:
        raise ValueError(f"classifier meta lacks {sorted(missing)}")
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    meta_path = os.path.join(path, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), params, force=True)
        ckptr.wait_until_finished()
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, meta_path)


def load_classifier(path: str) -> tuple[Any, dict]:
    """(params, meta) saved by `save_classifier`; FileNotFoundError if there is none."""
    path = os.path.abspath(path)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"no trained classifier in {path} (no {META_FILE}): run "
            f"`python -m launch.train_classifier --config <the run's config>` first.")
    with open(meta_path) as f:
        meta = json.load(f)
    shape = (meta["image_size"], meta["image_size"], meta["channels"])
    template = jax.eval_shape(lambda: init_classifier(jax.random.key(0), shape,
                                                      meta["num_classes"]))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            template)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_DIR), template)
    return params, meta


# ----------------------------------------------------------------------------- per config

def default_classifier_dir(config) -> str:
    """`<data.data_dir or ~/.cache/gdjax>/classifiers/<data set>_<size>px_<channels>ch`."""
    d = config.data
    root = d.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "gdjax")
    return os.path.abspath(os.path.join(root, "classifiers",
                                        f"{d.name}_{d.image_size}px_{d.channels}ch"))


def train_for_config(config, path: str | None = None, *, epochs: int | None = None,
                     batch_size: int | None = None, lr: float = 1e-3) -> tuple[Any, dict]:
    """Trains the evaluation classifier on all of the config's training images, saves it to
    `path` (default `default_classifier_dir(config)`) and returns (params, meta).

    `epochs` / `batch_size` default to `DEFAULT_TRAINING` for the data set.
    """
    d = config.data
    train, test = gdata.load_dataset(d.name, source=d.source, data_dir=d.data_dir or None,
                                     image_size=d.image_size, channels=d.channels)
    defaults = DEFAULT_TRAINING.get(d.name, _FALLBACK_TRAINING)
    epochs = epochs or defaults["epochs"]
    batch_size = batch_size or defaults["batch_size"]
    num_classes = max(max(train.classes), max(test.classes)) + 1
    start = time.perf_counter()
    params = train_classifier(train, seed=config.seed, epochs=epochs, batch_size=batch_size,
                              lr=lr, num_classes=num_classes)
    meta = {"dataset": d.name, "num_classes": num_classes, "image_size": d.image_size,
            "channels": d.channels, "seed": config.seed, "epochs": epochs,
            "batch_size": batch_size, "lr": lr,
            "train_seconds": round(time.perf_counter() - start, 2),
            "test_accuracy": evaluate_accuracy(params, test)}
    save_classifier(path or default_classifier_dir(config), params, meta)
    return params, meta
