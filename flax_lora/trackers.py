"""The metric loggers of --report_to (TensorBoard, wandb) behind one writer with tensorboardX's calls."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from flax_lora.config import TrainConfig
from flax_lora.errors import UserError

WANDB_PROJECT = "text2image-fine-tune"  # the tracker name of diffusers' script, so both land in one project


def report_targets(config: TrainConfig) -> list[str]:
    """The loggers --report_to asks for ('all': each one installed); a missing wandb is a UserError."""
    installed = {"tensorboard": True, "wandb": importlib.util.find_spec("wandb") is not None}  # tensorboardX: required
    if config.report_to == "all":
        return [name for name, ok in installed.items() if ok]
    if config.report_to == "none":
        return []
    if not installed[config.report_to]:
        raise UserError("--report_to wandb needs the wandb package: pip install wandb (or --report_to tensorboard)")
    return [config.report_to]


class Writers:
    """The metric loggers of --report_to behind tensorboardX's calls: each scalar or image batch goes to every one."""

    def __init__(self, tensorboard: Any = None, wandb_run: Any = None):
        self.tensorboard = tensorboard
        self.wandb_run = wandb_run

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar at a step."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=step)

    def add_images(self, tag: str, images: np.ndarray, step: int, dataformats: str = "NHWC") -> None:
        """Log a batch of uint8 images (N, H, W, C) at a step."""
        if self.tensorboard is not None:
            self.tensorboard.add_images(tag, images, step, dataformats=dataformats)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: [wandb.Image(img) for img in images]}, step=step)

    def close(self) -> None:
        """Flush and close every logger."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def open_writers(config: TrainConfig, output_dir: str) -> Writers | None:
    """The loggers of --report_to, writing under OUTPUT_DIR/--logging_dir (wandb: unless WANDB_DIR is set)."""
    targets = report_targets(config)
    if not targets:
        return None
    log_dir = os.path.join(output_dir, config.logging_dir)
    tensorboard = wandb_run = None
    if "tensorboard" in targets:
        from tensorboardX import SummaryWriter

        tensorboard = SummaryWriter(log_dir)
    if "wandb" in targets:
        import wandb

        wandb_dir = os.environ.get("WANDB_DIR") or log_dir
        os.makedirs(wandb_dir, exist_ok=True)
        wandb_run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), dir=wandb_dir, config=config.public_dict()
        )
    return Writers(tensorboard, wandb_run)
