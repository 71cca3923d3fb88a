"""The tiny Stable Diffusion pipeline of the built-in default run, built locally without a hub or PyTorch.

Our own Flax models are initialised from small configs and saved in diffusers' folder layout (PyTorch-layout
safetensors, config.json files, a byte-level tokenizer), so the run reads them with the same loading code
that reads real checkpoints. (The tests build their fixtures with PyTorch diffusers: tests/pipelines.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TINY_KINDS = ("sd1", "sd2", "sdxl")
TOKENIZER_MAX_LENGTH = 16
# The noise schedule every Stable Diffusion 1.x/2.x scheduler config shares.
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    steps_offset=1,
)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, done_file: str) -> Iterator[Path]:
    """A fresh folder beside `target` that replaces it only when the block succeeds; a crash leaves nothing.

    `done_file` names a file of a finished folder, so a concurrent builder that published first is not an error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        yield tmp
        if target.is_dir():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / done_file).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            shifted[byte] = chr(byte)
        else:
            shifted[byte] = chr(256 + extra)
            extra += 1
    return [shifted[b] for b in range(256)]


def write_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>", max_length: int = TOKENIZER_MAX_LENGTH) -> None:
    """Write a byte-level CLIP tokenizer with no merges (one token per character), as transformers reads it."""
    chars = _byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {**specials, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer",
              "do_lower_case": True, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_unet_config(kind: str) -> dict:
    """diffusers config of a tiny SD1-, SD2- or SDXL-style UNet."""
    config = dict(
        _class_name="UNet2DConditionModel",
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    if kind == "sd2":
        # SD 2.x: Linear proj_in/proj_out and a head count per block.
        config.update(use_linear_projection=True, attention_head_dim=[4, 8])
    if kind == "sdxl":
        # SDXL: no attention in the first block, deeper transformers, size/crop conditioning, two text encoders
        # (32 + 48 wide: the context is both side by side; the pooled 48 plus six 8-wide size embeddings).
        config.update(
            block_out_channels=[32, 64, 64],
            layers_per_block=2,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4, 8],
            transformer_layers_per_block=[1, 1, 2],
            use_linear_projection=True,
            cross_attention_dim=32 + 48,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=48 + 6 * 8,
            norm_num_groups=16,
        )
    return config


TINY_VAE_CONFIG = dict(
    _class_name="AutoencoderKL",
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_TEXT_CONFIG = dict(
    architectures=["CLIPTextModel"],
    model_type="clip_text_model",
    vocab_size=514,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=TOKENIZER_MAX_LENGTH,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
    bos_token_id=512,
    eos_token_id=513,
    pad_token_id=513,
)


def random_params(model, seed: int, *inputs) -> dict:
    """Random params of a model's shapes, drawn in numpy (compiling Flax's init costs ~20 s on CPU for nothing).

    Kernels ~ N(0, 1/fan_in), biases and embeddings small, norm scales near 1: every parameter differs from its
    neutral value, so a comparison with PyTorch exercises all of them.
    """
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    shapes = flatten_dict(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"])
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in sorted(shapes.items()):
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # bias, embedding
            value = 0.05 * rng.standard_normal(shape)
        params[path] = value.astype(np.float32)
    return unflatten_dict(params)


def save_weights(params: dict, file: Path, strip_prefix: str = "") -> None:
    """Write a Flax param tree as a PyTorch-layout safetensors file (what diffusers' save_pretrained writes)."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    from flax_lora.models.convert import flax_to_pt

    state = flax_to_pt(flatten_dict(params))
    state = {k.removeprefix(strip_prefix): np.asarray(v, np.float32) for k, v in state.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file), metadata={"format": "pt"})


def model_index(kind: str, scheduler_class: str) -> dict:
    """model_index.json of a diffusers SD 1.x/2.x (`sd1`, `sd2`) or SDXL (`sdxl`) pipeline folder."""
    sdxl = kind == "sdxl"
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_class],
    }
    if sdxl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)  # fmt: skip
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def write_pipeline_files(
    folder: Path, kind: str, configs: dict[str, dict], params: dict[str, dict], scheduler: dict
) -> None:
    """Write the components' configs and weights (Flax trees), the scheduler and model_index.json, in diffusers' layout."""
    for name, config in configs.items():
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config, indent=1))
        if name.startswith("text_encoder"):
            # transformers 5 saves CLIPTextModel without the `text_model.` prefix (and WithProjection with it).
            with_projection = config.get("architectures") == ["CLIPTextModelWithProjection"]
            save_weights(params[name], folder / name / "model.safetensors",
                         strip_prefix="" if with_projection else "text_model.")  # fmt: skip
        else:
            save_weights(params[name], folder / name / "diffusion_pytorch_model.safetensors")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
    (folder / "model_index.json").write_text(json.dumps(model_index(kind, scheduler["_class_name"]), indent=1))


def build_tiny_pipeline(out_dir: str | os.PathLike, kind: str = "sd1", seed: int = 0) -> str:
    """Build and save a tiny randomly initialised diffusers-layout pipeline (64 px, 8x8 latents) with our own models.

    No PyTorch is needed: the weights are our Flax models' initial params written in PyTorch's layout, so the
    folder loads in diffusers as well as here.
    """
    import jax.numpy as jnp

    from flax_lora.models import clip, unet, vae

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {TINY_KINDS}")
    out = Path(out_dir)
    if (out / "model_index.json").exists():
        return str(out)
    unet_config = tiny_unet_config(kind)
    sdxl = kind == "sdxl"
    text_config = {**TINY_TEXT_CONFIG, "hidden_act": "gelu" if kind == "sd2" else "quick_gelu"}
    # SDXL's second encoder: OpenCLIP-style (gelu) with a projection of the pooled state.
    text_config_2 = {**TINY_TEXT_CONFIG, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 48,
                     "projection_dim": 48, "hidden_act": "gelu"}  # fmt: skip
    unet_model = unet.UNet2DConditionModel(unet.UNetConfig.from_dict(unet_config))
    context = jnp.zeros((1, 1, unet_config["cross_attention_dim"]))
    added = {"text_embeds": jnp.zeros((1, 48)), "time_ids": jnp.zeros((1, 6))} if sdxl else None
    unet_params = random_params(unet_model, seed, jnp.zeros((1, 4, 8, 8)), jnp.zeros((1,)), context, added)
    vae_model = vae.AutoencoderKL(vae.VAEConfig.from_dict(TINY_VAE_CONFIG, "tiny vae"))
    vae_params = random_params(vae_model, seed + 1, jnp.zeros((1, 3, 64, 64)))
    ids = jnp.zeros((1, TOKENIZER_MAX_LENGTH), jnp.int32)
    encoders = {"text_encoder": text_config, **({"text_encoder_2": text_config_2} if sdxl else {})}
    text_params = {
        name: random_params(clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(config, f"tiny {name}")), seed + 2 + i, ids)
        for i, (name, config) in enumerate(encoders.items())
    }
    if kind == "sd2":
        scheduler = {"_class_name": "DDIMScheduler", **SD_SCHEDULE, "clip_sample": False,
                     "prediction_type": "v_prediction"}
    elif sdxl:  # SDXL base ships Euler with leading spacing
        schedule = {k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"}
        scheduler = {"_class_name": "EulerDiscreteScheduler", **schedule, "timestep_spacing": "leading"}
    else:
        scheduler = {"_class_name": "PNDMScheduler", **SD_SCHEDULE, "skip_prk_steps": True}
    with atomic_directory(out, "model_index.json") as tmp:
        write_tokenizer(tmp / "tokenizer")
        if sdxl:
            write_tokenizer(tmp / "tokenizer_2", pad_token="!")  # as SDXL's second tokenizer pads with "!"
        configs = {"unet": unet_config, "vae": TINY_VAE_CONFIG, **encoders}
        write_pipeline_files(tmp, kind, configs, {"unet": unet_params, "vae": vae_params, **text_params}, scheduler)
    return str(out)


def main(argv: list[str] | None = None) -> None:
    """`python -m flax_lora.tiny --kind sdxl --out DIR [--data DIR]`: write a tiny pipeline (and the shapes data) to try."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--kind", choices=TINY_KINDS, default="sd1", help="Pipeline family to imitate.")
    parser.add_argument("--out", required=True, help="Folder to write the pipeline to (kept if it already holds one).")
    parser.add_argument("--data", help="Also write the built-in captioned shapes (64 px) to this folder.")
    args = parser.parse_args(argv)
    print(f"tiny {args.kind} pipeline: {build_tiny_pipeline(args.out, args.kind)}")
    if args.data:
        from flax_lora.data import build_tiny_dataset

        print(f"captioned shapes: {build_tiny_dataset(args.data, resolution=64)}")


if __name__ == "__main__":
    main()
