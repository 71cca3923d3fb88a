"""Smoke test of bench/bench_train.py: both frameworks train a tiny UNet for 2 steps and report sane numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_train.py"


def test_bench_tiny_reports_both_frameworks(tmp_path):
    out = tmp_path / "tiny.json"
    # The defaults: attention auto (chunked on CPU), one XLA device per core, a warm rerun on the compile cache.
    cmd = [sys.executable, str(BENCH), "--config", "tiny", "--steps", "2", "--warmup", "0", "--batch", "2",
           "--device", "cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout  # the JSON path is printed
    summary = json.loads(out.read_text())
    assert summary["platform"] == "cpu"
    for name in ("flax", "torch"):
        r = summary["results"][name]
        for key in ("steps_per_s", "images_per_s", "step_s", "first_step_s", "memory_bytes", "first_loss", "last_loss"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["memory_kind"] == "host_rss_peak"
        assert r["mfu"] is None  # MFU only for sd15 on a GPU
    # Same adapter size on both sides: same targets and rank.
    assert summary["results"]["flax"]["lora_params"] == summary["results"]["torch"]["lora_params"]
    flax = summary["results"]["flax"]
    assert flax["step_impl"] == "flax_lora.train.make_train_step"
    # The rerun loads the step from the persistent cache instead of compiling it: its first step is faster.
    assert 0 < flax["first_step_warm_s"] < flax["first_step_s"] and flax["memory_bytes_warm"] > 0
    assert "warm" in proc.stdout
    cores = len(os.sched_getaffinity(0))
    assert summary["results"]["flax"]["devices"] == (cores if 2 % cores == 0 else 1)
    ratio = summary["ratio_flax_over_torch"]
    assert all(math.isfinite(v) and v > 0 for v in ratio.values())


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = sys.modules.setdefault("bench_train", importlib.util.module_from_spec(spec))  # dataclasses look it up
    spec.loader.exec_module(module)  # imports no JAX: only the CLI helpers
    return module


def test_bench_compile_only_rows():
    bench = _bench_module()
    cfg = bench.BenchConfig(config="sdxl", compile_only=True, devices="1,4,8", fsdp="1,4", batch_per_device="1")
    rows = [(r["devices"], r["fsdp"], r["remat"]) for r in cfg.compile_rows()]
    assert rows == [(1, 1, False), (1, 1, True), (4, 1, False), (4, 1, True), (4, 4, False), (4, 4, True),
                    (8, 1, False), (8, 1, True), (8, 4, False), (8, 4, True)]  # fmt: skip
    with pytest.raises(ValueError, match="--config sdxl runs with --compile_only only"):
        bench.BenchConfig(config="sdxl")
    with pytest.raises(ValueError, match="no --fsdp value in '3' divides"):
        bench.BenchConfig(config="tiny", compile_only=True, devices="4", fsdp="3")


def test_bench_compile_only_reports_memory_per_device(tmp_path):
    out = tmp_path / "compile.json"
    cmd = [sys.executable, str(BENCH), "--config", "tiny", "--compile_only", "--devices", "2", "--fsdp", "2",
           "--gradient_checkpointing", "on", "--precision", "bf16", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total GiB" in proc.stdout and str(out) in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["devices"], row["fsdp"], row["remat"], row["global_batch"]) == (2, 2, True, 2)  # the devices asked for
    m = row["memory_bytes"]
    assert m["temp"] > 0 and m["argument"] > 0 and row["lora_params"] > 0 and row["compile_s"] > 0
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
