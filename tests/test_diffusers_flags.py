"""diffusers' commands run here: every flag of its LoRA scripts is accepted (PyTorch-only ones log what happens
instead), --report_to wandb/all, --push_to_hub (against a fake HfApi: no network) and the README.md model card."""

import dataclasses
import glob
import json
import logging
import os
import re
import struct
import sys

import numpy as np
import pytest
import yaml

from flax_lora import hub
from flax_lora import train as T
from flax_lora.cli import build_parser
from flax_lora.config import PYTORCH_ONLY_FLAGS, TrainConfig, parse_args
from flax_lora.data import build_tiny_dataset
from flax_lora.errors import UserError
from flax_lora.model_card import TAGS, CardInfo, write_model_card
from tests.test_train import _config

# The flags of diffusers' examples/text_to_image/train_text_to_image_lora.py (main, 2026), its SDXL script's extras,
# and every flag of examples/dreambooth/train_dreambooth_lora.py's argparse (the last two groups together).
DIFFUSERS_FLAGS = (
    "adam_beta1 adam_beta2 adam_epsilon adam_weight_decay allow_tf32 cache_dir caption_column center_crop "
    "checkpointing_steps checkpoints_total_limit dataloader_num_workers dataset_config_name dataset_name "
    "enable_xformers_memory_efficient_attention gradient_accumulation_steps gradient_checkpointing hub_model_id "
    "hub_token image_column image_interpolation_mode learning_rate local_rank logging_dir lr_scheduler lr_warmup_steps "
    "max_grad_norm max_train_samples max_train_steps mixed_precision noise_offset num_train_epochs "
    "num_validation_images output_dir prediction_type pretrained_model_name_or_path push_to_hub random_flip rank "
    "report_to resolution resume_from_checkpoint revision scale_lr seed snr_gamma train_batch_size train_data_dir "
    "use_8bit_adam validation_epochs validation_prompt variant"
    # train_text_to_image_lora_sdxl.py
    " debug_loss enable_npu_flash_attention pretrained_vae_model_name_or_path train_text_encoder"
    # train_dreambooth_lora.py
    " lr_num_cycles lr_power prior_generation_precision pre_compute_text_embeddings"
    " class_data_dir class_labels_conditioning class_prompt instance_data_dir instance_prompt lora_dropout"
    " num_class_images prior_loss_weight sample_batch_size text_encoder_use_attention_mask tokenizer_max_length"
    " tokenizer_name validation_images with_prior_preservation"
).split()


def test_every_diffusers_flag_parses_and_each_pytorch_only_one_gets_a_note():
    argv = [
        "--pretrained_model_name_or_path", "owner/model", "--dataset_name", "owner/data", "--allow_tf32",
        "--use_8bit_adam", "--local_rank", "0", "--image_interpolation_mode", "lanczos", "--enable_npu_flash_attention",
        "--debug_loss", "--prior_generation_precision", "fp16", "--report_to", "all", "--push_to_hub",
        "--hub_model_id", "me/lora", "--hub_token", "hf_secret", "--hub_private_repo", "--pre_compute_text_embeddings",
    ]  # fmt: skip
    config = parse_args(argv)
    assert set(DIFFUSERS_FLAGS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    notes = config.ignored_flag_notes()
    assert [n.split(":")[0] for n in notes] == [f"--{k}" for k in PYTORCH_ONLY_FLAGS]  # one line each, in one table
    assert all(len(n.split(":", 1)[1].strip()) > 10 for n in notes)
    assert config.cache_text_embeddings  # DreamBooth's name for the same thing
    assert config.image_interpolation_mode == "lanczos"  # a real flag: the resize filter
    assert "hub_token" not in config.public_dict()
    assert TrainConfig().ignored_flag_notes() == []  # nothing given, nothing logged
    assert set(PYTORCH_ONLY_FLAGS) <= set(DIFFUSERS_FLAGS)


def test_diffusers_dreambooth_command_parses_and_flags_we_cannot_honour_are_one_line_errors(tmp_path):
    # diffusers' README command for train_dreambooth_lora.py, with prior preservation
    argv = [
        "--pretrained_model_name_or_path=owner/model", "--instance_data_dir=dog", "--output_dir=out",
        "--instance_prompt=a photo of sks dog", "--resolution=512", "--train_batch_size=1",
        "--gradient_accumulation_steps=1", "--checkpointing_steps=100", "--learning_rate=1e-4", "--report_to=wandb",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=500",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=50", "--seed=0", "--push_to_hub",
        "--with_prior_preservation", "--class_data_dir=dogs", "--class_prompt=a photo of dog",
        "--prior_loss_weight=1.0", "--num_class_images=200", "--sample_batch_size=2",
        "--prior_generation_precision=bf16", "--lora_dropout=0.0", "--image_interpolation_mode=lanczos",
    ]  # fmt: skip
    config = parse_args(argv)
    assert (config.instance_prompt, config.num_class_images, config.sample_batch_size) == ("a photo of sks dog", 200, 2)
    note = PYTORCH_ONLY_FLAGS["prior_generation_precision"]
    assert config.ignored_flag_notes() == [f"--prior_generation_precision: {note}"]
    for extra in (["--tokenizer_name=x"], ["--tokenizer_max_length=77"], ["--text_encoder_use_attention_mask"],
                  ["--validation_images", "a.png", "b.png"], ["--class_labels_conditioning=timesteps"],
                  ["--lora_dropout=0.1"]):  # fmt: skip
        name = extra[0].split("=")[0]
        with pytest.raises(ValueError, match=f"^{name} is not supported: .*; drop the flag$"):
            TrainConfig(**vars(build_parser(TrainConfig, "").parse_args(argv + extra)))


def test_report_to_wandb_without_wandb_fails_before_anything_loads(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert T.report_targets(TrainConfig(report_to="all")) == ["tensorboard"]
    out = tmp_path / "out"
    config = TrainConfig(pretrained_model_name_or_path=str(tmp_path / "no-model"), train_data_dir=str(tmp_path),
                         output_dir=str(out), report_to="wandb")  # fmt: skip
    with pytest.raises(UserError, match="pip install wandb") as e:
        T.main(config)
    assert "\n" not in str(e.value) and not out.exists()


def test_model_card_front_matter_and_links(tmp_path):
    from PIL import Image

    (tmp_path / "samples").mkdir()
    images = []
    for i in range(3):
        images.append(str(tmp_path / "samples" / f"final_{i}.png"))
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(images[-1])
    base = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    info = CardInfo(title="me/lora", base_model=base, dataset="the x dataset", steps=10, rank=4, alpha=4,
                    learning_rate=1e-4, resolution=512, validation_prompt='a "cat"')  # fmt: skip
    adapters = [str(tmp_path / "pytorch_lora_weights.safetensors")]
    card = open(write_model_card(str(tmp_path), info, adapters, images)).read()
    meta = _front_matter(card)
    assert meta["base_model"] == info.base_model and meta["license"] == "creativeml-openrail-m"
    assert meta["inference"] is True and meta["library_name"] == "diffusers" and set(TAGS) <= set(meta["tags"])
    assert 'pipe.load_lora_weights("me/lora", weight_name="pytorch_lora_weights.safetensors")' in card
    assert f"infer_flax.py --pretrained_model_name_or_path {base} --lora lora " in card
    assert "hf download me/lora --local-dir lora" in card
    _assert_links_exist(card, tmp_path, at_least=4)  # the grid and the three samples
    assert Image.open(tmp_path / "validation_grid.png").size == (24, 8)
    assert "LoCon" not in card and "DoRA" not in card
    locon_dora = CardInfo(**{**info.__dict__, "conv_rank": 8, "conv_alpha": 4.0, "use_dora": True})
    card = open(write_model_card(str(tmp_path), locon_dora, adapters, images)).read()
    assert "rank 4, alpha 4, LoRA on the 3x3 convs too (LoCon: conv rank 8, conv alpha 4), DoRA" in card


def test_push_to_hub_uploads_the_folder_without_checkpoints(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch)
    (tmp_path / "README.md").write_text("card")
    url = hub.push_to_hub(str(tmp_path), "lora", token="hf_x", private=True)
    assert url == "https://huggingface.co/me/lora"
    assert calls[0] == ("init", {"token": "hf_x"})
    assert calls[1] == ("create_repo", {"repo_id": "lora", "private": True, "exist_ok": True, "repo_type": "model"})
    name, kw = calls[2]
    assert name == "upload_folder" and kw["repo_id"] == "me/lora" and kw["folder_path"] == str(tmp_path)
    assert kw["ignore_patterns"] == ["checkpoints/*"]
    assert hub.repo_name(None, "/runs/my-lora/") == "my-lora"


def test_checkpoint_uploads_run_in_the_background_one_at_a_time(monkeypatch):
    calls = _fake_hub(monkeypatch)
    uploader = hub.CheckpointUploader("lora", token="hf_x")
    for step in (10, 20):
        uploader.submit(step, lambda folder: open(os.path.join(folder, "pytorch_lora_weights.safetensors"), "w").close())
    assert uploader.wait() == [True, True]
    uploads = [kw for name, kw in calls if name == "upload_folder"]
    assert [(kw["repo_id"], kw["path_in_repo"], kw["commit_message"]) for kw in uploads] == [
        ("me/lora", "checkpoint-10", "Checkpoint 10"), ("me/lora", "checkpoint-20", "Checkpoint 20")]
    assert all(kw["files"] == ["pytorch_lora_weights.safetensors"] for kw in uploads)


def test_push_to_hub_offline_and_without_token(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubUploadError, match=f"HF_HUB_OFFLINE is set. Every file is saved in {tmp_path}"):
        hub.push_to_hub(str(tmp_path), "me/lora", token="hf_x")  # the real HfApi, refused before any request
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UserError, match="--hub_token, or log in once with `hf auth login`"):
        hub.check_token(None)


def test_run_logs_to_tensorboard_and_wandb_writes_the_card_then_a_failed_upload_keeps_the_files(
    tiny_sd1_path, tmp_path, monkeypatch, caplog
):
    """One tiny run: --report_to all, the card, and an upload that fails only once everything is written."""
    data = build_tiny_dataset(tmp_path / "data", num_images=2, resolution=64)
    has_wandb = _wandb_available()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    add_scalar = T.Writers.add_scalar
    monkeypatch.setattr(T.Writers, "add_scalar", lambda self, *a: (logged.append(a), add_scalar(self, *a)))
    calls = _fake_hub(monkeypatch, upload_error=ConnectionError("connection refused"))
    out = tmp_path / "run"
    config = _config(
        tiny_sd1_path, data, out, max_train_steps=2, checkpointing_steps=1, validation_prompt="a red circle",
        validation_epochs=20, num_validation_images=2, num_inference_steps=4, report_to="all", push_to_hub=True,
        hub_model_id="me/tiny-lora", hub_token="hf_secret_token", allow_tf32=True,
    )
    with caplog.at_level(logging.INFO), pytest.raises(hub.HubUploadError) as e:
        T.main(config)
    message = str(e.value)
    assert "me/tiny-lora failed: the hub cannot be reached" in message and f"saved in {out}" in message
    assert any(r.getMessage().startswith("--allow_tf32: JAX already lets XLA use TF32") for r in caplog.records)

    # Each checkpoint's adapter went to checkpoint-N/; its failure was a warning and training went on.
    uploads = [kw for name, kw in calls if name == "upload_folder"]
    assert [kw.get("path_in_repo") for kw in uploads] == ["checkpoint-1", "checkpoint-2", None]
    assert all(kw["files"] == ["pytorch_lora_weights.safetensors"] for kw in uploads[:2])
    assert not any(os.path.exists(kw["folder_path"]) for kw in uploads[:2])  # the temporary folders are gone
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "checkpoint" in r.getMessage()]
    assert len(warnings) == 2 and "uploading checkpoint 1 to me/tiny-lora failed" in warnings[0]
    # The final upload came last: the adapter, card, grid, samples and logs were all there when it started.
    uploaded = uploads[-1]
    assert uploaded["folder_path"] == str(out) and uploaded["repo_id"] == "me/tiny-lora"
    for name in ("pytorch_lora_weights.safetensors", "README.md", "validation_grid.png", "samples/final_0.png",
                 "train_config.json", "loss.png"):  # fmt: skip
        assert name in uploaded["files"] and (out / name).is_file(), name
    assert any(f.startswith("logs/events.out.tfevents") for f in uploaded["files"])
    assert "hf_secret_token" not in (out / "train_config.json").read_text()

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert set(TAGS) <= set(meta["tags"]) and meta["license"] == "creativeml-openrail-m" and meta["inference"] is True
    assert "base_model" not in meta  # a local folder is no hub id; the text names it
    assert tiny_sd1_path in card and "a red circle" in card and "# LoRA text-to-image fine-tuning: me/tiny-lora" in card
    _assert_links_exist(card, out, at_least=3)

    losses = [(step, v) for tag, v, step in logged if tag == "train/loss"]
    assert [s for s, _ in losses] == [1, 2]
    if not has_wandb:
        pytest.skip("wandb is not installed (pip install wandb): TensorBoard was checked, wandb not")
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = {}
    for item in _wandb_history(run_file):
        history.setdefault(item["_step"], {}).update(item)
    for step, loss in losses:
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-6)
        assert "train/lr" in history[step] and "train/grad_norm" in history[step]
    assert history[2]["validation/final/count"] == 2  # the final validation images
    media = tmp_path / "wandb" / "wandb" / "offline-run-*" / "files" / "media" / "images"
    assert len(glob.glob(str(media / "**" / "*.png"), recursive=True)) == 2


# ------------------------------------------------------------------------------------------------ helpers


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def _assert_links_exist(card: str, folder, at_least: int) -> None:
    links = re.findall(r"\]\(\./([^)]+)\)", card)
    assert len(links) >= at_least, links
    for link in links:
        assert (folder / link).is_file(), link


def _fake_hub(monkeypatch, upload_error: Exception | None = None) -> list:
    """Replace huggingface_hub.HfApi by one that records its calls (and the folder's files at upload time)."""
    calls = []

    class FakeApi:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

        def upload_folder(self, **kw):
            root = kw["folder_path"]
            files = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
            calls.append(("upload_folder", {**kw, "files": files}))
            if upload_error is not None:
                raise upload_error

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    return calls


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _wandb_history(path: str) -> list[dict]:
    """The history rows of an offline wandb run file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, rows = open(path, "rb").read(), 7, 32768, b"", []  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.parametrize("mode", ["lanczos", "bicubic", "nearest_exact"])
def test_image_interpolation_mode_picks_the_resize_filter_as_torchvision_does_for_pil_images(mode):
    from PIL import Image

    from flax_lora.data import RESAMPLING, crop_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    got, _ = crop_image(img, 16, True, False, np.random.default_rng(0), mode)
    # torchvision's Resize(16) on a PIL image: the short side to 16 with PIL's filter of that mode
    want = np.asarray(img.resize((24, 16), RESAMPLING[mode]), np.float32)[:, 4:20]
    np.testing.assert_array_equal(got, (want / 127.5 - 1.0).transpose(2, 0, 1))
    bilinear, _ = crop_image(img, 16, True, False, np.random.default_rng(0))
    assert not np.array_equal(got, bilinear)  # the default filter differs
