"""Training data: captioned image sources, numpy preprocessing, and a deterministic per-process batch loader.

The loader sees the data as one endless stream: epoch e is a permutation of the examples seeded by
(seed, e), and stream position j holds example perm_e[j % n] with e = j // n. Step s of a run with
global batch G and accumulation A reads positions [(s*A + m)*G + r] for micro-batch m and row r. A
process loads only the rows that land on its own devices, so the data position of a checkpoint is just
the step, and a resumed or multi-process run sees exactly the examples a straight single-process run
would. Random crops, flips and caption choices are seeded by the stream position for the same reason.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from flax_lora.errors import MissingFileError, UserError, hub_download, is_hub_id
from flax_lora.tiny import atomic_directory

logger = logging.getLogger(__name__)


# Appended to the error a bad image stops a run with when --no-skip_bad_images is given.
SKIP_HINT = "without --no-skip_bad_images such files are skipped"


class BadImageError(UserError):
    """An image could not be read or decoded."""


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class CaptionedImages:
    """Random-access captioned images: `load_image(i)` returns an RGB PIL image, `captions(i)` its captions."""

    names: list[str]  # a readable name per example (file path or dataset row) for error messages
    caption_lists: list[list[str]]
    _load: Callable[[int], Image.Image]
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    def load_image(self, i: int) -> Image.Image:
        """Decode example i as RGB; raise BadImageError naming the file if it cannot be read."""
        try:
            img = self._load(i)
            img.load()
            return img.convert("RGB")
        except Exception as e:  # PIL raises many types for truncated/corrupt files
            raise BadImageError(f"cannot read image {self.names[i]}: {type(e).__name__}: {e}") from e

    def captions(self, i: int) -> list[str]:
        """All captions of example i."""
        return self.caption_lists[i]

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of example i from its header (no decoding); BadImageError if it cannot be opened."""
        try:
            return self._load(i).size
        except Exception as e:  # PIL raises many types for files it cannot identify
            raise BadImageError(f"cannot read image {self.names[i]}: {type(e).__name__}: {e}") from e


def _caption_list(value: Any, where: str, column: str) -> list[str]:
    """Normalize a caption cell (string or list of strings) into a non-empty list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(
        f"caption column '{column}' in {where} must hold a string or a list of strings, got {type(value).__name__}: "
        f"{str(value)[:80]!r}"
    )


def check_folder(path: str, flag: str) -> None:
    """Raise a UserError naming `flag` unless `path` is a readable folder."""
    if not os.path.exists(path):
        raise MissingFileError(f"{flag} {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; expected a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be read (permission denied)")


def load_image_folder(
    data_dir: str,
    caption_column: str = "text",
    max_samples: int | None = None,
    skip_missing: bool = True,
    caption_extension: str | None = None,
) -> CaptionedImages:
    """Read an image folder with metadata.jsonl (`file_name` + caption column), like diffusers' imagefolder; a
    folder without one is read the way kohya reads it (`load_caption_folder`).

    Every line is checked, and that its file exists, before any image is decoded: listed files that do not exist
    are skipped with a warning (an error naming the first one with `skip_missing=False`).
    """
    check_folder(data_dir, "--train_data_dir")
    meta = os.path.join(data_dir, "metadata.jsonl")
    if not os.path.isfile(meta):
        return load_caption_folder(data_dir, caption_extension, max_samples)
    if caption_extension:
        raise UserError(
            f"--caption_extension {caption_extension}: --train_data_dir {data_dir} has a metadata.jsonl, whose "
            "caption column is read instead of caption files; drop the flag (or the metadata.jsonl)"
        )
    expected = f"one JSON object per line with 'file_name' (the image, relative to the folder) and '{caption_column}'"
    names, captions, missing = [], [], []
    with open(meta, encoding="utf-8") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as e:
            raise UserError(f"{meta} is not UTF-8 text ({e}); expected {expected}") from e
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{meta} line {lineno} is not valid JSON: {e}; expected {expected}") from e
        if not isinstance(row, dict):
            raise UserError(f"{meta} line {lineno} is a JSON {type(row).__name__}; expected {expected}")
        if not isinstance(row.get("file_name"), str):
            raise UserError(f"{meta} line {lineno} has no 'file_name' string (keys: {sorted(row)}); expected {expected}")
        if caption_column not in row:
            raise UserError(
                f"caption column '{caption_column}' not found in {meta} line {lineno}; keys: {sorted(row)}. "
                "Pass --caption_column with one of them."
            )
        path = os.path.join(data_dir, row["file_name"])
        if not os.path.isfile(path):
            if not skip_missing:
                raise MissingFileError(
                    f"{path}, listed in {meta} line {lineno}, does not exist (file_name is relative to the folder; "
                    f"{SKIP_HINT})"
                )
            missing.append(path)
            continue
        names.append(path)
        captions.append(_caption_list(row[caption_column], f"{meta} line {lineno}", caption_column))
        if max_samples is not None and len(names) >= max_samples:
            break
    if missing and not names:
        raise MissingFileError(
            f"none of the {len(missing)} files listed in {meta} exist (first: {missing[0]}); file_name is relative "
            "to the folder that holds metadata.jsonl"
        )
    if missing:
        logger.warning("skipping %d files listed in %s that do not exist (first: %s)", len(missing), meta, missing[0])
    if not names:
        raise UserError(f"{meta} lists no images; expected {expected}")
    return CaptionedImages(names, captions, lambda i: Image.open(names[i]), source=data_dir)


def load_hf_dataset(
    name: str,
    config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | None = None,
    max_samples: int | None = None,
) -> CaptionedImages:
    """Load the train split of a Hugging Face `datasets` dataset (hub id or local path)."""
    path = os.path.expanduser(name)
    local = os.path.exists(path)
    if local:
        check_folder(path, "--dataset_name")
    elif not is_hub_id(name):
        raise MissingFileError(f"--dataset_name {name} does not exist (a hub dataset id looks like 'owner/name')")
    import datasets  # after the checks above: it takes seconds to import

    if local:
        try:
            ds = datasets.load_dataset(path, config_name, cache_dir=cache_dir, split="train")
        except Exception as e:  # `datasets` raises many types for a folder it cannot read, some without a message
            raise UserError(f"--dataset_name {name}: `datasets` cannot read this folder ({type(e).__name__}: {e})") from e
    else:
        logger.info("looking up dataset %s on the Hugging Face hub", name)
        fix = "A local folder works without the hub (--train_data_dir with a metadata.jsonl)."
        with hub_download("dataset", name, fix):
            ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir, split="train")
    for col, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if col not in ds.column_names:
            raise UserError(
                f"column '{col}' not found in dataset {name}; columns: {', '.join(ds.column_names)}. Pass {flag}."
            )
    if len(ds) == 0:
        raise UserError(f"dataset {name} has no rows in its train split")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    captions = [_caption_list(c, f"dataset {name} row {i}", caption_column) for i, c in enumerate(ds[caption_column])]
    # Decode lazily: keep the raw cell so a corrupt row fails (and is skipped) when it is used.
    if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))

    def load(i: int) -> Image.Image:
        cell = ds[i][image_column]
        if isinstance(cell, Image.Image):
            return cell
        if isinstance(cell, dict):
            if cell.get("bytes") is not None:
                import io

                return Image.open(io.BytesIO(cell["bytes"]))
            return Image.open(cell["path"])
        if isinstance(cell, str):
            return Image.open(cell)
        raise TypeError(f"unsupported image cell type {type(cell).__name__}")

    names = [f"{name}[{i}]" for i in range(len(ds))]
    return CaptionedImages(names, captions, load, source=name)


# The files image folders without metadata are read from (DreamBooth's instance and class folders).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder: str) -> list[str]:
    """The image files directly in a folder (not in its subfolders, not hidden ones), sorted by name."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


# The caption files read beside each image when --caption_extension is not given: the common one, then kohya's default.
CAPTION_EXTENSIONS = (".txt", ".caption")


def read_caption_file(image_path: str, extensions: tuple[str, ...]) -> str | None:
    """The first line of an image's caption file (`<stem><extension>`, kohya's rule), or None if it has none."""
    stem = os.path.splitext(image_path)[0]
    found = [stem + extension for extension in extensions if os.path.isfile(stem + extension)]
    if len(found) > 1:  # kohya would read only its --caption_extension (default .caption): no silent pick
        raise UserError(f"{image_path} has two caption files, {' and '.join(found)}: pass --caption_extension "
                        "to pick one")  # fmt: skip
    if not found:
        return None
    try:
        with open(found[0], encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"caption file {found[0]} is not UTF-8 text ({e})") from e
    return lines[0].strip() if lines else ""


def kohya_subfolder(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) of a kohya `<repeats>_<class tokens>` subfolder name such as `10_sks dog`, else None."""
    repeats, _, tokens = name.partition("_")
    return (int(repeats), tokens) if repeats.isdigit() else None


def load_caption_folder(
    data_dir: str, caption_extension: str | None = None, max_samples: int | None = None
) -> CaptionedImages:
    """An image folder captioned by text files beside the images, as kohya's sd-scripts read it.

    Subfolders named `<repeats>_<class tokens>` (`10_sks dog`) are kohya's DreamBooth layout: each of their images
    is an example `repeats` times, captioned by its caption file or else by the class tokens; then other subfolders
    and images directly in the folder are ignored, with a warning, as kohya ignores them. Without such subfolders
    every image directly in the folder is an example and needs its caption file. `max_samples` counts images.
    """
    extensions = (caption_extension,) if caption_extension else CAPTION_EXTENSIONS
    groups: list[tuple[str, int, str | None]] = []  # (folder, repeats, class tokens)
    for entry in sorted(os.scandir(data_dir), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        params = kohya_subfolder(entry.name)
        if params is None or params[0] < 1:
            logger.warning("ignoring subfolder %s: kohya reads only subfolders named <repeats>_<class tokens> with "
                           "repeats >= 1, e.g. '10_sks dog'", entry.path)  # fmt: skip
            continue
        groups.append((entry.path, *params))
    top_images = image_files(data_dir)
    if groups and top_images:
        logger.warning("ignoring the %d images directly in %s: with <repeats>_<class tokens> subfolders kohya reads "
                       "only those", len(top_images), data_dir)  # fmt: skip
    names, captions, uncaptioned, images = [], [], [], 0
    for folder, repeats, tokens in groups or [(data_dir, 1, None)]:
        for path in image_files(folder):
            if max_samples is not None and images >= max_samples:
                break
            caption = read_caption_file(path, extensions)
            if caption is None and tokens is None:
                uncaptioned.append(path)
                continue
            if caption is None and not tokens:
                logger.warning("%s has no caption file and its folder no class tokens: its caption is empty", path)
            names += [path] * repeats
            captions += [[tokens if caption is None else caption]] * repeats
            images += 1
    ext = " or ".join(extensions)
    layouts = (
        f"expected a metadata.jsonl (one JSON object per line with 'file_name' and the caption column), or images "
        f"with a caption file beside each (<image name>{ext}), directly in the folder or in kohya's "
        f"<repeats>_<class tokens> subfolders"
    )
    if uncaptioned:
        raise MissingFileError(
            f"--train_data_dir {data_dir} has no metadata.jsonl, and {len(uncaptioned)} of its images have no caption "
            f"file (first: {os.path.splitext(uncaptioned[0])[0]}{extensions[0]}); {layouts}"
        )
    if not names:
        has_csv = os.path.isfile(os.path.join(data_dir, "metadata.csv"))
        csv = " (its metadata.csv is read with --dataset_name instead)" if has_csv else ""
        raise MissingFileError(f"--train_data_dir {data_dir} has no metadata.jsonl and no captioned images; {layouts}{csv}")
    return CaptionedImages(names, captions, lambda i: Image.open(names[i]), source=data_dir)


def load_prompt_folder(data_dir: str, prompt: str, flag: str, max_samples: int | None = None) -> CaptionedImages:
    """Every image of a folder (`image_files`), each captioned `prompt`: DreamBooth's instance or class images.

    Images are turned upright by their EXIF orientation, as diffusers' DreamBooth dataset does."""
    from PIL import ImageOps

    check_folder(data_dir, flag)
    names = image_files(data_dir)[:max_samples]
    if not names:
        raise UserError(f"{flag} {data_dir} holds no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return CaptionedImages(
        names, [[prompt]] * len(names), lambda i: ImageOps.exif_transpose(Image.open(names[i])), source=data_dir
    )


def load_training_data(config) -> CaptionedImages:
    """The training examples a TrainConfig names (--dataset_name wins over --train_data_dir); with
    --with_prior_preservation, also checks that --class_data_dir is or can become a folder."""
    if config.with_prior_preservation:
        from flax_lora.errors import check_output_folder

        class_dir = os.path.expanduser(config.class_data_dir)
        if os.path.isdir(class_dir):
            check_folder(class_dir, "--class_data_dir")
        else:  # created for the sampled images
            check_output_folder(class_dir, f"--class_data_dir {config.class_data_dir}")
    if config.instance_data_dir is not None:
        return load_prompt_folder(
            os.path.expanduser(config.instance_data_dir), config.instance_prompt, "--instance_data_dir",
            config.max_train_samples,
        )
    if config.dataset_name is not None:
        return load_hf_dataset(
            config.dataset_name,
            config.dataset_config_name,
            config.image_column,
            config.caption_column,
            config.cache_dir,
            config.max_train_samples,
        )
    if config.train_data_dir is None:
        raise UserError("no training data: pass --dataset_name or --train_data_dir")
    return load_image_folder(
        os.path.expanduser(config.train_data_dir), config.caption_column, config.max_train_samples,
        skip_missing=config.skip_bad_images, caption_extension=config.caption_extension,
    )


# ------------------------------------------------------------------------------------ built-in dataset

_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
}
_SHAPES = ("circle", "square", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def build_tiny_dataset(out_dir: str, num_images: int = 24, resolution: int = 64, seed: int = 0) -> str:
    """Write colored-shape images with captions as an image folder + metadata.jsonl; idempotent."""
    out_dir = os.path.expanduser(out_dir)
    meta = os.path.join(out_dir, "metadata.jsonl")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            if sum(1 for line in f if line.strip()) == num_images:
                return out_dir
    rng = np.random.default_rng(seed)
    # Published at once, so a concurrent or interrupted build never leaves a half-written folder.
    with atomic_directory(out_dir, "metadata.jsonl") as tmp:
        rows = []
        for i in range(num_images):
            color = list(_COLORS)[i % len(_COLORS)]
            shape = _SHAPES[(i // len(_COLORS)) % len(_SHAPES)]
            img = Image.new("RGB", (resolution, resolution), (255, 255, 255))
            size = int(resolution * rng.uniform(0.4, 0.7))
            x0, y0 = (int(v) for v in rng.integers(0, resolution - size + 1, size=2))
            _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + size, y0 + size), _COLORS[color])
            name = f"{i:04d}.png"
            img.save(os.path.join(tmp, name))
            rows.append({"file_name": name, "text": f"a {color} {shape} on a white background"})
        with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return out_dir


# ---------------------------------------------------------------------------------------- preprocessing


# --image_interpolation_mode -> PIL filter, as torchvision's Resize maps its modes for PIL images.
RESAMPLING = {
    "nearest": Image.NEAREST, "nearest_exact": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
    "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS,
}  # fmt: skip


def preprocess_image(
    img: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Resize (shorter side), flip and crop like diffusers' script; return float32 CHW in [-1, 1]."""
    return crop_image(img, resolution, center_crop, random_flip, rng, interpolation)[0]


def resized_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `resolution`, as torchvision's Resize(int) (long side truncated)."""
    if w <= h:
        return resolution, int(resolution * h / w)
    return int(resolution * w / h), resolution


def mirrored_size_ids(size_ids: np.ndarray, resized_w: int | None = None) -> np.ndarray:
    """The size ids of the horizontally flipped crop: the same region, its left edge measured in the flipped image.

    `resized_w`: the width the image was resized to before the crop (a bucket's), if not `resized_size`'s."""
    h, w, top, left, target_h, target_w = size_ids
    new_w = resized_size(int(w), int(h), int(target_w))[0] if resized_w is None else resized_w
    return np.array([h, w, top, new_w - target_w - left, target_h, target_w], np.float32)


def crop_image(
    img: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator,
    interpolation: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """`preprocess_image`'s pixels and SDXL's size ids (original h, w, crop top, left, target h, w), float32.

    As diffusers' SDXL script: the crop's top-left is measured in the resized (and flipped) image, and the
    centre crop rounds as torchvision's CenterCrop does.
    """
    resized = resized_size(*img.size, resolution)
    return crop_to_bucket(img, (resolution, resolution), resized, center_crop, random_flip, rng, interpolation)


def crop_to_bucket(
    img: Image.Image, bucket: tuple[int, int], resized: tuple[int, int], center_crop: bool, random_flip: bool,
    rng: np.random.Generator, interpolation: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """`crop_image` for an aspect-ratio bucket (width, height): resize to `resized` (which covers it), flip, crop.

    The size ids are the image's original size, the crop's top-left in the resized (and flipped) image, as
    `crop_image`'s, and the bucket's size as the target size."""
    w, h = img.size
    (bucket_w, bucket_h), (new_w, new_h) = bucket, resized
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), RESAMPLING[interpolation])
    if center_crop:
        left, top = int(round((new_w - bucket_w) / 2)), int(round((new_h - bucket_h) / 2))
    else:
        left = int(rng.integers(0, new_w - bucket_w + 1))
        top = int(rng.integers(0, new_h - bucket_h + 1))
    arr = np.asarray(img, dtype=np.float32)
    if random_flip and rng.random() < 0.5:  # before the crop, as diffusers: the crop's left is in the flipped image
        arr = arr[:, ::-1]
    arr = arr[top : top + bucket_h, left : left + bucket_w]
    size_ids = np.array([h, w, top, left, bucket_h, bucket_w], np.float32)
    return np.ascontiguousarray((arr / 127.5 - 1.0).transpose(2, 0, 1)), size_ids


def read_image_sizes(data: CaptionedImages, skip_bad_images: bool = True, num_workers: int = 0) -> list:
    """(width, height) of every example from its header, None for one that cannot be opened (skipped with a warning)."""

    def size(i: int):
        try:
            return data.image_size(i)
        except BadImageError as e:
            if not skip_bad_images:
                raise BadImageError(f"{e} ({SKIP_HINT})") from e
            logger.warning("skipping %s", e)
            return None

    if num_workers > 0:
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            return list(pool.map(size, range(len(data))))
    return [size(i) for i in range(len(data))]


def training_buckets(data: CaptionedImages, config) -> Any:
    """The aspect-ratio buckets (flax_lora.buckets.Buckets) of a TrainConfig's --enable_bucket flags."""
    from flax_lora.buckets import assign_buckets

    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    ignored = [k for k in ("min_bucket_reso", "max_bucket_reso") if getattr(config, k) != defaults[k]]
    if config.bucket_no_upscale and ignored:
        logger.info("--min_bucket_reso and --max_bucket_reso are ignored with --bucket_no_upscale (as kohya's)")
    logger.info("reading the sizes of %d images for aspect-ratio buckets...", len(data))
    sizes = read_image_sizes(data, config.skip_bad_images, config.dataloader_num_workers)
    if all(s is None for s in sizes):
        raise UserError(f"no readable training images in {data.source}")
    return assign_buckets(
        sizes, config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps,
        config.bucket_no_upscale,
    )


# --------------------------------------------------------------------------------------------- loader


@dataclass
class BatchLoader:
    """Builds this process's rows of each step's batch: dict of numpy arrays shaped (accum, rows, ...).

    Without a cache it yields `pixel_values` (float32, 3xRxR) and `input_ids`; with `latent_cache`
    (n, flips, 2, C, h, w: mean and std of the VAE posterior) it yields `latent_mean`/`latent_std`, and
    with `text_cache` ({name: (n, ...)}, e.g. `text_embeddings`) those arrays instead of `input_ids`.
    SDXL loaders (`tokenizer_2` set) add `input_ids_2` and `time_ids` (n, 6: original size, crop top-left,
    target size of each example as it was cropped; `time_ids_cache` (n, flips, 6) with cached latents).
    `caption_dropout_rate` replaces a caption by "" (with a text cache: by `empty_text`, the empty caption's arrays).
    With `buckets` (--enable_bucket) each step reads one bucket's examples (flax_lora.buckets.StepPlan), cropped
    to its width x height, and `latent_cache` may be a list of per-example arrays of their buckets' shapes.
    """

    data: CaptionedImages
    tokenizer: Any
    resolution: int
    global_batch: int
    rows: list[int]
    accum: int = 1
    seed: int = 0
    center_crop: bool = False
    random_flip: bool = False
    skip_bad_images: bool = True
    num_workers: int = 0
    latent_cache: np.ndarray | None = None
    text_cache: dict[str, np.ndarray] | None = None
    tokenizer_2: Any = None
    time_ids_cache: np.ndarray | None = None
    valid: np.ndarray | None = None  # indices usable for training (cached mode drops bad images up front)
    interpolation: str = "bilinear"  # --image_interpolation_mode
    caption_dropout_rate: float = 0.0
    empty_text: dict[str, np.ndarray] | None = None
    buckets: Any = None  # flax_lora.buckets.Buckets (--enable_bucket)
    bad_images: set = field(default_factory=set)
    _perms: dict = field(default_factory=dict)
    _pool: Any = None
    _plan: Any = field(default=None, init=False, repr=False)  # built from `buckets`, also by dataclasses.replace

    def __post_init__(self):
        if self.valid is None:
            self.valid = np.arange(len(self.data))
        if self.buckets is not None:  # examples without a bucket (unreadable headers) are not trained on
            self.valid = self.valid[self.buckets.of[self.valid] >= 0]
        if len(self.valid) == 0:
            raise UserError(f"no readable training images in {self.data.source}")
        if self.caption_dropout_rate > 0 and self.text_cache is not None and self.empty_text is None:
            raise ValueError("caption dropout with a text cache needs the empty caption's arrays (empty_text)")
        if self.num_workers > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
        if self.buckets is not None:
            from flax_lora.buckets import StepPlan

            self._plan = StepPlan(self.buckets, self.valid, self.global_batch * self.accum, self.seed)

    @property
    def num_examples(self) -> int:
        return len(self.valid)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps that see every example at least once (with buckets: each bucket's last step filled up)."""
        if self._plan is not None:
            return self._plan.steps_per_epoch
        return math.ceil(len(self.valid) / (self.global_batch * self.accum))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = self.valid[np.random.default_rng([self.seed, epoch]).permutation(len(self.valid))]
        return self._perms[epoch]

    def example_at(self, position: int) -> int:
        """Example index at a stream position."""
        if self._plan is not None:
            return self._plan.example_at(position)
        n = len(self.valid)
        return int(self._perm(position // n)[position % n])

    def _load_pixels(self, position: int, rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray]:
        """Decode and preprocess the image at `position`; a bad one is replaced by the next good one (of its bucket)."""
        n = len(self.valid)
        if self._plan is not None:
            candidates = self._plan.candidates(position)
        else:
            candidates = (self.example_at(position + k) for k in range(n))
        for idx in candidates:
            if idx in self.bad_images:
                continue
            try:
                img = self.data.load_image(idx)
            except BadImageError as e:
                if not self.skip_bad_images:
                    raise BadImageError(f"{e} ({SKIP_HINT})") from e
                self.bad_images.add(idx)
                logger.warning("skipping %s (%d unreadable so far)", e, len(self.bad_images))
                continue
            if self.buckets is not None:
                bucket, resized = self.buckets.size_of(idx), self.buckets.resized_of(idx)
                crop = crop_to_bucket(img, bucket, resized, self.center_crop, self.random_flip, rng, self.interpolation)
            else:
                crop = crop_image(img, self.resolution, self.center_crop, self.random_flip, rng, self.interpolation)
            return (idx, *crop)
        if self.buckets is not None:
            size = "x".join(map(str, self.buckets.size_of(idx)))
            raise BadImageError(f"none of the images of the {size} bucket in {self.data.source} could be read")
        raise BadImageError(f"none of the {n} images in {self.data.source} could be read")

    def caption_dropped(self, position: int) -> bool:
        """Whether the example at a stream position trains on the empty caption (a seeded draw: resume is exact)."""
        rate = self.caption_dropout_rate
        return rate > 0 and bool(np.random.default_rng([self.seed, 3, position]).random() < rate)

    def _example(self, position: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 1, position])
        out = {}
        if self.latent_cache is None:
            idx, out["pixel_values"], time_ids = self._load_pixels(position, rng)
        else:
            idx = self.example_at(position)
            flip = int(self.random_flip and rng.random() < 0.5)
            out["latent_mean"], out["latent_std"] = self.latent_cache[idx][flip]  # an array or, with buckets, a list
            time_ids = None if self.time_ids_cache is None else self.time_ids_cache[idx, flip]
        if self.tokenizer_2 is not None:
            out["time_ids"] = time_ids
        dropped = self.caption_dropped(position)
        if self.text_cache is None:
            caps = self.data.captions(idx)
            out["caption"] = caps[int(rng.integers(len(caps)))] if len(caps) > 1 else caps[0]
            if dropped:  # after the draw above, so the other examples' captions stay as without dropout
                out["caption"] = ""
        elif dropped:
            out.update(self.empty_text)
        else:
            out.update({name: table[idx] for name, table in self.text_cache.items()})
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of optimizer step `step`, arrays shaped (accum, len(rows), ...)."""
        positions = [(step * self.accum + m) * self.global_batch + r for m in range(self.accum) for r in self.rows]
        if self._pool is not None:
            examples = list(self._pool.map(self._example, positions))
        else:
            examples = [self._example(p) for p in positions]
        out = {}
        for key in examples[0]:
            if key == "caption":
                captions = [e["caption"] for e in examples]
                arrays = {"input_ids": self.tokenizer(captions)}
                if self.tokenizer_2 is not None:
                    arrays["input_ids_2"] = self.tokenizer_2(captions)
            else:
                arrays = {key: np.stack([e[key] for e in examples])}
            for name, arr in arrays.items():
                out[name] = arr.reshape(self.accum, len(self.rows), *arr.shape[1:])
        return out

    def close(self) -> None:
        """Stop worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
