"""flax-lora: LoRA fine-tuning of Stable Diffusion in JAX/Flax with PyTorch-loadable adapters."""
