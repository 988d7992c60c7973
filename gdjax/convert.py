"""diffusers UNet2DModel weights in, and gdjax's own self-describing parameter checkpoints.

- `params_from_torch_state_dict(state_dict, config)`: torch state dict -> gdjax params, after
  checking every key and shape against the config (conv OIHW -> HWIO, linear (out, in) ->
  (in, out)); accepts the legacy attention names (query/key/value/proj_attn) of diffusers
  0.16-era checkpoints, such as the paper authors' models.
- `load_diffusers_checkpoint(directory)`: config.json + diffusion_pytorch_model.safetensors
  (read with numpy, no torch needed) or .bin (needs torch).
- `save_params` / `restore_params`: an Orbax checkpoint of the params with the UNet config
  stored beside it as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from gdjax import files, hosts
from gdjax.unet import UNetConfig, param_shapes

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"
GDJAX_CONFIG_FILE = "unet_config.json"
_PARAMS_DIR = "params"

# Flax names of list entries ("resnets_0") are torch list indices ("resnets.0"); other
# underscores-plus-digit names (linear_1) are plain torch attribute names.
_LIST_ENTRY = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")
_LEGACY_ATTENTION = re.compile(r"(attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ---------------------------------------------------------------- key and layout mapping

def torch_key(path: tuple[str, ...]) -> str:
    """The diffusers state-dict key of the flax parameter at `path`."""
    *modules, leaf = path
    parts = [_LIST_ENTRY.sub(r"\1.\2", m) for m in modules]
    parts.append("bias" if leaf == "bias" else "weight")  # kernel and GroupNorm scale
    return ".".join(parts)


def _torch_shape(flax_shape: tuple[int, ...], leaf: str = "kernel") -> tuple[int, ...]:
    if leaf == "embedding":  # nn.Embed and torch's nn.Embedding: both [labels, width]
        return tuple(flax_shape)
    if len(flax_shape) == 4:  # conv kernel HWIO -> OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:  # dense kernel (in, out) -> (out, in)
        return flax_shape[::-1]
    return tuple(flax_shape)


def _to_flax_layout(array: np.ndarray, leaf: str = "kernel") -> np.ndarray:
    if leaf == "embedding":
        return array
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def expected_torch_shapes(config: UNetConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (flax path, torch shape) for every parameter `UNet(config)` has."""
    flat = traverse_util.flatten_dict(param_shapes(config))
    return {torch_key(path): (path, _torch_shape(tuple(s.shape), path[-1]))
            for path, s in flat.items()}


def rename_legacy_keys(keys) -> dict[str, str]:
    """new key -> original key, mapping 0.16-era attention names to the current ones."""
    renamed: dict[str, str] = {}
    for key in keys:
        new = _LEGACY_ATTENTION.sub(lambda m: m.group(1) + _LEGACY_NAMES[m.group(2)] + ".", key)
        if new in renamed:
            raise ValueError(f"state dict holds both {renamed[new]!r} and {key!r} for {new!r}")
        renamed[new] = key
    return renamed


# ---------------------------------------------------------------- state dict -> params

def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; .float() also handles bf16/fp16 tensors
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def check_state_dict(shapes: Mapping[str, tuple[int, ...]], config: UNetConfig) -> None:
    """Raises ValueError listing missing/unexpected keys and wrong shapes (torch layout)."""
    expected = {k: shape for k, (_, shape) in expected_torch_shapes(config).items()}
    problems = files.shape_problems(shapes, expected)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"state dict does not fit the UNet config ({len(problems)} problems):\n  {shown}{more}\n"
            "Is the config the checkpoint's own (block_out_channels, layers_per_block, "
            "block types, in/out channels)? Keys and shapes are in diffusers' torch layout.")


def params_from_torch_state_dict(state_dict: Mapping[str, Any], config: UNetConfig) -> dict:
    """gdjax params (nested dict of float32 numpy arrays) from a diffusers UNet2DModel state dict.

    Values may be numpy arrays or torch tensors. Everything is checked before conversion.
    """
    originals = rename_legacy_keys(state_dict)
    check_state_dict({new: np.shape(state_dict[old]) for new, old in originals.items()}, config)
    flat = {path: _to_flax_layout(_as_numpy(state_dict[originals[key]]), path[-1])
            for key, (path, _) in expected_torch_shapes(config).items()}
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------- diffusers directories

def _resolve_model_dir(directory: Path) -> Path:
    if not directory.is_dir():
        raise FileNotFoundError(f"diffusers checkpoint directory not found: {directory}")
    if not (directory / CONFIG_FILE).is_file() and (directory / "unet" / CONFIG_FILE).is_file():
        return directory / "unet"  # a saved pipeline: its UNet lives in unet/
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in diffusers checkpoint directory {directory}")
    return directory


def _read_weights(directory: Path) -> dict[str, Any]:
    if (directory / SAFETENSORS_FILE).is_file():
        from safetensors.numpy import load_file
        return load_file(str(directory / SAFETENSORS_FILE))
    if (directory / BIN_FILE).is_file():
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{directory / BIN_FILE} is a torch pickle and reading it needs torch "
                f"(pip install torch), or re-save the model with safetensors") from e
        return torch.load(directory / BIN_FILE, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {BIN_FILE} in {directory}")


def load_diffusers_checkpoint(directory, dtype: str = "float32") -> tuple[UNetConfig, dict]:
    """(UNetConfig, params) from a diffusers UNet2DModel (or pipeline) directory."""
    directory = _resolve_model_dir(Path(directory))
    raw = json.loads((directory / CONFIG_FILE).read_text())
    class_name = raw.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"{directory / CONFIG_FILE} describes a {class_name}, not a UNet2DModel")
    config = UNetConfig.from_diffusers(raw, dtype=dtype)
    return config, params_from_torch_state_dict(_read_weights(directory), config)


# ---------------------------------------------------------------- gdjax checkpoints

def save_params(path, params, config: UNetConfig) -> None:
    """Writes `params` (Orbax, under path/params) and then, atomically, the config
    (path/unet_config.json): a directory without that file is an unfinished save."""
    params = jax.tree.map(hosts.host_copy, params)  # also replicated multi-host arrays
    files.save_tree(path, params, dataclasses.asdict(config), tree_dir=_PARAMS_DIR,
                    meta_file=GDJAX_CONFIG_FILE,
                    multiprocessing_options=hosts.local_orbax_options())


def restore_params(path) -> tuple[UNetConfig, dict]:
    """(UNetConfig, params) written by `save_params`; params come back as float32 jax arrays."""
    path = Path(path).absolute()
    config = UNetConfig(**files.saved_meta(path, GDJAX_CONFIG_FILE, missing=(
        f"not a gdjax params checkpoint (or its save never finished), missing "
        f"{path / GDJAX_CONFIG_FILE}")))
    if not (path / _PARAMS_DIR).exists():
        raise FileNotFoundError(f"not a gdjax params checkpoint, missing {path / _PARAMS_DIR}")
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), param_shapes(config))
    params = files.load_tree(path, target, tree_dir=_PARAMS_DIR,
                             multiprocessing_options=hosts.local_orbax_options())
    return config, params
