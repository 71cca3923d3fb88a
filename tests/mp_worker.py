"""One process of the 2-process test: `python tests/mp_worker.py PORT PROCESS_ID MODEL DATA OUT [flags...]`."""

import json
import os
import sys

# Two CPU devices per process: 4 devices in all, so each process holds half of every batch.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

from flax_lora.config import parse_args  # noqa: E402
from flax_lora.train import main  # noqa: E402

if __name__ == "__main__":
    port, pid, model, data, out, *extra = sys.argv[1:]
    config = parse_args(
        [
            "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", "2",
            "--process_id", pid,
            "--pretrained_model_name_or_path", model,
            "--train_data_dir", data,
            "--output_dir", out,
            "--resolution", "64",
            "--center_crop",
            "--train_batch_size", "1",
            "--max_train_steps", "6",
            "--checkpointing_steps", "3",
            "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0",
            "--seed", "0",
            *extra,
        ]
    )
    result = main(config)
    import jax
    from flax_lora.train import make_mesh, process_rows

    summary = {
        "process_index": jax.process_index(),
        "device_count": jax.device_count(),
        "rows": process_rows(make_mesh(), config.train_batch_size * jax.device_count()),
        "step": result["step"],
        "losses": [loss for _, loss in result["loss_history"]],
        "adapter": result.get("adapter"),
    }
    print("RESULT " + json.dumps(summary), flush=True)
