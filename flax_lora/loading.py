"""Load a diffusers-layout Stable Diffusion pipeline (hub id or local folder) into Flax.

Weights are read straight from the files a checkpoint ships (PyTorch safetensors first, then Flax msgpack,
then `.bin` through torch's `weights_only` loader) and mapped onto parameter shapes that `jax.eval_shape`
gives, so no layer is ever initialised only to be overwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora import attention

logger = logging.getLogger(__name__)


class _DropFlaxDeprecation(logging.Filter):
    """diffusers/transformers warn once per Flax layer that Flax is deprecated; we pin them on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "classes are deprecated" not in record.getMessage()


def _quiet_flax_deprecation() -> None:
    """Drop that warning at the libraries' own handlers (child loggers do not inherit logger filters)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        for handler in library._get_library_root_logger().handlers:
            handler.addFilter(_DropFlaxDeprecation())


_quiet_flax_deprecation()

Params = dict[str, Any]
COMPONENTS = ("unet", "text_encoder", "vae")
_CONFIG_FILES = ("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*")
# (file stem, framework) in order of preference: safetensors are safe and fast; msgpack is Flax's own.
_WEIGHT_STEMS = (
    ("diffusion_pytorch_model", "safetensors"),
    ("model", "safetensors"),
    ("diffusion_flax_model", "msgpack"),
    ("flax_model", "msgpack"),
    ("diffusion_pytorch_model", "bin"),
    ("pytorch_model", "bin"),
)
# diffusers' VAE attention was renamed in PyTorch (to_q, ...) but not in Flax (query, ...).
_FLAX_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# Buffers PyTorch saves that are not parameters.
_IGNORED_PT_KEYS = re.compile(r"(position_ids|num_batches_tracked)$")


def _pytorch_numerics(next_fun, args, kwargs, context):
    """Compute what PyTorch's UNet computes where diffusers' Flax port differs (diffusers 0.39).

    The port's transformer-block input GroupNorm uses epsilon 1e-5 (PyTorch: 1e-6) and its GEGLU feed-forward
    uses tanh-approximate GELU (PyTorch: exact). Each costs about 1e-4 per UNet call, which sampling amplifies
    into visible pixel differences, and trains against a slightly different model than users run.
    """
    from diffusers.models.attention_flax import FlaxGEGLU, FlaxTransformer2DModel

    module = context.module
    if context.method_name == "__call__" and not module.is_initializing():
        if isinstance(module, nn.GroupNorm) and isinstance(module.parent, FlaxTransformer2DModel):
            pytorch_norm = nn.GroupNorm(num_groups=module.num_groups, epsilon=1e-6, dtype=module.dtype)
            return pytorch_norm.apply({"params": module.variables["params"]}, args[0])
        if isinstance(module, FlaxGEGLU):
            hidden, gate = jnp.split(module.proj(args[0]), 2, axis=-1)
            return hidden * jax.nn.gelu(gate, approximate=False)
    return next_fun(*args, **kwargs)


def unet_class():
    """FlaxUNet2DConditionModel computing PyTorch's numerics; weights and API are unchanged.

    With `use_memory_efficient_attention=True` its attention is `flax_lora.attention.chunked_attention`.
    """
    from diffusers import FlaxUNet2DConditionModel
    from diffusers.configuration_utils import flax_register_to_config

    @flax_register_to_config
    class PyTorchNumericsFlaxUNet(FlaxUNet2DConditionModel):
        def __call__(self, *args, **kwargs):
            with contextlib.ExitStack() as stack:
                stack.enter_context(nn.intercept_methods(_pytorch_numerics))
                if self.use_memory_efficient_attention:
                    stack.enter_context(nn.intercept_methods(attention.memory_efficient_attention))
                return super().__call__(*args, **kwargs)

    return PyTorchNumericsFlaxUNet


@dataclass
class SDPipeline:
    """A Stable Diffusion pipeline in Flax: linen modules, their params, tokenizer and scheduler config."""

    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler_config: dict
    params: Params
    path: str
    name: str

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent covers per side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# --mixed_precision values (flax_lora.cli.MIXED_PRECISION) -> compute dtype of the frozen model.
COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def tokenize(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Token ids padded/truncated to the tokenizer's max length, int32 (N, L), as diffusers pads prompts."""
    out = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np")
    return out.input_ids.astype(np.int32)


def weight_files(folder_files: list[str], component: str, variant: str | None) -> list[str]:
    """Pick the weight file(s) of one component folder from a file listing, best format first."""
    suffix = f".{variant}" if variant else ""
    names = set(folder_files)
    for stem, framework in _WEIGHT_STEMS:
        single = f"{component}/{stem}{suffix}.{framework}"
        if single in names:
            return [single]
        index = f"{component}/{stem}.{framework}.index{suffix}.json"
        if index in names:
            return [index]
    found = sorted(f for f in folder_files if f.startswith(component + "/"))
    raise FileNotFoundError(
        f"no weights for {component!r} with variant={variant!r}: expected e.g. "
        f"{component}/diffusion_pytorch_model{suffix}.safetensors or model{suffix}.safetensors; found {found}"
    )


def resolve_pipeline_folder(name_or_path: str, revision: str | None = None, variant: str | None = None) -> str:
    """Return a local folder for a pipeline: the folder itself, or a hub snapshot of just the files needed."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "model_index.json")):
            raise FileNotFoundError(f"{name_or_path} is not a diffusers pipeline folder: no model_index.json")
        return name_or_path
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(name_or_path, revision=revision)
    except Exception as e:
        raise OSError(
            f"{name_or_path!r} is neither a local folder nor a reachable hub model id ({type(e).__name__}: {e})"
        ) from e
    wanted = [f for c in COMPONENTS for f in weight_files(files, c, variant)]
    for index in [f for f in wanted if f.endswith(".json")]:
        stem, framework = index.split(".index")[0].rsplit(".", 1)
        wanted.append(f"{stem}*.{framework}")  # the shards an index names
    return snapshot_download(name_or_path, revision=revision, allow_patterns=list(_CONFIG_FILES) + wanted)


def _read_weight_file(path: Path) -> dict[str, np.ndarray]:
    """Read one weight file (safetensors, msgpack or torch .bin) into a flat dict of numpy arrays."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix == ".msgpack":
        from flax.serialization import msgpack_restore

        tree = msgpack_restore(path.read_bytes())
        if set(tree) == {"params"}:
            tree = tree["params"]
        return {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}
    if path.suffix == ".bin":
        import torch

        # weights_only refuses pickled code: a .bin from the hub must not run anything on load.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
    raise ValueError(f"unsupported weight file {path}")


def read_weights(folder: Path, files: list[str]) -> dict[str, np.ndarray]:
    """Read a component's weights, following a sharded index when there is one."""
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = folder / name
        if name.endswith(".json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            for shard in shards:
                tensors.update(_read_weight_file(path.parent / shard))
        else:
            tensors.update(_read_weight_file(path))
    return tensors


def _candidate_paths(pt_prefix: str) -> list[tuple[str, ...]]:
    """Flax module paths a PyTorch module path may have: `blocks.0` is `blocks_0` (diffusers) or `blocks/0`."""
    joined = tuple(re.sub(r"\.(\d+)", r"_\1", pt_prefix).split(".")) if pt_prefix else ()
    split = tuple(pt_prefix.split(".")) if pt_prefix else ()
    renamed = joined[:-1] + (_FLAX_RENAMES.get(joined[-1], joined[-1]),) if joined else ()
    return list(dict.fromkeys([joined, split, renamed]))


def pt_to_flax_params(
    state: dict[str, np.ndarray], shapes: dict[tuple[str, ...], Any], source: str
) -> dict[tuple[str, ...], np.ndarray]:
    """Map a PyTorch (or already-Flax, `/`-joined) state dict onto a flat Flax param dict of known shapes."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state.items():
        if "/" in key:  # Flax msgpack: keys are already Flax paths.
            candidates = [(tuple(key.split("/")), value)]
        elif _IGNORED_PT_KEYS.search(key):
            continue
        else:
            prefix, _, leaf = key.rpartition(".")
            leaves = {"weight": ("kernel", "scale", "embedding"), "gamma": ("scale",), "beta": ("bias",)}
            candidates = [
                (path + (flax_leaf,), value)
                for path in _candidate_paths(prefix)
                for flax_leaf in leaves.get(leaf, (leaf,))
            ]
        match = next(((k, v) for k, v in candidates if k in shapes), None)
        if match is None:
            unexpected.append(key)
            continue
        flax_key, value = match
        expected = tuple(shapes[flax_key].shape)
        stored_shape = tuple(value.shape)
        if flax_key[-1] == "kernel" and "/" not in key:
            value = _pt_kernel_to_flax(value, expected)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"{source}: weight {key!r} has shape {stored_shape} (as Flax {tuple(value.shape)}), but the model "
                f"config expects Flax {'/'.join(flax_key)} of shape {expected}; is this checkpoint for another model?"
            )
        flat[flax_key] = value
    missing = sorted("/".join(k) for k in shapes if k not in flat)
    if unexpected or missing:
        raise ValueError(
            f"{source}: checkpoint does not match the model config: {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}), {len(missing)} missing params (e.g. {missing[:3]})"
        )
    return flat


def _pt_kernel_to_flax(value: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """PyTorch Linear (out, in) -> Dense (in, out); Conv OIHW -> HWIO; a 1x1 conv may feed a Dense."""
    if value.ndim == 4 and len(expected) == 2:
        value = value[:, :, 0, 0]
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T


def _param_shapes(init_fn) -> dict[tuple[str, ...], Any]:
    """Shapes of a model's params without computing any of them."""
    tree = jax.eval_shape(init_fn, jax.random.key(0))
    tree = tree.unfreeze() if hasattr(tree, "unfreeze") else tree
    if set(tree) == {"params"}:
        tree = tree["params"]
    return flatten_dict(tree)


def _load_component(folder: Path, component: str, variant: str | None, init_fn, param_dtype) -> Params:
    """Read, map and cast one component's weights."""
    listing = [str(p.relative_to(folder)) for p in (folder / component).iterdir()]
    files = weight_files(listing, component, variant)
    flat = pt_to_flax_params(read_weights(folder, files), _param_shapes(init_fn), source=str(folder / files[0]))
    return unflatten_dict({k: jnp.asarray(v, dtype=param_dtype) for k, v in flat.items()})


def load_pipeline(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    memory_efficient_attention: bool = False,
) -> SDPipeline:
    """Load UNet, text encoder, VAE, tokenizer and scheduler config of a diffusers pipeline into Flax.

    `memory_efficient_attention` computes the UNet's attention with `flax_lora.attention.chunked_attention`: the
    same outputs and gradients without the full attention matrix; on CPU it is also faster.
    """
    from diffusers import FlaxAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

    folder = Path(resolve_pipeline_folder(name_or_path, revision, variant))
    unet = unet_class().from_config(
        _read_json(folder / "unet" / "config.json"), dtype=dtype, use_memory_efficient_attention=memory_efficient_attention
    )
    vae = FlaxAutoencoderKL.from_config(_read_json(folder / "vae" / "config.json"), dtype=dtype)
    text_config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
    text_encoder = FlaxCLIPTextModel(text_config, dtype=dtype, _do_init=False)
    params = {
        "unet": _load_component(folder, "unet", variant, unet.init_weights, param_dtype),
        "vae": _load_component(folder, "vae", variant, vae.init_weights, param_dtype),
        "text_encoder": _load_component(
            folder,
            "text_encoder",
            variant,
            lambda rng: text_encoder.init_weights(rng, text_encoder.input_shape),
            param_dtype,
        ),
    }
    return SDPipeline(
        unet=unet,
        text_encoder=text_encoder,
        vae=vae,
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
        params=params,
        path=str(folder),
        name=name_or_path,
    )


def _read_json(path: Path) -> dict:
    """Read a JSON config, naming the file when it is missing or broken."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"missing pipeline config file {path}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
