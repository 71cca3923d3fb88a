"""Two processes on localhost (gloo CPU collectives) train one adapter; only process 0 writes files."""

import json
import os
import socket
import subprocess
import sys


from flax_lora.data import build_tiny_dataset

WORKER = os.path.join(os.path.dirname(__file__), "mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_workers(tiny_sd1_path: str, data: str, out, flags: list[str]) -> tuple[list[dict], list[str]]:
    """Train in two processes of mp_worker.py (2 CPU devices each); their RESULT dicts by process index, and outputs."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(WORKER)), HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(port), str(i), tiny_sd1_path, data, str(out), *flags],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])  # generous: a busy 2-core CI machine
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{text[-4000:]}"
    results = [json.loads(next(l for l in t.splitlines() if l.startswith("RESULT "))[7:]) for t in outputs]
    return sorted(results, key=lambda r: r["process_index"]), outputs


def test_two_processes_train_one_adapter_with_the_base_sharded_over_both(tiny_sd1_path, tmp_path):
    """--fsdp 4 with 2 devices per process: every base weight is split over both processes, so each gather crosses
    them; the validation sampler gathers the sharded base there too. Only process 0 writes files and logs."""
    data = build_tiny_dataset(tmp_path / "data", num_images=6, resolution=64)
    out = tmp_path / "run"
    flags = ["--report_to", "tensorboard", "--cache_latents", "--cache_text_embeddings", "--random_flip", "--fsdp", "4",
             "--validation_prompt", "a red circle", "--num_validation_images", "4", "--num_inference_steps", "2"]  # fmt: skip
    (r0, r1), outputs = _run_two_workers(tiny_sd1_path, data, out, flags)
    assert r0["device_count"] == r1["device_count"] == 4
    assert sorted(r0["rows"] + r1["rows"]) == [0, 1, 2, 3] and not set(r0["rows"]) & set(r1["rows"])
    assert r0["step"] == r1["step"] == 6
    assert r0["losses"] == r1["losses"] and all(0 < loss < 10 for loss in r0["losses"])  # one global loss
    assert r0["adapter"] and r1["adapter"] is None
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["3", "6"]
    assert {f"final_{i}.png" for i in range(4)} <= set(os.listdir(out / "samples"))
    assert len(os.listdir(out / "logs")) == 1  # one TensorBoard event file: process 0 logs
    # Only process 0 prints progress (the bar says "compiling the train step", then "training") and INFO logs.
    assert sum("compiling the train step" in t and "training:" in t for t in outputs) == 1
    assert sum("wrote " in t for t in outputs) == 1
