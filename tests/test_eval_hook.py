"""Tests of the evaluation classifier and the per-experience evaluation hook on the digits.

One classifier is trained for the module (5 epochs, batch 32: ~95% test accuracy in about
10-15 s on 2 CPU cores); the metric tests feed it real images as "samples", where the
expected class-balance values follow from its own predictions, and one test runs the hook on
a real `Run`.
"""

import logging
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import split_digits
from gdjax import continual, data as gdata, unet
from gdjax.eval import classifier as cls
from gdjax.eval import hooks, metrics

EPS = metrics.KLD_EPS


@pytest.fixture(scope="module")
def digits():
    return gdata.load_dataset("digits", image_size=16, channels=1)


@pytest.fixture(scope="module")
def trained(digits):
    train, test = digits
    start = time.perf_counter()
    params = cls.train_classifier(train, seed=0, epochs=5, batch_size=32)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    accuracy = cls.evaluate_accuracy(params, test)
    print(f"\ndigits classifier: {accuracy:.4f} test accuracy after 5 epochs, {seconds:.1f} s")
    return params, accuracy


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("classifier") / "digits_16px_1ch")
    meta = {"dataset": "digits", "num_classes": 10, "image_size": 16, "channels": 1}
    cls.save_classifier(path, trained[0], meta)
    return path


def to_unit(images):
    return (images + 1.0) / 2.0


# ----------------------------------------------------------------------------- classifier

def test_classifier_learns_the_digits(trained):
    assert trained[1] > 0.9


def test_feature_shapes_and_batching(trained, digits):
    params, test = trained[0], digits[1]
    logits, feats = cls.classify(params, test.images[:37], batch_size=500)
    assert logits.shape == (37, 10) and feats.shape == (37, cls.FEATURE_DIM)
    # A padded last batch must not change any row.
    logits7, feats7 = cls.classify(params, test.images[:37], batch_size=7)
    np.testing.assert_allclose(logits7, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats7, feats, rtol=1e-5, atol=1e-5)
    assert (feats >= 0).all()  # max-pooled ReLU activations


def test_training_is_deterministic_from_the_seed(digits):
    subset = digits[0].take(np.arange(96))
    a = cls.train_classifier(subset, seed=3, epochs=1, batch_size=32)
    b = cls.train_classifier(subset, seed=3, epochs=1, batch_size=32)
    c = cls.train_classifier(subset, seed=4, epochs=1, batch_size=32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_save_and_load_round_trip(trained, saved, digits):
    params, meta = cls.load_classifier(saved)
    assert meta["num_classes"] == 10 and meta["image_size"] == 16
    for x, y in zip(jax.tree.leaves(trained[0]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    images = digits[1].images[:20]
    np.testing.assert_array_equal(cls.classify(params, images)[0],
                                  cls.classify(trained[0], images)[0])


def test_missing_classifier_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="launch.train_classifier"):
        cls.load_classifier(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- metrics

def expected_kld_ard(t, g):
    """By hand: KLD = sum_c (t_c + 1e-8) ln((t_c + 1e-8) / (g_c + 1e-8)), ARD = 0.5 sum |t - g|."""
    return np.sum((t + EPS) * np.log((t + EPS) / (g + EPS))), 0.5 * np.abs(t - g).sum()


def predicted_frequencies(params, images):
    pred = cls.classify(params, images)[0].argmax(-1)
    return np.bincount(pred, minlength=10) / len(pred)


def test_test_images_as_samples(trained, digits):
    params, test = trained[0], digits[1]
    seen = test.select((0, 1, 2, 3))
    ref = hooks.reference_statistics(params, seen.images, seen.labels, num_classes=10)
    out = hooks.evaluate_samples(params, to_unit(seen.images), ref)
    # The "generated" frequencies are the classifier's predictions on the true images.
    t = np.bincount(seen.labels, minlength=10) / len(seen)
    g = predicted_frequencies(params, seen.images)
    kld, ard = expected_kld_ard(t, g)
    assert out["kld"] == pytest.approx(kld, rel=1e-9, abs=1e-12)
    assert out["ard"] == pytest.approx(ard, abs=1e-12)
    assert out["ard"] < 0.1 and out["kld"] < 0.1
    assert [out[f"gen_frac_class_{c}"] for c in range(10)] == pytest.approx(g.tolist())
    # The same images have the same features (up to the [0, 1] round trip): no distance.
    assert abs(out["fd_classifier"]) < 1e-6


def test_distances_rank_matching_above_one_class_samples(trained, digits):
    params, (train, test) = trained[0], digits
    seen = test.select((3, 5))
    ref = hooks.reference_statistics(params, seen.images, seen.labels, num_classes=10)
    matching = hooks.evaluate_samples(params, to_unit(train.select((3, 5)).images), ref)
    only_threes = train.select((3,)).images
    skewed = hooks.evaluate_samples(params, to_unit(only_threes), ref)
    n3, n5 = int((seen.labels == 3).sum()), int((seen.labels == 5).sum())
    t = np.zeros(10)
    t[3], t[5] = n3 / (n3 + n5), n5 / (n3 + n5)
    kld, ard = expected_kld_ard(t, predicted_frequencies(params, only_threes))
    assert skewed["kld"] == pytest.approx(kld, rel=1e-9)
    assert skewed["ard"] == pytest.approx(ard, abs=1e-12)
    # A perfect classifier would give g = one-hot(3): ARD = n5 / (n3 + n5), about one half.
    assert skewed["ard"] == pytest.approx(n5 / (n3 + n5), abs=0.1)
    assert matching["ard"] < 0.1 and matching["kld"] < 0.1 < skewed["kld"]
    # Other draws of the same classes (the training images) are much closer in feature space.
    assert 0 < 5 * matching["fd_classifier"] < skewed["fd_classifier"]
    assert 5 * abs(matching["kid_classifier"]) < skewed["kid_classifier"]


# ----------------------------------------------------------------------------- the hook

def tiny_config(data_dir):
    c = split_digits.get_config()
    c.model.name = "tiny"
    c.data.data_dir = data_dir
    c.eval.num_samples = 48
    c.eval.batch_size = 32
    c.eval.steps = 2
    c.log.tensorboard = False
    return c


def test_hook_on_a_run(saved, tmp_path):
    config = tiny_config(str(tmp_path / "data"))
    run = continual.build(config, str(tmp_path / "run"))
    gen_params = unet.init_params(run.unet_config, jax.random.key(0))
    hook = hooks.ClassifierEvalHook(config, saved)
    rows = [hook(run, k, gen_params) for k in (0, 1)]
    expected = {"kld", "ard", "fd_classifier", "kid_classifier"} | {
        f"gen_frac_class_{c}" for c in range(10)}
    for k, row in enumerate(rows):
        assert set(row) == expected
        assert all(np.isfinite(v) for v in row.values())
        assert sum(row[f"gen_frac_class_{c}"] for c in range(10)) == pytest.approx(1.0)
        png = os.path.join(run.workdir, "samples", f"histogram_experience_{k}.png")
        assert Image.open(png).size[0] > 100
    # The same generator and seed give the same samples; the references are cached per set.
    assert rows[0] == hook(run, 0, gen_params)
    assert len(hook._references) == 2


def test_default_hook_for_the_digits_trains_its_classifier_once(saved, tmp_path, monkeypatch):
    config = tiny_config(str(tmp_path / "data"))
    hook = hooks.default_eval_hook(config)
    assert hook is not None and hook.classifier_dir == cls.default_classifier_dir(config)
    calls = []

    def fake_train(cfg, path):  # stands in for the 20 s training: reuse the module's classifier
        calls.append(path)
        params, meta = cls.load_classifier(saved)
        cls.save_classifier(path, params, meta)
        return params, meta

    monkeypatch.setattr(cls, "train_for_config", fake_train)
    hook.classifier()
    hook.classifier()
    assert calls == [cls.default_classifier_dir(config)]
    assert os.path.exists(os.path.join(calls[0], cls.META_FILE))


def test_default_hook_without_a_classifier_warns_and_is_none(tmp_path, caplog):
    config = tiny_config(str(tmp_path / "data"))
    config.data.name = "fashion_mnist"
    with caplog.at_level(logging.WARNING):
        assert hooks.default_eval_hook(config) is None
    assert "launch.train_classifier" in caplog.text


def test_histogram_png(tmp_path):
    path = str(tmp_path / "h.png")
    hooks.save_histogram(path, [0.5, 0.5, 0, 0], [0.25, 0.25, 0.5, 0])
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert (pixels == [240, 140, 20]).all(-1).any()  # some generated (orange) bar is drawn
    assert (pixels == [150, 150, 150]).all(-1).any()
