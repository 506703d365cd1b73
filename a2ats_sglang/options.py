"""Typed options: frozen dataclasses whose fields carry their help text and bounds.

Declare every field with :func:`option`; that one table then gives the defaults,
the validation (:func:`validate`), the argparse flags (:func:`add_arguments`,
read back with :func:`given`) and the parsing of raw strings (:func:`parser_for`,
e.g. for environment variables)::

    @dataclass(frozen=True)
    class Fit:
        num_codes: int = option(512, "codes per KV head", min=2, max=32767)

        def __post_init__(self):
            validate(self, where=cli_flag)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

_KEY = "a2ats_option"


@dataclass(frozen=True)
class Option:
    """What :func:`option` stores in a field's metadata. Bounds are inclusive unless
    ``min_exclusive`` / ``max_exclusive``; for a tuple they bound each element."""

    help: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple | None = None
    cli: dict = dataclasses.field(default_factory=dict)  # extra argparse keywords (nargs, type, metavar)

    def allowed(self) -> str:
        """The allowed values in words: ``in (0, 1]``, ``>= 0``, ``one of (...)``; "" if unbounded."""
        if self.choices is not None:
            return f"one of {self.choices}"
        if self.min is not None and self.max is not None:
            return f"in {'(' if self.min_exclusive else '['}{self.min}, {self.max}{')' if self.max_exclusive else ']'}"
        if self.min is not None:
            return f"{'>' if self.min_exclusive else '>='} {self.min}"
        return "" if self.max is None else f"{'<' if self.max_exclusive else '<='} {self.max}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, tuple):
            return all(self.accepts(v) for v in value)
        if self.choices is not None and value not in self.choices:
            return False
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            return False
        return self.max is None or (value < self.max if self.max_exclusive else value <= self.max)


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, max_exclusive: bool = False, choices: Iterable | None = None,
           cli: dict | None = None) -> Any:
    """A dataclass field with a default, its help text and its allowed values
    (``cli``: extra keywords for ``argparse.add_argument``)."""
    spec = Option(help, min, max, min_exclusive, max_exclusive, tuple(choices) if choices is not None else None,
                  dict(cli or {}))
    return dataclasses.field(default=default, metadata={_KEY: spec})


def spec(f: dataclasses.Field) -> Option:
    """The :class:`Option` of a field declared with :func:`option`."""
    return f.metadata[_KEY]


def default_of(cls: type, name: str) -> Any:
    """The declared default of ``cls.name`` (to share a default between tables)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def cli_flag(name: str) -> str:
    """``num_codes`` -> ``--num-codes``."""
    return "--" + name.replace("_", "-")


def parse_bool(raw: Any) -> bool:
    """1/true/yes/on -> True; 0/false/no/off/"" -> False."""
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value in ("1", "true", "yes", "on")
    raise ValueError(f"not a boolean: {raw!r}")


def parse_int_tuple(raw: str) -> tuple[int, ...]:
    """``"2048,8192"`` -> ``(2048, 8192)``."""
    return tuple(int(x) for x in str(raw).split(",") if x.strip())


def parser_for(default: Any) -> Callable[[str], Any]:
    """str -> value of the default's type (bool: 1/0/true/false/...; tuple: comma-separated ints)."""
    if isinstance(default, bool):
        return parse_bool
    return parse_int_tuple if isinstance(default, tuple) else type(default)


def validate(obj: Any, prefix: str = "", where: Callable[[str], str] | None = None) -> None:
    """Raise ValueError for the first field of ``obj`` outside its bounds:
    ``{prefix}{field} must be {allowed}, got {value} ({where(field)})``."""
    for f in dataclasses.fields(obj):
        o, value = spec(f), getattr(obj, f.name)
        if not o.accepts(value):
            hint = f" ({where(f.name)})" if where else ""
            raise ValueError(f"{prefix}{f.name} must be {o.allowed()}, got {value!r}{hint}")


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, flag: Callable[[str], str] = cli_flag,
                  dest: Callable[[str], str] = str, exclude: Iterable[str] = ()) -> None:
    """One flag per field of ``cls`` (argparse default None: :func:`given` returns what was given).
    A bool is ``--flag`` (true) or ``--flag 0/1``; a tuple is comma-separated ints."""
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        o = spec(f)
        kw: dict[str, Any] = {"type": parser_for(f.default)}
        if isinstance(f.default, bool):
            kw.update(nargs="?", const=True)
        if o.choices is not None:
            kw["choices"] = o.choices
        kw.update(o.cli)
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        notes = [f"default: {shown}"] if shown not in ("", None) else []
        notes += [o.allowed()] if o.allowed() and o.choices is None else []  # argparse shows choices itself
        text = o.help + (f" ({'; '.join(notes)})" if notes else "")
        parser.add_argument(flag(f.name), dest=dest(f.name), default=None, help=text.replace("%", "%%"), **kw)


def given(ns: argparse.Namespace, cls: type, dest: Callable[[str], str] = str, exclude: Iterable[str] = ()) -> dict:
    """{field: value} of the flags :func:`add_arguments` added that were given (lists become tuples)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, dest(f.name), None)
        if f.name not in exclude and value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out
