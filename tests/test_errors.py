"""A new user's mistakes: each ends as one `error: ...` line naming the thing and the fix, found before slow work."""

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flax_lora import train as T
from flax_lora.config import TrainConfig
from flax_lora.data import load_hf_dataset, load_image_folder
from flax_lora.errors import ExistingOutputError, MissingFileError, UserError, hub_download
from flax_lora.loading import PipelineError, resolve_pipeline_folder

ROOT = Path(__file__).resolve().parent.parent


def _folder(path: Path, rows: list, images: int = 2) -> str:
    """An image folder with `images` PNGs and a metadata.jsonl of `rows` (dicts, or raw lines as str)."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (16, 16), (i * 90, 0, 0)).save(path / f"{i}.png")
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (path / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return str(path)


def _good(path: Path) -> str:
    return _folder(path, [{"file_name": f"{i}.png", "text": f"image {i}"} for i in range(2)])


def _cli(tmp_path, *args: str) -> list[str]:
    """Run a CLI script; assert it failed with exit status 1, no traceback, a last line `error: ...`; return stderr."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert all(line.startswith(("INFO ", "WARNING ")) for line in lines[:-1]), proc.stderr[-2000:]  # logs only
    return lines


# ------------------------------------------------------------------------------- command lines


def test_help_of_both_clis_imports_no_jax(tmp_path):
    """--help answers at once: the flags are parsed before JAX (or numpy) is imported."""
    for script in ("train_flax.py", "infer_flax.py"):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), "--help"], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "flax_lora.config" in imported and not imported & {"jax", "numpy", "flax_lora.inference"}, script


def test_cli_user_errors_are_one_line(tmp_path):
    """Representative mistakes of each CLI and the bench: exit status 1, one `error:` line, no output folder left."""
    data = _good(tmp_path / "data")
    out = tmp_path / "out"
    lines = _cli(tmp_path, str(ROOT / "train_flax.py"), "--pretrained_model_name_or_path", "someone/some-model",
                 "--train_data_dir", data, "--output_dir", str(out))  # fmt: skip
    assert "'someone/some-model' is neither a local folder nor a reachable hub model id" in lines[-1]
    assert "HF_HUB_OFFLINE is set" in lines[-1] and "A local folder of a diffusers pipeline" in lines[-1]
    assert not out.exists()

    (tmp_path / "models").mkdir()  # so models/sd15 is a mistyped local path, not a hub id
    lines = _cli(tmp_path, str(ROOT / "infer_flax.py"), "--pretrained_model_name_or_path", "models/sd15", "--prompt", "x")
    assert lines[-1] == "error: pipeline folder models/sd15 does not exist (a hub id looks like 'owner/name')"
    # a GPU kernel on this CPU-only machine: refused before the model is looked for
    lines = _cli(tmp_path, str(ROOT / "infer_flax.py"), "--pretrained_model_name_or_path", "models/sd15", "--prompt", "x",
                 "--attention", "cudnn")  # fmt: skip
    assert lines[-1] == "error: --attention cudnn runs on GPUs only; this run is on cpu: use --attention auto"
    (tmp_path / "afile").write_text("")
    lines = _cli(tmp_path, str(ROOT / "bench" / "bench_train.py"), "--config", "tiny", "--out", "afile/r.json")
    assert lines[-1] == f"error: --out afile/r.json: {tmp_path / 'afile'} is a file, not a folder"
    # the bench's own progress lines come first there, so not through _cli
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--config", "tiny", "--frameworks",
                           "flax", "--attention", "cudnn", "--out", "r.json"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: flax worker: --attention cudnn runs on GPUs only; this run is on cpu: use --attention auto"
    )


# ---------------------------------------------------------------------------------------- data


def test_image_folder_mistakes_name_the_file_and_the_fix(tmp_path, caplog):
    expected = "expected one JSON object per line with 'file_name'"
    with pytest.raises(MissingFileError, match="--train_data_dir .*nope does not exist"):
        load_image_folder(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file; expected a folder"):
        load_image_folder(str(tmp_path / "file"))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(MissingFileError, match="has no metadata.jsonl and no captioned images; .*its metadata.csv is read with --dataset_name"):
        load_image_folder(str(tmp_path / "csv"))
    cases = {
        "json": (['{"file_name": "0.png"'], "line 1 is not valid JSON"),
        "list": (['["0.png", "a caption"]'], "line 1 is a JSON list"),
        "no_name": ([{"text": "a"}], r"line 1 has no 'file_name' string \(keys: \['text'\]\)"),
        "empty": ([], "lists no images"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(UserError, match=f"{message}.*{expected}"):
            load_image_folder(_folder(tmp_path / name, rows))
    with pytest.raises(UserError, match="caption column 'text' not found .*Pass --caption_column"):
        load_image_folder(_folder(tmp_path / "caption", [{"file_name": "0.png", "prompt": "a"}]))

    rows = [{"file_name": "0.png", "text": "a"}, {"file_name": "gone.png", "text": "b"}]
    partly = _folder(tmp_path / "partly", rows)
    with caplog.at_level(logging.WARNING, "flax_lora.data"):
        assert len(load_image_folder(partly)) == 1  # skipped up front, like an unreadable image
    assert "skipping 1 files listed in" in caplog.text and "gone.png" in caplog.text
    with pytest.raises(MissingFileError, match=r"gone.png, listed in .* line 2, does not exist .*--no-skip_bad_images"):
        load_image_folder(partly, skip_missing=False)
    with pytest.raises(MissingFileError, match="none of the 1 files listed in .* exist"):
        load_image_folder(_folder(tmp_path / "none", [{"file_name": "x/0.png", "text": "a"}]))


def test_dataset_name_mistakes_are_user_errors(tmp_path):
    with pytest.raises(MissingFileError, match="--dataset_name my-data does not exist .*'owner/name'"):
        load_hf_dataset("my-data")
    with pytest.raises(UserError, match="'someone/data' is neither a local folder nor a reachable hub dataset id"):
        load_hf_dataset("someone/data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--dataset_name .*empty: `datasets` cannot read this folder"):
        load_hf_dataset(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------- models, hub


def test_model_paths_and_hub_failures(tmp_path, monkeypatch, caplog):
    with pytest.raises(MissingFileError, match="pipeline folder nope-model does not exist"):
        resolve_pipeline_folder("nope-model")
    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(PipelineError, match="is a file; .*single-file checkpoints are not read"):
        resolve_pipeline_folder(str(tmp_path / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(MissingFileError, match="pipeline folder models/sd15 does not exist"):  # not taken for a hub id
        resolve_pipeline_folder("models/sd15")

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(UserError, match=r"'a/b' is neither .* hub model id: the hub cannot be reached.*boom\)\. Fix"):
            with hub_download("model", "a/b", "Fix."):
                logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
                raise ConnectionError("boom")
    assert "Retrying" not in caplog.text  # the hub's retry chatter is muted
    with pytest.raises(UserError, match=r"hub dataset 'a/b' could not be loaded \(KeyError"):
        with hub_download("dataset", "a/b", "Fix."):
            raise KeyError("split")


# ------------------------------------------------------------------------------------ training


def test_training_checks_inputs_before_the_model_and_leaves_no_output(tmp_path):
    """Each of these fails in setup before the model loads (the model is an unreachable hub id), writing nothing."""
    data = _good(tmp_path / "data")
    out = tmp_path / "new" / "out"
    model = "someone/not-loaded"
    with pytest.raises(MissingFileError, match="--train_data_dir .*typo does not exist"):
        T.main(TrainConfig(pretrained_model_name_or_path=model, train_data_dir=str(tmp_path / "typo"), output_dir=str(out)))
    with pytest.raises(MissingFileError, match="--resume_from_checkpoint .*checkpoints/5 does not exist"):
        T.main(TrainConfig(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=str(out),
                           resume_from_checkpoint=str(out / "checkpoints" / "5")))  # fmt: skip
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="--output_dir .*: .*data/0.png is a file, not a folder"):
        T.main(TrainConfig(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=f"{data}/0.png/out"))
    (tmp_path / "old" / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(ExistingOutputError, match="checkpoints already holds checkpoints .*step 3.*--resume_from_checkpoint"):
        T.main(TrainConfig(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=str(tmp_path / "old")))
    with pytest.raises(UserError, match="reachable hub model id"):  # every input above was fine: the model is next
        T.main(TrainConfig(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=str(out)))
    assert not (tmp_path / "new").exists()


def test_a_failed_run_removes_only_the_folders_it_created_and_left_without_outputs(tmp_path):
    out = tmp_path / "parent" / "run"
    with pytest.raises(UserError):
        with T.removed_if_unwritten(str(out), "logs"):
            (out / "logs").mkdir(parents=True)
            (out / "logs" / "events.tfevents").write_text("x")
            (out / "checkpoints").mkdir()
            raise UserError("bad image")
    assert not (tmp_path / "parent").exists()  # the parent was created for this run too
    with pytest.raises(UserError):
        with T.removed_if_unwritten(str(out), "logs"):
            (out / "samples").mkdir(parents=True)
            (out / "samples" / "step000010_0.png").write_text("x")
            raise UserError("later failure")
    assert (out / "samples" / "step000010_0.png").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError):
        with T.removed_if_unwritten(str(existing), "logs"):
            raise UserError("x")
    assert existing.exists()


def test_flag_values_that_cannot_work_are_refused():
    for flag, value in (("validation_epochs", 0), ("checkpoints_total_limit", 0), ("max_train_samples", 0),
                        ("num_inference_steps", 0), ("dataloader_num_workers", -1), ("snr_gamma", 0.0)):  # fmt: skip
        with pytest.raises(ValueError, match=f"--{flag} must be"):
            TrainConfig(**{flag: value})


def test_progress_bar_says_compiling_then_an_eta_without_the_compile_step(monkeypatch):
    from tqdm import tqdm

    clock = iter([0.0, 100.0] + [100.0 + 2 * i for i in range(1, 10)])  # a 100 s compile, then 2 s steps
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    bar = tqdm(total=10, file=io.StringIO(), desc="compiling the train step")
    run = types.SimpleNamespace(per_step=4, total_steps=10, writer=None)
    buffer = T.MetricsBuffer(run, [], bar)
    buffer.push(1, {"loss": np.float32(0.5)})
    assert bar.desc == "compiling the train step"
    buffer.push(2, {"loss": np.float32(0.4)})  # step 1 is done: it was the compile
    assert bar.desc == "training" and "ETA" not in bar.postfix
    buffer.push(3, {"loss": np.float32(0.3)})
    buffer.flush()
    assert bar.n == 3 and "2.00 s/step" in bar.postfix and "2.0 img/s" in bar.postfix
    assert "ETA 00:14" in bar.postfix  # 7 steps left x 2 s


# ----------------------------------------------------------------------------- inference, bench


def test_infer_checks_outputs_before_loading_the_model(tmp_path):
    from flax_lora.config import InferConfig as FromConfig
    from flax_lora.config import SCHEDULER_NAMES
    from flax_lora.inference import InferConfig, parse_args, run
    from flax_lora.schedulers import SAMPLER_NAMES

    assert InferConfig is FromConfig and SCHEDULER_NAMES == SAMPLER_NAMES
    (tmp_path / "afile").write_text("")
    unloadable = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--prompt", "x"]
    with pytest.raises(UserError, match="--output_dir .*afile is a file, not a folder"):
        run(parse_args(unloadable + ["--output_dir", str(tmp_path / "afile" / "images")]))
    with pytest.raises(UserError, match="--output .* is a folder; name a .png file"):
        run(parse_args(unloadable + ["--output", str(tmp_path)]))


def test_bench_prints_an_estimate_and_refuses_impossible_flags(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    tiny = bench.BenchConfig(config="tiny", steps=20, warmup=2)
    line = bench.describe_estimate(tiny)
    assert line.startswith("[bench] estimate: about ") and "measured on a 2-core CPU" in line
    flax_only = bench.BenchConfig(config="tiny", frameworks="flax")
    assert bench.estimate_seconds(flax_only) < bench.estimate_seconds(tiny)
    assert bench.estimate_seconds(bench.BenchConfig(config="small", batch=4)) > bench.estimate_seconds(
        bench.BenchConfig(config="small")
    )
    assert "no time estimate" in bench.describe_estimate(bench.BenchConfig(config="sd15"))
    for bad, message in ((dict(threads=os.cpu_count() + 1), "--threads"), (dict(frameworks=""), "--frameworks"),
                         (dict(batch=3, flax_cpu_devices=2), "does not split"),
                         (dict(compile_only=True, attention="pallas"), "where --attention pallas cannot run")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            bench.BenchConfig(**bad)
