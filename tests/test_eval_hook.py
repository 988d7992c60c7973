"""Tests of the evaluation classifier and the per-experience evaluation hook on the digits.

The module's classifier is the full default: `python -m launch.train_classifier` trains the
digits ResNet-18 (15 epochs, batch 64) in a subprocess, under XLA's usual optimisation
(this session's unoptimised backend, tests/conftest.py, runs its training step ~10x
slower). That takes about a minute on 2 CPU cores and must reach >= 98.5% test accuracy;
the metric tests then feed it real images as "samples", where the expected class-balance
values follow from its own predictions, and one test runs the hook on a real `Run`.
"""

import json
import logging
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import split_digits
from gdjax import data as gdata, rng, unet
from gdjax.run import build, settings_from_config
from gdjax.eval import classifier as cls
from gdjax.eval import hooks, metrics, sampling

EPS = metrics.KLD_EPS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET = "resnet18"


@pytest.fixture(scope="module")
def digits():
    return gdata.load_dataset("digits", image_size=16, channels=1)


def _optimised_env():
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    return dict(os.environ, XLA_FLAGS=flags.strip())


def train_from_the_command_line(tmp_path_factory, *args):
    """(saved directory, seconds, stderr) of `launch.train_classifier` on the digits, with
    optimised XLA in its own process (unoptimised, as the suite compiles, a ResNet-18 trains
    several times slower)."""
    tmp = tmp_path_factory.mktemp("classifier")
    path = str(tmp / "digits_16px_1ch")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "launch.train_classifier", f"--output={path}",
         f"--config.data.data_dir={tmp / 'data'}", *args],
        cwd=ROOT, env=_optimised_env(), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\n{result.stdout.strip()} [{seconds:.0f} s with the process start]")
    return path, seconds, result.stderr


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The default digits classifier's training: ResNet-18, 15 epochs."""
    return train_from_the_command_line(tmp_path_factory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ResNet-18 of 3 epochs, the default's augmentation and schedule otherwise (the
    default's 15 epochs: the slow test below), saved as the hook reads it."""
    return train_from_the_command_line(tmp_path_factory, "--epochs=3")[0]


@pytest.fixture(scope="module")
def trained(saved):
    return cls.load_classifier(saved, architecture=RESNET, image_size=16, channels=1)


def to_unit(images):
    return (images + 1.0) / 2.0


def classify(variables, images, **kwargs):
    return cls.classify(variables, images, arch=RESNET, **kwargs)


# ----------------------------------------------------------------------------- classifier

@pytest.mark.slow  # the default's 15 epochs in a subprocess (2.5 minutes on 2 cores)
def test_default_digits_resnet_reaches_98_5_percent(cli_run, digits):
    variables, meta = cls.load_classifier(cli_run[0], architecture=RESNET, image_size=16,
                                          channels=1)
    assert meta["test_accuracy"] >= 0.985
    assert (meta["architecture"], meta["epochs"], meta["batch_size"], meta["lr"],
            meta["lr_schedule"]) == (RESNET, 15, 64, 1e-3, "cosine")
    assert meta["augmentation"] == {"flip": False, "degrees": 10.0, "translate": 0.1,
                                    "noise_std": 0.1}
    # Read back here (unoptimised XLA), it predicts the same: at most one near-tie flips.
    accuracy = cls.evaluate_accuracy(variables, digits[1], arch=RESNET)
    assert abs(accuracy - meta["test_accuracy"]) <= 1.0 / len(digits[1]) + 1e-12
    assert "classifier resnet18 | step 330/330 (100%)" in cli_run[2]  # the progress line
    print(f"\ndigits ResNet-18: {meta['test_accuracy']:.4f} in {meta['train_seconds']:.0f} s")


def test_feature_shapes_and_batching(trained, digits):
    variables, test = trained[0], digits[1]
    logits, feats = classify(variables, test.images[:37], batch_size=500)
    assert logits.shape == (37, 10) and feats.shape == (37, 512)
    # Inference uses BatchNorm's running averages: a row does not depend on its batch, and
    # a padded last batch changes nothing.
    logits7, feats7 = classify(variables, test.images[:37], batch_size=7)
    np.testing.assert_allclose(logits7, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats7, feats, rtol=1e-5, atol=1e-5)
    assert (feats >= 0).all()  # averages of ReLU activations


@pytest.mark.parametrize("arch", ["resnet18", "simple_cnn"])
def test_training_is_deterministic_from_the_seed(digits, arch):
    subset = digits[0].take(np.arange(32))  # one step an epoch: augmentation, dropout, BN
    settings = cls.training_defaults(arch, "digits")

    def train(seed):
        return cls.train_classifier(subset, seed=seed, epochs=1, batch_size=32, arch=arch,
                                    augmentation=settings.augmentation, progress_every=None)

    a, b, c = train(3), train(3), train(4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    if arch == RESNET:  # BatchNorm's running statistics are trained state too
        fresh = cls.init_variables(arch, jax.random.key(0), (16, 16, 1), 10)["batch_stats"]
        assert not np.allclose(a["batch_stats"]["bn1"]["running_var"],
                               fresh["bn1"]["running_var"])


def test_save_and_load_round_trip(trained, digits, tmp_path):
    variables, meta = trained
    path = str(tmp_path / "copy")
    cls.save_classifier(path, variables, meta)
    loaded, loaded_meta = cls.load_classifier(path)
    assert loaded_meta == meta
    for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    images = digits[1].images[:20]
    np.testing.assert_array_equal(classify(loaded, images)[0], classify(variables, images)[0])


@pytest.mark.parametrize("wanted, message", [
    (dict(architecture="simple_cnn"), "architecture='resnet18', but 'simple_cnn' is wanted"),
    (dict(image_size=32), "image_size=16, but 32 is wanted"),
    (dict(channels=3), "channels=1, but 3 is wanted"),
])
def test_load_refuses_another_architecture_or_input(saved, wanted, message):
    with pytest.raises(ValueError, match=message):
        cls.load_classifier(saved, **wanted)


def test_hook_refuses_a_classifier_of_another_architecture(saved, tmp_path):
    config = hook_config()
    config.eval.classifier = "simple_cnn"
    with pytest.raises(ValueError, match="retrain it with `python -m launch.train_classifier"):
        hooks.ClassifierEvalHook(settings_from_config(config), saved).classifier()


def test_a_classifier_saved_without_its_architecture_is_refused(tmp_path):
    """What an older gdjax left (a SimpleCNN with no architecture in its record)."""
    path = tmp_path / "old"
    path.mkdir()
    (path / cls.META_FILE).write_text(json.dumps(
        {"dataset": "digits", "num_classes": 10, "image_size": 16, "channels": 1}))
    with pytest.raises(ValueError, match=r"records no \['architecture'\].*retrain"):
        cls.load_classifier(str(path))


def test_missing_classifier_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="launch.train_classifier"):
        cls.load_classifier(str(tmp_path / "nothing"))


def test_default_directories_name_the_architecture(tmp_path, monkeypatch):
    """In the user cache ($GDJAX_CACHE_DIR, else ~/.cache/gdjax), never beside the data."""
    data = settings_from_config(hook_config()).data
    monkeypatch.setenv("GDJAX_CACHE_DIR", str(tmp_path / "cache"))
    resnet_dir = cls.default_classifier_dir(data, "resnet18")
    assert resnet_dir == os.path.join(str(tmp_path / "cache"), "classifiers", "resnet18",
                                      "digits_16px_1ch")
    monkeypatch.delenv("GDJAX_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cls.default_classifier_dir(data, "resnet18") == os.path.join(
        str(tmp_path / "home"), ".cache", "gdjax", "classifiers", "resnet18", "digits_16px_1ch")
    assert cls.default_classifier_dir(data, "simple_cnn") != resnet_dir
    with pytest.raises(ValueError, match="unknown classifier architecture"):
        cls.default_classifier_dir(data, "vgg")


def test_config_validation_names_the_classifier_key(tmp_path):
    config = hook_config()
    config.eval.classifier = "resnet50"
    with pytest.raises(ValueError, match="eval.classifier='resnet50' is unknown"):
        settings_from_config(config)


# ----------------------------------------------------------------------------- metrics

def expected_kld_ard(t, g):
    """By hand: KLD = sum_c (t_c + 1e-8) ln((t_c + 1e-8) / (g_c + 1e-8)), ARD = 0.5 sum |t - g|."""
    return np.sum((t + EPS) * np.log((t + EPS) / (g + EPS))), 0.5 * np.abs(t - g).sum()


def predicted_frequencies(variables, images):
    pred = classify(variables, images)[0].argmax(-1)
    return np.bincount(pred, minlength=10) / len(pred)


def test_test_images_as_samples(trained, digits):
    variables, test = trained[0], digits[1]
    seen = test.select((0, 1, 2, 3))
    ref = hooks.reference_statistics(variables, seen.images, seen.labels, arch=RESNET,
                                     num_classes=10)
    out = hooks.evaluate_samples(variables, to_unit(seen.images), ref, arch=RESNET)
    # The "generated" frequencies are the classifier's predictions on the true images.
    t = np.bincount(seen.labels, minlength=10) / len(seen)
    g = predicted_frequencies(variables, seen.images)
    kld, ard = expected_kld_ard(t, g)
    assert out["kld"] == pytest.approx(kld, rel=1e-9, abs=1e-12)
    assert out["ard"] == pytest.approx(ard, abs=1e-12)
    assert out["ard"] < 0.05 and out["kld"] < 0.05  # a few of the 144 images mislabelled
    assert [out[f"gen_frac_class_{c}"] for c in range(10)] == pytest.approx(g.tolist())
    # The same images have the same features (up to the [0, 1] round trip): no distance,
    # next to a trace of the feature covariance that is orders of magnitude larger.
    assert abs(out["fd_classifier"]) < 1e-6 * np.trace(ref.sigma)


def test_distances_rank_matching_above_one_class_samples(trained, digits):
    variables, (train, test) = trained[0], digits
    seen = test.select((3, 5))
    ref = hooks.reference_statistics(variables, seen.images, seen.labels, arch=RESNET,
                                     num_classes=10)
    matching = hooks.evaluate_samples(variables, to_unit(train.select((3, 5)).images), ref,
                                      arch=RESNET)
    only_threes = train.select((3,)).images
    skewed = hooks.evaluate_samples(variables, to_unit(only_threes), ref, arch=RESNET)
    n3, n5 = int((seen.labels == 3).sum()), int((seen.labels == 5).sum())
    t = np.zeros(10)
    t[3], t[5] = n3 / (n3 + n5), n5 / (n3 + n5)
    kld, ard = expected_kld_ard(t, predicted_frequencies(variables, only_threes))
    assert skewed["kld"] == pytest.approx(kld, rel=1e-9)
    assert skewed["ard"] == pytest.approx(ard, abs=1e-12)
    # A perfect classifier would give g = one-hot(3): ARD = n5 / (n3 + n5), about one half.
    assert skewed["ard"] == pytest.approx(n5 / (n3 + n5), abs=0.02)
    assert matching["ard"] < 0.05 and matching["kld"] < 0.05 < skewed["kld"]
    # Other draws of the same classes (the training images) are much closer in feature space.
    assert 0 < 5 * matching["fd_classifier"] < skewed["fd_classifier"]
    assert 5 * abs(matching["kid_classifier"]) < skewed["kid_classifier"]


# ----------------------------------------------------------------------------- the hook

def hook_config():
    c = split_digits.get_config()
    c.model.name = "tiny"
    c.eval.num_samples = 48
    c.eval.batch_size = 32
    c.eval.steps = 2
    c.log.tensorboard = False
    return c


@pytest.fixture(scope="module")
def simple_cnn_dir(digits, tmp_path_factory):
    """A SimpleCNN of 2 epochs (seconds), for the hook's other architecture."""
    path = str(tmp_path_factory.mktemp("simple_cnn") / "digits_16px_1ch")
    variables = cls.train_classifier(digits[0], seed=0, epochs=2, batch_size=32,
                                     arch="simple_cnn", progress_every=None)
    cls.save_classifier(path, variables, {"architecture": "simple_cnn", "num_classes": 10,
                                          "image_size": 16, "channels": 1})
    return path


@pytest.mark.parametrize("arch", ["resnet18", "simple_cnn"])
def test_hook_on_a_run(arch, request, tmp_path):
    path = request.getfixturevalue("saved" if arch == RESNET else "simple_cnn_dir")
    config = hook_config()
    config.eval.classifier = arch
    run = build(config, str(tmp_path / "run"))
    gen_params = unet.init_params(run.settings.unet, jax.random.key(0))
    hook = hooks.ClassifierEvalHook(run.settings, path)
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
    assert next(iter(hook._references.values())).features.shape[1] == cls.FEATURE_DIMS[arch]


def test_a_conditional_generator_is_asked_by_label_and_scored_on_it(simple_cnn_dir, tmp_path,
                                                                     monkeypatch):
    """After experience 0 (2 digits) the 48 samples are asked for those 2 digits in turn
    (row i: the (i mod 2)-th), guided at eval.guidance_scale; label_accuracy is the fraction
    the classifier labels as asked: 24 of 48 given here."""
    config = hook_config()
    config.eval.classifier = "simple_cnn"
    config.model.class_conditional = True
    config.eval.guidance_scale = 2.0
    run = build(config, str(tmp_path / "run"))
    gen_params = unet.init_params(run.settings.unet, jax.random.key(0))
    asked = np.array(run.experiences[0])[np.arange(48) % 2]
    seen = {}
    real_predictions = hooks.sample_predictions

    def predictions(variables, samples, **kwargs):
        seen["samples"] = samples
        labels, features = real_predictions(variables, samples, **kwargs)
        wrong = (asked + 1) % 10
        return np.where(np.arange(48) % 4 < 2, asked, wrong), features

    monkeypatch.setattr(hooks, "sample_predictions", predictions)
    fid_calls = []  # the FID gets the asked labels for its per-class FIDs

    def fake_fid(real, labels, classes, samples, **kwargs):
        fid_calls.append(kwargs["sample_labels"])
        return {"fid": 1.0}

    monkeypatch.setattr(type(run), "test_uint8", gdata.ImageSplit(np.zeros((2, 16, 16, 1),
                                                                           np.uint8), np.zeros(2)))
    row = hooks.ClassifierEvalHook(run.settings, simple_cnn_dir, fid=fake_fid)(run, 0, gen_params)
    assert row["label_accuracy"] == 0.5 and row["fid"] == 1.0
    np.testing.assert_array_equal(fid_calls[0], asked)
    unguided = sampling.generate(run.apply_fn, gen_params, run.schedule,
                                 rng.key(run.settings.seed, "eval_samples", 0), num=48,
                                 image_shape=run.image_shape, num_steps=2, batch_size=32)
    labelled = sampling.generate(run.apply_fn, gen_params, run.schedule,
                                 rng.key(run.settings.seed, "eval_samples", 0), num=48,
                                 image_shape=run.image_shape, num_steps=2, batch_size=32,
                                 labels=sampling.SampleLabels(run.experiences[0], 10, 2.0))
    np.testing.assert_array_equal(seen["samples"], labelled)
    assert np.abs(labelled - unguided).max() > 1e-3


def test_default_hook_for_the_digits_trains_its_classifier_once(saved, tmp_path, monkeypatch):
    config = hook_config()
    hook = hooks.default_eval_hook(config)
    where = cls.default_classifier_dir(hook.settings.data, RESNET)
    assert hook is not None and hook.classifier_dir == where
    calls = []

    def fake_train(settings, path, *, arch):  # stands in for the minute of training
        calls.append((path, arch))
        variables, meta = cls.load_classifier(saved)
        cls.save_classifier(path, variables, meta)
        return variables, meta

    monkeypatch.setattr(cls, "train_for_settings", fake_train)
    hook.classifier()
    hook.classifier()
    assert calls == [(where, RESNET)]
    assert os.path.exists(os.path.join(calls[0][0], cls.META_FILE))


def test_default_hook_without_a_classifier_warns_and_is_none(tmp_path, caplog):
    config = hook_config()
    config.data.name = "fashion_mnist"
    config.eval.train_classifier = False
    with caplog.at_level(logging.WARNING):
        assert hooks.default_eval_hook(config) is None
    assert "reports no KLD, ARD, fd_classifier or kid_classifier" in caplog.text
    assert "launch.train_classifier" in caplog.text
    assert "--config.eval.train_classifier=True" in caplog.text


def test_histogram_png(tmp_path):
    """Drawn with matplotlib (gdjax/figures.py, as the report's): per class a grey bar of
    the true and an orange bar of the generated frequency, axes labelled."""
    from matplotlib.colors import to_rgba

    from gdjax import figures
    true, gen = [0.5, 0.5, 0, 0], [0.25, 0.25, 0.5, 0]
    fig = figures.class_histogram(true, gen, title="after experience 1")
    ax = fig.axes[0]
    bars = [p for p in ax.patches]
    assert [b.get_height() for b in bars] == true + gen
    assert {b.get_facecolor() for b in bars[:4]} == {to_rgba("0.6")}
    assert {b.get_facecolor() for b in bars[4:]} == {to_rgba("tab:orange")}
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("class", "fraction of images")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "true (test images of the classes seen)",
        "generated (labelled by the evaluation classifier)"]
    path = str(tmp_path / "h.png")
    hooks.save_histogram(path, true, gen, title="after experience 1")
    assert Image.open(path).size == (640, 320)
