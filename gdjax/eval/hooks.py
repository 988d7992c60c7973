"""The evaluation run after every experience: sample the generator, label the samples, score.

After experience k, `ClassifierEvalHook` draws `eval.num_samples` images with the DDIM
sampler, labels them with the evaluation classifier of `eval.classifier` (the ResNet-18 of
REFERENCE §7 by default, or the small SimpleCNN; gdjax/eval/classifier.py) and compares them
with the test images of the classes seen so far:

- `kld`, `ard`: class balance, KL(true || generated) and half the L1 distance between the
  true and the generated class frequencies;
- `fd_classifier`, `kid_classifier`: Fréchet and kernel distances on the classifier's
  penultimate features (512-d for the ResNet-18, 128-d for SimpleCNN). They work offline but
  are not Inception's, so they are never comparable with published FIDs;
- `gen_frac_class_<c>`: the fraction of samples labelled c, for every class;

- `fid`, `kid`: FID and KID on Inception-v3 pool features (REFERENCE §7, as torchmetrics
  computes them) when `eval.fid` is on and the converted Inception weights are present
  (gdjax/eval/inception.py says how to get them); without them these two are left out
  with one warning, and everything else still runs;

and draws `<workdir>/samples/histogram_experience_<k>.png` (true vs generated frequencies).
The per-class-set test statistics and the classifier are computed or loaded once per run.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from PIL import Image, ImageDraw

from gdjax import data as gdata
from gdjax import generate, hosts
from gdjax.eval import classifier as cls
from gdjax.eval import inception, metrics

log = logging.getLogger(__name__)

# hook(run, experience_index, generator_params) -> {metric name: value}
EvalHook = Callable[[Any, int, Any], dict]

# Folded into the run seed for the evaluation samples of experience k (the sample grid of
# gdjax/continual.py uses 10_000 + k), so the two draws are independent.
_EVAL_RNG_OFFSET = 20_000
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class Reference(NamedTuple):
    """What the samples are compared with: the test images of the classes seen."""

    freq: np.ndarray      # float64 [num_classes], true class frequencies
    features: np.ndarray  # float32 [N, D], classifier features
    mu: np.ndarray
    sigma: np.ndarray


def reference_statistics(variables, images, labels, *, arch: str, num_classes: int,
                         batch_size: int = 500) -> Reference:
    """Class frequencies and feature statistics of real images [N, H, W, C] in [-1, 1],
    features from the `arch` classifier `variables`."""
    _, features = cls.classify(variables, images, arch=arch, batch_size=batch_size)
    return Reference(metrics.class_frequencies(labels, num_classes), features,
                     *metrics.feature_statistics(features))


def sample_statistics(variables, samples, *, arch: str, num_classes: int,
                      batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(generated class frequencies [num_classes], features [N, D]) of samples in [0, 1]."""
    samples = np.asarray(samples, np.float32) * 2.0 - 1.0  # the classifier reads [-1, 1]
    logits, features = cls.classify(variables, samples, arch=arch, batch_size=batch_size)
    return metrics.class_frequencies(logits.argmax(-1), num_classes), features


def compare(reference: Reference, gen_freq: np.ndarray, gen_features: np.ndarray, *,
            seed: int = 0) -> dict[str, float]:
    """The metrics of generated samples (frequencies, features) against `reference`."""
    mu, sigma = metrics.feature_statistics(gen_features)
    kid_mean, _ = metrics.kid(reference.features, gen_features, subsets=KID_SUBSETS,
                              subset_size=KID_SUBSET_SIZE, seed=seed)
    out = {"kld": metrics.kld(reference.freq, gen_freq),
           "ard": metrics.ard(reference.freq, gen_freq),
           "fd_classifier": metrics.frechet_distance(reference.mu, reference.sigma, mu, sigma),
           "kid_classifier": kid_mean}
    out.update({f"gen_frac_class_{c}": float(f) for c, f in enumerate(gen_freq)})
    return out


def evaluate_samples(variables, samples, reference: Reference, *, arch: str, seed: int = 0,
                     batch_size: int = 500) -> dict[str, float]:
    """`compare` applied to samples [N, H, W, C] in [0, 1] labelled by the `arch`
    classifier `variables`."""
    gen_freq, features = sample_statistics(variables, samples, arch=arch,
                                           num_classes=len(reference.freq),
                                           batch_size=batch_size)
    return compare(reference, gen_freq, features, seed=seed)


# ----------------------------------------------------------------------------- histogram

def save_histogram(path: str, true_freq, gen_freq, *, title: str = "") -> None:
    """A bar chart PNG: per class, the true (grey) and generated (orange) frequency."""
    true_freq, gen_freq = np.asarray(true_freq), np.asarray(gen_freq)
    bar, gap, top, bottom, left, height = 12, 10, 24, 18, 10, 160
    width = left * 2 + len(true_freq) * (2 * bar + gap)
    image = Image.new("RGB", (width, top + height + bottom), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 4), title or "true (grey) vs generated (orange)", fill="black")
    base = top + height
    draw.line([(left, base), (width - left, base)], fill="black")
    for c, (t, g) in enumerate(zip(true_freq, gen_freq)):
        x = left + c * (2 * bar + gap) + gap // 2
        for offset, value, colour in ((0, t, (150, 150, 150)), (bar, g, (240, 140, 20))):
            if value > 0:
                draw.rectangle([x + offset, base - round(value * height), x + offset + bar - 1,
                                base], fill=colour)
        draw.text((x + bar - 3, base + 3), str(c), fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)  # a reader never sees half a PNG


# ----------------------------------------------------------------------------- the hook

class InceptionFID:
    """FID and KID of samples against the test images of the classes seen (Inception-v3).

    The real images' features are computed once per class set. Real images (stored in
    [-1, 1]) are put on the uint8 grid first, as the baseline's real images are (PIL
    resizes them in uint8 and ToTensor divides by 255), so the truncation in
    `inception.to_uint8` keeps them exactly.
    """

    def __init__(self, params, *, batch_size: int = 100):
        self.params = params
        self.batch_size = batch_size
        self._real: dict[tuple, np.ndarray] = {}

    def real_features(self, test: gdata.ImageSplit, classes) -> np.ndarray:
        key = tuple(sorted(int(c) for c in classes))
        if key not in self._real:
            images = np.clip((test.select(key).images + 1.0) / 2.0, 0.0, 1.0)
            images = np.round(images * 255.0).astype(np.float32) / 255.0
            self._real[key] = inception.pool_features(self.params, images,
                                                      batch_size=self.batch_size)
        return self._real[key]

    def __call__(self, test: gdata.ImageSplit, classes, samples01, *,
                 seed: int = 0) -> dict[str, float]:
        real = self.real_features(test, classes)
        fake = inception.pool_features(self.params, samples01, batch_size=self.batch_size)
        kid_mean, _ = metrics.kid(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                                  seed=seed)
        return {"fid": metrics.frechet_distance(*metrics.feature_statistics(real),
                                                *metrics.feature_statistics(fake)),
                "kid": kid_mean}


class ClassifierEvalHook:
    """The per-experience evaluation; a callable `EvalHook` for `continual.train`.

    The classifier (architecture `config.eval.classifier`) is read from `classifier_dir` at
    the first call (or, with `train_if_missing`, trained there first); one of another
    architecture or input size is refused. The test statistics are cached per class set.
    """

    def __init__(self, config, classifier_dir: str | None, *, train_if_missing: bool = False,
                 fid: InceptionFID | None = None):
        self.config = config
        self.classifier_dir = classifier_dir  # None: no classifier metrics
        self.train_if_missing = train_if_missing
        self.fid = fid
        self._classifier = None
        self._references: dict[tuple, Reference] = {}

    @property
    def arch(self) -> str:
        return self.config.eval.classifier

    def classifier(self) -> tuple[Any, dict]:
        """(variables, meta) of the evaluation classifier, loaded or trained once."""
        if self._classifier is None:
            d = self.config.data
            try:
                self._classifier = cls.load_classifier(
                    self.classifier_dir, architecture=self.arch, image_size=d.image_size,
                    channels=d.channels)
            except FileNotFoundError:
                if not self.train_if_missing:
                    raise
                log.info("training the evaluation classifier (%s) into %s", self.arch,
                         self.classifier_dir)
                self._classifier = cls.train_for_config(self.config, self.classifier_dir,
                                                        arch=self.arch)
        return self._classifier

    def reference(self, test: gdata.ImageSplit, classes) -> Reference:
        key = tuple(sorted(int(c) for c in classes))
        if key not in self._references:
            variables, meta = self.classifier()
            seen = test.select(key)
            self._references[key] = reference_statistics(
                variables, seen.images, seen.labels, arch=self.arch,
                num_classes=meta["num_classes"], batch_size=self.config.eval.batch_size)
        return self._references[key]

    def __call__(self, run, k: int, gen_params) -> dict[str, float]:
        e = run.config.eval
        rng = jax.random.fold_in(jax.random.key(run.config.seed), _EVAL_RNG_OFFSET + k)
        samples = generate.generate(run.apply_fn, gen_params, run.schedule, rng,
                                    num=e.num_samples, image_shape=run.image_shape,
                                    num_steps=e.steps, eta=e.eta, batch_size=e.batch_size)
        seen = gdata.seen_classes(run.experiences, k)
        out = {}
        if self.classifier_dir is not None:
            out.update(self._classifier_metrics(run, k, samples, seen))
        if self.fid is not None:
            out.update(self.fid(run.test, seen, samples, seed=run.config.seed + k))
        return out

    def _classifier_metrics(self, run, k: int, samples, seen) -> dict[str, float]:
        variables, meta = self.classifier()
        ref = self.reference(run.test, seen)
        gen_freq, features = sample_statistics(variables, samples, arch=self.arch,
                                               num_classes=meta["num_classes"],
                                               batch_size=run.config.eval.batch_size)
        if hosts.is_writer():
            save_histogram(os.path.join(run.workdir, "samples",
                                        f"histogram_experience_{k}.png"), ref.freq, gen_freq,
                           title=f"experience {k}: true (grey) vs generated (orange)")
        return compare(ref, gen_freq, features, seed=run.config.seed + k)


def default_eval_hook(config) -> ClassifierEvalHook | None:
    """The evaluation hook for `config`, or None (with a warning) when it cannot have one.

    The classifier lives in `classifier.default_classifier_dir(config)` (one directory per
    architecture). For the digits a missing one is trained there at the first evaluation
    (the ResNet-18 in about a minute on 2 CPU cores, SimpleCNN in about 20 s); for other
    data sets the run goes on without these metrics until
    `python -m launch.train_classifier --config ...` has written it. FID is added when
    `eval.fid` is on and the Inception weights are in `eval.inception_dir` (default:
    `inception.default_inception_dir()`).
    """
    path = cls.default_classifier_dir(config)
    trainable = config.data.name == "digits"
    if not trainable and not os.path.exists(os.path.join(path, cls.META_FILE)):
        log.warning("no evaluation classifier in %s: this run reports no kld/ard/fd_classifier "
                    "metrics. Train one with `python -m launch.train_classifier --config "
                    "<this config>`.", path)
        path = None
    fid = None
    if config.eval.fid:
        params = inception.maybe_load_inception(config.eval.inception_dir or None)
        fid = None if params is None else InceptionFID(params)
    if path is None and fid is None:
        return None
    return ClassifierEvalHook(config, path, train_if_missing=trainable, fid=fid)
