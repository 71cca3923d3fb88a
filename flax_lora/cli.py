"""Command lines generated from typed config dataclasses: one flag per field, its help text in the field."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, TypeVar

Config = TypeVar("Config")
MIXED_PRECISION = ("no", "bf16", "fp16")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"


def flag(default: Any, help: str, choices: tuple[str, ...] | None = None, nargs: str | None = None) -> Any:
    """A dataclass field that carries its command-line help (and allowed values; `nargs="+"`: a list flag that takes
    several values at once)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "nargs": nargs})


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
        if typing.get_origin(tp) is list and f.metadata.get("nargs"):
            kwargs.update(action="extend", nargs=f.metadata["nargs"], type=typing.get_args(tp)[0], default=None)
        elif typing.get_origin(tp) is list:
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


def reexec_with_huge_pages() -> None:
    """Restart this command (same PID) with glibc's huge pages for large blocks, unless GLIBC_TUNABLES names them.

    XLA:CPU allocates a step's buffers anew each step and glibc maps large blocks fresh every time: huge pages cut
    the page faults about 30x and the CPU step about 8% (README: Benchmark). glibc reads GLIBC_TUNABLES only when a
    process starts, hence the exec; call it after the flags parsed, so --help and flag errors stay one quick run.
    A hugetlb value the user set is kept: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts out.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or HUGE_PAGES_TUNABLE in tunables or not sys.executable:
        return
    # Only a plain `python [options] script args` run, with sys.argv as it came, is a command the exec can repeat.
    if len(sys.orig_argv) <= len(sys.argv) or sys.orig_argv[-len(sys.argv) :] != sys.argv:
        return
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"; musl has none
        if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):  # the tunable came in 2.35
            return
    except (ValueError, OSError, AttributeError):
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}=1"]))}
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # orig_argv keeps the interpreter's own options (-X, -W, -u)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # e.g. an interpreter that cannot be exec'd again: run without them
        pass
