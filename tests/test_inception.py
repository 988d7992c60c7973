"""gdjax/eval/inception.py: the FID Inception-v3 against a torch implementation of the same
network on random weights (converted through launch/convert_inception.py), the TF1 resize
against float64 numpy, torchmetrics' [0, 1] -> uint8 step, FID of feature sets, and the
errors for missing weights, wrong weight files and bad images."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from gdjax.eval import inception, metrics

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


def torch_reference_features(model, images01: np.ndarray) -> np.ndarray:
    """torchmetrics FID(normalize=True) preprocessing, then the torch network."""
    imgs = torch.from_numpy(np.ascontiguousarray(images01.transpose(0, 3, 1, 2)))
    imgs = (imgs * 255).byte()  # torchmetrics' step, verbatim semantics
    if imgs.shape[1] == 1:
        imgs = imgs.repeat(1, 3, 1, 1)
    nhwc = imgs.permute(0, 2, 3, 1).numpy()
    x = tf1_resize_reference(nhwc).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return model((x - 128) / 128).numpy()


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
    monkeypatch.delenv(inception.ENV_DIR)
    assert inception.default_inception_dir().endswith(os.path.join(".cache", "gdjax",
                                                                   "inception"))


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
    with pytest.raises(ValueError, match="Conv2d_1a_3x3/conv/kernel: expected shape"):
        inception.save_inception(str(tmp_path), wrong)
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / inception.PARAMS_DIR, wrong)
    (tmp_path / inception.META_FILE).write_text(json.dumps({"format": inception.FORMAT}))
    with pytest.raises(ValueError, match=r"params does not hold InceptionV3 params: "
                                         r"Conv2d_1a_3x3/conv/kernel: expected shape "
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

def test_default_hook_loads_the_weights_and_goes_on_without_them(converted, tmp_path, caplog):
    from configs import split_fmnist
    from gdjax.eval import hooks
    config = split_fmnist.get_config()
    config.data.data_dir = str(tmp_path / "no_data")  # no evaluation classifier there
    config.eval.inception_dir = str(converted[0])
    hook = hooks.default_eval_hook(config)
    assert hook is not None and hook.classifier_dir is None and hook.fid is not None
    config.eval.inception_dir = str(tmp_path / "no_weights")
    with caplog.at_level(logging.WARNING):
        assert hooks.default_eval_hook(config) is None  # neither classifier nor weights
    assert "convert_inception" in caplog.text


def test_fid_part_of_the_hook_against_a_direct_computation(monkeypatch):
    """The hook puts real images on the uint8 grid, picks the seen classes, caches their
    features and reports FID and KID of the two feature sets (features here: a cheap
    stand-in for the network, which the tests above check)."""
    from gdjax import data as gdata
    from gdjax.eval import hooks

    def fake_features(params, images, *, batch_size):
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        return np.stack([x.mean(1), x.std(1), x[:, 0], x[:, -1]], 1).astype(np.float32)

    monkeypatch.setattr(inception, "pool_features", fake_features)
    rng = np.random.default_rng(0)
    test = gdata.ImageSplit(rng.uniform(-1, 1, (40, 4, 4, 1)).astype(np.float32),
                            np.repeat(np.arange(4), 10))
    samples = rng.uniform(0, 1, (30, 4, 4, 1)).astype(np.float32)
    fid = hooks.InceptionFID(params=None)
    got = fid(test, [2, 0], samples, seed=3)
    real01 = np.round((test.images[np.isin(test.labels, [0, 2])] + 1) / 2 * 255) / 255
    real = fake_features(None, real01, batch_size=1)
    fake = fake_features(None, samples, batch_size=1)
    assert got["fid"] == pytest.approx(metrics.frechet_distance(
        *metrics.feature_statistics(real), *metrics.feature_statistics(fake)), rel=1e-6)
    assert got["kid"] == pytest.approx(metrics.kid(real, fake, subsets=hooks.KID_SUBSETS,
                                                   subset_size=hooks.KID_SUBSET_SIZE,
                                                   seed=3)[0], rel=1e-6)
    assert list(fid._real) == [(0, 2)]
