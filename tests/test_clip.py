"""Our Flax CLIP text encoder against transformers' PyTorch one, on tiny random models saved by transformers 5."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file
from transformers import CLIPTextConfig as PTConfig
from transformers import CLIPTextModel as PTModel
from transformers import CLIPTextModelWithProjection as PTModelWithProjection

from flax_lora.models.clip import CLIPTextConfig, load_clip, normalize_pt_key
from flax_lora.models.convert import CheckpointMismatchError

VOCAB, BOS, EOS, PAD = 100, 98, 99, 0
# Batch of 3, length 16 (= max_position_embeddings): padding after EOS, padding with the EOS id itself (as SD's
# tokenizer pads), and a sequence that fills the length.
IDS = np.array(
    [
        [BOS, 5, 17, 42, EOS] + [PAD] * 11,
        [BOS, 7, EOS] + [EOS] * 13,
        [BOS] + list(range(10, 24)) + [EOS],
    ],
    np.int32,
)
# The legacy rule (eos_token_id 2) pools at the largest id: here an early 97, not the EOS at position 3 or 2.
LEGACY_IDS = np.array([[BOS, 97, 3, 2, PAD, PAD, PAD], [BOS, 4, 2, 97, 2, 2, 2]], np.int32)

KINDS = {
    # SD 1.x text encoder: quick_gelu, no projection.
    "sd1": (PTModel, dict(hidden_act="quick_gelu", eos_token_id=EOS, pad_token_id=PAD, num_hidden_layers=2)),
    # OpenCLIP bigG (SDXL text_encoder_2): gelu, text_projection.
    "bigg": (PTModelWithProjection, dict(hidden_act="gelu", eos_token_id=EOS, pad_token_id=EOS, num_hidden_layers=3)),
    # A pre-#24773 config: eos_token_id 2.
    "legacy": (PTModel, dict(hidden_act="quick_gelu", eos_token_id=2, pad_token_id=PAD, num_hidden_layers=2)),
}


def _build(root: Path, kind: str) -> tuple[torch.nn.Module, Path]:
    """A tiny random transformers model of `kind`, saved to `root/kind`, with biases and LN params made random."""
    cls, extra = KINDS[kind]
    config = PTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=24,
        bos_token_id=BOS,
        **extra,
    )
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # transformers initialises biases to 0 and LN to 1: noise so that their mapping is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / kind)
    return model, root / kind


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """kind -> (PyTorch model, folder it was saved to)."""
    root = tmp_path_factory.mktemp("clip")
    return {kind: _build(root, kind) for kind in KINDS}


def _load(folder: Path, dtype=jnp.float32, param_dtype=jnp.float32, weights=None):
    config = CLIPTextConfig.from_dict(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    state = load_file(folder / "model.safetensors") if weights is None else weights
    return load_clip(state, config, str(folder / "model.safetensors"), dtype=dtype, param_dtype=param_dtype)


def _torch_outputs(model: torch.nn.Module, ids: np.ndarray) -> dict[str, np.ndarray | list[np.ndarray]]:
    with torch.no_grad():
        ids_t = torch.from_numpy(ids).long()
        text = model.text_model if hasattr(model, "text_projection") else model
        out = text(ids_t, output_hidden_states=True)
        result = {
            "last_hidden_state": out.last_hidden_state.numpy(),
            "pooler_output": out.pooler_output.numpy(),
            "hidden_states": [h.numpy() for h in out.hidden_states],
        }
        if hasattr(model, "text_projection"):
            result["text_embeds"] = model(ids_t).text_embeds.numpy()
    return result


def _relative_error(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-12))


@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_transformers(saved, kind):
    pt_model, folder = saved[kind]
    model, params = _load(folder)
    ids = LEGACY_IDS if kind == "legacy" else IDS
    ref = _torch_outputs(pt_model, ids)
    out = model.apply({"params": params}, jnp.asarray(ids))

    assert len(out.hidden_states) == len(ref["hidden_states"]) == model.config.num_hidden_layers + 1
    errors = {
        "last_hidden_state": _relative_error(out.last_hidden_state, ref["last_hidden_state"]),
        "pooler_output": _relative_error(out.pooler_output, ref["pooler_output"]),
    }
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref["hidden_states"])):
        errors[f"hidden_states[{i}]"] = _relative_error(ours, theirs)
    if kind == "bigg":
        errors["text_embeds"] = _relative_error(out.text_embeds, ref["text_embeds"])
    else:
        assert out.text_embeds is None
    print(kind, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-5, errors


def test_legacy_pooling_rule_is_distinguished(saved):
    """The legacy ids pool somewhere other than the first EOS, so the test above checks which rule is used."""
    pt_model, _ = saved["legacy"]
    ref = _torch_outputs(pt_model, LEGACY_IDS)
    rows = np.arange(len(LEGACY_IDS))
    first_two = ref["last_hidden_state"][rows, np.argmax(LEGACY_IDS == 2, axis=-1)]
    assert not np.allclose(first_two, ref["pooler_output"])


def test_param_tree_names(saved):
    _, params = _load(saved["bigg"][1])
    keys = {"/".join(k) for k in flatten_dict(params)}
    for name in (
        "text_model/embeddings/token_embedding/embedding",
        "text_model/embeddings/position_embedding/embedding",
        "text_model/encoder/layers_2/self_attn/q_proj/kernel",
        "text_model/encoder/layers_0/self_attn/out_proj/bias",
        "text_model/encoder/layers_1/layer_norm1/scale",
        "text_model/encoder/layers_1/mlp/fc1/kernel",
        "text_model/encoder/layers_1/mlp/fc2/bias",
        "text_model/encoder/layers_0/layer_norm2/bias",
        "text_model/final_layer_norm/scale",
        "text_projection/kernel",
    ):
        assert name in keys
    assert "text_projection/bias" not in keys


def test_transformers4_layout_loads_the_same(saved):
    """transformers 4.x wrote CLIPTextModel's keys under `text_model.`; 5 writes them at the top level."""
    folder = saved["sd1"][1]
    state = load_file(folder / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5's layout, as this test assumes
    old = {f"text_model.{k}": v for k, v in state.items()}
    old["text_model.embeddings.position_ids"] = np.arange(16)[None]  # 4.x saved this buffer
    _, params = _load(folder)
    _, params_old = _load(folder, weights=old)
    flat, flat_old = flatten_dict(params), flatten_dict(params_old)
    assert flat.keys() == flat_old.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], flat_old[key])


def test_normalize_pt_key():
    assert normalize_pt_key("encoder.layers.0.mlp.fc1.weight") == "text_model.encoder.layers.0.mlp.fc1.weight"
    assert normalize_pt_key("text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"
    assert normalize_pt_key("text_projection.weight") == "text_projection.weight"


def test_checkpoint_mismatches_name_the_key(saved):
    folder = saved["sd1"][1]
    state = load_file(folder / "model.safetensors")

    wrong = dict(state, **{"encoder.layers.1.mlp.fc1.weight": np.zeros((36, 32), np.float32)})
    message = re.escape("'encoder.layers.1.mlp.fc1.weight' has shape (36, 32)")
    with pytest.raises(CheckpointMismatchError, match=message):
        _load(folder, weights=wrong)

    extra = dict(state, **{"text_projection.weight": np.zeros((24, 32), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=re.escape("1 unexpected keys (e.g. ['text_projection.weight'])")):
        _load(folder, weights=extra)

    missing = {k: v for k, v in state.items() if k != "final_layer_norm.bias"}
    message = re.escape("1 missing params (e.g. ['text_model/final_layer_norm/bias'])")
    with pytest.raises(CheckpointMismatchError, match=message):
        _load(folder, weights=missing)


def test_config_from_dict(saved):
    path = saved["bigg"][1] / "config.json"
    raw = json.loads(path.read_text())
    assert {"attention_dropout", "initializer_range", "dtype", "transformers_version"} <= raw.keys()
    config = CLIPTextConfig.from_dict(raw, str(path))
    assert config.with_projection and config.hidden_act == "gelu" and config.num_hidden_layers == 3
    assert not CLIPTextConfig.from_dict(json.loads((saved["sd1"][1] / "config.json").read_text()), "x").with_projection

    bad = {
        "hidden_act": ("gelu_new", "hidden_act"),
        "eos_token_id": ([EOS, 3], "eos_token_id"),
        "architectures": (["CLIPModel"], "architectures"),
        "model_type": ("clip", "model_type"),
        "num_attention_heads": (5, "not a multiple of num_attention_heads 5"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
            CLIPTextConfig.from_dict(dict(raw, **{key: value}), str(path))


def test_bf16_stays_close(saved):
    folder = saved["bigg"][1]
    model32, params32 = _load(folder)
    model16, params16 = _load(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ref = model32.apply({"params": params32}, jnp.asarray(IDS))
    out = model16.apply({"params": params16}, jnp.asarray(IDS))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    errors = {
        "last_hidden_state": _relative_error(out.last_hidden_state, ref.last_hidden_state),
        "hidden_states[-2]": _relative_error(out.hidden_states[-2], ref.hidden_states[-2]),
        "text_embeds": _relative_error(out.text_embeds, ref.text_embeds),
    }
    print("bf16", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 5e-2, errors


def test_jit_and_lora(saved):
    """Under jit the outputs equal eager ones; a LoRA branch on q_proj equals merging it into the kernel."""
    model, params = _load(saved["sd1"][1])
    ids = jnp.asarray(IDS[:, :9])  # shorter than max_position_embeddings
    eager = model.apply({"params": params}, ids)
    jitted = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    # XLA fuses the jitted graph differently from op-by-op dispatch: equal up to float32 rounding
    np.testing.assert_allclose(jitted.last_hidden_state, eager.last_hidden_state, atol=1e-5)
    np.testing.assert_allclose(jitted.pooler_output, eager.pooler_output, atol=1e-5)

    rng = np.random.default_rng(0)
    down, up, scale = rng.normal(size=(32, 2)), rng.normal(size=(2, 32)), np.full((2,), 0.5)
    q_lora = {"down": down, "up": up, "scale": scale}
    lora = {"text_model": {"encoder": {"layers_1": {"self_attn": {"q_proj": q_lora}}}}}
    lora = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), lora)
    with_lora = jax.jit(lambda p, l, x: model.apply({"params": p, "lora": l}, x))(params, lora, ids)
    merged = jax.tree.map(lambda a: a, params)
    q_proj = merged["text_model"]["encoder"]["layers_1"]["self_attn"]["q_proj"]
    q_proj["kernel"] = q_proj["kernel"] + jnp.asarray((down * scale) @ up, jnp.float32)
    expected = model.apply({"params": merged}, ids)
    assert _relative_error(with_lora.last_hidden_state, eager.last_hidden_state) > 1e-3
    np.testing.assert_allclose(with_lora.last_hidden_state, expected.last_hidden_state, atol=1e-5)
