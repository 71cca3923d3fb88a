"""Generate images with Stable Diffusion and LoRA adapters in JAX/Flax: flags only, the work is in flax_lora.inference."""

from __future__ import annotations

import sys

from flax_lora.cli import reexec_with_huge_pages
from flax_lora.config import InferConfig, parse_infer_args
from flax_lora.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    """Parse flags, generate, save; print where the images went."""
    config: InferConfig = parse_infer_args(argv)
    if argv is None:  # the command line itself, which the restart repeats (not a caller's list)
        reexec_with_huge_pages()
    from flax_lora.inference import run  # after the flags: --help and flag errors need no JAX

    for path in exit_on_user_error(lambda: run(config)):  # user errors end as one `error: ...` line
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
