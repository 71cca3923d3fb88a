"""CPU training without a recipe: one XLA device per core with --train_batch_size as the whole batch (trained as on
one device), and the CLIs' restart with glibc's huge pages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flax_lora import devices as T
from flax_lora.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CORES = T.usable_cores()


def _glibc_with_hugetlb() -> bool:
    """Linux with glibc 2.35 or newer: the tunable exists and the CLIs restart with it."""
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return sys.platform == "linux" and libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except (ValueError, OSError, AttributeError):
        return False


def _fresh_env(**extra: str) -> dict:
    """The environment of a fresh CPU process: without the conftest's 8 fake devices or a set device count."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "GLIBC_TUNABLES")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    return env


# ------------------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    "cores, batch, fsdp, expected",
    [(2, 4, 1, 2), (16, 4, 1, 4), (6, 16, 1, 4), (4, 7, 1, 1), (1, 8, 1, 1), (8, 8, 4, 8), (4, 6, 2, 2), (2, 3, 2, 1)],
)
def test_automatic_device_count_divides_the_batch_and_fsdp_groups(cores, batch, fsdp, expected):
    assert T.auto_cpu_devices(cores, batch, fsdp) == expected


def test_global_batch_is_the_flag_only_for_an_automatic_split():
    assert T.global_batch_size(4, 2, cpu_split=2) == 4
    assert T.global_batch_size(4, 2, cpu_split=0) == 8  # explicit --num_cpu_devices, GPUs, TPUs: per device


def test_split_message_says_what_was_chosen():
    assert T.cpu_split_message(4, 2, 2) == (
        "CPU: batch 4 split over 2 XLA devices (one per core; --num_cpu_devices 1 turns this off)"
    )
    assert "the most of the 4 cores that divide the batch" in T.cpu_split_message(6, 3, 4)
    assert T.cpu_split_message(7, 1, 4).startswith("CPU: batch 7 on 1 XLA device (no device count up to the 4 cores")
    assert T.cpu_split_message(4, 1, 1) == "CPU: batch 4 on 1 XLA device"


def test_split_warns_when_the_model_copies_may_not_fit_in_ram(caplog):
    ram = T.ram_bytes()
    with caplog.at_level("INFO", logger="flax_lora.devices"):
        T.log_cpu_split(4, 2, 1, model_bytes=1)
        assert "CPU: batch 4 split over 2 XLA devices" in caplog.text and "RAM" not in caplog.text
        T.log_cpu_split(4, 2, 1, model_bytes=ram // 2)  # two device copies and the host's: 1.5x the RAM
    assert "pass --num_cpu_devices 1 or --fsdp 2" in caplog.records[-1].getMessage()


def test_automatic_mode_in_a_started_process_changes_nothing():
    jax.devices()  # the conftest's 8 fake devices are up
    assert T.init_devices(TrainConfig()) == 0
    assert jax.device_count() == 8


def test_huge_pages_are_read_from_glibc_tunables(monkeypatch):
    cases = [("", False), ("glibc.malloc.hugetlb=0", False), ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", True)]
    for tunables, on in cases:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
        assert T.huge_pages_enabled() is on, tunables


# --------------------------------------------------------------------------------------- huge pages restart


@pytest.mark.skipif(not _glibc_with_hugetlb(), reason="needs Linux with glibc >= 2.35")
@pytest.mark.parametrize(
    "tunables, restarted, final",
    [
        (None, True, "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", True, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", False, "glibc.malloc.hugetlb=0"),  # the opt-out
    ],
)
def test_restart_adds_huge_pages_in_the_same_process(tmp_path, tunables, restarted, final):
    script = tmp_path / "restart.py"
    script.write_text(
        "import os\nfrom flax_lora.cli import reexec_with_huge_pages\nprint('start', os.getpid(), flush=True)\n"
        "reexec_with_huge_pages()\nprint('tunables', os.environ.get('GLIBC_TUNABLES'))\n"
    )
    env = _fresh_env(**({"GLIBC_TUNABLES": tunables} if tunables else {}))
    proc = subprocess.run([sys.executable, str(script), "--a"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    starts = [line for line in lines if line.startswith("start ")]
    assert len(starts) == (2 if restarted else 1) and len(set(starts)) == 1, lines  # exec: one PID
    assert lines[-1] == f"tunables {final}"


def test_a_flag_error_is_printed_once(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_flax.py"), "--resolution", "7"], capture_output=True,
                          text=True, env=_fresh_env(), timeout=60, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("--resolution must be a positive multiple of 8") == 1, proc.stderr


# ------------------------------------------------------------------------------------ trainer, two processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same 2-step run (batch 2) in fresh processes: automatic devices, and --num_cpu_devices 1."""
    from flax_lora.data import build_tiny_dataset
    from flax_lora.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("cpu_devices")
    model = build_tiny_pipeline(root / "tiny-sd1")
    data = build_tiny_dataset(str(root / "data"), num_images=2, resolution=32)
    out = {}
    for name, extra in [("auto", []), ("one", ["--num_cpu_devices", "1"])]:
        cmd = [sys.executable, str(ROOT / "train_flax.py"), "--pretrained_model_name_or_path", model,
               "--train_data_dir", data, "--output_dir", str(root / name), "--resolution", "32", "--center_crop",
               "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-3",
               "--lr_warmup_steps", "0", "--cache_latents", "--cache_text_embeddings", "--report_to", "none",
               *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_fresh_env(), timeout=300, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (root / name, proc.stderr)
    return out


def _meta(folder: Path) -> dict:
    return json.loads((folder / "checkpoints" / "2" / "meta" / "metadata").read_text())


@pytest.mark.skipif(CORES < 2, reason="one core: the automatic split is one device")
def test_automatic_split_trains_the_flag_batch_over_one_device_per_core(runs):
    folder, log = runs["auto"]
    assert "CPU: batch 2 split over 2 XLA devices" in log, log[-3000:]
    assert "2 devices (1 processes), global batch 2 x 1 accumulation, 2 steps" in log
    if _glibc_with_hugetlb():  # train_flax.py restarted itself with glibc's huge pages
        assert "glibc huge pages on" in log
    assert _meta(folder)["samples_per_step"] == 2


@pytest.mark.skipif(CORES < 2, reason="one core: the automatic split is one device")
def test_automatic_split_matches_one_device(runs):
    from safetensors.numpy import load_file

    (auto, _), (one, one_log) = runs["auto"], runs["one"]
    assert "1 devices (1 processes), global batch 2 x 1 accumulation" in one_log and "CPU: batch" not in one_log
    np.testing.assert_allclose([l for _, l in _meta(auto)["loss_history"]],
                               [l for _, l in _meta(one)["loss_history"]], rtol=1e-5)  # fmt: skip
    a, b = (load_file(str(folder / "pytorch_lora_weights.safetensors")) for folder in (auto, one))
    assert a.keys() == b.keys() and any(np.abs(v).max() > 0 for v in a.values())
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_the_split_plans_no_more_model_copies_than_fit_in_memory(tmp_path):
    model = tmp_path / "pipe"
    for component, files in {"unet": {"a.safetensors": 600, "a.fp16.safetensors": 300}, "vae": {"b.bin": 100},
                             "tokenizer": {"vocab.json": 10**6}}.items():  # fmt: skip
        (model / component).mkdir(parents=True)
        for name, size in files.items():
            (model / component / name).write_bytes(b"\0" * size)
    # the largest file per weight component (tokenizers are not weights), doubled for fp32 compute
    assert T.local_model_bytes(str(model), "no") == 2 * (600 + 100)
    assert T.local_model_bytes(str(model), "bf16") == 700
    assert T.local_model_bytes("owner/hub-model", "no") is None and T.local_model_bytes(None, "no") is None
    # 10 GB of RAM, 1.5 GB per copy: 60% of RAM holds 4 copies, one of them the host's -> 3 devices
    assert T.devices_that_fit(1.5e9, 1, 10e9) == 3
    assert T.devices_that_fit(1.5e9, 4, 10e9) == 12  # each device holds a quarter of the model with --fsdp 4
    assert T.devices_that_fit(20e9, 1, 10e9) == 1 and T.devices_that_fit(None, 1, 10e9) is None
