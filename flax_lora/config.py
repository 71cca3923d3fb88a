"""The configurations of both CLIs, training and inference: typed dataclasses; each command line is generated from
its fields.

Training flag names and meanings follow diffusers' `examples/text_to_image/train_text_to_image_lora.py`, so a
user of that script switches by changing the command name. Each field carries its help text in
`metadata["help"]`; `flax_lora.cli` turns fields into argparse flags (bools become `--flag`). This module imports
neither JAX nor numpy, so `--help` and flag errors are instant.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from flax_lora.cli import MIXED_PRECISION, build_parser, check_choices, config_from_args, parse_config
from flax_lora.cli import flag as _f

LR_SCHEDULERS = (
    "constant",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant_with_warmup",
)
PREDICTION_TYPES = ("epsilon", "v_prediction")
OPTIMIZERS = ("adamw", "prodigy", "lion", "adafactor")
# flax_lora.schedulers.SAMPLER_NAMES, spelled out here because that module imports JAX (a test keeps them equal).
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm++", "dpm++_karras", "euler", "euler_a", "pndm")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
# torchvision's InterpolationMode names, as diffusers' --image_interpolation_mode takes them (flax_lora.data maps them
# to PIL's filters, which torchvision's Resize uses on PIL images).
INTERPOLATION_MODES = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact")
# Flags of diffusers' LoRA scripts (train_text_to_image_lora[_sdxl].py, train_dreambooth_lora.py) that mean nothing in
# JAX: accepted so a diffusers command runs unchanged, and each one given logs this line (`ignored_flag_notes`).
PYTORCH_ONLY_FLAGS = {
    "allow_tf32": "JAX already lets XLA use TF32 for float32 matmuls on NVIDIA GPUs "
    "(JAX_DEFAULT_MATMUL_PRECISION=highest turns it off); nothing to switch on",
    "use_8bit_adam": "no bitsandbytes in JAX: the --optimizer (default adamw) keeps its state in float32",
    "local_rank": "jax.distributed numbers the processes (--process_id, or --multihost); ignored",
    "enable_npu_flash_attention": "no Ascend NPUs in JAX; --attention chooses the attention kernel; ignored",
    "debug_loss": "per-image losses are not logged; ignored",
    "prior_generation_precision": "class images are sampled by the training pipeline in --mixed_precision's dtype "
    "(float32 with 'no'), its weights already cast to it; ignored",
}
# train_dreambooth_lora.py's flags this trainer cannot honour: given with another value than the default, each one is
# an error with this reason (diffusers' own default is always accepted).
UNSUPPORTED_FLAGS = {
    "tokenizer_name": "the pipeline's own tokenizer/ folder is used; put another tokenizer there instead",
    "tokenizer_max_length": "captions are padded to the tokenizer's model_max_length (77 for SD's CLIP)",
    "text_encoder_use_attention_mask": "the CLIP text encoders here take no attention mask (neither does SD's own "
    "pipeline)",
    "validation_images": "it is for image-conditioned pipelines (DeepFloyd IF's upscaler); validation here samples "
    "text-to-image from --validation_prompt",
    "class_labels_conditioning": "Stable Diffusion UNets have no class-label embedding (it is for DeepFloyd IF)",
    "lora_dropout": "LoRA layers train without dropout here",
}


def _pytorch_only(name: str) -> str:
    """Help text of a flag kept only so diffusers' commands run."""
    return f"diffusers' flag, accepted for drop-in use: {PYTORCH_ONLY_FLAGS[name]}."


# flax_lora.attention.IMPLEMENTATIONS, spelled out here because that module imports JAX (a test keeps them equal).
ATTENTION_IMPLEMENTATIONS = ("auto", "memory_efficient", "xla", "chunked", "cudnn", "pallas")
_ATTENTION_HELP = (
    "The UNet's attention kernel. auto: cuDNN flash attention on NVIDIA GPUs (bf16/fp16, head dims cuDNN takes), "
    "the Pallas flash kernel on TPU (long sequences), else chunked on CPU (the fastest there) and xla on GPU/TPU; "
    "memory_efficient: the same, but chunked wherever no fused kernel applies; xla: XLA's plain softmax "
    "attention (the reference); chunked: ours, no score matrix kept; cudnn / pallas: that kernel or an error."
)

DEFAULT_DEMO_MODEL = os.path.join("~", ".cache", "flax_lora", "demo-sd1")
DEFAULT_DEMO_DATA = os.path.join("~", ".cache", "flax_lora", "demo-blue-shapes")
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "flax_lora", "jax-compilation-cache")
_CACHE_HELP = (
    "JAX's persistent compilation cache: a rerun with the same settings loads the compiled steps instead of "
    "compiling them again; 'none' turns it off (JAX_COMPILATION_CACHE_DIR, if set, wins)."
)
# The built-in default run (no --pretrained_model_name_or_path): small settings for the tiny pipeline. They
# replace the flag defaults only, so any flag the user gives still wins.
BUILTIN_RUN_DEFAULTS = dict(
    resolution=32,
    train_batch_size=4,
    max_train_steps=300,
    learning_rate=1e-3,
    lr_warmup_steps=0,
    rank=8,
    checkpointing_steps=100,
    validation_prompt="a blue circle",
    num_validation_images=2,
    validation_epochs=10,
    num_inference_steps=25,
    guidance_scale=5.0,
    output_dir="tiny-lora-output",
    center_crop=True,
)
_DESCRIPTION = (
    "LoRA fine-tuning of Stable Diffusion with JAX/Flax (flags follow diffusers' train_text_to_image_lora.py). "
    "With no model and data flags it trains a tiny built-in example."
)


@dataclass
class TrainConfig:
    """Every training option; `python train_flax.py --help` lists them."""

    # Model
    pretrained_model_name_or_path: str | None = _f(
        None,
        "Hub id or local folder of a Stable Diffusion pipeline (diffusers layout). Without it, the demo: a tiny "
        f"pipeline that draws red, green and yellow shapes is trained once in {DEFAULT_DEMO_MODEL}, and a LoRA "
        "teaches it blue.",
    )
    revision: str | None = _f(None, "Revision (branch, tag or commit) of the pretrained model on the hub.")
    variant: str | None = _f(None, "Variant of the model files, e.g. 'fp16'.")
    pretrained_vae_model_name_or_path: str | None = _f(
        None,
        "Hub id or local folder of another VAE (an AutoencoderKL) to use instead of the pipeline's, e.g. "
        "madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.",
    )

    # Data
    dataset_name: str | None = _f(
        None,
        "Name of a Hugging Face `datasets` dataset (hub id or local path) with an image and a caption column.",
    )
    dataset_config_name: str | None = _f(None, "Config name of the dataset; leave unset if it has only one.")
    train_data_dir: str | None = _f(
        None,
        "Folder of training images with a metadata.jsonl: one JSON object per line with 'file_name' "
        "(path relative to the folder) and the caption column. Without one, a caption file beside each image, as "
        "kohya reads it (<repeats>_<class tokens> subfolders included; see --caption_extension). Ignored if "
        "--dataset_name is given.",
    )
    caption_extension: str | None = _f(
        None,
        "kohya's flag: the extension of the caption files beside --train_data_dir's images (without a "
        "metadata.jsonl), e.g. .txt; by default .txt, else .caption.",
    )
    image_column: str = _f("image", "Dataset column holding the image (or, for metadata.jsonl, 'file_name').")
    caption_column: str = _f("text", "Dataset column holding the caption (a string or a list of strings).")
    max_train_samples: int | None = _f(None, "Use only the first N training examples (debugging / quick runs).")
    cache_dir: str | None = _f(None, "Where downloaded models and datasets are stored.")
    resolution: int = _f(
        512, "Training images are resized (shorter side) and cropped to this square size; must be divisible by 8."
    )
    center_crop: bool = _f(False, "Crop the center of the image (default: a random crop).")
    random_flip: bool = _f(False, "Flip images horizontally at random.")
    dataloader_num_workers: int = _f(
        0, "Threads that decode and preprocess images (0 = decode in the training loop's thread)."
    )
    skip_bad_images: bool = _f(
        True,
        "Skip unreadable images and count them (default). With --no-skip_bad_images the first bad image stops "
        "the run with an error naming the file.",
    )
    cache_latents: bool = _f(
        False,
        "Encode every training image with the VAE once before training and train on the stored latent "
        "distributions (saves about 65%% of a step at 512 px). Random crops are then drawn once; "
        "--random_flip caches both orientations.",
    )
    cache_text_embeddings: bool = _f(
        False,
        "Encode every caption with the text encoder once before training (not with --train_text_encoder; "
        "with several captions per image, the first one is used).",
    )
    image_interpolation_mode: str = _f(
        "bilinear",
        "Filter of the resize to --resolution. diffusers' SD 1.x LoRA script defaults to lanczos, its SDXL script "
        "resizes bilinear: pass lanczos to preprocess exactly as the SD 1.x script does.",
        INTERPOLATION_MODES,
    )
    caption_dropout_rate: float = _f(
        0.0,
        "Replace each example's caption by the empty one with this probability (kohya's flag), drawn from --seed and "
        "the example's position in the data stream, so a resumed run drops the same ones.",
    )
    validation_split: float | None = _f(
        None,
        "Hold out this fraction (0 < F < 1) of the training examples, chosen from --seed, and log their denoising "
        "loss (fixed noise and timesteps) as val/loss at each validation and at the end.",
    )
    enable_bucket: bool = _f(
        False,
        "Aspect-ratio buckets (kohya's flag): instead of a --resolution square, each image is resized and cropped to "
        "the bucket (width x height in multiples of --bucket_reso_steps, about the square's area) whose aspect ratio "
        "is nearest its own. Each step's batch comes from one bucket; the step compiles once per bucket shape.",
    )
    min_bucket_reso: int = _f(
        256, "Shortest bucket side with --enable_bucket (rounded down to a multiple of --bucket_reso_steps)."
    )
    max_bucket_reso: int = _f(
        1024, "Longest bucket side with --enable_bucket (rounded up to a multiple of --bucket_reso_steps)."
    )
    bucket_reso_steps: int = _f(
        64, "Bucket sides are multiples of this with --enable_bucket: a multiple of 8 (kohya uses 64 for SD 1.x/2.x, 32 "
        "for SDXL).",
    )
    bucket_no_upscale: bool = _f(
        False,
        "With --enable_bucket: each image gets its own bucket, its size (shrunk to the --resolution square's area if "
        "larger) rounded down to --bucket_reso_steps, so no image is enlarged; --min/--max_bucket_reso are ignored.",
    )

    # DreamBooth (train_dreambooth_lora.py's flags; flax_lora.dreambooth)
    instance_data_dir: str | None = _f(
        None,
        "DreamBooth: a folder of images of the subject (no metadata.jsonl; subfolders and other files are ignored), "
        "each captioned --instance_prompt. Replaces --train_data_dir / --dataset_name.",
    )
    instance_prompt: str | None = _f(
        None, "The caption of every --instance_data_dir image, with the subject's identifier: 'a photo of sks dog'."
    )
    with_prior_preservation: bool = _f(
        False,
        "DreamBooth's prior preservation: each step's batch is --train_batch_size instance examples plus as many "
        "--class_data_dir examples, and the loss is the instance MSE + --prior_loss_weight x the class MSE "
        "(--snr_gamma weights the instance part only).",
    )
    class_data_dir: str | None = _f(
        None,
        "Folder of class images for --with_prior_preservation; when it holds fewer than --num_class_images, the "
        "missing ones are first sampled from the base model with --class_prompt (written one by one: a rerun resumes).",
    )
    class_prompt: str | None = _f(
        None, "Caption of the class images, and the prompt they are sampled with, e.g. 'a photo of dog'."
    )
    prior_loss_weight: float = _f(1.0, "Weight of the class images' loss with --with_prior_preservation.")
    num_class_images: int = _f(
        100,
        "Class images used with --with_prior_preservation (the first ones of --class_data_dir by name); missing ones "
        "are sampled as diffusers does (the pipeline's scheduler, 50 steps, guidance 7.5, the model's image size), "
        "each from --seed and its number.",
    )
    sample_batch_size: int = _f(
        4,
        "Class images sampled per device and call (as --train_batch_size: on a CPU host with the automatic "
        "--num_cpu_devices, per call).",
    )
    tokenizer_name: str | None = _f(None, f"diffusers' flag; only unset works: {UNSUPPORTED_FLAGS['tokenizer_name']}.")
    tokenizer_max_length: int | None = _f(
        None, f"diffusers' flag; only unset works: {UNSUPPORTED_FLAGS['tokenizer_max_length']}."
    )
    text_encoder_use_attention_mask: bool = _f(
        False, f"diffusers' flag; only unset works: {UNSUPPORTED_FLAGS['text_encoder_use_attention_mask']}."
    )
    validation_images: list[str] = _f(
        (), f"diffusers' flag; only unset works: {UNSUPPORTED_FLAGS['validation_images']}.", nargs="+"
    )
    class_labels_conditioning: str | None = _f(
        None, f"diffusers' flag; only unset works: {UNSUPPORTED_FLAGS['class_labels_conditioning']}."
    )
    lora_dropout: float = _f(0.0, f"diffusers' flag; only 0 works: {UNSUPPORTED_FLAGS['lora_dropout']}.")

    # Batch and schedule
    train_batch_size: int = _f(
        16,
        "Batch size per device (the global batch is this times the device count); on a CPU host with the automatic "
        "--num_cpu_devices, the whole batch, split over the cores.",
    )
    num_train_epochs: int = _f(100, "Epochs to train; --max_train_steps overrides it when given.")
    max_train_steps: int | None = _f(None, "Total optimizer steps to run; overrides --num_train_epochs.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated before each optimizer update.")
    learning_rate: float = _f(1e-4, "Initial learning rate (after warmup).")
    scale_lr: bool = _f(
        False, "Scale the learning rate by the number of devices, accumulation steps and per-device batch size."
    )
    lr_scheduler: str = _f("constant", "Learning-rate schedule.", LR_SCHEDULERS)
    lr_warmup_steps: int = _f(500, "Warmup steps of the learning-rate schedule (ignored by 'constant').")
    lr_num_cycles: int = _f(1, "Hard restarts of the 'cosine_with_restarts' schedule.")
    lr_power: float = _f(1.0, "Power of the 'polynomial' schedule.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay (applied to the LoRA weights only).")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm (0 disables clipping).")
    optimizer: str = _f(
        "adamw",
        "adamw; prodigy (optax.contrib.prodigy: pass --learning_rate 1.0, the schedule then scales its estimated step "
        "size); lion (usually 3-10x lower lr than AdamW); adafactor (no parameter-scaled steps, as kohya's "
        "recommended settings). Betas and weight decay come from the --adam_* flags (adafactor: weight decay only).",
        OPTIMIZERS,
    )
    use_ema: bool = _f(
        False,
        "Keep an exponential moving average of the LoRA weights (diffusers' EMAModel warmup: decay 0 at the first "
        "update, then min(--ema_decay, (1+n)/(10+n)) after n updates); the adapter files and validation use the EMA.",
    )
    ema_decay: float = _f(0.9999, "Largest EMA decay with --use_ema (diffusers' EMAModel default).")

    # Diffusion loss
    snr_gamma: float | None = _f(
        None, "Min-SNR weighting gamma (5.0 is recommended); unset trains with plain MSE."
    )
    noise_offset: float = _f(0.0, "Scale of the per-channel noise offset (0 disables it).")
    prediction_type: str | None = _f(
        None,
        "Training target; unset uses the scheduler config's prediction_type.",
        PREDICTION_TYPES,
    )
    enable_xformers_memory_efficient_attention: bool = _f(
        False,
        "diffusers' flag, kept for drop-in use: memory-efficient attention, i.e. --attention memory_efficient (a fused "
        "kernel where the platform has one, else ours in chunks with a FlashAttention-2 backward; no xformers "
        "needed). Same results, no attention matrix in memory.",
    )
    attention: str = _f("auto", _ATTENTION_HELP, ATTENTION_IMPLEMENTATIONS)
    mixed_precision: str = _f(
        "no",
        "Compute dtype of the frozen model: 'bf16' (recommended on TPU and recent GPUs) or 'fp16'. LoRA weights "
        "and optimizer state stay float32.",
        MIXED_PRECISION,
    )
    gradient_checkpointing: bool = _f(
        False,
        "Recompute each UNet resnet and transformer layer in the backward pass instead of storing its activations "
        "(diffusers' flag): much less memory for about one more forward pass per step; same results.",
    )

    # LoRA
    rank: int = _f(4, "LoRA rank.")
    lora_alpha: float | None = _f(None, "LoRA alpha (scale = alpha / rank); unset means alpha = rank.")
    use_dora: bool = _f(
        False,
        "DoRA (PEFT's use_dora): every LoRA module also trains a magnitude per output feature, and its weight becomes "
        "magnitude * (W + scale * B @ A) / ||W + scale * B @ A||. The diffusers file loads with DoRA in diffusers' "
        "load_lora_weights; the kohya format cannot carry it.",
    )
    conv_rank: int | None = _f(
        None,
        "Also train LoRA on the UNet's 3x3 convs (LoCon, kohya's conv_dim): ResNet blocks' conv1/conv2 and the "
        "down/upsamplers' conv, at this rank; unset: no conv LoRA.",
    )
    conv_alpha: float | None = _f(None, "Alpha of the conv LoRA (scale = conv_alpha / conv_rank); unset: conv_rank.")
    conv_dim: int | None = _f(None, "kohya's name for --conv_rank (the same thing).")
    train_text_encoder: bool = _f(False, "Also train LoRA layers on the text encoder.")
    export_formats: str = _f(
        "diffusers",
        "Adapter files written at the end, comma-separated: 'diffusers' (pytorch_lora_weights.safetensors, for "
        "diffusers' load_lora_weights and PEFT) and 'kohya' (lora_kohya.safetensors, for A1111, ComfyUI and "
        "kohya's tools), e.g. 'diffusers,kohya'.",
    )

    # Output, checkpoints, logging
    output_dir: str = _f("sd-model-finetuned-lora", "Where the adapter, checkpoints, samples and logs are written.")
    seed: int | None = _f(None, "Seed for reproducible training (unset: 0).")
    checkpointing_steps: int = _f(500, "Save a checkpoint (LoRA, optimizer, step, RNG, data position) every N steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints (oldest deleted).")
    resume_from_checkpoint: str | None = _f(
        None, "Resume from a checkpoint folder (OUTPUT_DIR/checkpoints/N) or 'latest' in OUTPUT_DIR."
    )
    validation_prompt: str | None = _f(None, "Prompt sampled during training and at the end.")
    num_validation_images: int = _f(4, "Images generated per validation.")
    validation_epochs: int = _f(1, "Run validation every N epochs.")
    num_inference_steps: int = _f(25, "Sampling steps for validation images.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale for validation images.")
    report_to: str = _f(
        "tensorboard",
        "Where scalars and validation images are logged: tensorboard (in --logging_dir), wandb (pip install wandb; "
        "WANDB_MODE=offline works without network), all (every one installed) or none.",
        REPORT_TO,
    )
    logging_dir: str = _f("logs", "TensorBoard folder, relative to --output_dir.")

    # Devices and processes
    num_cpu_devices: int = _f(
        0,
        "CPU only: split the host into this many XLA devices and train data-parallel over them (the global batch "
        "is --train_batch_size times the device count). XLA:CPU runs one device's step mostly on one core, so one "
        "device per core trains faster (README: Benchmark). 0 (automatic): on a CPU host, the most devices, at most "
        "one per usable core, that divide --train_batch_size evenly; the flag then stays the whole batch, so the "
        "run trains what one device would. Not in multi-process runs, nor when JAX has started or "
        "JAX_NUM_CPU_DEVICES or XLA_FLAGS set the count. 1 turns the split off.",
    )
    coordinator_address: str | None = _f(
        None,
        "host:port of process 0 for multi-process training; with --num_processes and --process_id. Not "
        "needed on TPU pods / SLURM, where --multihost detects everything.",
    )
    num_processes: int | None = _f(None, "Number of processes of a multi-process run.")
    process_id: int | None = _f(None, "Index of this process in a multi-process run.")
    multihost: bool = _f(False, "Call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM).")
    fsdp: int = _f(
        1,
        "Shard the frozen base weights over groups of this many devices (FSDP): each device stores 1/N of every "
        "large weight and gathers a layer's weights when it runs it, while the batch stays split over all devices. "
        "Must divide the device count; 1 keeps a full copy on every device. LoRA weights and optimizer state stay "
        "replicated (70 MB for SDXL at rank 4).",
    )
    compilation_cache_dir: str = _f(DEFAULT_COMPILATION_CACHE, _CACHE_HELP)

    # Hugging Face hub upload at the end (diffusers' flags)
    push_to_hub: bool = _f(
        False,
        "Upload the output folder (adapter files, README.md model card, samples, logs; not the checkpoints) to the "
        "hub once everything is saved locally, and each checkpoint's adapter to checkpoint-N/ in the background. A "
        "failed final upload is an error after the files are written; a failed checkpoint upload a warning.",
    )
    hub_model_id: str | None = _f(None, "Hub repository to upload to (default: the --output_dir folder's name).")
    hub_token: str | None = _f(
        None, "Hub token for --push_to_hub (default: the one `hf auth login` stored); never written to the outputs."
    )
    hub_private_repo: bool = _f(False, "Create the hub repository as private (if it does not exist yet).")

    # diffusers' flags that mean nothing here (PYTORCH_ONLY_FLAGS); one log line each when given
    allow_tf32: bool = _f(False, _pytorch_only("allow_tf32"))
    use_8bit_adam: bool = _f(False, _pytorch_only("use_8bit_adam"))
    local_rank: int = _f(-1, _pytorch_only("local_rank"))
    enable_npu_flash_attention: bool = _f(False, _pytorch_only("enable_npu_flash_attention"))
    debug_loss: bool = _f(False, _pytorch_only("debug_loss"))
    prior_generation_precision: str | None = _f(
        None, _pytorch_only("prior_generation_precision"), ("no", "fp32", "fp16", "bf16")
    )
    pre_compute_text_embeddings: bool = _f(
        False, "train_dreambooth_lora.py's name for --cache_text_embeddings (the same thing)."
    )

    def __post_init__(self):
        if self.pre_compute_text_embeddings:
            self.cache_text_embeddings = True
        if self.conv_dim is not None:
            if self.conv_rank not in (None, self.conv_dim):
                raise ValueError(f"--conv_dim {self.conv_dim} and --conv_rank {self.conv_rank} name one rank: give one")
            self.conv_rank = self.conv_dim
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag whose value cannot work."""
        if self.resolution % 8 != 0 or self.resolution <= 0:
            raise ValueError(
                f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}"
            )
        at_least = {
            1: ("train_batch_size", "gradient_accumulation_steps", "rank", "num_train_epochs", "max_train_steps",
                "checkpointing_steps", "checkpoints_total_limit", "max_train_samples", "validation_epochs",
                "num_inference_steps", "lr_num_cycles", "fsdp", "conv_dim", "conv_rank"),
            0: ("num_cpu_devices", "dataloader_num_workers", "num_validation_images", "lr_warmup_steps"),
        }  # fmt: skip
        for minimum, names in at_least.items():
            for name in names:
                value = getattr(self, name)
                if value is not None and value < minimum:  # None: the flag is unset
                    raise ValueError(f"--{name} must be >= {minimum}, got {value}")
        if self.enable_xformers_memory_efficient_attention and self.attention == "xla":
            raise ValueError(
                "--enable_xformers_memory_efficient_attention asks for memory-efficient attention, --attention xla for "
                "the plain one: give one of them"
            )
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise ValueError(f"--caption_dropout_rate must be in [0, 1], got {self.caption_dropout_rate}")
        if self.validation_split is not None and not 0.0 < self.validation_split < 1.0:
            raise ValueError(f"--validation_split must be in (0, 1), e.g. 0.1, got {self.validation_split}")
        self._validate_buckets()
        if self.use_ema and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1) with --use_ema (e.g. 0.9999), got {self.ema_decay}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be > 0 (5.0 is recommended), got {self.snr_gamma}")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ValueError("--conv_alpha needs --conv_rank (the rank of the conv LoRA); give both")
        check_choices(self)
        from flax_lora.formats import FORMATS  # here, not at import: --help stays free of numpy and flax

        unknown = [f for f in self.export_format_list if f not in FORMATS]
        if unknown or not self.export_format_list:
            raise ValueError(f"--export_formats {self.export_formats!r}: expected a comma-separated subset of {FORMATS}")
        if self.use_dora and "kohya" in self.export_format_list:
            raise ValueError("--use_dora: the kohya format cannot carry a DoRA adapter; use --export_formats diffusers")
        if self.cache_text_embeddings and self.train_text_encoder:
            raise ValueError("--cache_text_embeddings cannot be combined with --train_text_encoder")
        self._validate_dreambooth()
        if self.caption_extension is not None:
            if self.train_data_dir is None:
                raise ValueError("--caption_extension names the caption files of --train_data_dir's images: give "
                                 "that folder too")  # fmt: skip
            if not self.caption_extension.startswith("."):
                raise ValueError(f"--caption_extension must start with '.', e.g. .txt; got {self.caption_extension!r}")
        sources = (self.dataset_name, self.train_data_dir, self.instance_data_dir)
        if all(v is None for v in sources) and self.pretrained_model_name_or_path:
            raise ValueError("give --dataset_name, --train_data_dir or --instance_data_dir to train a pretrained model")
        multi = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in multi) and not all(v is not None for v in multi):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")

    def _validate_buckets(self) -> None:
        """The --enable_bucket flags: given without it is an error (kohya ignores them silently), and kohya's ranges."""
        names = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [n for n in names if getattr(self, n) != defaults[n]]
        if given and not self.enable_bucket:
            raise ValueError(f"--{given[0]} sets up aspect-ratio buckets: add --enable_bucket, or drop --{given[0]}")
        if not self.enable_bucket:
            return
        steps = self.bucket_reso_steps
        if steps <= 0 or steps % 8:
            raise ValueError(f"--bucket_reso_steps must be a positive multiple of 8 (the VAE's factor), got {steps}")
        if self.bucket_no_upscale:  # min/max are not used
            return
        from flax_lora.buckets import bucket_range  # here, not at import: --help stays free of numpy

        low, high = bucket_range(self.min_bucket_reso, self.max_bucket_reso, steps)
        if low < steps:
            raise ValueError(f"--min_bucket_reso must be >= --bucket_reso_steps {steps}, got {self.min_bucket_reso}")
        if not low <= self.resolution <= high:
            raise ValueError(
                f"--resolution {self.resolution} must lie between --min_bucket_reso {self.min_bucket_reso} and "
                f"--max_bucket_reso {self.max_bucket_reso}; change one of them"
            )

    def _validate_dreambooth(self) -> None:
        """train_dreambooth_lora.py's flags: one data source, prior preservation's inputs, flags we cannot honour."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, reason in UNSUPPORTED_FLAGS.items():
            if getattr(self, name) not in (defaults[name], None, []):
                raise ValueError(f"--{name} is not supported: {reason}; drop the flag")
        if self.instance_data_dir is not None:
            for other in ("train_data_dir", "dataset_name"):
                if getattr(self, other) is not None:
                    raise ValueError(f"--instance_data_dir and --{other} are two training sets: give one of them")
            if not self.instance_prompt:
                raise ValueError("--instance_data_dir needs --instance_prompt, the caption of its images, e.g. "
                                 "'a photo of sks dog'")  # fmt: skip
        elif self.instance_prompt is not None:
            raise ValueError("--instance_prompt captions the --instance_data_dir images: give that folder too")
        if self.with_prior_preservation:
            for name in ("class_data_dir", "class_prompt"):
                if not getattr(self, name):
                    raise ValueError(f"--with_prior_preservation needs --{name}")
            if self.num_class_images < 1 or self.sample_batch_size < 1:
                raise ValueError(f"--num_class_images and --sample_batch_size must be >= 1, got "
                                 f"{self.num_class_images} and {self.sample_batch_size}")  # fmt: skip
            if self.enable_bucket:
                raise ValueError("--with_prior_preservation cannot be combined with --enable_bucket yet: drop one")

    def ignored_flag_notes(self) -> list[str]:
        """One line per flag given that this run ignores: PyTorch-only ones (what it does instead), class flags without
        --with_prior_preservation."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        notes = [f"--{k}: {note}" for k, note in PYTORCH_ONLY_FLAGS.items() if getattr(self, k) != defaults[k]]
        if not self.with_prior_preservation:  # diffusers warns too
            unused = [k for k in ("class_data_dir", "class_prompt") if getattr(self, k) is not None]
            notes += [f"--{k}: used only with --with_prior_preservation; ignored" for k in unused]
        return notes

    def public_dict(self) -> dict:
        """The flags as a dict for the files and loggers a run writes: --hub_token left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "hub_token"}

    @property
    def unet_attention(self) -> str:
        """The UNet's attention implementation: --attention, made memory-efficient by the xformers flag."""
        if self.enable_xformers_memory_efficient_attention and self.attention == "auto":
            return "memory_efficient"
        return self.attention

    @property
    def export_format_list(self) -> list[str]:
        """--export_formats as a list, in the order given, without repeats."""
        return list(dict.fromkeys(f.strip() for f in self.export_formats.split(",") if f.strip()))

    @property
    def uses_builtin_defaults(self) -> bool:
        """True when no model or data was given: train the tiny pipeline on the built-in shapes."""
        return self.pretrained_model_name_or_path is None


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse command-line flags into a validated TrainConfig (errors exit with a usage message)."""
    parser = build_parser(TrainConfig, _DESCRIPTION)
    if parser.parse_args(argv).pretrained_model_name_or_path is None:
        parser.set_defaults(**BUILTIN_RUN_DEFAULTS)
    return config_from_args(parser, TrainConfig, argv)


@dataclass
class InferConfig:
    """Every inference option; `python infer_flax.py --help` lists them."""

    prompt: str = _f(None, "Text prompt (required).")
    pretrained_model_name_or_path: str | None = _f(
        None, "Hub id or local folder of a Stable Diffusion pipeline; unset: the base model the adapter records."
    )
    revision: str | None = _f(None, "Revision (branch, tag or commit) of the pretrained model on the hub.")
    variant: str | None = _f(None, "Variant of the model files, e.g. 'fp16'.")
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "Hub id or local folder of another VAE (an AutoencoderKL) to decode with, e.g. SDXL's fp16-fix VAE."
    )
    lora: list[str] = _f((), "Adapter file or folder (diffusers, PEFT or kohya .safetensors); repeat for several.")
    lora_scale: list[float] = _f(
        (), "Scale of each --lora, in the same order (one value applies to all; default 1.0)."
    )
    fuse_lora: bool = _f(False, "Merge the adapters into the weights once (faster steps; scales fixed).")
    negative_prompt: str | None = _f(None, "What the image should not show (the unconditional branch of guidance).")
    num_inference_steps: int = _f(25, "Denoising steps.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale (1 or less disables guidance).")
    scheduler: str | None = _f(
        None, "Sampling algorithm; unset: the pipeline's own. Built from the pipeline's scheduler config.",
        SCHEDULER_NAMES,
    )
    height: int | None = _f(None, "Image height in pixels, a multiple of 8 (default: the model's size).")
    width: int | None = _f(None, "Image width in pixels, a multiple of 8 (default: the model's size).")
    num_images: int | None = _f(None, "Images to generate, split over all devices (default 1, or one per init latent).")
    seed: int = _f(0, "Seed of the initial latents.")
    init_latents: str | None = _f(
        None,
        "A .npy of initial latents (num_images, 4, height/8, width/8), unit variance, as passed to diffusers' "
        "pipeline(latents=...): the same latents give the same image in PyTorch diffusers.",
    )
    mixed_precision: str = _f("no", "Compute dtype: 'bf16' (TPU, recent GPUs) or 'fp16'; params stay float32.",
                              MIXED_PRECISION)
    attention: str = _f("auto", _ATTENTION_HELP, ATTENTION_IMPLEMENTATIONS)
    output: str | None = _f(None, "PNG file to write (several images: numbered PATH-0.png, PATH-1.png, ...).")
    output_dir: str | None = _f(None, "Folder for the images (image-0.png, ...); used when --output is unset.")
    compilation_cache_dir: str = _f(DEFAULT_COMPILATION_CACHE, _CACHE_HELP)

    def __post_init__(self):
        self.lora = list(self.lora or ())
        self.lora_scale = list(self.lora_scale or ())
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag whose value cannot work."""
        if not self.prompt:
            raise ValueError("--prompt is required")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise ValueError(f"--{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
        for name in ("num_inference_steps", "num_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if len(self.lora_scale) > 1 and len(self.lora_scale) != len(self.lora):
            raise ValueError(f"{len(self.lora_scale)} --lora_scale values for {len(self.lora)} --lora files")
        if self.pretrained_model_name_or_path is None and not self.lora:
            raise ValueError("give --pretrained_model_name_or_path (or a --lora whose metadata names its base model)")
        check_choices(self)

    @property
    def scales(self) -> list[float]:
        """One scale per adapter."""
        if not self.lora_scale:
            return [1.0] * len(self.lora)
        if len(self.lora_scale) == 1:
            return self.lora_scale * len(self.lora)
        return self.lora_scale


def parse_infer_args(argv: list[str] | None = None) -> InferConfig:
    """Parse infer_flax.py's flags into a validated InferConfig (errors exit with a usage message)."""
    return parse_config(InferConfig, "Generate images with Stable Diffusion and LoRA adapters in JAX/Flax.", argv)
