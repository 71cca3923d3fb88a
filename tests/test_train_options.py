"""Training options of issue 14: --optimizer, --use_ema, --caption_dropout_rate, --validation_split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_lora import train as T
from flax_lora.config import TrainConfig
from flax_lora.data import BatchLoader, build_tiny_dataset, load_image_folder
from flax_lora.errors import UserError
from tests.test_train import _config, assert_same_adapter


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "four", num_images=4, resolution=64)


def _restored(out_dir, step: int) -> dict:
    """A checkpoint's state as orbax stores it (nested dicts and lists), without a target tree."""
    import orbax.checkpoint as ocp

    checkpointer = T.Checkpointer(str(out_dir / "checkpoints"))
    state = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    checkpointer.close()
    return state


def _by_path(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(caption_dropout_rate=1.5), "--caption_dropout_rate"),
        (dict(caption_dropout_rate=-0.1), "--caption_dropout_rate"),
        (dict(validation_split=1.0), "--validation_split"),
        (dict(validation_split=0.0), "--validation_split"),
        (dict(use_ema=True, ema_decay=1.0), "--ema_decay"),
        (dict(use_ema=True, ema_decay=0.0), "--ema_decay"),
        (dict(optimizer="sgd"), "--optimizer"),
    ],
)
def test_bad_values_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_validation_split_is_disjoint_seeded_and_needs_two_examples():
    train, held = T.split_examples(np.arange(20), 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(20))
    again, held_again = T.split_examples(np.arange(20), 0.25, seed=3)
    np.testing.assert_array_equal(held, held_again)
    assert not np.array_equal(held, T.split_examples(np.arange(20), 0.25, seed=4)[1])
    assert len(T.split_examples(np.arange(2), 0.01, 0)[1]) == 1 and len(T.split_examples(np.arange(2), 0.99, 0)[0]) == 1
    assert T.split_examples(np.arange(5), None, 0)[1] is None
    with pytest.raises(UserError, match="--validation_split 0.5 needs at least 2"):
        T.split_examples(np.arange(1), 0.5, 0)


# ------------------------------------------------------------------------------------------ optimizers


def test_every_optimizer_lowers_a_loss_and_adamw_is_unchanged():
    """Each --optimizer (with clipping in front) minimises a LoRA-shaped least-squares problem; adamw is the old chain."""
    rng = np.random.default_rng(0)
    target = {"down": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), "up": jnp.asarray(rng.normal(size=(4, 16)))}
    params0 = jax.tree.map(jnp.zeros_like, target)

    def loss(p):
        return sum(jnp.mean((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    finals = {}
    for name in ("adamw", "prodigy", "lion", "adafactor"):
        lr = 1.0 if name == "prodigy" else 3e-2
        config = TrainConfig(optimizer=name, learning_rate=lr, lr_warmup_steps=0)
        optimizer, _ = T.make_optimizer(config, 50, lr)
        params, state = params0, optimizer.init(params0)
        for _ in range(50):
            updates, state = optimizer.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
        assert float(loss(params)) < 0.7 * float(loss(params0)), name
        finals[name] = params
    for name in ("prodigy", "lion", "adafactor"):
        assert not np.allclose(finals[name]["down"], finals["adamw"]["down"]), name

    config = TrainConfig(learning_rate=3e-2, lr_warmup_steps=0)
    ours, _ = T.make_optimizer(config, 50, 3e-2)
    before = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, 0.9, 0.999, 1e-8, weight_decay=1e-2))
    grads = jax.grad(loss)(params0)
    a, _ = ours.update(grads, ours.init(params0), params0)
    b, _ = before.update(grads, before.init(params0), params0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_resume_with_another_optimizer_names_the_flags(tmp_path):
    from types import SimpleNamespace

    mesh = T.make_mesh()
    params = {"unet": {"a": {"down": jnp.ones((4, 2)), "up": jnp.zeros((2, 4))}}}
    adamw, _ = T.make_optimizer(TrainConfig(), 10, 1e-3)
    checkpointer = T.Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.save(T.create_train_state(params, adamw, 0, mesh), {})
    for kw in (dict(optimizer="lion"), dict(use_ema=True)):
        optimizer, _ = T.make_optimizer(TrainConfig(**kw), 10, 1e-3)
        run = SimpleNamespace(config=TrainConfig(resume_from_checkpoint="latest", **kw), checkpointer=checkpointer,
                              resume_step=None, per_step=8, seed=0, val_history=[])  # fmt: skip
        with pytest.raises(UserError, match="does not fit this run.*--optimizer, --use_ema"):
            T.restore(run, T.create_train_state(params, optimizer, 0, mesh))
    checkpointer.close()


def test_ema_transformation_follows_diffusers_warmup():
    ema = T.ema_of_params(0.5)
    params = {"w": jnp.zeros(3)}
    state = ema.init(params)
    seen = []
    for n in range(4):
        updates = {"w": jnp.full(3, 1.0)}  # params go 1, 2, 3, 4
        out, state = ema.update(updates, state, params)
        assert out is updates
        params = optax.apply_updates(params, updates)
        seen.append(float(state.ema["w"][0]))
    # decay 0, then min(0.5, 2/11), min(0.5, 3/12), min(0.5, 4/13)
    expected, e = [], 0.0
    for n, p in enumerate([1.0, 2.0, 3.0, 4.0]):
        d = 0.0 if n == 0 else min(0.5, (1 + n) / (10 + n))
        e = d * e + (1 - d) * p
        expected.append(e)
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------ caption dropout


def _ids(captions):
    """A stand-in tokenizer: each caption's length and first letter."""
    return np.array([[len(c), ord(c[0]) if c else 0] for c in captions], np.int32)


def test_caption_dropout_uncached_cached_and_after_resume(four_images):
    data = load_image_folder(four_images)
    empty = _ids([""])[0]
    kw = dict(data=data, tokenizer=_ids, resolution=64, global_batch=8, rows=list(range(8)), center_crop=True, seed=5)
    none = BatchLoader(**kw)
    zero = BatchLoader(**kw, caption_dropout_rate=0.0)
    all_ = BatchLoader(**kw, caption_dropout_rate=1.0, tokenizer_2=_ids, time_ids_cache=None)  # SDXL: both tokenizers
    for step in range(2):
        a, b, c = none.batch(step), zero.batch(step), all_.batch(step)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert (c["input_ids"] == empty).all() and (c["input_ids_2"] == empty).all()
        np.testing.assert_array_equal(a["pixel_values"], c["pixel_values"])  # only the captions change

    # Cached text: a dropped caption takes the empty caption's embedding.
    table = {"text_embeddings": np.arange(4, dtype=np.float32)[:, None, None] + np.zeros((4, 2, 3), np.float32)}
    empty_text = {"text_embeddings": np.full((2, 3), -1.0, np.float32)}
    cached = dict(kw, text_cache=table)
    with pytest.raises(ValueError, match="empty_text"):
        BatchLoader(**cached, caption_dropout_rate=0.5)
    half = BatchLoader(**cached, caption_dropout_rate=0.5, empty_text=empty_text)
    batch = half.batch(0)["text_embeddings"][0]
    dropped = np.array([half.caption_dropped(p) for p in range(8)])
    assert 0 < dropped.sum() < 8
    assert (batch[dropped] == -1).all()
    np.testing.assert_array_equal(batch[~dropped, 0, 0], [half.example_at(p) for p in np.flatnonzero(~dropped)])
    # A fresh loader (a resumed run) drops the same positions: the draw depends on seed and position only.
    resumed = BatchLoader(**cached, caption_dropout_rate=0.5, empty_text=empty_text)
    np.testing.assert_array_equal(resumed.batch(3)["text_embeddings"], half.batch(3)["text_embeddings"])
    rate = np.mean([half.caption_dropped(p) for p in range(2000)])
    assert 0.45 < rate < 0.55


# ------------------------------------------------------------------------------------------ end to end


def test_prodigy_ema_caption_dropout_validation_split_and_resume(tiny_sd1_path, four_images, tmp_path, pipe_sd1):
    """One configuration, three runs (one compile): the EMA is the hand-computed one and the adapter file holds it;
    val/loss is logged; a run stopped at step 2 and resumed equals the straight run (Prodigy's and the EMA's state,
    the caption dropout pattern and the val/loss history all come back)."""
    from flax_lora.formats import load_adapter

    kw = dict(optimizer="prodigy", learning_rate=1.0, use_ema=True, caption_dropout_rate=0.5, validation_split=0.25,
              checkpointing_steps=1)  # fmt: skip
    out = tmp_path / "straight"
    straight = T.main(_config(tiny_sd1_path, four_images, out, max_train_steps=4, **kw))

    # EMA: the first update copies the weights, the second uses diffusers' warmup decay 2/11 (< --ema_decay).
    states = {step: _restored(out, step) for step in (1, 2, 4)}
    p1, p2 = _by_path(states[1]["params"]), _by_path(states[2]["params"])
    ema1, ema2 = _by_path(states[1]["opt_state"][-1]["ema"]), _by_path(states[2]["opt_state"][-1]["ema"])
    assert p1.keys() == ema2.keys() and any(not np.array_equal(p1[k], p2[k]) for k in p1)
    for k in p1:
        np.testing.assert_array_equal(ema1[k], p1[k], err_msg=k)
        np.testing.assert_allclose(ema2[k], 2 / 11 * p1[k] + 9 / 11 * p2[k], rtol=1e-5, atol=1e-8, err_msg=k)
    ema4, p4 = _by_path(states[4]["opt_state"][-1]["ema"]), _by_path(states[4]["params"])
    exported = _by_path(load_adapter(str(out / "pytorch_lora_weights.safetensors"), pipe_sd1.params).params)
    assert exported.keys() == ema4.keys()
    for k in exported:
        np.testing.assert_allclose(exported[k], ema4[k], rtol=1e-6, atol=1e-9, err_msg=k)
    assert any(not np.allclose(exported[k], p4[k]) for k in exported)  # not the raw weights

    # 3 training examples, global batch 8: every step is an epoch, so val/loss comes after each step.
    assert [s for s, _ in straight["val_loss_history"]] == [1, 2, 3, 4]
    losses = [v for _, v in straight["val_loss_history"]]
    assert all(np.isfinite(losses)) and len(set(losses)) == 4  # fixed noise; the (EMA) weights changed
    assert (out / "loss.png").is_file()

    T.main(_config(tiny_sd1_path, four_images, tmp_path / "resumed", max_train_steps=2, **kw))
    second = T.main(_config(tiny_sd1_path, four_images, tmp_path / "resumed", max_train_steps=4,
                            resume_from_checkpoint="latest", **kw))  # fmt: skip
    assert_same_adapter(out, tmp_path / "resumed")
    np.testing.assert_array_equal(straight["loss_history"], second["loss_history"])
    np.testing.assert_array_equal(straight["val_loss_history"], second["val_loss_history"])


@pytest.fixture(scope="module")
def pipe_sd1(tiny_sd1_path):
    from flax_lora.loading import load_pipeline

    return load_pipeline(tiny_sd1_path)
