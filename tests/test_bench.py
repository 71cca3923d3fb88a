"""Smoke test of bench/bench_train.py: both frameworks train a tiny UNet for 2 steps and report sane numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_train.py"


def test_bench_tiny_reports_both_frameworks(tmp_path):
    out = tmp_path / "tiny.json"
    # The CPU options of the README's figures: chunked attention, one XLA device per core (0 = auto).
    cmd = [sys.executable, str(BENCH), "--config", "tiny", "--steps", "2", "--warmup", "0", "--batch", "2",
           "--device", "cpu", "--flax_attention", "memory_efficient", "--flax_cpu_devices", "0",
           "--out", str(out)]  # fmt: skip
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
    assert summary["results"]["flax"]["step_impl"] == "flax_lora.train.make_train_step"
    cores = len(os.sched_getaffinity(0))
    assert summary["results"]["flax"]["devices"] == (cores if 2 % cores == 0 else 1)
    ratio = summary["ratio_flax_over_torch"]
    assert all(math.isfinite(v) and v > 0 for v in ratio.values())
