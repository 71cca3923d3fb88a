"""Aspect-ratio buckets as kohya sd-scripts' --enable_bucket: the bucket sizes, each image's bucket, the step plan.

Design:
- Bucket sizes follow kohya's rules: (width, height) pairs in multiples of --bucket_reso_steps, each side within
  [--min_bucket_reso, --max_bucket_reso], of at most the area of a --resolution square (for each width the
  tallest height that fits), plus that square itself. An image takes the bucket whose aspect ratio is nearest its
  own (its exact size when that is a bucket), is resized to cover the bucket (kohya's rounding) and then cropped.
- --bucket_no_upscale has no predefined list: an image larger than the square's area is first shrunk to that area
  (keeping its aspect ratio, one side a multiple of the steps), and its bucket is its size rounded down to the
  steps, so no image is enlarged. Only an image with a side shorter than one step is enlarged, to that step.
- Buckets are decided once, from the image sizes alone (headers, no decoding), the same on every process.
- Step plan: epoch e shuffles each bucket's examples with (seed, e, bucket) and cuts them into steps of
  samples-per-step (global batch x accumulation) examples. A bucket's last, short step is filled up with the
  first examples of the same shuffled order, so every image is trained on at least once an epoch and a few
  twice (with other crops and flips: those follow the stream position). The steps of all buckets are then
  shuffled with (seed, e). Every step holds one bucket, so its arrays have one shape; an epoch has a fixed
  number of steps; and step s's examples are a pure function of (seed, s), so a resumed or multi-process
  run (each process loads its rows of the step) sees exactly what a straight single-process run would.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


def bucket_range(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """kohya's adjustment of --min/--max_bucket_reso to multiples of the steps: the minimum down, the maximum up."""
    return min_reso - min_reso % steps, -(-max_reso // steps) * steps


def bucket_resolutions(
    resolution: int, min_reso: int = 256, max_reso: int = 1024, steps: int = 64
) -> list[tuple[int, int]]:
    """The predefined (width, height) buckets for a --resolution, sorted (kohya's make_bucket_resolutions)."""
    min_reso, max_reso = bucket_range(min_reso, max_reso, steps)
    area = resolution * resolution
    side = resolution // steps * steps  # the largest square in steps that fits the area
    sizes = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, area // width // steps * steps)
        if height >= min_reso:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to so that it covers the bucket, its aspect ratio kept (kohya's rounding)."""
    bucket_w, bucket_h = bucket
    if width / height > bucket_w / bucket_h:  # wider than the bucket: match the height
        scale = bucket_h / height
    else:
        scale = bucket_w / width
    # max(): the matched side is the bucket's exactly, whatever the float rounding of the scale.
    return max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5))


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (the first on ties; the image's own size if listed)."""
    if (width, height) in sizes:
        return width, height
    errors = [abs(w / h - width / height) for w, h in sizes]
    return sizes[int(np.argmin(errors))]


def own_bucket(width: int, height: int, max_area: int, steps: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """--bucket_no_upscale: (bucket, resized size) of an image; shrunk to max_area if larger, never enlarged."""
    ratio = width / height
    resized = (width, height)
    if width * height > max_area:

        def to_steps(x: float) -> int:
            x = int(x + 0.5)
            return x - x % steps

        # Shrink to the area, then make the width or the height a multiple of the steps: the one that keeps the
        # aspect ratio better (kohya's choice).
        shrunk_w = math.sqrt(max_area * ratio)
        by_width = to_steps(shrunk_w)
        by_height = to_steps(max_area / shrunk_w)
        error_w = abs(by_width / max(1, to_steps(by_width / ratio)) - ratio)
        error_h = abs(to_steps(by_height * ratio) / max(1, by_height) - ratio)
        if by_width and (error_w < error_h or not by_height):
            resized = (by_width, int(by_width / ratio + 0.5))
        else:
            resized = (int(by_height * ratio + 0.5), by_height)
    # A side shorter than one step cannot be cropped to a bucket: that side is the one enlarged (to one step).
    bucket = tuple(max(steps, side - side % steps) for side in resized)
    if resized[0] < bucket[0] or resized[1] < bucket[1]:
        resized = cover_size(width, height, bucket)
    return bucket, resized


@dataclass(frozen=True)
class Buckets:
    """Each example's bucket: `sizes` (width, height) per bucket, `of` bucket index per example (-1: unreadable),
    `resized` (n, 2) the width and height an example is resized to before its crop."""

    sizes: list[tuple[int, int]]
    of: np.ndarray
    resized: np.ndarray

    def size_of(self, i: int) -> tuple[int, int]:
        """(width, height) of example i's bucket."""
        return self.sizes[int(self.of[i])]

    def resized_of(self, i: int) -> tuple[int, int]:
        """(width, height) example i is resized to before it is cropped to its bucket."""
        return int(self.resized[i, 0]), int(self.resized[i, 1])

    def counts(self, examples: np.ndarray) -> dict[tuple[int, int], int]:
        """{bucket size: examples in it} of the buckets these examples use, in bucket order."""
        ids, counts = np.unique(self.of[np.asarray(examples, int)], return_counts=True)
        return {self.sizes[b]: int(c) for b, c in zip(ids, counts)}

    def summary(self, examples: np.ndarray) -> str:
        """One line: how many buckets these examples use and how many images each holds (width x height)."""
        counts = self.counts(examples)
        listed = ", ".join(f"{w}x{h}: {c}" for (w, h), c in counts.items())
        return f"aspect-ratio buckets: {len(examples)} images in {len(counts)} buckets ({listed})"


def assign_buckets(
    image_sizes: list[tuple[int, int] | None], resolution: int, min_reso: int = 256, max_reso: int = 1024,
    steps: int = 64, no_upscale: bool = False,
) -> Buckets:
    """Each image's bucket from its (width, height) (None: unreadable, no bucket), by kohya's rules."""
    predefined = [] if no_upscale else bucket_resolutions(resolution, min_reso, max_reso, steps)
    chosen, resized = [], []
    for size in image_sizes:
        if size is None:
            chosen.append(None)
            resized.append((0, 0))
        elif no_upscale:
            bucket, new = own_bucket(*size, resolution * resolution, steps)
            chosen.append(bucket)
            resized.append(new)
        else:
            chosen.append(nearest_bucket(*size, predefined))
            resized.append(cover_size(*size, chosen[-1]))
    sizes = sorted({b for b in chosen if b is not None}) if no_upscale else predefined
    index = {b: i for i, b in enumerate(sizes)}
    of = np.array([-1 if b is None else index[b] for b in chosen], np.int64)
    return Buckets(sizes, of, np.asarray(resized, np.int64).reshape(-1, 2))


class StepPlan:
    """Which bucket and examples each optimizer step reads (see the module docstring); a pure function of the seed."""

    def __init__(self, buckets: Buckets, examples: np.ndarray, per_step: int, seed: int):
        self.buckets, self.per_step, self.seed = buckets, per_step, seed
        examples = np.sort(np.asarray(examples, np.int64))
        of = buckets.of[examples]
        self.members = {int(b): examples[of == b] for b in np.unique(of) if b >= 0}
        self.steps_per_epoch = sum(math.ceil(len(m) / per_step) for m in self.members.values())
        self._epochs: dict[int, tuple[dict, list]] = {}

    def _epoch(self, epoch: int) -> tuple[dict[int, np.ndarray], list[tuple[int, np.ndarray]]]:
        """(each bucket's shuffled order, the epoch's steps as (bucket, examples)) of an epoch."""
        entry = self._epochs.get(epoch)
        if entry is None:
            orders, steps = {}, []
            for b, members in self.members.items():
                order = members[np.random.default_rng([self.seed, 5, epoch, b]).permutation(len(members))]
                orders[b] = order
                count = math.ceil(len(order) / self.per_step)
                filled = np.resize(order, count * self.per_step)  # repeats the order from its start
                steps += [(b, filled[k * self.per_step : (k + 1) * self.per_step]) for k in range(count)]
            shuffle = np.random.default_rng([self.seed, 6, epoch]).permutation(len(steps))
            entry = (orders, [steps[k] for k in shuffle])
            if len(self._epochs) > 4:  # a few epochs kept: loader threads and bad-image stand-ins reread them
                self._epochs.pop(min(list(self._epochs)), None)
            self._epochs[epoch] = entry
        return entry

    def step(self, step: int) -> tuple[int, np.ndarray]:
        """(bucket index, the per_step example indices) of optimizer step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[1][k]

    def example_at(self, position: int) -> int:
        """Example index at a stream position (step * per_step + micro-batch * global batch + row)."""
        step, j = divmod(position, self.per_step)
        return int(self.step(step)[1][j])

    def candidates(self, position: int) -> list[int]:
        """The example at a position, then the rest of its bucket in the epoch's order: stand-ins for a bad image."""
        step, j = divmod(position, self.per_step)
        bucket, examples = self.step(step)
        order = self._epoch(step // self.steps_per_epoch)[0][bucket]
        start = int(np.flatnonzero(order == examples[j])[0])
        return [int(i) for i in np.roll(order, -start)]
