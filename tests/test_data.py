"""Data: image folder + metadata.jsonl or kohya's caption files, preprocessing, corrupt images, per-process rows, the built-in set."""

import json

import numpy as np
import pytest
from PIL import Image

from flax_lora.config import TrainConfig, parse_args
from flax_lora.errors import MissingFileError, UserError
from flax_lora.data import (
    BadImageError,
    BatchLoader,
    build_tiny_dataset,
    load_image_folder,
    load_training_data,
    preprocess_image,
)


class CharTokenizer:
    """Stand-in tokenizer with flax_lora.tokenizer.CLIPTokenizer's call signature: texts -> int32 (N, L) ids."""

    model_max_length = 8

    def __call__(self, texts):
        n = self.model_max_length
        return np.array([[ord(c) % 100 for c in t[:n].ljust(n)] for t in texts], np.int32)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "shapes", num_images=12, resolution=32)


def test_builtin_dataset_is_an_image_folder(shapes_dir):
    data = load_image_folder(shapes_dir)
    assert len(data) == 12
    assert data.load_image(0).size == (32, 32)
    assert data.captions(0)[0].startswith("a ") and "white background" in data.captions(0)[0]
    assert build_tiny_dataset(shapes_dir, num_images=12, resolution=32) == shapes_dir  # idempotent


def test_preprocess_resizes_crops_and_normalizes():
    img = Image.fromarray(np.full((40, 80, 3), 255, np.uint8))
    img.paste((0, 0, 0), (0, 0, 10, 40))  # black strip at the left edge
    out = preprocess_image(img, 16, center_crop=True, random_flip=False, rng=np.random.default_rng(0))
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    assert out.min() >= -1 and out.max() == 1.0  # the center crop misses the left strip
    flips = [
        preprocess_image(img, 16, center_crop=False, random_flip=True, rng=np.random.default_rng(s)) for s in range(32)
    ]
    assert all(f.shape == (3, 16, 16) for f in flips)
    assert len({f.tobytes() for f in flips}) > 1  # random crops/flips differ by seed


def test_missing_caption_column_is_named(shapes_dir):
    with pytest.raises(ValueError, match="caption column 'prompt' not found.*--caption_column"):
        load_image_folder(shapes_dir, caption_column="prompt")


def test_resolution_must_divide_by_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        TrainConfig(resolution=60)
    with pytest.raises(SystemExit):
        parse_args(["--resolution", "60"])
    assert parse_args(["--resolution", "64", "--random_flip"]).random_flip


def test_export_formats_flag():
    assert parse_args(["--export_formats", "kohya, diffusers,kohya"]).export_format_list == ["kohya", "diffusers"]
    assert TrainConfig().export_format_list == ["diffusers"]
    for bad in ("comfy", ","):
        with pytest.raises(ValueError, match=r"--export_formats .*expected a comma-separated subset of \('diffusers', 'kohya'\)"):
            TrainConfig(export_formats=bad)


def _image(path, color) -> str:
    """Write a 16x16 PNG of one color; returns its path."""
    Image.new("RGB", (16, 16), color).save(path)
    return str(path)


def test_caption_files_beside_the_images_are_read_as_kohya_reads_them(tmp_path, caplog):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, ext in enumerate((".txt", ".caption", ".txt")):
        _image(flat / f"{i}.png", (80 * i, 0, 0))
        (flat / f"{i}{ext}").write_text(f"caption {i}\nsecond line is not read\n")
    data = load_image_folder(str(flat))
    assert data.names == [str(flat / f"{i}.png") for i in range(3)]
    assert [data.captions(i) for i in range(3)] == [[f"caption {i}"] for i in range(3)]
    assert len(load_image_folder(str(flat), max_samples=2)) == 2
    with pytest.raises(MissingFileError, match=r"1 of its images have no caption file \(first: .*1\.txt\)"):
        load_image_folder(str(flat), caption_extension=".txt")  # 1.png has only a .caption file

    kohya = tmp_path / "kohya"
    (kohya / "3_sks dog").mkdir(parents=True)
    (kohya / "1_style_x").mkdir()
    (kohya / "notes").mkdir()
    (kohya / "0_off").mkdir()
    captioned = _image(kohya / "3_sks dog" / "a.png", (0, 90, 0))
    (kohya / "3_sks dog" / "a.txt").write_text("a photo of sks dog on grass")
    by_folder = _image(kohya / "3_sks dog" / "b.png", (0, 0, 90))
    styled = _image(kohya / "1_style_x" / "c.png", (9, 9, 9))
    _image(kohya / "notes" / "d.png", (1, 1, 1))
    _image(kohya / "0_off" / "e.png", (2, 2, 2))
    _image(kohya / "top.png", (3, 3, 3))
    with caplog.at_level("WARNING"):
        data = load_image_folder(str(kohya))
    assert data.names == [styled] + [captioned] * 3 + [by_folder] * 3  # subfolders in name order, each image repeated
    assert [data.captions(i)[0] for i in range(len(data))] == ["style_x"] + ["a photo of sks dog on grass"] * 3 + [
        "sks dog"
    ] * 3
    log = caplog.text
    assert "ignoring subfolder" in log and "notes" in log and "0_off" in log
    assert "ignoring the 1 images directly in" in log
    config = TrainConfig(pretrained_model_name_or_path="unused", train_data_dir=str(kohya), caption_extension=".txt")
    assert load_training_data(config).names == data.names


def test_caption_extension_mistakes_are_named(tmp_path, shapes_dir):
    with pytest.raises(ValueError, match="--caption_extension must start with '.', e.g. .txt; got 'txt'"):
        TrainConfig(pretrained_model_name_or_path="unused", train_data_dir=str(tmp_path), caption_extension="txt")
    with pytest.raises(ValueError, match="--caption_extension names the caption files of --train_data_dir"):
        TrainConfig(pretrained_model_name_or_path="unused", dataset_name="x/y", caption_extension=".txt")
    with pytest.raises(UserError, match="has a metadata.jsonl, whose caption column is read instead"):
        load_image_folder(shapes_dir, caption_extension=".txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match=r"has no metadata.jsonl and no captioned images; expected a "
                                               r"metadata.jsonl .* \(<image name>.txt or .caption\)"):  # fmt: skip
        load_image_folder(str(tmp_path / "empty"))
    (tmp_path / "two").mkdir()
    _image(tmp_path / "two" / "0.png", (0, 0, 0))
    for ext in (".txt", ".caption"):
        (tmp_path / "two" / f"0{ext}").write_text("a caption")
    with pytest.raises(UserError, match=r"0\.png has two caption files, .*0\.txt and .*0\.caption: pass --caption_extension"):
        load_image_folder(str(tmp_path / "two"))
    assert load_image_folder(str(tmp_path / "two"), caption_extension=".caption").captions(0) == ["a caption"]
    (tmp_path / "bad").mkdir()
    _image(tmp_path / "bad" / "0.png", (0, 0, 0))
    (tmp_path / "bad" / "0.txt").write_bytes(b"\xff\xfe caption")
    with pytest.raises(UserError, match=r"caption file .*0\.txt is not UTF-8 text"):
        load_image_folder(str(tmp_path / "bad"))


def _corrupt_folder(tmp_path, shapes_dir):
    rows = [json.loads(line) for line in open(f"{shapes_dir}/metadata.jsonl")][:4]
    for r in rows:
        Image.open(f"{shapes_dir}/{r['file_name']}").save(tmp_path / r["file_name"])
    (tmp_path / rows[1]["file_name"]).write_bytes(b"not a png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_image_folder(str(tmp_path)), rows[1]["file_name"]


def test_bad_images_are_skipped_and_counted_or_stop(tmp_path, shapes_dir):
    data, bad = _corrupt_folder(tmp_path, shapes_dir)
    loader = BatchLoader(data, CharTokenizer(), 16, global_batch=4, rows=list(range(4)))
    for step in range(3):
        batch = loader.batch(step)
        assert batch["pixel_values"].shape == (1, 4, 3, 16, 16)
        assert batch["input_ids"].shape == (1, 4, 8)
    assert len(loader.bad_images) == 1
    strict = BatchLoader(data, CharTokenizer(), 16, global_batch=4, rows=list(range(4)), skip_bad_images=False)
    with pytest.raises(BadImageError, match=bad):
        strict.batch(0)


def test_process_rows_tile_the_global_batch_and_steps_are_reproducible(shapes_dir):
    data = load_image_folder(shapes_dir)
    kw = dict(global_batch=4, accum=2, seed=3, random_flip=True)
    whole = BatchLoader(data, CharTokenizer(), 16, rows=[0, 1, 2, 3], **kw)
    halves = [BatchLoader(data, CharTokenizer(), 16, rows=r, num_workers=2, **kw) for r in ([0, 1], [2, 3])]
    for step in (0, 5):  # step 5 crosses into the second epoch (12 images, 8 per step)
        full = whole.batch(step)
        parts = [h.batch(step) for h in halves]
        for key in ("pixel_values", "input_ids"):
            np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in parts], axis=1))
    # A fresh loader (a resumed run) reproduces a step exactly.
    again = BatchLoader(data, CharTokenizer(), 16, rows=[0, 1, 2, 3], **kw).batch(5)
    np.testing.assert_array_equal(again["pixel_values"], whole.batch(5)["pixel_values"])
    # Every example appears once per epoch.
    epoch = [whole.example_at(j) for j in range(12)]
    assert sorted(epoch) == list(range(12))


def test_cached_latents_and_text_are_gathered(shapes_dir):
    data = load_image_folder(shapes_dir)
    latents = np.random.default_rng(0).normal(size=(12, 2, 2, 4, 2, 2)).astype(np.float32)
    text = np.random.default_rng(1).normal(size=(12, 8, 5)).astype(np.float32)
    loader = BatchLoader(
        data, None, 16, global_batch=3, rows=[0, 1, 2], latent_cache=latents, text_cache={"text_embeddings": text},
        random_flip=True,
    )
    batch = loader.batch(1)
    assert set(batch) == {"latent_mean", "latent_std", "text_embeddings"}
    assert batch["latent_mean"].shape == (1, 3, 4, 2, 2)
    idx = [loader.example_at(3 + r) for r in range(3)]
    np.testing.assert_array_equal(batch["text_embeddings"][0], text[idx])


def test_hf_datasets_path_reads_an_imagefolder(shapes_dir):
    from flax_lora.data import load_hf_dataset

    data = load_hf_dataset(shapes_dir, image_column="image", caption_column="text", max_samples=5)
    assert len(data) == 5
    assert data.load_image(0).size == (32, 32) and "white background" in data.captions(0)[0]
    with pytest.raises(ValueError, match="column 'prompt' not found.*--caption_column"):
        load_hf_dataset(shapes_dir, caption_column="prompt")


def test_builtin_run_defaults_yield_to_flags_the_user_gives():
    from flax_lora.config import BUILTIN_RUN_DEFAULTS

    demo = parse_args(["--validation_epochs", "1"])
    assert demo.validation_epochs == 1  # given explicitly, even though it equals the usual default
    assert demo.resolution == BUILTIN_RUN_DEFAULTS["resolution"] and demo.max_train_steps == 300
    real = parse_args(["--pretrained_model_name_or_path", "some/model", "--train_data_dir", "images"])
    assert real.resolution == 512 and real.max_train_steps is None  # diffusers' defaults for a real model
