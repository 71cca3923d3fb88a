"""Adapter files across diffusers/transformers versions: our exports load in each, and each one's files load in ours.

The other versions live in their own venvs (they cannot share one with newest diffusers and transformers 5), so
this runs only where FLAX_LORA_COMPAT_PYTHONS lists their Pythons, e.g. venvs with diffusers 0.32 +
transformers 4.48 and diffusers 0.36 + transformers 4.57 (README: Adapter files, "Other diffusers versions").
Newest diffusers is covered in tests/test_formats.py, in-process.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from flax_lora.formats import load_adapter, save_adapter
from flax_lora.loading import load_pipeline
from tests.test_formats import TEXT_PEFT, UNET_PEFT, _flax_forward, _inputs, _random_adapter

PYTHONS = [p for p in os.environ.get("FLAX_LORA_COMPAT_PYTHONS", "").split(os.pathsep) if p]
SCRIPT = str(Path(__file__).with_name("compat_load.py"))
pytestmark = pytest.mark.skipif(not PYTHONS, reason="FLAX_LORA_COMPAT_PYTHONS lists no other diffusers venv")


def _run(python: str, *args: str) -> dict:
    """Run compat_load.py with another Python; its outputs, versions and warnings."""
    done = subprocess.run([python, SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(args[4]) as out:  # the OUT.npz argument of both modes
        return {k: out[k][()] if out[k].ndim == 0 else out[k] for k in out.files}


@pytest.fixture(scope="module")
def old_layout(tiny_sd1_old_layout_path):
    """The transformers 4.x-layout pipeline (older transformers cannot read the 5.x one) and our model of it."""
    return tiny_sd1_old_layout_path, load_pipeline(tiny_sd1_old_layout_path)


def _inputs_file(pipe, folder: Path) -> str:
    ids, latents, timesteps = _inputs(pipe)
    np.savez(folder / "inputs.npz", ids=ids, latents=latents, timesteps=timesteps)
    return str(folder / "inputs.npz")


@pytest.mark.parametrize("python", PYTHONS)
def test_our_exports_load_exactly_in_other_diffusers(python, old_layout, tmp_path):
    path, pipe = old_layout
    adapter = _random_adapter(pipe, path)
    flax_text, flax_noise = _flax_forward(pipe, adapter)
    inputs = _inputs_file(pipe, tmp_path)
    for format in ("diffusers", "kohya"):
        file = save_adapter(adapter, tmp_path / format, format=format)
        out = _run(python, "load", path, file, inputs, str(tmp_path / f"{format}.npz"))
        assert not [w for w in out["warnings"].splitlines() if "lora" in w.lower()], (out["versions"], out["warnings"])
        np.testing.assert_allclose(out["text"], flax_text, atol=1e-4, err_msg=f"{format}, {out['versions']}")
        np.testing.assert_allclose(out["noise"], flax_noise, atol=1e-4, err_msg=f"{format}, {out['versions']}")


@pytest.mark.parametrize("python", PYTHONS)
def test_files_other_diffusers_write_load_in_ours_as_in_newest_diffusers(python, old_layout, tmp_path):
    """PEFT adapters (rsLoRA, rank/alpha patterns) saved by that version's save_lora_weights, transformers 4.x keys.

    With the header (diffusers >= 0.34) the writer's own loader, newest diffusers and ours agree. Without it
    (<= 0.33 drops alpha) older loaders apply the first module's rank as everyone's alpha, newest diffusers (and
    we) scale 1 per module: we follow newest diffusers there, and the test shows the old loader differs.
    """
    from diffusers import StableDiffusionPipeline

    from tests.test_formats import _torch_forward

    path, pipe = old_layout
    inputs = _inputs_file(pipe, tmp_path)
    folder = tmp_path / "written"
    # Attention targets only: diffusers names all of them `.lora.down`, which every version's loader reads whole.
    unet_config = dict(UNET_PEFT, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    theirs = _run(python, "write", path, str(folder), inputs, str(tmp_path / "out.npz"), json.dumps(unet_config), json.dumps(TEXT_PEFT))
    file = folder / "pytorch_lora_weights.safetensors"
    assert any(k.startswith("text_encoder.text_model.") for k in load_file(str(file)))  # transformers 4.x names
    newest = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    newest.load_lora_weights(str(folder))
    newest_text, newest_noise = _torch_forward(newest, pipe)
    flax_text, flax_noise = _flax_forward(pipe, load_adapter(folder, pipe.params))
    np.testing.assert_allclose(flax_text, newest_text, atol=1e-4, err_msg=theirs["versions"])
    np.testing.assert_allclose(flax_noise, newest_noise, atol=1e-4, err_msg=theirs["versions"])
    with safe_open(str(file), framework="np") as f:
        has_header = "lora_adapter_metadata" in (f.metadata() or {})
    off = max(float(np.abs(flax_text - theirs["text"]).max()), float(np.abs(flax_noise - theirs["noise"]).max()))
    print(theirs["versions"], "header" if has_header else "no header", "ours vs the writer's own loader:", off)
    if has_header:
        np.testing.assert_allclose(flax_text, theirs["text"], atol=1e-4, err_msg=theirs["versions"])
        np.testing.assert_allclose(flax_noise, theirs["noise"], atol=1e-4, err_msg=theirs["versions"])
    else:
        assert off > 1e-2  # the old loader's first-rank alpha: the difference the docstring describes
