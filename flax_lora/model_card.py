"""The README.md model card of a training run's output folder, laid out as diffusers' `save_model_card` of
train_text_to_image_lora.py writes one: YAML front matter (license, base_model, tags, inference), a title, what was
trained on what, the validation images, and how to load the adapter (PyTorch diffusers and this trainer).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from flax_lora.errors import is_hub_id
from flax_lora.formats import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME

LICENSE = "creativeml-openrail-m"  # what diffusers' text-to-image LoRA script declares
TAGS = [
    "stable-diffusion",
    "stable-diffusion-diffusers",
    "text-to-image",
    "diffusers",
    "diffusers-training",
    "lora",
    "flax",
]
GRID_NAME = "validation_grid.png"
CARD_NAME = "README.md"


@dataclass
class CardInfo:
    """What the card says about a run."""

    title: str  # the hub repository, or the output folder's name
    base_model: str
    dataset: str  # hub dataset id, data folder, or the built-in shapes
    steps: int
    rank: int
    alpha: float
    learning_rate: float
    resolution: int
    validation_prompt: str | None = None
    sdxl: bool = False
    instance_prompt: str | None = None  # DreamBooth (--instance_data_dir): the caption of every training image
    class_prompt: str | None = None  # with --with_prior_preservation
    train_text_encoder: bool = False
    conv_rank: int | None = None  # LoCon (--conv_rank): the rank and alpha of the 3x3 conv modules
    conv_alpha: float | None = None
    use_dora: bool = False


def save_image_grid(paths: list[str], out_path: str) -> str:
    """Tile the images (same size) into one PNG, up to 4 per row."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    cols = min(len(images), 4)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    grid.save(out_path)
    return out_path


def _front_matter(base_model: str, instance_prompt: str | None = None) -> str:
    """The card's YAML metadata; the hub only takes a repository id as base_model, so a local path is left out.
    DreamBooth cards carry the instance prompt, as diffusers' do (the hub's widget prompts with it)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        license=LICENSE,
        library_name="diffusers",
        base_model=base_model if is_hub_id(base_model) else None,
        tags=TAGS,
        inference=True,
        instance_prompt=instance_prompt,  # None is left out of the YAML
    )
    return f"---\n{data.to_yaml()}\n---\n"


def render_card(info: CardInfo, adapter_files: list[str], images: list[str], grid: str | None) -> str:
    """The model card's text; files are given relative to the output folder."""
    base = info.base_model
    base_link = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`"
    trained_on, kind = info.dataset, "text-to-image fine-tuning"
    if info.instance_prompt is not None:  # as diffusers' DreamBooth card: the prompt that names the subject
        kind = "DreamBooth"
        prior = f", with prior preservation on images of `{info.class_prompt}`" if info.class_prompt else ""
        dreambooth = "[DreamBooth](https://dreambooth.github.io/)"
        trained_on = f"{info.dataset} captioned `{info.instance_prompt}` with {dreambooth}{prior}"
    extras = ""
    if info.conv_rank is not None:
        extras += f", LoRA on the 3x3 convs too (LoCon: conv rank {info.conv_rank}, conv alpha {info.conv_alpha:g})"
    if info.use_dora:
        extras += ", DoRA (a trained magnitude per output feature; `load_lora_weights` applies it)"
    lines = [
        f"# LoRA {kind}: {info.title}",
        "",
        f"LoRA adapter weights for {base_link}, trained with flax-lora (JAX/Flax) on {trained_on}: "
        f"{info.steps} steps at {info.resolution} px, rank {info.rank}, alpha {info.alpha:g}{extras}, "
        f"learning rate {info.learning_rate:g}.",
        "",
    ]
    if info.instance_prompt is not None:
        lines += [
            f"Instance prompt: `{info.instance_prompt}` (prompts that contain it show the trained subject). LoRA on "
            f"the text encoder: {'yes' if info.train_text_encoder else 'no'}.",
            "",
        ]
    if images:
        lines += ["## Validation images", ""]
        if info.validation_prompt:
            lines += [f"Prompt: `{info.validation_prompt}`", ""]
        if grid:
            lines += [f"![validation images](./{grid})", ""]
        lines += [" ".join(f"[{os.path.basename(p)}](./{p})" for p in images), ""]
    files = [os.path.basename(f) for f in adapter_files]
    prompt = (info.validation_prompt or info.instance_prompt or "a photo").replace('"', '\\"')
    if DIFFUSERS_WEIGHT_NAME in files:
        pipeline = "StableDiffusionXLPipeline" if info.sdxl else "StableDiffusionPipeline"
        lines += [
            "## Use it in PyTorch diffusers",
            "",
            "```python",
            "import torch",
            f"from diffusers import {pipeline}",
            "",
            f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{info.title}", weight_name="{DIFFUSERS_WEIGHT_NAME}")',
            f'image = pipe("{prompt}").images[0]',
            "```",
            "",
            "(`load_lora_weights` takes this repository's id or the local folder.)",
            "",
        ]
    folder = info.title.split("/")[-1]
    lines += [
        "## Use it with flax-lora (JAX)",
        "",
        "```bash",
        f'python infer_flax.py --pretrained_model_name_or_path {base} --lora {folder} --prompt "{prompt}" '
        "--output image.png",
        "```",
        "",
    ]
    if "/" in info.title:  # a hub repository: infer_flax.py reads local folders
        lines += [f"(`hf download {info.title} --local-dir {folder}` fetches the folder from the hub.)", ""]
    lines += ["## Files", ""]
    described = {
        DIFFUSERS_WEIGHT_NAME: "diffusers / PEFT adapter (`load_lora_weights`)",
        KOHYA_WEIGHT_NAME: "kohya adapter (A1111, ComfyUI, kohya's tools)",
    }
    lines += [f"- `{f}`: {described.get(f, 'adapter')}" for f in files]
    lines += ["- `train_config.json`: every training flag", "- `loss.png`: the training loss", ""]
    return "\n".join(lines)


def write_model_card(output_dir: str, info: CardInfo, adapter_files: list[str], images: list[str]) -> str:
    """Write OUTPUT_DIR/README.md (and the validation image grid, when there are images); returns the card's path."""
    rel_images = [os.path.relpath(p, output_dir) for p in images]
    grid = None
    if images:
        save_image_grid(images, os.path.join(output_dir, GRID_NAME))
        grid = GRID_NAME
    path = os.path.join(output_dir, CARD_NAME)
    with open(path, "w") as f:
        card = render_card(info, adapter_files, rel_images, grid)
        f.write(_front_matter(info.base_model, info.instance_prompt) + "\n" + card)
    return path
