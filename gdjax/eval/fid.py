"""Inception FID and KID of generated samples, with the real images' features cached.

`InceptionFID(params, dataset=..., weights=...)` scores samples in [0, 1] against the real
test images of the classes seen, both through Inception-v3's pool features
(gdjax/eval/inception.py) as the authors' code computes them (REFERENCE §7): the real images
as `inception.reference_real_uint8` leaves them, the samples as `inception.to_uint8` does.
The features of every real test image are computed once per data set and resolution and
cached in `<cache>/fid_features/<dataset>_<size>px_<channels>ch.npz` (gdjax/cache.py), with
a record of the images' and labels' SHA-1 and the Inception weights; a file that does not
match is refused (`load_features`), naming it and the fix, before any computation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile

import numpy as np

from gdjax import cache, files
from gdjax import data as gdata
from gdjax.eval import inception, metrics
from gdjax.logs import Progress

log = logging.getLogger(__name__)

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000

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
    """Writes the cache file atomically (`files.atomic_write`)."""
    buffer = io.BytesIO()
    np.savez(buffer, features=features.astype(np.float32), labels=np.asarray(labels, np.int32),
             meta=np.array(json.dumps(meta)))
    files.atomic_write(path, buffer.getvalue())


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

    def all_real_features(self, real_uint8, real_labels, sharding=None) -> np.ndarray:
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
                batch_size=self.batch_size, progress=progress, sharding=sharding)
            progress.close()
            try:
                save_features(path, features, real_labels, meta)
            except OSError as e:
                log.warning("could not cache the real Inception features in %s (%s); they "
                            "are computed again next run", path, e)
        self._all = (meta["images_sha1"], features)
        return features

    def check_cache(self, real_uint8, real_labels) -> None:
        """Raises ValueError if the cache file of these images exists but holds the features
        of other images or weights (or is corrupt); reads no more than the file."""
        meta = features_meta(self.dataset, np.asarray(real_uint8), np.asarray(real_labels),
                             weights=self.weights)
        load_features(features_file(self.cache_dir, self.dataset, np.asarray(real_uint8)), meta)

    def real_features(self, real_uint8, real_labels, classes, sharding=None) -> np.ndarray:
        """The features of the real images whose label is in `classes`, in image order."""
        features = self.all_real_features(real_uint8, real_labels, sharding)
        index = gdata.experience_indices(np.asarray(real_labels), sorted(int(c) for c in classes))
        if len(index) < 2:
            raise ValueError(f"{len(index)} real images of classes {sorted(classes)}: FID "
                             f"needs at least 2")
        return features[index]

    def __call__(self, real_uint8, real_labels, classes, samples01, *,
                 seed: int | np.random.Generator = 0, sharding=None,
                 sample_labels=None) -> dict[str, float]:
        """{"fid", "kid"} of `samples01` (NHWC in [0, 1]) against the real images of
        `classes` (`real_uint8` uint8 NHWC, `real_labels` int [N]); the network's batches
        split over `sharding`'s devices when given.

        `sample_labels` [len(samples01)]: the class each sample was asked for (a
        class-conditional generator); then also "fid_class_<c>", the FID of the samples
        asked for c against the real images of c, for each c in `classes`, and
        "fid_per_class", their mean. With n samples of a class these are the FID of n
        samples (noisier and higher than over all of them)."""
        real = self.real_features(real_uint8, real_labels, classes, sharding)
        progress = Progress(len(samples01), "Inception features of the samples", unit="image")
        fake = inception.pool_features(self.params, samples01, batch_size=self.batch_size,
                                       progress=progress, sharding=sharding)
        progress.close()
        kid_mean, _ = metrics.kid(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                                  seed=seed)
        out = {"fid": metrics.frechet_distance(*metrics.feature_statistics(real),
                                               *metrics.feature_statistics(fake)),
               "kid": kid_mean}
        if sample_labels is not None:
            out.update(self._per_class(real_uint8, real_labels, classes, fake,
                                       np.asarray(sample_labels), sharding))
        return out

    def _per_class(self, real_uint8, real_labels, classes, fake, sample_labels,
                   sharding) -> dict[str, float]:
        if len(sample_labels) != len(fake):
            raise ValueError(f"{len(sample_labels)} sample labels for {len(fake)} samples")
        out = {}
        for c in sorted(int(c) for c in classes):
            mine = fake[sample_labels == c]
            if len(mine) < 2:
                raise ValueError(f"{len(mine)} samples asked for class {c}: a per-class FID "
                                 f"needs at least 2 (raise eval.num_samples)")
            real = self.real_features(real_uint8, real_labels, (c,), sharding)
            out[f"fid_class_{c}"] = metrics.frechet_distance(
                *metrics.feature_statistics(real), *metrics.feature_statistics(mine))
        out["fid_per_class"] = float(np.mean(list(out.values())))
        return out
