"""Load a diffusers-layout Stable Diffusion pipeline (hub id or local folder) into our Flax models.

Design:
- Each component's config (`unet/config.json`, `text_encoder/config.json`, `vae/config.json`) builds our own
  model (flax_lora.models); its weights are read straight from the files PyTorch tools write (safetensors,
  sharded or not, any `variant`; `.bin` through our pickle reader that runs no code and needs no torch) and
  mapped onto parameter shapes from `jax.eval_shape`, so no layer is initialised only to be overwritten.
- Every key is accounted for (flax_lora.models.convert): a checkpoint for another model is an error naming
  the file, the key and both shapes. Key spellings of older and newer libraries (transformers 4 vs 5 CLIP
  layouts, old VAE attention names) are normalised by each model file.
- `SDPipeline` holds the modules, params, tokenizers and scheduler config, and the few calls that training
  and inference share (text embeddings, noise prediction, VAE encode/decode) with an optional LoRA.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora.errors import MissingFileError, UserError, hub_download, is_hub_id
from flax_lora.lora import LORA, lora_variables
from flax_lora.models import clip, unet as unet_lib, vae as vae_lib
from flax_lora.models.convert import CheckpointMismatchError, read_safetensors
from flax_lora.tokenizer import CLIPTokenizer

Params = dict[str, Any]
LoraLayers = tuple[tuple[Params, Any], ...]
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_CONFIG_FILES = ("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*")
# (file stem, format) in order of preference: safetensors are safe and fast; .bin is read without running code.
_WEIGHT_STEMS = (
    ("diffusion_pytorch_model", "safetensors"),
    ("model", "safetensors"),
    ("diffusion_pytorch_model", "bin"),
    ("pytorch_model", "bin"),
)
# --mixed_precision values (flax_lora.cli.MIXED_PRECISION) -> compute dtype of the frozen model.
COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
logger = logging.getLogger(__name__)


class PipelineError(UserError):
    """A pipeline folder or hub id that cannot be loaded as a Stable Diffusion pipeline."""


@dataclass
class SDPipeline:
    """A Stable Diffusion pipeline in Flax: our modules, their params, tokenizers and scheduler config."""

    unet: unet_lib.UNet2DConditionModel
    text_encoder: clip.CLIPTextModel
    vae: vae_lib.AutoencoderKL
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    params: Params
    path: str
    name: str
    pipeline_class: str = "StableDiffusionPipeline"
    text_encoder_2: clip.CLIPTextModel | None = None
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL: with no negative prompt, guidance uses zero embeddings rather than the encoded empty prompt.
    force_zeros_for_empty_prompt: bool = False

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent covers per side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL pipelines (two text encoders, size/crop conditioning)."""
        return self.unet.config.addition_embed_type == "text_time"

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Token ids of every text encoder: `input_ids` (B, L), and `input_ids_2` for SDXL's second tokenizer."""
        ids = {"input_ids": self.tokenizer(prompts)}
        if self.tokenizer_2 is not None:
            ids["input_ids_2"] = self.tokenizer_2(prompts)
        return ids

    def encode_text(self, params: Params, ids: jax.Array, lora: LoraLayers = ()) -> jax.Array:
        """The text encoder's last hidden state (B, L, D) for token ids, with LoRA layers when given."""
        out = self.text_encoder.apply({"params": params["text_encoder"], LORA: lora_variables(*lora)}, ids)
        return out.last_hidden_state

    def encode_prompt(
        self, params: Params, ids: dict[str, jax.Array], lora: dict[str, LoraLayers] | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """(cross-attention context (B, L, D), pooled text embeds (B, P) or None) as the UNet expects them.

        SD 1.x/2.x: the text encoder's last hidden state. SDXL, as diffusers' `encode_prompt` with clip_skip None:
        both encoders' penultimate hidden states side by side, and `text_encoder_2`'s projected pooled output.
        """
        lora = lora or {}
        if not self.is_sdxl:
            return self.encode_text(params, ids["input_ids"], lora.get("text_encoder", ())), None
        states, pooled = [], None
        for component, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
            model = getattr(self, component)
            variables = {"params": params[component], LORA: lora_variables(*lora.get(component, ()))}
            out = model.apply(variables, ids[key])
            states.append(out.hidden_states[-2])
            pooled = out.text_embeds if out.text_embeds is not None else out.pooler_output
        return jnp.concatenate(states, axis=-1), pooled

    def predict_noise(
        self, params: Params, latents: jax.Array, t: jax.Array, text: jax.Array, lora: LoraLayers = (), added=None
    ) -> jax.Array:
        """The UNet's output for NCHW latents at timesteps `t`, with LoRA layers when given."""
        variables = {"params": params["unet"], LORA: lora_variables(*lora)}
        return self.unet.apply(variables, latents, t, text, added)

    def encode_images(self, params: Params, pixels: jax.Array) -> vae_lib.LatentDistribution:
        """The VAE posterior of NCHW pixels in [-1, 1] (unscaled latents)."""
        return self.vae.apply({"params": params["vae"]}, pixels, method=self.vae.encode)

    def decode_latents(self, params: Params, latents: jax.Array) -> jax.Array:
        """NCHW images in [-1, 1] of scaled (diffusion-space) latents."""
        return self.vae.apply({"params": params["vae"]}, self.vae.unscale_latents(latents), method=self.vae.decode)


def _read_weight_file(path: Path) -> dict[str, np.ndarray]:
    """Read one weight file (safetensors or PyTorch .bin) into a flat dict of numpy arrays."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    if path.suffix == ".bin":
        from flax_lora.models.torch_pickle import load_torch_file

        return load_torch_file(path)
    raise PipelineError(f"unsupported weight file {path}")


def read_weights(folder: Path, files: list[str]) -> dict[str, np.ndarray]:
    """Read a component's weights, following a sharded index when there is one."""
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = folder / name
        if name.endswith(".json"):
            shards = sorted(set(_read_json(path)["weight_map"].values()))
            for shard in shards:
                tensors.update(_read_weight_file(path.parent / shard))
        else:
            tensors.update(_read_weight_file(path))
    return tensors


def weight_files(folder_files: list[str], component: str, variant: str | None) -> list[str]:
    """Pick the weight file(s) of one component folder from a file listing, best format first."""
    suffix = f".{variant}" if variant else ""
    names = set(folder_files)
    for stem, fmt in _WEIGHT_STEMS:
        single = f"{component}/{stem}{suffix}.{fmt}"
        if single in names:
            return [single]
        index = f"{component}/{stem}.{fmt}.index{suffix}.json"
        if index in names:
            return [index]
    found = sorted(f for f in folder_files if f.startswith(component + "/"))
    if any(f.endswith(".msgpack") for f in found):
        raise PipelineError(
            f"{component} has only Flax .msgpack weights ({found}): that format of diffusers<0.40's Flax classes is "
            "not read; use the PyTorch (safetensors) weights of the same model"
        )
    raise PipelineError(
        f"no weights for {component!r} with variant={variant!r}: expected e.g. "
        f"{component}/diffusion_pytorch_model{suffix}.safetensors or model{suffix}.safetensors; found {found}"
    )


def resolve_pipeline_folder(name_or_path: str, revision: str | None = None, variant: str | None = None) -> str:
    """Return a local folder for a pipeline: the folder itself, or a hub snapshot of just the files needed."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise PipelineError(f"{name_or_path} is not a diffusers pipeline folder: no model_index.json")
        return path
    if os.path.exists(path):
        raise PipelineError(
            f"{name_or_path} is a file; expected a diffusers pipeline folder (with model_index.json): single-file "
            "checkpoints are not read"
        )
    if not is_hub_id(name_or_path):
        raise MissingFileError(f"pipeline folder {name_or_path} does not exist (a hub id looks like 'owner/name')")
    from huggingface_hub import list_repo_files, snapshot_download

    logger.info("looking up %s on the Hugging Face hub", name_or_path)
    fix = "A local folder of a diffusers pipeline (with model_index.json) works without the hub."
    with hub_download("model", name_or_path, fix):
        files = list_repo_files(name_or_path, revision=revision)
    if "model_index.json" not in files:
        raise PipelineError(f"hub model {name_or_path} is not a diffusers pipeline: it has no model_index.json")
    components = [c for c in MODEL_COMPONENTS if any(f.startswith(c + "/") for f in files)]
    wanted = [f for c in components for f in weight_files(files, c, variant)]
    for index in [f for f in wanted if f.endswith(".json")]:
        stem, fmt = index.split(".index")[0].rsplit(".", 1)
        wanted.append(f"{stem}*.{fmt}")  # the shards an index names
    with hub_download("model", name_or_path, fix):
        return snapshot_download(name_or_path, revision=revision, allow_patterns=list(_CONFIG_FILES) + wanted)


def resolve_vae_folder(name_or_path: str, revision: str | None = None, variant: str | None = None) -> Path:
    """(--pretrained_vae_model_name_or_path) an AutoencoderKL folder or hub id, or a pipeline's `vae/`, as a local folder."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return path / "vae"
        if not (path / "config.json").is_file():
            raise PipelineError(f"VAE folder {name_or_path} has no config.json (expected an AutoencoderKL save_pretrained folder)")
        return path
    if not is_hub_id(name_or_path):
        raise MissingFileError(f"VAE folder {name_or_path} does not exist (a hub id looks like 'owner/name')")
    from huggingface_hub import snapshot_download

    suffix = f".{variant}" if variant else ""
    patterns = ["config.json"] + [f"{stem}{suffix}*.{fmt}*" for stem, fmt in _WEIGHT_STEMS]
    with hub_download("model", name_or_path, "A local AutoencoderKL folder works without the hub."):
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))


def _component_weights(folder: Path, component: str, variant: str | None) -> tuple[dict[str, np.ndarray], str]:
    """A component's PyTorch state dict and the file it came from (for errors)."""
    listing = [f"{component}/{p.name}" for p in (folder / component).iterdir()]
    files = weight_files(listing, component, variant)
    return read_weights(folder, files), str(folder / files[0])


def _component_config(folder: Path, component: str, config_class) -> Any:
    """A component's config.json read by our model's config class; an unimplemented field is a PipelineError."""
    path = folder / component / "config.json"
    try:
        return config_class.from_dict(_read_json(path), str(path))
    except PipelineError:
        raise
    except ValueError as e:  # the model files raise ValueError naming the file, the field and the value
        raise PipelineError(str(e)) from e


def _check_components(folder: Path, index: dict) -> None:
    """Refuse a pipeline class or component class our models do not implement, by name."""
    where = folder / "model_index.json"
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise PipelineError(f"{where}: pipeline class {cls!r} is not supported; expected one of {PIPELINE_CLASSES}")
    expected = {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("CLIPTextModelWithProjection", "CLIPTextModel"),
    }
    for component, classes in expected.items():
        entry = index.get(component)
        if component == "text_encoder_2" and not entry:
            continue
        if not entry or entry[-1] is None:
            raise PipelineError(f"{where}: the pipeline has no {component}")
        if entry[-1] not in classes:
            raise PipelineError(f"{where}: {component} is a {entry[-1]}; expected one of {classes}")


def load_pipeline(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    vae: str | None = None,
) -> SDPipeline:
    """Load UNet, text encoder(s), VAE, tokenizer(s) and scheduler config of a diffusers pipeline into Flax.

    `vae` replaces the pipeline's VAE by another AutoencoderKL (folder or hub id), e.g. SDXL's fp16-fix VAE.

    `attention` picks the UNet's attention kernel (flax_lora.attention.IMPLEMENTATIONS): "auto" runs the platform's
    fused kernel where it applies (cuDNN on NVIDIA GPUs, Pallas on TPU), else "chunked" on CPU and "xla" elsewhere.
    """
    folder = Path(resolve_pipeline_folder(name_or_path, revision, variant))
    index = _read_json(folder / "model_index.json")
    _check_components(folder, index)
    loaders = {
        "unet": (unet_lib.UNetConfig, unet_lib.load_unet),
        "vae": (vae_lib.VAEConfig, vae_lib.load_vae),
        "text_encoder": (clip.CLIPTextConfig, clip.load_clip),
        "text_encoder_2": (clip.CLIPTextConfig, clip.load_clip),
    }
    components = [c for c in loaders if c != "text_encoder_2" or index.get(c)]
    # Where each component lives: (root, subfolder); a separate VAE is its own folder.
    places = {c: (folder, c) for c in components}
    if vae is not None:
        vae_folder = resolve_vae_folder(vae, revision, variant)
        places["vae"] = (vae_folder.parent, vae_folder.name)
    # Every config is checked before the first (slow) weight file is read.
    configs = {c: _component_config(*places[c], loaders[c][0]) for c in components}
    models, params = {}, {}
    for component in components:
        weights, source = _component_weights(*places[component], variant)
        # Only the UNet takes the attention choice: the VAE's one attention layer and CLIP's causal 77 tokens stay xla.
        kwargs = {"attention": attention} if component == "unet" else {}
        load = loaders[component][1]
        models[component], params[component] = load(weights, configs[component], source, dtype, param_dtype, **kwargs)
    has_second = "text_encoder_2" in models
    return SDPipeline(
        unet=models["unet"],
        text_encoder=models["text_encoder"],
        vae=models["vae"],
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
        params=params,
        path=str(folder),
        name=name_or_path,
        pipeline_class=index["_class_name"],
        text_encoder_2=models.get("text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_folder(folder / "tokenizer_2") if has_second else None,
        # diffusers' StableDiffusionXLPipeline default when model_index.json does not say.
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", has_second)),
    )


def _read_json(path: Path) -> dict:
    """Read a JSON config, naming the file when it is missing or broken."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise MissingFileError(f"missing pipeline file {path}") from e
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from e


__all__ = ["CheckpointMismatchError", "COMPUTE_DTYPES", "PipelineError", "SDPipeline", "load_pipeline"]
