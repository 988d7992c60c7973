"""The evaluation ResNet-18 against a PyTorch one, its weight converter, and the augmentations.

The reference is torchvision's resnet18 written out here in plain torch.nn with torchvision's
layout and names (torchvision itself does not import with this torch), given random weights
and random BatchNorm running statistics. Converted through `resnet.variables_from_torch`, the
Flax network must give the same logits and 512-d features in eval mode (max|diff| / max|ref|
<= 1e-4) and, in train mode, the same BatchNorm running-statistic updates and (in float64)
the same gradients.
The augmentations are checked on hand-made images where the answer is exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
from flax import traverse_util
from torch import nn

from configs import split_digits
from gdjax.run import settings_from_config
from gdjax.eval import augment as aug
from gdjax.eval import classifier as cls
from gdjax.eval import resnet

RTOL = 1e-4


# ----------------------------------------------------------------------------- the reference

class TorchBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchResNet18(nn.Module):
    """torchvision.models.resnet18(num_classes=...) with the same module tree."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            setattr(self, f"layer{i + 1}", nn.Sequential(
                TorchBasicBlock(in_planes, planes, stride), TorchBasicBlock(planes, planes, 1)))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def random_torch_resnet(seed=0, num_classes=10):
    """Random weights (torch's init) plus random BatchNorm affine and running statistics,
    so that eval mode exercises every stored tensor."""
    torch.manual_seed(seed)
    model = TorchResNet18(num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def state_dict_arrays(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def images(seed, n, size, channels=3):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)).astype(
        np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def torch_model():
    return random_torch_resnet().eval()


# ----------------------------------------------------------------------------- eval parity

@pytest.mark.parametrize("size", [32, 16])
def test_eval_mode_logits_and_features_match_torch(torch_model, size):
    variables = resnet.variables_from_torch(state_dict_arrays(torch_model))
    x = images(size, 6, size)
    with torch.no_grad():
        ref_logits = torch_model(nchw(x)).numpy()
        ref_feats = torch_model.features(nchw(x)).numpy()
    with jax.default_matmul_precision("highest"):
        logits, feats = resnet.ResNet18().apply(
            variables, x, method=resnet.ResNet18.logits_and_features)
    assert feats.shape == (6, resnet.FEATURE_DIM)
    assert relative_error(logits, ref_logits) <= RTOL
    assert relative_error(feats, ref_feats) <= RTOL
    # The samples are not all alike: the check is not passed by a constant output.
    assert np.abs(ref_logits - ref_logits.mean(0)).max() > 1e-2 * np.abs(ref_logits).max()


def test_grey_images_are_repeated_to_three_channels(torch_model):
    variables = resnet.variables_from_torch(state_dict_arrays(torch_model))
    grey = images(3, 4, 16, channels=1)
    with torch.no_grad():
        ref = torch_model(nchw(np.repeat(grey, 3, axis=-1))).numpy()
    with jax.default_matmul_precision("highest"):
        ours = resnet.ResNet18().apply(variables, grey)
    assert relative_error(ours, ref) <= RTOL


def test_classify_after_save_and_load_matches_torch(torch_model, tmp_path):
    """The converter's whole path: .pth file -> Orbax classifier -> batched inference."""
    pth = str(tmp_path / "resnet.pth")
    torch.save(torch_model.state_dict(), pth)
    config = split_digits.get_config()
    out = str(tmp_path / "converted")
    _, meta = cls.convert_torch_for_settings(settings_from_config(config), pth, out,
                                             evaluate=False)
    assert meta["architecture"] == "resnet18" and meta["num_classes"] == 10
    variables, _ = cls.load_classifier(out, architecture="resnet18", image_size=16, channels=1)
    x = images(5, 9, 16, channels=1)
    with torch.no_grad():
        ref = torch_model(nchw(np.repeat(x, 3, axis=-1))).numpy()
    with jax.default_matmul_precision("highest"):
        logits, feats = cls.classify(variables, x, arch="resnet18", batch_size=4)
    assert relative_error(logits, ref) <= RTOL and feats.shape == (9, 512)


# ----------------------------------------------------------------------------- training mode

def test_one_training_step_updates_batch_norm_as_torch_does():
    """The real compiled train step (no augmentation) on one batch: every running mean and
    variance after it equals torch's after a train-mode forward of the same batch (torch
    updates the variance with the unbiased batch variance; Flax's own BatchNorm would not)."""
    model = random_torch_resnet(seed=1).train()
    start = state_dict_arrays(model)
    x = images(11, 8, 16)
    labels = np.arange(8) % 10
    model(nchw(x))
    ref = state_dict_arrays(model)
    step, optimizer = cls._train_step("resnet18", 10, 5e-4, aug.NONE, 0)
    variables = resnet.variables_from_torch(start)
    opt_state = optimizer.init(variables["params"])
    with jax.default_matmul_precision("highest"):
        new, _, _ = step(variables, opt_state, x, labels, jax.random.key(0))
    stats = traverse_util.flatten_dict(new["batch_stats"])
    assert len(stats) == 40  # 20 BatchNorms, mean and variance each
    for path, value in stats.items():
        key = resnet.torch_key(("batch_stats",) + path)
        assert not np.allclose(ref[key], start[key])  # the batch moved every statistic
        np.testing.assert_allclose(value, ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_train_mode_gradients_match_torch():
    """In float64 on both sides: train-mode BatchNorm over 8 images (1x1 at layer4) makes
    these float32 gradients ill-conditioned. Torch's own float32 gradients are 5% (relative)
    from its float64 ones at layer1.1.bn2.bias, and JAX's float32 ones land near either,
    depending on XLA:CPU's fusion emitters; in float64 every gradient is the same function of
    the same weights, whatever the backend does."""
    model = random_torch_resnet(seed=2).train().double()
    x, labels = images(12, 8, 32).astype(np.float64), np.arange(8) % 10
    loss = nn.functional.cross_entropy(model(nchw(x)), torch.from_numpy(labels))
    loss.backward()
    ref = {k: p.grad.numpy() for k, p in model.named_parameters()}

    variables = resnet.variables_from_torch(state_dict_arrays(model))  # stored as float32
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)

        def loss_fn(params):
            logits, _ = resnet.ResNet18().apply({**variables, "params": params}, x,
                                                train=True, mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])

        ours_loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
    assert float(ours_loss) == pytest.approx(loss.item(), rel=1e-12)
    flat = traverse_util.flatten_dict(grads)
    assert len(flat) == len(ref) == 62
    for path, g in flat.items():
        key = resnet.torch_key(("params",) + path)
        expected = resnet._to_flax_layout(ref[key])
        assert relative_error(g, expected) <= 1e-9, key


def abstract_apply(x, **kwargs):
    """Traces the network on `x` (shapes only: the checks run at trace time)."""
    def apply():
        variables = resnet.init_variables(jax.random.key(0), 10, 16)
        return resnet.ResNet18().apply(variables, x, **kwargs)
    return jax.eval_shape(apply)


def test_batch_norm_in_training_needs_two_values_per_channel():
    with pytest.raises(ValueError, match="more than one value per channel"):
        # one 16x16 image reaches the last stages at 1x1: one value per channel
        abstract_apply(images(0, 1, 16), train=True, mutable=["batch_stats"])
    abstract_apply(images(0, 2, 16), train=True, mutable=["batch_stats"])


def test_inputs_with_two_channels_are_refused():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        abstract_apply(images(0, 2, 16, channels=2))


# ----------------------------------------------------------------------------- converter

def test_state_dict_keys_are_torchvision_keys(torch_model):
    flat = traverse_util.flatten_dict(jax.eval_shape(resnet.init_variables, jax.random.key(0)))
    ours = {resnet.torch_key(p) for p in flat}
    theirs = {k for k in torch_model.state_dict() if not k.endswith("num_batches_tracked")}
    assert ours == theirs and len(ours) == 102


def test_head_size_comes_from_the_state_dict():
    variables = resnet.variables_from_torch(state_dict_arrays(random_torch_resnet(0, 100)))
    assert variables["params"]["fc"]["kernel"].shape == (512, 100)
    assert cls.num_classes_of(variables["params"]) == 100


def test_num_batches_tracked_may_be_absent(torch_model):
    state = {k: v for k, v in state_dict_arrays(torch_model).items()
             if not k.endswith("num_batches_tracked")}
    resnet.variables_from_torch(state)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("layer3.1.bn2.running_var"), "missing keys .*layer3.1.bn2.running_var"),
    (lambda s: s.update({"layer5.0.conv1.weight": np.zeros((1,))}),
     "unexpected keys .*layer5.0.conv1.weight"),
    (lambda s: s.update({"layer2.0.conv1.weight": np.zeros((128, 64, 5, 5), np.float32)}),
     r"'layer2.0.conv1.weight' has shape \(128, 64, 5, 5\).*\(128, 64, 3, 3\)"),
    (lambda s: s.update({"fc.bias": np.zeros(11, np.float32)}),
     r"'fc.bias' has shape \(11,\).*\(10,\)"),
    (lambda s: s.pop("fc.weight"), "no 'fc.weight'"),
])
def test_converter_names_the_bad_key(torch_model, change, message):
    state = state_dict_arrays(torch_model)
    change(state)
    with pytest.raises(ValueError, match=message):
        resnet.variables_from_torch(state)


def test_pth_files(torch_model, tmp_path):
    path = str(tmp_path / "resnet.pth")
    torch.save(torch_model.state_dict(), path)
    loaded = resnet.load_torch_state_dict(path)
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(loaded[key], value.float().numpy())
    with pytest.raises(FileNotFoundError, match="no state dict file"):
        resnet.load_torch_state_dict(str(tmp_path / "absent.pth"))
    torch.save(torch.zeros(3), str(tmp_path / "tensor.pth"))
    with pytest.raises(ValueError, match="does not hold a state dict"):
        resnet.load_torch_state_dict(str(tmp_path / "tensor.pth"))


# ----------------------------------------------------------------------------- augmentations

def hand_made(n=1, size=8, channels=2):
    """Every pixel different, so that any misplaced pixel shows."""
    x = np.arange(n * size * size * channels, dtype=np.float32).reshape(n, size, size, channels)
    return x / x.size


def shifted(image, dy, dx, fill=aug.FILL):
    """`image` [H, W, C] moved down by dy and right by dx, in numpy."""
    h, w, _ = image.shape
    out = np.full_like(image, fill)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@pytest.mark.parametrize("size", [6, 7])
def test_rotation_by_quarter_turns_is_rot90(size):
    x = hand_made(3, size)
    out = np.asarray(aug.warp(jnp.asarray(x), degrees=jnp.array([90.0, -90.0, 180.0]),
                              shift=jnp.zeros((3, 2))))
    # Positive angles turn counter-clockwise as displayed (rows down), as torchvision does.
    np.testing.assert_array_equal(out[0], np.rot90(x[0], 1))
    np.testing.assert_array_equal(out[1], np.rot90(x[1], -1))
    np.testing.assert_array_equal(out[2], np.rot90(x[2], 2))


def test_zero_rotation_and_shift_is_the_identity():
    x = hand_made(2)
    out = aug.warp(jnp.asarray(x), degrees=jnp.zeros(2), shift=jnp.zeros((2, 2)))
    np.testing.assert_array_equal(np.asarray(out), x)
    np.testing.assert_array_equal(np.asarray(aug.augment(jax.random.key(0), x, aug.NONE)), x)


def test_shift_moves_every_pixel_exactly():
    x = hand_made(2)
    out = np.asarray(aug.warp(jnp.asarray(x), degrees=jnp.zeros(2),
                              shift=jnp.array([[1.0, 2.0], [-3.0, 0.0]])))
    np.testing.assert_array_equal(out[0], shifted(x[0], 1, 2))
    np.testing.assert_array_equal(out[1], shifted(x[1], -3, 0))


def test_random_translation_is_a_whole_pixel_shift_within_ten_percent():
    x = np.repeat(hand_made(1, size=20), 64, axis=0)
    settings = aug.Augmentation(flip=False, degrees=0.0, translate=0.1, noise_std=0.0)
    out = np.asarray(aug.augment(jax.random.key(3), jnp.asarray(x), settings))
    seen = set()
    for image in out:
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(image, shifted(x[0], dy, dx))]
        assert len(matches) == 1  # at most 10% of 20 px = 2 px along each axis
        seen.add(matches[0])
    assert len(seen) > 10  # the shifts vary from image to image


def test_random_flip_mirrors_about_half_the_images():
    x = np.repeat(hand_made(1), 64, axis=0)
    settings = aug.Augmentation(flip=True, degrees=0.0, translate=0.0, noise_std=0.0)
    out = np.asarray(aug.augment(jax.random.key(1), jnp.asarray(x), settings))
    mirrored = np.array([np.array_equal(o, x[0, :, ::-1]) for o in out])
    kept = np.array([np.array_equal(o, x[0]) for o in out])
    assert (mirrored | kept).all() and 16 < mirrored.sum() < 48


def test_noise_is_independent_with_the_given_std():
    x = np.zeros((64, 16, 16, 3), np.float32)
    settings = aug.Augmentation(flip=False, degrees=0.0, translate=0.0, noise_std=0.1)
    noise = np.asarray(aug.augment(jax.random.key(2), jnp.asarray(x), settings))
    assert noise.std() == pytest.approx(0.1, rel=0.02) and abs(noise.mean()) < 0.002
    assert np.abs(np.corrcoef(noise[..., 0].ravel(), noise[..., 1].ravel())[0, 1]) < 0.02


def test_augment_is_deterministic_from_its_key():
    x = jnp.asarray(np.repeat(hand_made(1, 16, 1), 8, axis=0))
    settings = aug.Augmentation()
    a, b = (np.asarray(aug.augment(jax.random.key(5), x, settings)) for _ in range(2))
    c = np.asarray(aug.augment(jax.random.key(6), x, settings))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_any_rotation_then_shift_equals_scipy_nearest_neighbour():
    """scipy's rotate (order 0, black outside the grid) about the same centre, then a numpy
    whole-pixel shift: the same image, pixel for pixel, at angles that are not quarter turns."""
    x = np.random.default_rng(4).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
    degrees, shifts = [10.0, -10.0, 7.3, -3.1], [(0, 0), (1, -2), (-1, 0), (0, 1)]
    out = np.asarray(aug.warp(jnp.asarray(x), degrees=jnp.array(degrees),
                              shift=jnp.array(shifts, jnp.float32)))
    for image, angle, (dy, dx), ours in zip(x, degrees, shifts, out):
        rotated = scipy.ndimage.rotate(image, angle, reshape=False, order=0,
                                       mode="grid-constant", cval=aug.FILL)
        np.testing.assert_array_equal(ours, shifted(rotated, dy, dx))
    assert (out[0] == aug.FILL).sum() > 0  # corners uncovered by the turn are black


@pytest.mark.parametrize("kwargs, message", [
    (dict(degrees=-1.0), "degrees=-1.0 must be a finite number >= 0"),
    (dict(noise_std=float("nan")), "noise_std=nan"),
    (dict(translate=1.5), "translate=1.5 is a fraction"),
])
def test_bad_augmentation_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aug.Augmentation(**kwargs)


def test_augment_wants_a_batch():
    with pytest.raises(ValueError, match="batch NHWC"):
        aug.augment(jax.random.key(0), jnp.zeros((8, 8, 1)), aug.Augmentation())


def test_training_defaults_follow_the_reference():
    fmnist = cls.training_defaults("resnet18", "fashion_mnist")
    assert (fmnist.epochs, fmnist.batch_size, fmnist.lr, fmnist.lr_schedule) == (
        100, 64, 5e-4, "constant")
    assert fmnist.augmentation == aug.Augmentation(flip=True, degrees=10.0, translate=0.1,
                                                   noise_std=0.1)
    assert cls.training_defaults("resnet18", "cifar10") == fmnist
    assert not cls.training_defaults("resnet18", "digits").augmentation.flip
    with pytest.raises(ValueError, match="unknown classifier architecture 'vgg'"):
        cls.training_defaults("vgg", "digits")
