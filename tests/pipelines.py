"""Tiny pipelines saved by PyTorch diffusers + transformers 5, as users' pipelines are saved today (test fixtures).

Every component is randomly initialised from a small config and written with `save_pretrained` (safetensors),
so the loading code under test is the one that reads real checkpoints. `old_layout=True` rewrites the text
encoder's keys the way transformers 4.x saved them (`text_model.` prefix), the layout older hub checkpoints have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flax_lora.tiny import SD_SCHEDULE, TOKENIZER_MAX_LENGTH, atomic_directory, tiny_unet_config, write_tokenizer

KINDS = ("sd1", "sd2", "sdxl")


def torch_scheduler_classes() -> dict:
    """diffusers' PyTorch scheduler class of each of our sampler names."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    return {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpm++": DPMSolverMultistepScheduler,
        "dpm++_karras": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
        "pndm": PNDMScheduler,
    }


def torch_scheduler(name: str, config: dict):
    """diffusers' PyTorch scheduler for one of our sampler names, built from a config as `from_config` does."""
    extra = {"use_karras_sigmas": True} if name == "dpm++_karras" else {}
    return torch_scheduler_classes()[name].from_config(config, **extra)


def unet_config(kind: str) -> dict:
    """UNet2DConditionModel kwargs of a tiny SD1-, SD2- or SDXL-style UNet: the built-in tiny pipelines' configs."""
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in tiny_unet_config(kind).items()}
    config.pop("_class_name")
    return config


def _text_config(hidden: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def build_torch_pipeline(out_dir: str | Path, kind: str = "sd1", seed: int = 0, old_layout: bool = False) -> str:
    """Build and save a tiny PyTorch diffusers pipeline (64 px images, 8x8 latents); return its folder."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {KINDS}")
    out = Path(out_dir)
    if (out / "model_index.json").exists():
        return str(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(kind))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    with atomic_directory(out, "model_index.json") as tmp:
        write_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))
        common = dict(unet=unet, vae=vae, tokenizer=tokenizer)
        if kind == "sdxl":
            write_tokenizer(tmp / "tokenizer_2", pad_token="!")
            schedule = {k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"}  # Euler has no such option
            scheduler = EulerDiscreteScheduler(**schedule, timestep_spacing="leading")
            pipe = StableDiffusionXLPipeline(
                **common,
                text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")),
                text_encoder_2=CLIPTextModelWithProjection(_text_config(48, "gelu", projection=48)),
                tokenizer_2=CLIPTokenizer.from_pretrained(str(tmp / "tokenizer_2")),
                scheduler=scheduler,
            )
        else:
            # The schedulers the real checkpoints ship: SD 1.5 PNDM (epsilon), SD 2.x DDIM (v_prediction).
            if kind == "sd2":
                scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type="v_prediction")
                text_encoder = CLIPTextModel(_text_config(32, "gelu"))
            else:
                scheduler = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True)
                text_encoder = CLIPTextModel(_text_config(32, "quick_gelu"))
            pipe = StableDiffusionPipeline(
                **common, text_encoder=text_encoder, scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if old_layout:
            _rewrite_text_encoder_as_transformers_4(tmp / "text_encoder" / "model.safetensors")
    return str(out)


def _rewrite_text_encoder_as_transformers_4(file: Path) -> None:
    """Give a CLIPTextModel's keys the `text_model.` prefix transformers 4.x saved them with."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(file))
    assert not any(k.startswith("text_model.") for k in tensors), "expected the transformers 5 layout"
    renamed = {f"text_model.{k}": np.ascontiguousarray(v) for k, v in tensors.items()}
    renamed["text_model.embeddings.position_ids"] = np.arange(TOKENIZER_MAX_LENGTH, dtype=np.int64)[None]
    save_file(renamed, str(file), metadata={"format": "pt"})
    config = json.loads((file.parent / "config.json").read_text())
    config["transformers_version"] = "4.57.6"
    (file.parent / "config.json").write_text(json.dumps(config))
