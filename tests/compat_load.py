"""LoRA files through whatever diffusers this Python has: load one, or write one with PEFT and load it back.

Run by `tests/test_formats_compat.py` with the Pythons of other diffusers/transformers versions; it imports
nothing of flax_lora, so it runs in a venv that has only PyTorch's stack.
    python tests/compat_load.py load PIPELINE ADAPTER_FILE INPUTS.npz OUT.npz
    python tests/compat_load.py write PIPELINE OUT_FOLDER INPUTS.npz OUT.npz UNET_CONFIG_JSON TEXT_CONFIG_JSON
INPUTS.npz holds `ids`, `latents` and `timesteps`. OUT.npz gets the text and UNet outputs of the pipeline with
the adapter loaded by `load_lora_weights`, the versions used, and every warning the libraries logged.
"""

import inspect
import json
import logging
import sys
import warnings

import numpy as np
import torch


def _outputs(pipeline: str, adapter: str, inputs: str, out: str) -> None:
    """Load the adapter into a fresh pipeline and save its outputs and warnings."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    for name in ("diffusers", "peft", "transformers"):  # diffusers' loggers do not propagate to the root
        logging.getLogger(name).addHandler(handler)
    arrays = np.load(inputs)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    folder, name = adapter.rsplit("/", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(folder, weight_name=name)
    with torch.no_grad():
        text = pipe.text_encoder(torch.from_numpy(arrays["ids"]).long())[0]
        noise = pipe.unet(torch.from_numpy(arrays["latents"]), torch.from_numpy(arrays["timesteps"]), text).sample
    np.savez(
        out,
        text=text.numpy(),
        noise=noise.numpy(),
        versions=f"diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        warnings="\n".join([r.getMessage() for r in records] + [str(w.message) for w in caught]),
    )


def _write(pipeline: str, out_folder: str, unet_config: str, text_config: str) -> str:
    """PEFT adapters with random weights on the UNet and text encoder, saved by diffusers' save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    unet_lora, text_lora = LoraConfig(**json.loads(unet_config)), LoraConfig(**json.loads(text_config))
    pipe.unet.add_adapter(unet_lora)
    inject_adapter_in_model(text_lora, pipe.text_encoder)
    extra = {}
    if "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters:
        extra = dict(unet_lora_adapter_metadata=unet_lora.to_dict(), text_encoder_lora_adapter_metadata=text_lora.to_dict())
    StableDiffusionPipeline.save_lora_weights(
        out_folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        **extra,
    )
    return f"{out_folder}/pytorch_lora_weights.safetensors"


if __name__ == "__main__":
    mode, pipeline_folder, target, inputs_file, out_file, *configs = sys.argv[1:]
    adapter_file = _write(pipeline_folder, target, *configs) if mode == "write" else target
    _outputs(pipeline_folder, adapter_file, inputs_file, out_file)
