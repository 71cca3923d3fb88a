"""Generate images with Stable Diffusion and LoRA adapters in JAX/Flax: flags only, the work is in flax_lora.inference."""

from __future__ import annotations

import sys

from flax_lora.formats import AdapterFormatError
from flax_lora.inference import InferConfig, parse_args, run


def main(argv: list[str] | None = None) -> int:
    """Parse flags, generate, save; print where the images went."""
    config: InferConfig = parse_args(argv)
    try:
        paths = run(config)
    except (FileNotFoundError, AdapterFormatError) as e:  # user errors: the message names the file and the fix
        sys.exit(f"error: {e}")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
