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
The per-class-set test statistics and the classifier are computed or loaded once per run;
the real images' Inception features once per data set and resolution, cached on disk
(`gdjax.cache.cache_path("fid_features")`, `InceptionFID`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from PIL import Image, ImageDraw

from gdjax import data as gdata
from gdjax import cache, generate, hosts, rng
from gdjax.eval import classifier as cls
from gdjax.eval import inception, metrics
from gdjax.logs import Progress

log = logging.getLogger(__name__)

# hook(run, experience_index, generator_params) -> {metric name: value}
EvalHook = Callable[[Any, int, Any], dict]

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


# ----------------------------------------------------------------------------- Inception FID

FEATURES_FORMAT = "gdjax-fid-real-features"
FEATURES_VERSION = 1


def real_images_sha1(images_uint8: np.ndarray, labels: np.ndarray) -> str:
    """SHA-1 of uint8 images (shape included) and their labels (as int64)."""
    digest = hashlib.sha1(repr(tuple(images_uint8.shape)).encode())
    digest.update(np.ascontiguousarray(images_uint8).tobytes())
    digest.update(np.asarray(labels, np.int64).tobytes())
    return digest.hexdigest()


def _resolution(images: np.ndarray) -> str:
    h, w = images.shape[1:3]
    return f"{h}px" if h == w else f"{h}x{w}px"


def features_file(cache_dir: str, dataset: str, images_uint8: np.ndarray) -> str:
    """`<cache_dir>/<data set>_<size>px_<channels>ch.npz`: the cached real features' file."""
    return os.path.join(cache_dir, f"{dataset}_{_resolution(images_uint8)}_"
                                   f"{images_uint8.shape[-1]}ch.npz")


def features_meta(dataset: str, images_uint8: np.ndarray, labels: np.ndarray, *,
                  weights: str) -> dict:
    """What a cached features file must record to be reused for these images."""
    return {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, "dataset": dataset,
            "image_size": list(images_uint8.shape[1:3]), "channels": int(images_uint8.shape[-1]),
            "num_images": len(images_uint8), "images_sha1": real_images_sha1(images_uint8, labels),
            "inception_weights": weights, "preprocessing": "reference_real_uint8"}


def _delete_fix(path: str) -> str:
    return f"Delete it (rm {path}); the next evaluation recomputes it."


def load_features(path: str, want: dict) -> np.ndarray | None:
    """The features [N, 2048] cached in `path` for the images `want` describes
    (`features_meta`), or None when there is no file. A file that cannot be read, or was
    computed for another data set, resolution, image set or Inception weights, is a
    ValueError naming it and the fix."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            features, labels = z["features"], z["labels"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is corrupt or truncated, not a cache of Inception features "
                         f"({type(e).__name__}: {e}). {_delete_fix(path)}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has no metadata record. {_delete_fix(path)}")
    wrong = [k for k in want if meta.get(k) != want[k]]
    if wrong:
        differences = "; ".join(f"{k} {meta.get(k)!r} in the file, {want[k]!r} here"
                                for k in wrong)
        raise ValueError(f"{path} holds the Inception features of other images or weights "
                         f"({differences}). {_delete_fix(path)}")
    if features.shape != (want["num_images"], inception.FEATURE_DIM) or \
            len(labels) != want["num_images"] or not np.isfinite(features).all():
        raise ValueError(f"{path}: features of shape {features.shape} for "
                         f"{want['num_images']} images, or not finite. {_delete_fix(path)}")
    return features.astype(np.float32)


def save_features(path: str, features: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Writes the cache file atomically (a temporary file beside it, then os.replace)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, features=features.astype(np.float32),
                     labels=np.asarray(labels, np.int32), meta=np.array(json.dumps(meta)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class InceptionFID:
    """FID and KID of samples against the test images of the classes seen (Inception-v3).

    Per call it takes the real test images as uint8 NHWC at the data set's resolution (as
    the authors' loader resizes them: PIL, uint8) with their labels. They reach the network
    as `inception.reference_real_uint8` leaves them (the authors' float32 round trip); the
    samples, in [0, 1], as `inception.to_uint8` does (REFERENCE §7).

    The features of every test image (all classes) are computed once per data set and
    resolution and cached in `<cache_dir>/<dataset>_<size>px_<channels>ch.npz` (default
    `cache_dir`: `gdjax.cache.cache_path("fid_features")`), with a record of the data set,
    the images' and labels' SHA-1 and the Inception weights (`weights`, e.g. the converted
    file's sha256); each class set's features are picked from them by label. A cached file
    that does not match is a ValueError before any computation (`load_features`).
    """

    def __init__(self, params, *, dataset: str, weights: str = "", cache_dir: str | None = None,
                 batch_size: int = 100):
        self.params = params
        self.dataset = dataset
        self.weights = weights
        self.cache_dir = os.path.abspath(cache_dir or cache.cache_path("fid_features"))
        self.batch_size = batch_size
        self._all: tuple[str, np.ndarray] | None = None  # (images sha1, features of all)

    def all_real_features(self, real_uint8, real_labels) -> np.ndarray:
        """float32 [N, 2048]: the features of every real image, from memory, the cache file,
        or computed (and cached) with a progress line."""
        real_uint8, real_labels = np.asarray(real_uint8), np.asarray(real_labels)
        if real_uint8.dtype != np.uint8 or real_uint8.ndim != 4 or \
                len(real_uint8) != len(real_labels):
            raise ValueError(f"real images must be uint8 NHWC with one label each, got "
                             f"{real_uint8.dtype} {real_uint8.shape} and {len(real_labels)} "
                             f"labels")
        meta = features_meta(self.dataset, real_uint8, real_labels, weights=self.weights)
        if self._all is not None and self._all[0] == meta["images_sha1"]:
            return self._all[1]
        path = features_file(self.cache_dir, self.dataset, real_uint8)
        features = load_features(path, meta)
        if features is None:
            progress = Progress(len(real_uint8), f"Inception features of the {self.dataset} "
                                f"test images (cached in {path})", unit="image")
            features = inception.pool_features_uint8(
                self.params, inception.reference_real_uint8(real_uint8),
                batch_size=self.batch_size, progress=progress)
            progress.close()
            try:
                save_features(path, features, real_labels, meta)
            except OSError as e:
                log.warning("could not cache the real Inception features in %s (%s); they "
                            "are computed again next run", path, e)
        self._all = (meta["images_sha1"], features)
        return features

    def real_features(self, real_uint8, real_labels, classes) -> np.ndarray:
        """The features of the real images whose label is in `classes`, in image order."""
        features = self.all_real_features(real_uint8, real_labels)
        index = gdata.experience_indices(np.asarray(real_labels), sorted(int(c) for c in classes))
        if len(index) < 2:
            raise ValueError(f"{len(index)} real images of classes {sorted(classes)}: FID "
                             f"needs at least 2")
        return features[index]

    def __call__(self, real_uint8, real_labels, classes, samples01, *,
                 seed: int = 0) -> dict[str, float]:
        """{"fid", "kid"} of `samples01` (NHWC in [0, 1]) against the real images of
        `classes` (`real_uint8` uint8 NHWC, `real_labels` int [N])."""
        real = self.real_features(real_uint8, real_labels, classes)
        progress = Progress(len(samples01), "Inception features of the samples", unit="image")
        fake = inception.pool_features(self.params, samples01, batch_size=self.batch_size,
                                       progress=progress)
        progress.close()
        kid_mean, _ = metrics.kid(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                                  seed=seed)
        return {"fid": metrics.frechet_distance(*metrics.feature_statistics(real),
                                                *metrics.feature_statistics(fake)),
                "kid": kid_mean}


# ----------------------------------------------------------------------------- the hook

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
        key = rng.key(run.config.seed, "eval_samples", k)
        samples = generate.generate(run.apply_fn, gen_params, run.schedule, key,
                                    num=e.num_samples, image_shape=run.image_shape,
                                    num_steps=e.steps, eta=e.eta, batch_size=e.batch_size)
        seen = gdata.seen_classes(run.experiences, k)
        out = {}
        if self.classifier_dir is not None:
            out.update(self._classifier_metrics(run, k, samples, seen))
        if self.fid is not None and (e.fid_at == "all" or k == len(run.experiences) - 1):
            out.update(self.fid(run.test_uint8.images, run.test_uint8.labels, seen, samples,
                                seed=rng.numpy_rng(run.config.seed, "kid_inception", k)))
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
        return compare(ref, gen_freq, features,
                       seed=rng.numpy_rng(run.config.seed, "kid_classifier", k))


def default_eval_hook(config) -> ClassifierEvalHook | None:
    """The evaluation hook for `config`, or None (with a warning) when it cannot have one.

    The classifier lives in `classifier.default_classifier_dir(config)` (the user cache, one
    directory per architecture and data set). With `eval.train_classifier` (the digits and
    the reduced Split Fashion-MNIST) a missing one is trained there at the first
    evaluation; otherwise the run goes on without kld / ard / fd_classifier, saying so once,
    until `python -m launch.train_classifier --config ...` has written it. FID is added when
    `eval.fid` is on and the Inception weights are in `eval.inception_dir` (default:
    `inception.default_inception_dir()`), after every experience or only the last
    (`eval.fid_at`).
    """
    path = cls.default_classifier_dir(config)
    trainable = config.eval.train_classifier
    if not trainable and not os.path.exists(os.path.join(path, cls.META_FILE)):
        log.warning("no evaluation classifier in %s: this run reports no KLD, ARD, "
                    "fd_classifier or kid_classifier. Train one with `python -m "
                    "launch.train_classifier --config <this config>` (or set "
                    "--config.eval.train_classifier=True to train it at the first "
                    "evaluation).", path)
        path = None
    fid = None
    if config.eval.fid:
        weights_dir = config.eval.inception_dir or None
        params = inception.maybe_load_inception(weights_dir)
        if params is not None:
            record = inception.load_record(weights_dir)
            fid = InceptionFID(params, dataset=config.data.name,
                               weights=f"sha256:{record.get('sha256', '')}")
    if path is None and fid is None:
        return None
    return ClassifierEvalHook(config, path, train_if_missing=trainable, fid=fid)
