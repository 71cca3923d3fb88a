"""Our CLIP tokenizer gives transformers' ids on folders that transformers 5 writes and that 4.x/the hub ship."""

import itertools
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from flax_lora.errors import MissingFileError, UserError
from flax_lora.tokenizer import CLIPTokenizer

MAX_LENGTH = 24
PROMPTS = [
    "A Photo of an ASTRONAUT riding a Horse on Mars",
    "hello, world!!! (masterpiece:1.2), 8k uhd -- f/1.8",
    "it's a dog's life; they're here, we'll see, I'd've, you've, I'm",
    "   lots   of\t whitespace\n\nhere  ",
    "café crème brûlée, naïve façade, cafe\u0301 décomposé",
    "a cat 🐱 and a rocket 🚀 over 東京 at night",
    "",
    "wow! so many exclamation marks!!",
    "<|endoftext|> inside a prompt, and <|startoftext|> too",
    "<|ENDOFTEXT|> upper case",
    "a very long prompt about a beautiful landscape with mountains and rivers and castles and dragons"
    " flying over the forest at sunset, highly detailed oil painting, trending on artstation",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table, whose order fixes CLIP's first 256 ids."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes map to themselves; the rest go above 255
    return dict(zip(bs, map(chr, cs)))


def byte_alphabet() -> list[str]:
    """The 256 byte-level characters in GPT-2's order."""
    return list(bytes_to_unicode().values())


def captions() -> list[str]:
    """A few hundred words of CLIP-style captions to learn merges from."""
    adjectives = ["beautiful", "dark", "golden", "ancient", "tiny", "glowing", "misty", "colorful"]
    subjects = ["castle", "dragon", "forest", "mountain", "river", "astronaut", "horse", "robot", "portrait", "city"]
    styles = ["oil painting", "digital art", "photograph", "watercolor", "highly detailed", "trending on artstation"]
    rows = itertools.product(adjectives, subjects, styles)
    return [f"a {a} {s} at sunset, {style}, it's the landscape" for a, s, style in itertools.islice(rows, 0, None, 3)]


@pytest.fixture(scope="module")
def bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A real CLIP-layout vocabulary: 256 bytes, 256 bytes + </w>, learned merges, then the two specials."""
    trained = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    clip = transformers.CLIPTokenizer().backend_tokenizer  # CLIP's normaliser and word split, as transformers has them
    trained.normalizer, trained.pre_tokenizer = clip.normalizer, clip.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        min_frequency=2,
        initial_alphabet=byte_alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    trained.train_from_iterator(captions(), trainer)
    saved = json.loads(trained.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved]
    chars = byte_alphabet()
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens) and len(merges) > 100
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    """vocab.json + merges.txt as CLIP ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def save_with_transformers(folder: Path, vocab, merges, pad_token: str, max_length: int = MAX_LENGTH) -> Path:
    """The folder transformers' CLIPTokenizer.save_pretrained writes (transformers 5: tokenizer.json + config)."""
    source = write_vocab(folder.parent / (folder.name + "-source"), vocab, merges)
    tokenizer = transformers.CLIPTokenizer(
        str(source / "vocab.json"), str(source / "merges.txt"), pad_token=pad_token, model_max_length=max_length
    )
    tokenizer.save_pretrained(str(folder))
    return folder


def _added(content: str, special: bool | None = None) -> dict:
    """A serialised AddedToken as transformers 4.x writes it (SD 1.x's tokens are normalized)."""
    token = dict(content=content, lstrip=False, normalized=True, rstrip=False, single_word=False)
    return token if special is None else {**token, "special": special}


def write_hub_folder(folder: Path, vocab, merges, pad_token: str, style: str) -> Path:
    """vocab.json + merges.txt + the configs of a hub SD folder: 'legacy' (SD 1.x/2.x era) or 'decoder' (4.34+)."""
    write_vocab(folder, vocab, merges)
    config = dict(do_lower_case=True, errors="replace", model_max_length=MAX_LENGTH, tokenizer_class="CLIPTokenizer")
    if style == "legacy":
        # SD 2.x's folder says pad <|endoftext|> here but "!" in special_tokens_map.json, which wins.
        typed = lambda c: {"__type": "AddedToken", **_added(c)}  # noqa: E731
        config.update(bos_token=typed("<|startoftext|>"), eos_token=typed("<|endoftext|>"))
        config.update(unk_token=typed("<|endoftext|>"))
        config["pad_token"] = "<|endoftext|>"
        special_map = dict(bos_token=_added("<|startoftext|>"), eos_token=_added("<|endoftext|>"))
        special_map.update(unk_token=_added("<|endoftext|>"), pad_token=pad_token)
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    else:
        decoder = {str(vocab[t]): _added(t, special=True) for t in ("<|startoftext|>", "<|endoftext|>", pad_token)}
        config.update(added_tokens_decoder=decoder, bos_token="<|startoftext|>", eos_token="<|endoftext|>")
        config.update(unk_token="<|endoftext|>", pad_token=pad_token)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def reference_ids(folder: Path, prompts: list[str], class_name: str = "CLIPTokenizer") -> np.ndarray:
    """What diffusers feeds the text encoder: transformers' ids padded and truncated to model_max_length."""
    reference = getattr(transformers, class_name).from_pretrained(str(folder))
    out = reference(prompts, padding="max_length", max_length=reference.model_max_length, truncation=True)
    return np.asarray(out.input_ids)


def assert_same_ids(folder: Path, prompts: list[str] = PROMPTS, class_name: str = "CLIPTokenizer") -> np.ndarray:
    """Our ids equal transformers' on `folder`, as int32 (N, model_max_length); returns them."""
    ours = CLIPTokenizer.from_folder(folder)(prompts)
    expected = reference_ids(folder, prompts, class_name)
    assert ours.dtype == np.int32 and ours.shape == (len(prompts), CLIPTokenizer.from_folder(folder).model_max_length)
    for prompt, got, want in zip(prompts, ours, expected):
        assert got.tolist() == want.tolist(), prompt
    return ours


REFERENCE_CLASSES = ["CLIPTokenizer"] + (["CLIPTokenizerFast"] if hasattr(transformers, "CLIPTokenizerFast") else [])


@pytest.mark.parametrize("class_name", REFERENCE_CLASSES)
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_saved_by_transformers(tmp_path, bpe, pad_token, class_name):
    vocab, merges = bpe
    folder = save_with_transformers(tmp_path / "tokenizer", vocab, merges, pad_token)
    ids = assert_same_ids(folder, class_name=class_name)
    tokenizer = CLIPTokenizer.from_folder(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"])
    assert tokenizer.pad_token_id == vocab[pad_token]
    # The merges are used: "landscape" is one learned token, not nine characters.
    assert len(tokenizer.encode("landscape")) < 3
    # The long prompt is cut to bos + its first 22 tokens + eos; the empty one is bos, eos, then padding.
    long_row, empty_row = ids[-1], ids[PROMPTS.index("")]
    words = tokenizer.encode(PROMPTS[-1])
    assert len(words) > MAX_LENGTH
    assert long_row.tolist() == [tokenizer.bos_token_id, *words[: MAX_LENGTH - 2], tokenizer.eos_token_id]
    assert empty_row[:2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert (empty_row[2:] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("style", ["legacy", "decoder"])
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_hub_folders_without_tokenizer_json(tmp_path, bpe, pad_token, style):
    vocab, merges = bpe
    folder = write_hub_folder(tmp_path / "tokenizer", vocab, merges, pad_token, style)
    assert not (folder / "tokenizer.json").exists()
    assert_same_ids(folder)
    assert CLIPTokenizer.from_folder(folder).pad_token_id == vocab[pad_token]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_vocab_files_and_tokenizer_json_agree(tmp_path, bpe, pad_token):
    vocab, merges = bpe
    legacy = write_hub_folder(tmp_path / "legacy", vocab, merges, pad_token, "decoder")
    resaved = tmp_path / "resaved"
    transformers.CLIPTokenizer.from_pretrained(str(legacy)).save_pretrained(str(resaved))
    assert (resaved / "tokenizer.json").is_file() and not (resaved / "vocab.json").exists()
    expected = CLIPTokenizer.from_folder(legacy)(PROMPTS)
    assert (CLIPTokenizer.from_folder(resaved)(PROMPTS) == expected).all()
    # tokenizer.json's own padding/truncation settings must not leak into the ids.
    data = json.loads((resaved / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = dict(direction="Left", max_length=5, strategy="LongestFirst", stride=0)
    data["padding"] = dict(
        strategy={"Fixed": 40}, direction="Left", pad_to_multiple_of=None, pad_id=7, pad_type_id=0, pad_token="&"
    )
    (resaved / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert (CLIPTokenizer.from_folder(resaved)(PROMPTS) == expected).all()


def test_tiny_pipeline_tokenizer(tmp_path):
    # The folder flax_lora/tiny.py's _write_tokenizer builds: byte-level, no merges, 16 tokens.
    folder = tmp_path / "tokenizer"
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    reference = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=16
    )
    reference.save_pretrained(str(folder))
    ids = assert_same_ids(folder)
    tokenizer = CLIPTokenizer.from_folder(folder)
    assert tokenizer.model_max_length == 16 and ids.shape == (len(PROMPTS), 16)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 513 and tokenizer.bos_token_id == 512
    # No merges: one id per byte, the last letter of a word carrying </w>.
    assert tokenizer.encode("Hi é") == [tokens.index(t) for t in ("h", "i</w>", "Ã", "©</w>")]
    # Only the vocabulary files, no configs: CLIP's default tokens, and the length must come from the caller.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "vocab.json", bare)
    shutil.copy(folder / "merges.txt", bare)
    with pytest.raises(UserError, match=r"tokenizer_config.json does not exist"):
        CLIPTokenizer.from_folder(bare)
    assert (CLIPTokenizer.from_folder(bare, default_max_length=16)(PROMPTS) == ids).all()
    # Data loader workers receive it pickled.
    assert (pickle.loads(pickle.dumps(tokenizer))(PROMPTS) == ids).all()


@pytest.mark.parametrize("unk_token", ["<|endoftext|>", "typed"])
def test_special_token_flags_follow_transformers(tmp_path, bpe, unk_token):
    # eos, unk and pad share one text; which entry's "normalized" flag wins decides whether "<|ENDOFTEXT|>" is eos.
    vocab, merges = bpe
    folder = write_hub_folder(tmp_path / "tokenizer", vocab, merges, "<|endoftext|>", "legacy")
    (folder / "special_tokens_map.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]
    config["unk_token"] = config["eos_token"] if unk_token == "typed" else unk_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = assert_same_ids(folder, ["<|ENDOFTEXT|> a", "<|endoftext|> a"])
    assert (ids[0, 1] == vocab["<|endoftext|>"]) == (unk_token == "typed")


def test_no_limit_sentinel_needs_a_default(tmp_path, bpe):
    vocab, merges = bpe
    folder = write_hub_folder(tmp_path / "tokenizer", vocab, merges, "!", "decoder")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    sentinel = int(1e30)  # transformers' VERY_LARGE_INTEGER, "no limit"
    config["model_max_length"] = sentinel
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=rf"tokenizer_config.json gives no usable model_max_length \(got {sentinel}\)"):
        CLIPTokenizer.from_folder(folder)
    assert CLIPTokenizer.from_folder(folder, default_max_length=77)(["a"]).shape == (1, 77)
    config["model_max_length"] = "77"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"tokenizer_config.json: model_max_length must be an integer >= 2 .*got '77'"):
        CLIPTokenizer.from_folder(folder)


def test_missing_and_unreadable_files(tmp_path, bpe):
    vocab, merges = bpe
    with pytest.raises(MissingFileError, match=r"nowhere does not exist: expected .*tokenizer.json.*vocab.json"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    folder = write_hub_folder(tmp_path / "tokenizer", vocab, merges, "!", "decoder")
    (folder / "merges.txt").unlink()
    with pytest.raises(MissingFileError, match=r"folder .*tokenizer has no tokenizer.json and no merges.txt"):
        CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "vocab.json").write_text("{broken")
    with pytest.raises(UserError, match=r"cannot read .*tokenizer/vocab.json and .*tokenizer/merges.txt"):
        CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").unlink()
    (folder / "vocab.json").unlink()
    with pytest.raises(MissingFileError, match=r"no vocab.json or merges.txt: expected tokenizer.json, or vocab.json"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cannot read tokenizer file .*tokenizer.json: JSONDecodeError"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(UserError, match=r"tokenizer.json: expected a BPE model"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text("[")
    with pytest.raises(UserError, match=r"cannot read tokenizer file .*tokenizer_config.json"):
        CLIPTokenizer.from_folder(folder)


def test_added_token_id_mismatch_is_an_error(tmp_path, bpe):
    vocab, merges = bpe
    folder = write_hub_folder(tmp_path / "tokenizer", vocab, merges, "<|endoftext|>", "decoder")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(len(vocab) + 5)] = _added("<new-concept>", special=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    expected = rf"tokenizer: added token '<new-concept>' is listed with id {len(vocab) + 5} but gets id {len(vocab)}"
    with pytest.raises(UserError, match=expected):
        CLIPTokenizer.from_folder(folder)


def test_added_tokens_match_transformers(tmp_path, bpe):
    # A textual-inversion style token appended after the vocabulary is one id, as in transformers.
    vocab, merges = bpe
    folder = write_hub_folder(tmp_path / "tokenizer", vocab, merges, "<|endoftext|>", "decoder")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(len(vocab))] = _added("<cat-toy>", special=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = assert_same_ids(folder, ["a <cat-toy> on a table", "A <CAT-TOY>"])
    assert len(vocab) in ids[0].tolist()


def test_import_does_not_pull_transformers():
    code = "import flax_lora.tokenizer, sys; assert not {'transformers', 'torch', 'diffusers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
