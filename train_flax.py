"""Train a LoRA adapter for Stable Diffusion with JAX/Flax; flags follow diffusers' train_text_to_image_lora.py.

With no flags it trains a tiny built-in pipeline on a generated shapes dataset (a few minutes on a CPU).
"""

from flax_lora.cli import reexec_with_huge_pages
from flax_lora.config import parse_args
from flax_lora.errors import exit_on_user_error

if __name__ == "__main__":
    config = parse_args()
    reexec_with_huge_pages()  # once the flags are good; GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out
    from flax_lora.train import main  # after the flags: --help and flag errors need no JAX

    exit_on_user_error(lambda: main(config))
