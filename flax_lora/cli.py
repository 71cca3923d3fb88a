"""Command lines generated from typed config dataclasses: one flag per field, its help text in the field."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

Config = TypeVar("Config")
MIXED_PRECISION = ("no", "bf16", "fp16")


def flag(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that carries its command-line help (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def check_choices(config: Any) -> None:
    """Raise ValueError naming the first flag whose value is not one of its choices."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise ValueError(f"--{f.name} must be one of {', '.join(choices)}; got {value!r}")


def _base_type(tp: Any) -> Any:
    """The non-None type of an annotation like `int | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def build_parser(config_class: type, description: str) -> argparse.ArgumentParser:
    """argparse parser with a flag per field: bools are --x/--no-x, lists are repeatable flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        tp = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
        if typing.get_origin(tp) is list:
            kwargs.update(action="append", type=typing.get_args(tp)[0], default=None)
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def config_from_args(parser: argparse.ArgumentParser, config_class: type[Config], argv: list[str] | None) -> Config:
    """Parse flags with a built parser; a ValueError from the config exits with a usage message."""
    namespace = parser.parse_args(argv)
    try:
        return config_class(**vars(namespace))
    except ValueError as e:
        parser.error(str(e))


def parse_config(config_class: type[Config], description: str, argv: list[str] | None = None) -> Config:
    """Parse flags into a validated config."""
    return config_from_args(build_parser(config_class, description), config_class, argv)
