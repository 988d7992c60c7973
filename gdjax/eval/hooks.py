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
- `label_accuracy` (a class-conditional generator, whose samples are asked for by label,
  balanced over the classes seen): the fraction the classifier labels as asked;
- `fid_class_<c>`, `fid_per_class` (a class-conditional generator, with FID on): each
  class's FID between the samples asked for it and its test images, and their mean;
- `fid`, `kid`: FID and KID on Inception-v3 pool features (gdjax/eval/fid.py) when
  `eval.fid` is on and the converted Inception weights are present, after every experience
  or the last only (`eval.fid_at`); without the weights these two are left out with one
  warning, and everything else still runs;

and draws `<workdir>/samples/histogram_experience_<k>.png` (true vs generated frequencies).
Sampling, labelling and feature pooling run on the run's mesh, the batch split over its
devices. The per-class-set test statistics and the classifier are computed or loaded once
per run.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import numpy as np

from gdjax import data as gdata
from gdjax import figures, hosts, rng, rundir
from gdjax.eval import classifier as cls
from gdjax.eval import inception, metrics, sampling
from gdjax.eval.fid import KID_SUBSET_SIZE, KID_SUBSETS, InceptionFID

log = logging.getLogger(__name__)


class Reference(NamedTuple):
    """What the samples are compared with: the test images of the classes seen."""

    freq: np.ndarray      # float64 [num_classes], true class frequencies
    features: np.ndarray  # float32 [N, D], classifier features
    mu: np.ndarray
    sigma: np.ndarray


def reference_statistics(variables, images, labels, *, arch: str, num_classes: int,
                         batch_size: int = 500, sharding=None) -> Reference:
    """Class frequencies and feature statistics of real images [N, H, W, C] in [-1, 1],
    features from the `arch` classifier `variables`."""
    _, features = cls.classify(variables, images, arch=arch, batch_size=batch_size,
                               sharding=sharding)
    return Reference(metrics.class_frequencies(labels, num_classes), features,
                     *metrics.feature_statistics(features))


def sample_predictions(variables, samples, *, arch: str, batch_size: int = 500,
                       sharding=None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels [N], features [N, D]) of samples in [0, 1] by the `arch` classifier."""
    samples = np.asarray(samples, np.float32) * 2.0 - 1.0  # the classifier reads [-1, 1]
    logits, features = cls.classify(variables, samples, arch=arch, batch_size=batch_size,
                                    sharding=sharding)
    return logits.argmax(-1), features


def sample_statistics(variables, samples, *, arch: str, num_classes: int,
                      batch_size: int = 500, sharding=None) -> tuple[np.ndarray, np.ndarray]:
    """(generated class frequencies [num_classes], features [N, D]) of samples in [0, 1]."""
    predicted, features = sample_predictions(variables, samples, arch=arch,
                                             batch_size=batch_size, sharding=sharding)
    return metrics.class_frequencies(predicted, num_classes), features


def compare(reference: Reference, gen_freq: np.ndarray, gen_features: np.ndarray, *,
            seed: int | np.random.Generator = 0) -> dict[str, float]:
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


def evaluate_samples(variables, samples, reference: Reference, *, arch: str,
                     seed: int | np.random.Generator = 0,
                     batch_size: int = 500) -> dict[str, float]:
    """`compare` applied to samples [N, H, W, C] in [0, 1] labelled by the `arch`
    classifier `variables`."""
    gen_freq, features = sample_statistics(variables, samples, arch=arch,
                                           num_classes=len(reference.freq),
                                           batch_size=batch_size)
    return compare(reference, gen_freq, features, seed=seed)


def save_histogram(path: str, true_freq, gen_freq, *, title: str = "") -> None:
    """The class histogram PNG of one evaluation (gdjax/figures.py)."""
    figures.save_figure(figures.class_histogram(true_freq, gen_freq, title=title), path)


# ----------------------------------------------------------------------------- the hook

class ClassifierEvalHook:
    """The per-experience evaluation; a callable `continual.EvalHook`.

    The classifier (architecture `settings.eval.classifier`) is read from `classifier_dir`
    at the first call (or, with `train_if_missing`, trained there first); one of another
    architecture or input size is refused. The test statistics are cached per class set.
    """

    def __init__(self, settings, classifier_dir: str | None, *, train_if_missing: bool = False,
                 fid: InceptionFID | None = None):
        self.settings = settings
        self.classifier_dir = classifier_dir  # None: no classifier metrics
        self.train_if_missing = train_if_missing
        self.fid = fid
        self._classifier = None
        self._references: dict[tuple, Reference] = {}

    @property
    def arch(self) -> str:
        return self.settings.eval.classifier

    def classifier(self) -> tuple[Any, dict]:
        """(variables, meta) of the evaluation classifier, loaded or trained once."""
        if self._classifier is None:
            d = self.settings.data
            try:
                self._classifier = cls.load_classifier(
                    self.classifier_dir, architecture=self.arch, image_size=d.image_size,
                    channels=d.channels)
            except FileNotFoundError:
                if not self.train_if_missing:
                    raise
                log.info("training the evaluation classifier (%s) into %s", self.arch,
                         self.classifier_dir)
                self._classifier = cls.train_for_settings(self.settings, self.classifier_dir,
                                                          arch=self.arch)
        return self._classifier

    def reference(self, test: gdata.ImageSplit, classes, sharding=None) -> Reference:
        key = tuple(sorted(int(c) for c in classes))
        if key not in self._references:
            variables, meta = self.classifier()
            seen = test.select(key)
            self._references[key] = reference_statistics(
                variables, seen.images, seen.labels, arch=self.arch,
                num_classes=meta["num_classes"], batch_size=self.settings.eval.batch_size,
                sharding=sharding)
        return self._references[key]

    def __call__(self, run, k: int, gen_params) -> dict[str, float]:
        e, seed = run.settings.eval, run.settings.seed
        asked = run.sample_labels(k)  # a conditional generator's labels; None: unconditional
        samples = sampling.generate(
            run.apply_fn, gen_params, run.schedule, rng.key(seed, "eval_samples", k),
            num=e.num_samples, image_shape=run.image_shape, num_steps=e.steps, eta=e.eta,
            batch_size=e.batch_size, sharding=run.sharding, labels=asked)
        seen = gdata.seen_classes(run.experiences, k)
        out = {}
        if self.classifier_dir is not None:
            out.update(self._classifier_metrics(run, k, samples, seen, asked))
        if self.fid is not None and (e.fid_at == "all" or k == len(run.experiences) - 1):
            out.update(self.fid(run.test_uint8.images, run.test_uint8.labels, seen, samples,
                                seed=rng.numpy_rng(seed, "kid_inception", k),
                                sharding=run.sharding, sample_labels=None if asked is None
                                else asked.of_rows(np.arange(len(samples)))))
        return out

    def _classifier_metrics(self, run, k: int, samples, seen, asked=None) -> dict[str, float]:
        """The classifier's metrics; with `asked` (`sampling.SampleLabels`), also
        label_accuracy: the fraction of samples it labels as the class they were asked for."""
        variables, meta = self.classifier()
        ref = self.reference(run.test, seen, run.sharding)
        predicted, features = sample_predictions(variables, samples, arch=self.arch,
                                                 batch_size=run.settings.eval.batch_size,
                                                 sharding=run.sharding)
        gen_freq = metrics.class_frequencies(predicted, meta["num_classes"])
        if hosts.is_writer():
            save_histogram(rundir.histogram(run.workdir, k), ref.freq, gen_freq,
                           title=f"after experience {k} (0-based): class frequencies")
        out = compare(ref, gen_freq, features,
                      seed=rng.numpy_rng(run.settings.seed, "kid_classifier", k))
        if asked is not None:
            out["label_accuracy"] = float(np.mean(predicted == asked.of_rows(
                np.arange(len(predicted)))))
        return out


def default_eval_hook(config) -> ClassifierEvalHook | None:
    """The evaluation hook for `config` (a ConfigDict or `run.Settings`), or None (with a
    warning) when it cannot have one.

    The classifier lives in `classifier.default_classifier_dir(settings.data)` (the user
    cache, one directory per architecture and data set). With `eval.train_classifier` (the
    digits and the reduced Split Fashion-MNIST) a missing one is trained there at the first
    evaluation; otherwise the run goes on without kld / ard / fd_classifier, saying so once,
    until `python -m launch.train_classifier --config ...` has written it. FID is added when
    `eval.fid` is on and the Inception weights are in `eval.inception_dir` (default:
    `inception.default_inception_dir()`); a cached feature file of other images is refused
    here, before any training.
    """
    from gdjax.run import Settings, settings_from_config

    settings = config if isinstance(config, Settings) else settings_from_config(config)
    e = settings.eval
    path = cls.default_classifier_dir(settings.data, e.classifier)
    if not e.train_classifier and not os.path.exists(os.path.join(path, cls.META_FILE)):
        log.warning("no evaluation classifier in %s: this run reports no KLD, ARD, "
                    "fd_classifier or kid_classifier. Train one with `python -m "
                    "launch.train_classifier --config <this config>` (or set "
                    "--config.eval.train_classifier=True to train it at the first "
                    "evaluation).", path)
        path = None
    fid = _inception_fid(settings) if e.fid else None
    if path is None and fid is None:
        return None
    return ClassifierEvalHook(settings, path, train_if_missing=e.train_classifier, fid=fid)


def _inception_fid(settings) -> InceptionFID | None:
    weights_dir = settings.eval.inception_dir or None
    params = inception.maybe_load_inception(weights_dir)
    if params is None:
        return None
    record = inception.load_record(weights_dir)
    d = settings.data
    fid = InceptionFID(params, dataset=d.name, weights=f"sha256:{record.get('sha256', '')}")
    real = gdata.load_uint8_split(d.name, source=d.source, data_dir=d.data_dir,
                                  image_size=d.image_size, channels=d.channels)
    fid.check_cache(real.images, real.labels)
    return fid
