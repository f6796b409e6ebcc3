"""Command-line flags generated from a config dataclass: one flag per field, named after it
(`global_batch_size` -> `--global-batch-size`), typed by its annotation, defaulting to its default,
documented by the string literal under it (its docstring). So a new setting is one field.

A field's `metadata` may refine its flag: "flag" (another name, e.g. "--no-learn-sigma" for a
boolean that defaults to True), "choices", "metavar", "nargs" (of a list field; default "+"),
"required", "positional", "cli" (False: not a flag), and bound its value: "min", "max"
(inclusive), "infinite" (True: a float may be +inf, an open end). Booleans become switches:
`--compile` sets True; a True default gets `--no-NAME`; an optional boolean (`bool | None`,
default None: decided by other settings) gets both.

`check_fields` is the one place every config's values are checked against their fields (the CLI's
flags, a study spec's tables and library callers alike): the annotated type, a finite number for
every float, the "min"/"max" bounds, a non-empty text for a required one.
Nothing here imports torch: the parser of every subcommand is built without loading the library."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any

from ditlab.errors import UserError


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring under it} of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # the class's statements
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _help(doc: str, default: Any, shown: bool) -> str:
    if not shown or default is None or isinstance(default, bool):
        return doc
    return f"{doc} (default {default})"


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass `cls` (except `skip` and fields with metadata cli=False)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or meta.get("cli", True) is False:
            continue
        typ, optional = _unwrap(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        doc = docs.get(f.name, "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": _help(doc, default, not required)}
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=meta.get("metavar", f.name.upper()), help=doc,
                                **({"nargs": "?", "default": default} if not required else {}))
            continue
        name = meta.get("flag", "--" + f.name.replace("_", "-"))
        if typ is bool and optional:  # None: decided later; --NAME and --no-NAME both given
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if typ is bool:
            parser.add_argument(name, action="store_false" if default else "store_true", **kwargs)
            continue
        origin = typing.get_origin(typ)
        if origin in (list, tuple):
            typ, kwargs["nargs"] = typing.get_args(typ)[0], meta.get("nargs", "+")
        kwargs.update(type=typ, default=default, required=required)
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = list(meta[key]) if key == "choices" else meta[key]
        parser.add_argument(name, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass `cls` built from the parsed flags its fields made (plus `extra`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **extra})


def flag_name(field: dataclasses.Field, prefix: str = "--") -> str:
    """The flag a value of `field` is given with (`global_batch_size` -> `--global-batch-size`)."""
    if field.metadata.get("positional"):
        return field.metadata.get("metavar", field.name.upper())
    return prefix + field.name.replace("_", "-")


def _kind_error(value: Any, typ: Any, infinite: bool = False) -> str | None:
    """Why `value` is not of the annotated type `typ` (None when it is); `infinite` lets a float be
    +inf (an open end of an interval), never nan or -inf."""
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        inner = typing.get_args(typ)[0]
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        if inner is str:  # a list of texts may hold integers: class ids as library callers give them
            value = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return next((_kind_error(v, inner, infinite) for v in value if _kind_error(v, inner, infinite)), None)
    if typ is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if typ is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if infinite and value == math.inf:
            return None
        return None if math.isfinite(value) else "must be a finite number"
    if typ is str:
        return None if isinstance(value, str) else "must be a text"
    return None


def check_fields(obj: Any, prefix: str = "--") -> None:
    """Refuse a field of the dataclass `obj` whose value is of the wrong type, a float that is not
    finite (nan, inf: argparse and TOML both read them; metadata "infinite" admits +inf), outside its
    metadata "min"/"max", or an empty text where a value is required, in one line naming its flag
    (`prefix` + the field's name)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, (typ, optional) = getattr(obj, f.name), _unwrap(hints[f.name])
        flag = flag_name(f, prefix)
        if value is None:
            if optional:
                continue
            raise UserError(f"{flag}: a value is required")
        why = _kind_error(value, typ, f.metadata.get("infinite", False))
        if why is not None:
            raise UserError(f"{flag} {value!r} {why}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and typ is str and not value.strip():
            raise UserError(f"{flag} {value!r}: give a non-empty value")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            bound = (f"between {low} and {high}" if low is not None and high is not None
                     else f"at least {low}" if low is not None else f"at most {high}")
            raise UserError(f"{flag} {value} must be {bound}")
