"""PyTorch state dicts <-> our Flax param trees: one key-and-layout mapping for every model.

Our modules carry PyTorch's names with `_N` for list members, so a PyTorch key `a.b.0.c.weight` is the Flax
leaf `a/b_0/c/{kernel|scale|embedding}`; which leaf it is comes from the model's own parameter shapes
(`jax.eval_shape`), never from guessing. Layouts: Linear (out, in) -> kernel (in, out); Conv OIHW -> HWIO.
Model files own the key spellings that differ between library versions (`normalize` argument).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from flax_lora.errors import UserError

FlatParams = dict[tuple[str, ...], Any]
# Flax names list members `name_N` where PyTorch says `name.N`; other `_N` names (linear_1) are plain names.
LIST_NAMES = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "attentions",
        "resnets",
        "transformer_blocks",
        "to_out",
        "net",
        "downsamplers",
        "upsamplers",
        "layers",
    }
)
_LIST_MEMBER = re.compile(r"^(.+)_(\d+)$")
# Buffers PyTorch saves that are not parameters.
_IGNORED_PT_KEYS = re.compile(r"(position_ids|num_batches_tracked)$")
# PyTorch leaf name -> the Flax leaves it may be, by module type.
_PT_LEAVES = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}


class CheckpointMismatchError(UserError):
    """A checkpoint whose keys or shapes do not fit the model its config describes."""


class UnreadableWeightsError(UserError):
    """A weight file that is not what its name says (truncated, foreign, an unknown dtype)."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (numpy, bfloat16 too, which safetensors.numpy cannot give) and header metadata of a safetensors file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        header_len = int.from_bytes(buffer[:8], "little")
        header = json.loads(bytes(buffer[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a {type(header).__name__}, not a table of tensors")
    except ValueError as e:  # JSON and unicode errors are ValueErrors
        raise UnreadableWeightsError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors = {}
    for key, info in header.items():
        try:
            dtype, (start, end), shape = info["dtype"], info["data_offsets"], info["shape"]
        except (KeyError, TypeError, ValueError) as e:
            raise UnreadableWeightsError(f"{path}: the header entry of tensor {key!r} is malformed ({info!r})") from e
        if dtype == "BF16":
            import ml_dtypes

            np_dtype = ml_dtypes.bfloat16
        elif dtype in _SAFETENSORS_DTYPES:
            np_dtype = _SAFETENSORS_DTYPES[dtype]
        else:
            raise UnreadableWeightsError(f"{path}: tensor {key!r} has dtype {dtype}, which is not supported")
        if base + end > size:
            raise UnreadableWeightsError(f"{path} is truncated: tensor {key!r} ends at byte {base + end} of {size}")
        count = (end - start) // np.dtype(np_dtype).itemsize
        if count != int(np.prod(shape)):
            raise UnreadableWeightsError(f"{path}: tensor {key!r} has {count} values for shape {shape}")
        tensors[key] = np.frombuffer(buffer, np_dtype, count=count, offset=base + start).reshape(shape)
    return tensors, metadata


def pt_module_path(flax_path: tuple[str, ...]) -> str:
    """PyTorch module path of a Flax module path: `down_blocks_0/to_out_0` -> `down_blocks.0.to_out.0`."""
    parts = []
    for name in flax_path:
        member = _LIST_MEMBER.match(name)
        parts.append(f"{member[1]}.{member[2]}" if member and member[1] in LIST_NAMES else name)
    return ".".join(parts)


def flax_module_path(pt_path: str) -> tuple[str, ...]:
    """Flax module path of a PyTorch module path: `down_blocks.0.to_out.0` -> (`down_blocks_0`, `to_out_0`)."""
    return tuple(re.sub(r"\.(\d+)", r"_\1", pt_path).split(".")) if pt_path else ()


def _to_flax_layout(value: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """PyTorch Linear (out, in) -> (in, out); Conv OIHW -> HWIO; a 1x1 conv may feed a Linear and back."""
    if value.ndim == 4 and len(expected) == 2:
        value = value[:, :, 0, 0]
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and len(expected) == 4:
        return value.T[None, None]
    return value.T


def pt_to_flax(
    state: dict[str, np.ndarray],
    shapes: FlatParams,
    source: str,
    normalize: Callable[[str], str | None] = lambda key: key,
) -> FlatParams:
    """Map a PyTorch state dict onto a flat Flax param dict of known shapes; every key and param accounted for.

    `normalize` rewrites a version-specific key to the model's canonical PyTorch path, or returns None for a
    key that is known and deliberately not a parameter.
    """
    flat: FlatParams = {}
    unexpected = []
    for key, value in state.items():
        if _IGNORED_PT_KEYS.search(key):
            continue
        canonical = normalize(key)
        if canonical is None:
            continue
        prefix, _, leaf = canonical.rpartition(".")
        path = flax_module_path(prefix)
        flax_key = next((path + (f,) for f in _PT_LEAVES.get(leaf, (leaf,)) if path + (f,) in shapes), None)
        if flax_key is None:
            unexpected.append(key)
            continue
        expected = tuple(shapes[flax_key].shape)
        flax_value = _to_flax_layout(value, expected) if flax_key[-1] == "kernel" else value
        if tuple(flax_value.shape) != expected:
            raise CheckpointMismatchError(
                f"{source}: weight {key!r} has shape {tuple(value.shape)} (as Flax {tuple(flax_value.shape)}), but "
                f"the model config expects {'/'.join(flax_key)} of shape {expected}; is this checkpoint for another "
                "model, or its config.json edited?"
            )
        if flax_key in flat:
            raise CheckpointMismatchError(f"{source}: two keys map to {'/'.join(flax_key)} (the second is {key!r})")
        flat[flax_key] = flax_value
    missing = sorted("/".join(k) for k in shapes if k not in flat)
    if unexpected or missing:
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not match the model config: {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}), {len(missing)} missing params (e.g. {missing[:3]})"
        )
    return flat


def load_params(
    state: dict[str, np.ndarray],
    shapes: FlatParams,
    source: str,
    param_dtype: Any,
    normalize: Callable[[str], str | None] = lambda key: key,
) -> dict:
    """A model's param tree from a PyTorch state dict (`pt_to_flax`), cast to `param_dtype` on the device."""
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict

    flat = pt_to_flax(state, shapes, source, normalize)
    return unflatten_dict({k: jnp.asarray(v, dtype=param_dtype) for k, v in flat.items()})


def flax_to_pt(flat: FlatParams) -> dict[str, np.ndarray]:
    """Inverse of `pt_to_flax` for our models: a PyTorch state dict (canonical keys) of a flat Flax param dict."""
    state = {}
    for path, value in flat.items():
        value = np.asarray(value)
        leaf = path[-1]
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        pt_leaf = "bias" if leaf == "bias" else "weight"
        state[f"{pt_module_path(path[:-1])}.{pt_leaf}"] = np.ascontiguousarray(value)
    return state
