"""Input pipeline speed: images/s of the trainer's BatchLoader for each --dataloader_num_workers, same batches.

Design: a folder of JPEG photos-like images (larger than the training resolution, so each one is decoded, resized
and cropped as in a real run) is written once into a temporary folder; then `flax_lora.data.BatchLoader` builds
the same steps' batches with each worker count. The batches must be bit-identical across worker counts (the
order and crops are a function of seed and position only); the table reports images/s and the speed-up over 0.
Nothing here touches JAX or a model: it measures what `--dataloader_num_workers` changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from flax_lora.data import BatchLoader, load_image_folder


def write_images(folder: str, count: int, width: int, height: int, seed: int = 0) -> None:
    """`count` JPEGs with smooth gradients and shapes (they compress and decode like photos, unlike noise)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as meta:
        for i in range(count):
            base = rng.uniform(0, 255, 3) + rng.uniform(-0.2, 0.2, 3) * (xs[..., None] + ys[..., None])
            img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for _ in range(6):
                x0, y0 = rng.integers(0, width - 64), rng.integers(0, height - 64)
                box = (int(x0), int(y0), int(x0 + rng.integers(32, 256)), int(y0 + rng.integers(32, 256)))
                draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            name = f"{i:04d}.jpg"
            img.save(os.path.join(folder, name), quality=90)
            meta.write(json.dumps({"file_name": name, "text": f"image {i}"}) + "\n")


def measure(folder: str, workers: int, args: argparse.Namespace) -> tuple[float, str]:
    """(images/s over `args.steps` batches, a hash of every pixel they held) with this many workers."""
    loader = BatchLoader(
        data=load_image_folder(folder), tokenizer=lambda captions: np.zeros((len(captions), 77), np.int32),
        resolution=args.resolution, global_batch=args.batch, rows=list(range(args.batch)), seed=0,
        random_flip=True, num_workers=workers, interpolation=args.interpolation,
    )
    digest = hashlib.sha256()
    try:
        loader.batch(0)  # warm the thread pool and the file cache: every count then reads from memory
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            digest.update(loader.batch(step)["pixel_values"].tobytes())
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    return args.steps * args.batch / seconds, digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--image_size", default="768x640", help="WIDTHxHEIGHT of the source JPEGs")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2,4", help="comma-separated --dataloader_num_workers values")
    parser.add_argument("--interpolation", default="bilinear")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count; the best is reported")
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_size.split("x"))
    counts = [int(w) for w in args.workers.split(",")]
    print(f"bench_data: {args.num_images} JPEGs {width}x{height} -> {args.resolution} px, batch {args.batch}, "
          f"{args.steps} batches x {args.repeats} runs per worker count; about "
          f"{args.num_images / 20 + len(counts) * args.repeats * (args.steps + 1) * args.batch / 50:.0f} s on 2 cores")
    with tempfile.TemporaryDirectory() as folder:
        write_images(folder, args.num_images, width, height)
        rows, hashes = [], set()
        for workers in counts:
            runs = [measure(folder, workers, args) for _ in range(args.repeats)]
            hashes.update(h for _, h in runs)
            rows.append((workers, max(r for r, _ in runs)))
    base = rows[0][1]
    print(f"{'workers':>8} {'images/s':>9} {'vs ' + str(counts[0]):>7}")
    for workers, rate in rows:
        print(f"{workers:>8} {rate:>9.1f} {rate / base:>6.2f}x")
    if len(hashes) != 1:
        raise SystemExit("error: the batches differ between worker counts (the data order must not depend on them)")
    print(f"identical batches for every worker count (os.cpu_count() = {os.cpu_count()})")


if __name__ == "__main__":
    main()
