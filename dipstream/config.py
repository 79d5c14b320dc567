"""Typed configs turned into command-line options (one definition, no second copy in the CLI)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def base_type(tp):
    """(python type, optional?) of a field annotation like `float | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """Add one --option per field of dataclass `cls` (nested dataclasses are flattened), but for
    the names in its CLI_HIDDEN (fields a command built on another's config does not use)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in getattr(cls, "CLI_HIDDEN", ()):
            continue
        tp, _ = base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, prefix)
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "(default:" not in help_text:  # a help that explains its default says it once
            help_text = f"{help_text} (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help
        kwargs = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, type=tp, metavar=f.metadata.get("metavar", tp.__name__.upper()),
                                **kwargs)


def leaf_names(cls) -> set[str]:
    """Names of every leaf field of dataclass `cls`, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        tp, _ = base_type(hints[f.name])
        out |= leaf_names(tp) if dataclasses.is_dataclass(tp) else {f.name}
    return out


def flat(cls, **values):
    """Build dataclass `cls` from flat keyword values, as the command line does (nested configs
    filled from their own fields); an unknown key is an error."""
    unknown = set(values) - leaf_names(cls)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return from_namespace(cls, argparse.Namespace(**values))


def from_namespace(cls, ns: argparse.Namespace, prefix: str = ""):
    """Build dataclass `cls` from parsed options; options not given keep the field defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp, _ = base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_namespace(tp, ns, prefix)
        elif hasattr(ns, prefix + f.name):
            kwargs[f.name] = getattr(ns, prefix + f.name)
    return cls(**kwargs)
