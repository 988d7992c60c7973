"""gdjax.unet against diffusers' UNet2DModel (float32, CPU), plus its config validation."""

import dataclasses

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import convert, unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(2)

TIMESTEP_ROWS = ([0, 1, 500], [999, 999, 999], [7, 250, 998])
PARITY_TOLERANCE = 1e-4  # on max|diff| / max|ref|


def diffusers_model(config: unet.UNetConfig, seed: int = 0):
    """A randomly initialised diffusers UNet2DModel for `config`, GroupNorm affines perturbed.

    Fresh GroupNorms have weight 1 and bias 0, which would hide a scale/bias mix-up.
    """
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config.to_diffusers()).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return model


def torch_eps(model, x_nhwc: np.ndarray, t) -> np.ndarray:
    """diffusers' output for NHWC input, returned as NHWC."""
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.tensor(t)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def relative_error(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def random_images(config: unet.UNetConfig, batch: int = 3, seed: int = 0) -> np.ndarray:
    shape = (batch, config.sample_size, config.sample_size, config.in_channels)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", ["tiny", "digits", "ddim_medium", "ddim_medium_3ch"])
def test_matches_diffusers(name):
    config = unet.get_unet_config(name)
    model = diffusers_model(config)
    params = convert.params_from_torch_state_dict(model.state_dict(), config)
    assert unet.param_count(params) == sum(p.numel() for p in model.parameters())

    apply = jax.jit(unet.UNet(config).apply)
    x = random_images(config)
    for t in TIMESTEP_ROWS:
        with jax.default_matmul_precision("highest"):  # no TF32 if run on a GPU
            out = apply({"params": params}, x, jnp.array(t))
        assert out.shape == x.shape and out.dtype == jnp.float32
        assert relative_error(out, torch_eps(model, x, t)) <= PARITY_TOLERANCE, (name, t)


@pytest.mark.parametrize("options", [
    dict(flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    dict(attention_head_dim=None, layers_per_block=2, add_attention=False, norm_num_groups=2),
], ids=["time-embedding-and-eps", "one-head-two-layers-no-mid-attention"])
def test_matches_diffusers_with_other_options(options):
    # The options the named configs leave at their defaults: a swapped sin/cos, an ignored
    # shift or eps, a wrong head count would all pass the test above.
    config = unet.get_unet_config("tiny", **options)
    model = diffusers_model(config, seed=1)
    params = convert.params_from_torch_state_dict(model.state_dict(), config)
    apply = jax.jit(unet.UNet(config).apply)
    x = random_images(config, seed=1)
    for t in TIMESTEP_ROWS:
        with jax.default_matmul_precision("highest"):
            out = apply({"params": params}, x, jnp.array(t))
        assert relative_error(out, torch_eps(model, x, t)) <= PARITY_TOLERANCE, (options, t)
    # With these options at their defaults (same parameter shapes) the output differs: the
    # options are really exercised.
    defaults = dataclasses.replace(config, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
                                   attention_head_dim=8)
    with jax.default_matmul_precision("highest"):
        other = jax.jit(unet.UNet(defaults).apply)({"params": params}, x, jnp.array(t))
    assert relative_error(other, torch_eps(model, x, t)) > 1e-3


def test_class_conditional_matches_diffusers():
    """num_class_embeds: diffusers' nn.Embedding class embedding added to the time
    embedding; 11 labels (10 classes and a null one for guidance)."""
    config = unet.get_unet_config("tiny", num_class_embeds=11)
    model = diffusers_model(config, seed=2)
    params = convert.params_from_torch_state_dict(model.state_dict(), config)
    assert params["class_embedding"]["embedding"].shape == (11, config.time_embed_dim)
    apply = jax.jit(unet.UNet(config).apply)
    x = random_images(config, seed=2)
    for t, labels in zip(TIMESTEP_ROWS, ([0, 5, 10], [3, 3, 3], [10, 1, 7])):
        with torch.no_grad():
            ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor(t),
                        class_labels=torch.tensor(labels)).sample.numpy().transpose(0, 2, 3, 1)
        with jax.default_matmul_precision("highest"):
            out = apply({"params": params}, x, jnp.array(t), jnp.array(labels))
        assert relative_error(out, ref) <= PARITY_TOLERANCE, (t, labels)
    # The label matters: another one changes the prediction.
    other = apply({"params": params}, x, jnp.array(TIMESTEP_ROWS[0]), jnp.array([1, 2, 3]))
    assert relative_error(other, np.asarray(apply({"params": params}, x,
                                                  jnp.array(TIMESTEP_ROWS[0]),
                                                  jnp.array([0, 5, 10])))) > 1e-3
    # Fresh params: the embedding is N(0, 1), as torch's nn.Embedding.
    fresh = unet.init_params(config, jax.random.key(0))["class_embedding"]["embedding"]
    assert abs(float(np.std(fresh)) - 1.0) < 0.2 and abs(float(np.mean(fresh))) < 0.2
    dconfig = dict(config.to_diffusers(), _class_name="UNet2DModel")
    assert unet.UNetConfig.from_diffusers(dconfig) == config


def test_class_labels_must_match_the_config():
    conditional = unet.get_unet_config("tiny", num_class_embeds=3)
    params = unet.init_params(conditional, jax.random.key(0))
    x = random_images(conditional, batch=2)
    with pytest.raises(ValueError, match="class-conditional .* pass class_labels"):
        unet.UNet(conditional).apply({"params": params}, x, jnp.array([1, 2]))
    plain = unet.get_unet_config("tiny")
    with pytest.raises(ValueError, match="unconditional UNet"):
        unet.UNet(plain).apply({"params": unet.init_params(plain, jax.random.key(0))}, x,
                               jnp.array([1, 2]), jnp.array([0, 1]))


def test_ddim_medium_param_count():
    # The paper's Fashion-MNIST denoiser; counted without allocating anything.
    assert unet.param_count(unet.param_shapes(unet.get_unet_config("ddim_medium"))) == 42_855_873


@pytest.mark.parametrize("name", ["tiny", "digits"])
def test_init_params_matches_diffusers_structure(name):
    config = unet.get_unet_config(name)
    params = unet.init_params(config, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert set(convert.expected_torch_shapes(config)) == set(diffusers_model(config).state_dict())
    assert unet.param_count(params) == sum(
        p.numel() for p in diffusers_model(config).parameters())
    assert name != "digits" or 250_000 < unet.param_count(params) < 300_000


def test_init_params_follows_torch_default_init():
    # Conv/linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and GroupNorm 1/0, as
    # torch initialises the paper's diffusers models, so training from scratch starts alike.
    config = unet.get_unet_config("digits")
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**config.to_diffusers()).state_dict()
    ours = jax.tree.map(np.asarray, unet.init_params(config, jax.random.key(1)))
    flat = flax.traverse_util.flatten_dict(ours)
    for path, mine in flat.items():
        key = convert.torch_key(path)
        ref = reference[key].numpy()
        if key.split(".")[-2] in ("norm1", "norm2", "group_norm", "conv_norm_out"):
            np.testing.assert_array_equal(mine, ref, err_msg=key)
            continue
        weight = reference[key.rsplit(".", 1)[0] + ".weight"]
        bound = 1 / np.sqrt(torch.nn.init._calculate_fan_in_and_fan_out(weight)[0])
        assert np.abs(mine).max() <= bound, key
        if mine.size >= 256:
            assert mine.std() == pytest.approx(ref.std(), rel=0.15), key


def test_scalar_and_float_timesteps_broadcast():
    config = unet.get_unet_config("tiny")
    params = unet.init_params(config, jax.random.key(0))
    apply = jax.jit(unet.UNet(config).apply)
    x = random_images(config, batch=2)
    vector = apply({"params": params}, x, jnp.array([10, 10]))
    np.testing.assert_array_equal(apply({"params": params}, x, 10), vector)
    np.testing.assert_array_equal(apply({"params": params}, x, jnp.array([10.0, 10.0])), vector)


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (2, 16, 16), (2, 15, 16, 1)])
def test_bad_input_shape_is_rejected_before_compiling(shape):
    config = unet.get_unet_config("tiny")
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(unet.UNet(config).apply, {"params": unet.param_shapes(config)},
                       jnp.zeros(shape), 0)


def test_bfloat16_compute_keeps_float32_params():
    config = unet.get_unet_config("digits")
    params = unet.init_params(config, jax.random.key(0))
    x = random_images(config)
    t = jnp.array([0, 500, 999])
    ref = jax.jit(unet.UNet(config).apply)({"params": params}, x, t)
    low_config = dataclasses.replace(config, dtype="bfloat16")
    low = jax.jit(unet.UNet(low_config).apply)({"params": params}, x, t)
    assert low.dtype == jnp.float32  # returned in the input's dtype
    assert relative_error(low, np.asarray(ref)) < 5e-2


def test_config_is_a_static_argument():
    config = unet.get_unet_config("tiny")
    assert hash(config) == hash(unet.get_unet_config("tiny"))
    traces = []

    @jax.jit
    def run(params, x):
        traces.append(1)
        return unet.UNet(config).apply({"params": params}, x, 0)

    params = unet.init_params(config, jax.random.key(0))
    run(params, random_images(config))
    run(params, random_images(config, seed=1))
    assert len(traces) == 1


def test_diffusers_config_roundtrip():
    for name in ("ddim_medium", "ddim_medium_3ch", "digits", "tiny"):
        config = unet.get_unet_config(name)
        diffusers_config = dict(config.to_diffusers(), _class_name="UNet2DModel",
                                _diffusers_version="0.16.1", num_train_timesteps=None)
        assert unet.UNetConfig.from_diffusers(diffusers_config) == config


@pytest.mark.parametrize("key,value", [
    ("time_embedding_type", "fourier"),
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("center_input_sample", True),
    ("act_fn", "gelu"),
    ("time_embedding_dim", 100),
    ("some_future_option", 1),
])
def test_from_diffusers_rejects_unsupported_options(key, value):
    config = dict(unet.get_unet_config("tiny").to_diffusers(), **{key: value})
    with pytest.raises(ValueError, match=key):
        unet.UNetConfig.from_diffusers(config)


def test_from_diffusers_accepts_explicit_default_time_embedding_dim():
    config = unet.get_unet_config("tiny")
    assert unet.UNetConfig.from_diffusers(
        dict(config.to_diffusers(), time_embedding_dim=32)) == config


@pytest.mark.parametrize("overrides,field", [
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
    (dict(up_block_types=("AttnUpBlock2D", "UpBlock2DX")), "up_block_types"),
    (dict(down_block_types=("DownBlock2D",) * 3), "down_block_types"),
    (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
    (dict(block_out_channels=(8, 18)), "block_out_channels"),
    (dict(norm_num_groups=3), "block_out_channels"),
    (dict(attention_head_dim=16, block_out_channels=(8, 24)), "attention_head_dim"),
    (dict(sample_size=15), "sample_size"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(dtype="float64"), "dtype"),
    (dict(num_class_embeds=0), "num_class_embeds"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"UNetConfig\.{field}"):
        unet.get_unet_config("tiny", **overrides)


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(ValueError, match="ddim_medium"):
        unet.get_unet_config("ddim_large")
