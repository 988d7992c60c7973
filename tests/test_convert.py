"""gdjax.convert: diffusers checkpoints in (safetensors, .bin, legacy names), clear errors on
mismatches, Orbax round trips, and the launch/convert.py entry point."""

import json
import subprocess
import sys
from pathlib import Path

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import convert, unet
from tests.test_unet import diffusers_model, random_images, relative_error, torch_eps

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
TINY = unet.get_unet_config("tiny")


@pytest.fixture(scope="module")
def tiny_model():
    return diffusers_model(TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_apply():
    return jax.jit(unet.UNet(TINY).apply)


def assert_matches_torch(apply, params, model, config=TINY):
    x = random_images(config)
    t = [0, 500, 999]
    with jax.default_matmul_precision("highest"):  # no TF32 if run on a GPU
        out = apply({"params": params}, x, jnp.array(t))
    assert relative_error(out, torch_eps(model, x, t)) <= 1e-4


def assert_trees_equal(a, b):
    flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]),
                                      err_msg=str(path))


def numpy_state_dict(model) -> dict:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_load_saved_pretrained(tmp_path, tiny_model, tiny_apply, safe):
    tiny_model.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / (convert.SAFETENSORS_FILE if safe else convert.BIN_FILE)).is_file()
    config, params = convert.load_diffusers_checkpoint(tmp_path)
    assert config == TINY
    assert_matches_torch(tiny_apply, params, tiny_model)


def test_load_pipeline_directory_uses_its_unet(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "unet")
    config, params = convert.load_diffusers_checkpoint(tmp_path)
    assert config == TINY
    assert_trees_equal(params, convert.params_from_torch_state_dict(tiny_model.state_dict(), TINY))


def test_bin_without_torch_says_so(tmp_path, tiny_model, monkeypatch):
    tiny_model.save_pretrained(tmp_path, safe_serialization=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="needs torch"):
        convert.load_diffusers_checkpoint(tmp_path)


def test_legacy_attention_names(tiny_model):
    # diffusers 0.16 (the paper authors' checkpoints) named the attention projections
    # query/key/value/proj_attn.
    new_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
                 ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in numpy_state_dict(tiny_model).items():
        for new, old in new_names.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    assert_trees_equal(convert.params_from_torch_state_dict(legacy, TINY),
                       convert.params_from_torch_state_dict(tiny_model.state_dict(), TINY))


def test_torch_tensors_and_numpy_arrays_give_the_same_params(tiny_model):
    assert_trees_equal(convert.params_from_torch_state_dict(tiny_model.state_dict(), TINY),
                       convert.params_from_torch_state_dict(numpy_state_dict(tiny_model), TINY))


def test_missing_key_is_named(tiny_model):
    state = numpy_state_dict(tiny_model)
    del state["mid_block.attentions.0.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing key 'mid_block\.attentions\.0\.to_k\.weight'"):
        convert.params_from_torch_state_dict(state, TINY)


def test_unexpected_key_is_named(tiny_model):
    state = numpy_state_dict(tiny_model)
    state["class_embedding.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(ValueError, match=r"unexpected key 'class_embedding\.weight'"):
        convert.params_from_torch_state_dict(state, TINY)


def test_wrong_shape_names_key_and_both_shapes(tiny_model):
    state = numpy_state_dict(tiny_model)
    state["conv_in.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"'conv_in\.weight': expected shape \(8, 1, 3, 3\), "
                                         r"found \(8, 3, 3, 3\)"):
        convert.params_from_torch_state_dict(state, TINY)


def test_wrong_config_hints_at_the_config(tiny_model):
    with pytest.raises(ValueError, match="config"):
        convert.params_from_torch_state_dict(tiny_model.state_dict(),
                                             unet.get_unet_config("digits"))


def test_missing_directory_and_files(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert.load_diffusers_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_diffusers_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_diffusers()))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        convert.load_diffusers_checkpoint(tmp_path)


def test_unsupported_diffusers_config_is_rejected(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        convert.load_diffusers_checkpoint(tmp_path)


def test_orbax_roundtrip_is_exact(tmp_path):
    config = unet.get_unet_config("digits", dtype="bfloat16")
    params = unet.init_params(config, jax.random.key(0))
    convert.save_params(tmp_path / "ckpt", params, config)
    restored_config, restored = convert.restore_params(tmp_path / "ckpt")
    assert restored_config == config
    assert_trees_equal(restored, params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(restored))
    # Overwriting an existing checkpoint is allowed (re-running a conversion).
    convert.save_params(tmp_path / "ckpt", params, config)


def test_restore_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet_config.json"):
        convert.restore_params(tmp_path)


def test_launch_convert(tmp_path, tiny_model, tiny_apply):
    tiny_model.save_pretrained(tmp_path / "diffusers")
    result = subprocess.run(
        [sys.executable, "-m", "launch.convert", f"--src={tmp_path / 'diffusers'}",
         f"--dst={tmp_path / 'gdjax'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count = sum(p.numel() for p in tiny_model.parameters())
    assert f"{count:,} parameters" in result.stdout
    config, params = convert.restore_params(tmp_path / "gdjax")
    assert config == TINY
    assert_matches_torch(tiny_apply, params, tiny_model)
