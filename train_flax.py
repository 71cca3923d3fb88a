"""Train a LoRA adapter for Stable Diffusion with JAX/Flax; flags follow diffusers' train_text_to_image_lora.py.

With no flags it trains a tiny built-in pipeline on a generated shapes dataset (a few minutes on a CPU).
"""

import sys

from flax_lora.config import parse_args
from flax_lora.train import main

if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileExistsError, FileNotFoundError) as e:  # user errors: the message says what to do, no traceback
        sys.exit(f"error: {e}")
