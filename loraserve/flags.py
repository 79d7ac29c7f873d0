"""Command-line flags that take their default, type and help from where the
value is used: a dataclass field or a function's keyword parameter. A default
is then written once, and the CLI cannot drift from the library."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Callable


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, source: Any, name: str, *,
             help: str | None = None, show: Callable[[Any], str] | None = None, **kwargs: Any) -> argparse.Action:
    """Add `flag` whose default is `name`'s in `source` (see `default_of`).

    The type comes from the annotation (int or float) unless `type` is given;
    the help is `help`, else the first sentence of the field's docstring, with
    the default appended. `show` writes the default the way it is typed (a
    byte count as '512MiB') for a `type` that parses it back."""
    owner, attr, value = _resolve(source, name)
    if show is not None and value is not None:
        value = show(value)
    elif "type" not in kwargs and "action" not in kwargs and (kind := _number_type(owner, attr, value)):
        kwargs["type"] = kind
    text = help if help is not None else _as_help(field_docs(owner).get(attr, ""))
    if value is not None:
        text = f"{text} (default: %(default)s)" if text else "default: %(default)s"
    return parser.add_argument(flag, default=value, help=text or None, **kwargs)


def default_of(source: Any, name: str) -> Any:
    """The default of field `name` of dataclass `source`, or of keyword `name` of
    function `source`. A dotted name goes into a nested default:
    `default_of(WorkloadConfig, "first_input.mean")`."""
    return _resolve(source, name)[2]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under its annotation), from the
    source; empty when the source is not available."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    return {node.target.id: inspect.cleandoc(after.value.value) for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)}


def first_sentence(text: str) -> str:
    """Up to the first full stop followed by a space, without the stop."""
    return re.split(r"(?<=\.)\s", " ".join(text.split()), maxsplit=1)[0].removesuffix(".")


def _as_help(doc: str) -> str:
    """A docstring's first sentence in argparse's style: lower case, % escaped."""
    text = first_sentence(doc).replace("%", "%%")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _resolve(source: Any, name: str) -> tuple[Any, str, Any]:
    """(owner, attribute, default) of a possibly dotted `name` in `source`."""
    head, *rest = name.split(".")
    owner, attr, value = source, head, _own_default(source, head)
    for part in rest:
        owner, attr, value = type(value), part, getattr(value, part)
    return owner, attr, value


def _own_default(source: Any, name: str) -> Any:
    if dataclasses.is_dataclass(source):
        field = {f.name: f for f in dataclasses.fields(source)}[name]
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise ValueError(f"{source.__name__}.{name} has no default")
    value = inspect.signature(source).parameters[name].default
    if value is inspect.Parameter.empty:
        raise ValueError(f"{source.__name__}({name}) has no default")
    return value


def _number_type(owner: Any, attr: str, default: Any) -> type | None:
    """int or float from the annotation (`float | None` counts as float), else
    from the default, else None (a string)."""
    try:
        hint = typing.get_type_hints(owner).get(attr)
    except (NameError, TypeError):
        hint = None if isinstance(default, bool) else type(default)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (int, float) else None
