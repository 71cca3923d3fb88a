"""CLIP's byte-level BPE tokenizer, read from a diffusers `tokenizer/` folder without transformers.

Design: the ids must equal transformers' `CLIPTokenizer(texts, padding="max_length", truncation=True)`, since the
text encoder was trained on them. Two folder layouts exist: transformers 5 saves `tokenizer.json` +
`tokenizer_config.json`; 4.x and the hub's SD folders ship `vocab.json` + `merges.txt` + `special_tokens_map.json`
+ `tokenizer_config.json`. Like transformers 5, we take only the vocabulary, merges and added tokens from
`tokenizer.json` and rebuild CLIP's normaliser and word split in code, so both layouts share one pipeline.
Special and added tokens are merged from the config files in transformers' order (their flags decide whether a
token matches before or after lowercasing). bos, eos, truncation and padding are applied here, not by the
backend's post-processor, so padding or truncation settings saved in `tokenizer.json` cannot change the ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from flax_lora.errors import MissingFileError, UserError

# CLIP's defaults, used where a folder's config does not name a token.
_DEFAULT_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# transformers' order of named special tokens; it decides the ids of specials missing from the vocabulary.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers stores "no limit" as int(1e30) and treats anything above 1e20 as no limit.
_NO_LIMIT = 1e20
# CLIP's word split: its own special tokens, English contractions, letter runs, single digits, punctuation runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _read_json(path: Path) -> Any:
    """Parse a JSON file, naming it in the error if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read tokenizer file {path}: {type(e).__name__}: {e}") from e


def _token_content(value: Any, where: str) -> str:
    """The text of a token given as a string or as a serialised AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{where}: expected a token string or an AddedToken dict with 'content', got {value!r}")


def _token_state(value: Any, named: set[str], where: str) -> dict[str, Any]:
    """AddedToken fields of a config value: a string is special iff it names a special token; dict flags are kept."""
    content = _token_content(value, where)
    if isinstance(value, str):
        special = content in named
        return dict(
            content=content, single_word=False, lstrip=False, rstrip=False, normalized=not special, special=special
        )
    special = bool(value.get("special", False))
    return dict(
        content=content,
        single_word=bool(value.get("single_word", False)),
        lstrip=bool(value.get("lstrip", False)),
        rstrip=bool(value.get("rstrip", False)),
        # As tokenizers' AddedToken does: unless given, only non-special tokens match the normalised text.
        normalized=bool(value.get("normalized", not special)),
        special=special,
    )


def _max_length(config: dict, default: int | None, config_file: Path) -> int:
    """The model_max_length of tokenizer_config.json, else `default`; an error if neither is usable."""
    value = config.get("model_max_length")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (is_number and value >= _NO_LIMIT):
        if not is_number or value != int(value) or value < 2:
            raise UserError(f"{config_file}: model_max_length must be an integer >= 2 (bos + eos), got {value!r}")
        return int(value)
    if default is None:
        problem = f"gives no usable model_max_length (got {value!r})" if config_file.is_file() else "does not exist"
        raise UserError(
            f"{config_file} {problem}, so the prompt length is unknown (Stable Diffusion uses 77): "
            "pass default_max_length, e.g. the text encoder's max_position_embeddings"
        )
    if default < 2:
        raise ValueError(f"default_max_length must be >= 2 (bos + eos), got {default}")
    return default


def _vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """Vocabulary, merges and the added-token list of tokenizer.json if present, else of vocab.json + merges.txt."""
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file():
        data = _read_json(tokenizer_file)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise UserError(f"{tokenizer_file}: expected a BPE model with a 'vocab' dict, as CLIP's tokenizer saves")
        merges = []
        # tokenizers < 0.20 writes merges as "a b" strings, later versions as [a, b] pairs.
        for merge in model.get("merges", []):
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise UserError(f"{tokenizer_file}: expected merges as 'a b' or [a, b], got {merge!r}")
            merges.append(pair)
        added = data.get("added_tokens") or []
        return model["vocab"], merges, added
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
    if missing:
        raise MissingFileError(
            f"tokenizer folder {folder} has no tokenizer.json and no {' or '.join(missing)}: "
            "expected tokenizer.json, or vocab.json and merges.txt"
        )
    try:
        vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
    except Exception as e:  # the Rust reader raises plain Exception for bad JSON or merge lines
        raise UserError(f"cannot read {vocab_file} and {merges_file}: {e}") from e
    return vocab, merges, []


def _special_and_added(
    folder: Path, config: dict, json_added: list[dict]
) -> tuple[dict[str, Any], list[tuple[int | None, AddedToken]]]:
    """Named special tokens, and the added tokens in the order transformers adds them, with any id a file lists."""
    tokens: dict[str, Any] = dict(_DEFAULT_TOKENS)
    tokens.update({k: config[k] for k in _SPECIAL_KEYS if config.get(k) is not None})
    by_id: dict[int, Any] = {}
    if "added_tokens_decoder" in config:
        # Written by transformers >= 4.34; then it alone lists added tokens and special_tokens_map.json is ignored.
        by_id = {int(i): t for i, t in config["added_tokens_decoder"].items()}
    else:
        # Older folders (e.g. SD 2.x's, whose config says pad <|endoftext|> but special_tokens_map.json says "!"):
        # special_tokens_map.json wins, then added_tokens.json and tokenizer.json's list add tokens.
        map_file = folder / "special_tokens_map.json"
        if map_file.is_file():
            for key, value in _read_json(map_file).items():
                if key in _SPECIAL_KEYS and value is not None:
                    tokens[key] = {**value, "special": True} if isinstance(value, dict) else value
        added_file = folder / "added_tokens.json"
        if added_file.is_file():
            by_id.update({int(i): content for content, i in _read_json(added_file).items()})
        by_id.update({int(t["id"]): t for t in json_added})
    named = {_token_content(v, f"{folder}: {k}") for k, v in tokens.items()}
    queue = [(i, _token_state(t, named, f"{folder}: added token {i}")) for i, t in sorted(by_id.items())]
    listed = {state["content"] for _, state in queue}
    # Then each named token not listed, unless an identical one is queued. The backend keeps the flags of the
    # last token added with the same text: SD 1.x's eos (normalized) is overridden by its pad (a plain string).
    for key in _SPECIAL_KEYS:
        if key in tokens:
            state = _token_state(tokens[key], named, f"{folder}: {key}")
            if state["content"] not in listed and all(state != queued for _, queued in queue):
                queue.append((None, state))
    # transformers marks every named token special when adding it.
    added = [(i, AddedToken(**{**s, "special": s["special"] or s["content"] in named})) for i, s in queue]
    return tokens, added


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str) -> Tokenizer:
    """CLIP's pipeline: NFC, whitespace runs to one space, lowercase; CLIP's split; GPT-2 bytes; BPE with </w>."""
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return backend


@dataclass
class CLIPTokenizer:
    """CLIP prompt tokenizer: text to bos + BPE ids + eos, truncated and padded to model_max_length."""

    model_max_length: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    backend: Tokenizer = field(repr=False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, default_max_length: int | None = None) -> CLIPTokenizer:
        """Read a pipeline's tokenizer/ folder; default_max_length applies only if its config gives no limit."""
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(
                f"tokenizer folder {folder} does not exist: expected tokenizer_config.json with tokenizer.json, "
                "or vocab.json and merges.txt"
            )
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise UserError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        vocab, merges, json_added = _vocab_and_merges(folder)
        tokens, added = _special_and_added(folder, config, json_added)
        backend = _clip_backend(vocab, merges, _token_content(tokens["unk_token"], f"{folder}: unk_token"))
        backend.add_tokens([token for _, token in added])
        # A listed token whose id the backend did not reproduce would shift the ids the text encoder expects.
        for i, token in added:
            if i is not None and backend.token_to_id(token.content) != i:
                got = backend.token_to_id(token.content)
                raise UserError(f"{folder}: added token {token.content!r} is listed with id {i} but gets id {got}")
        # Every named token was added above (after the vocabulary if it was missing), so each has an id.
        bos, eos, pad = (
            backend.token_to_id(_token_content(tokens[key], key)) for key in ("bos_token", "eos_token", "pad_token")
        )
        return cls(
            model_max_length=_max_length(config, default_max_length, config_file),
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            backend=backend,
        )

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without bos/eos and untruncated."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int32 (N, model_max_length): bos + ids + eos, truncated keeping eos last, padded with pad_token_id."""
        if isinstance(texts, str):
            raise TypeError("CLIPTokenizer takes a list of prompts, not one string")
        out = np.full((len(texts), self.model_max_length), self.pad_token_id, dtype=np.int32)
        keep = self.model_max_length - 2
        for row, text in enumerate(texts):
            # One encode per text, not encode_batch: its thread pool warns and goes serial in forked data workers.
            ids = [self.bos_token_id, *self.encode(text)[:keep], self.eos_token_id]
            out[row, : len(ids)] = ids
        return out

