"""The one config parser of ``atlas-rl``, the recipes and the runner: TRL's ``TrlParser`` over our dataclasses.

Every option is a dataclass field (its ``metadata["help"]`` is the help text, ``metadata["aliases"]`` extra flag
names). Values come, lowest precedence first, from the dataclass default, :meth:`ConfigParser.set_defaults`
(e.g. a ``--quick`` preset), the YAML file of ``--config FILE``, ``--set KEY=VALUE`` (a YAML line: kept for the
commands the docs quote), and typed flags (``--learning_rate 5e-5``, ``--ks 2,4`` or ``--ks 2 4``). A flag given
on the command line always wins, whatever its value (no comparing with defaults to guess what was given).

What this adds to ``TrlParser``: tuple fields (``tuple[int, ...]`` and fixed-length tuples), comma lists,
``--set``, a type check of values that bypass argparse (YAML), and one-line errors with exit status 2 for every
mistake (unknown key or flag, wrong type, bad value, missing or malformed config file).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NoReturn, Union

import yaml
from trl import TrlParser

__all__ = ["ConfigError", "ConfigParser", "one_line"]


class ConfigError(ValueError):
    """A configuration mistake the user can fix (the message says how)."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------------------------------------------ types
def _optional(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _item_types(tp: Any) -> tuple[Any, int | None] | None:
    """For a list/tuple type: (item type, fixed length or None); else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return (args[0] if args else str), None
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], None
        return (args[0] if args else str), len(args) or None
    return None


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ConfigError(f"{name} must be true or false, got {v!r}")


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        return int(v)
    raise ConfigError(f"{name} must be an integer, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    try:
        if isinstance(v, str):
            return float(v)  # YAML 1.1 reads 5e-5 (no dot) as a string
    except ValueError:
        pass
    raise ConfigError(f"{name} must be a number, got {v!r}")


def _as_str(name: str, v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ConfigError(f"{name} must be a string, got {v!r}")


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _scalar(name: str, v: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        if v not in typing.get_args(tp):
            raise ConfigError(f"{name} must be one of {list(typing.get_args(tp))}, got {v!r}")
        return v
    check = _SCALARS.get(tp)
    return check(name, v) if check is not None else v  # other types (dict, Any, ...): as given


def check_value(name: str, v: Any, tp: Any) -> Any:
    """``v`` converted to the field type ``tp`` (int -> float, list -> tuple, "2,4" -> [2, 4]) or ConfigError."""
    tp, optional = _optional(tp)
    if v is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be null")
    items = _item_types(tp)
    if items is None:
        return _scalar(name, v, tp)
    item_tp, length = items
    if isinstance(v, str):
        v = [_from_text(name, x.strip(), item_tp) for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{name} must be a list, got {v!r}")
    if length is not None and len(v) != length:
        raise ConfigError(f"{name} must hold {length} values, got {list(v)}")
    out = [check_value(f"{name}[{i}]", x, item_tp) for i, x in enumerate(v)]
    return tuple(out) if typing.get_origin(tp) is tuple else out


def _from_text(name: str, text: str, tp: Any) -> Any:
    try:
        return tp(text) if tp in (int, float) else text
    except ValueError:
        raise ConfigError(f"{name}: invalid {tp.__name__} value {text!r}") from None


# ------------------------------------------------------------------------------------------------ parser
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help; the description as written (recipes put their launch command there)."""


class ConfigParser(TrlParser):
    """``TrlParser`` over ``dataclass_types`` with tuples, comma lists, ``--set`` and one-line errors."""

    def __init__(self, dataclass_types: Sequence[type], prog: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types=list(dataclass_types), prog=prog, allow_abbrev=False, **kwargs)
        self.add_argument("--config", default=None, metavar="YAML", help="YAML file of option values")
        self.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="an option as a YAML line (repeatable)"
        )

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        tp, _ = _optional(field.type)
        if tp is dict or typing.get_origin(tp) is dict:  # a mapping flag takes YAML: --extra '{a: 1}'
            kwargs = {k: v for k, v in field.metadata.items() if k != "aliases"}
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
            parser.add_argument(f"--{field.name}", type=_yaml_mapping, default=default, **kwargs)
            return None
        items = _item_types(tp)
        if items is None or typing.get_origin(tp) is list:
            return TrlParser._parse_dataclass_field(parser, field)
        item_tp, length = items  # a tuple field: like a list, converted to a tuple when the dataclass is built
        kwargs = {k: v for k, v in field.metadata.items() if k != "aliases"}
        aliases = field.metadata.get("aliases", [])
        names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        parser.add_argument(
            *names, *([aliases] if isinstance(aliases, str) else aliases), type=item_tp, nargs=length or "+",
            default=default, **kwargs,
        )  # fmt: skip

    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit status 2 (argparse prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")

    # ---- parsing
    def parse(self, argv: Sequence[str] | None = None, remaining: bool = False, strict: bool = True) -> Any:
        """The dataclass instances (a tuple; one instance alone when there is one type).

        With ``remaining=True``: ``(instances, extra)`` where ``extra`` maps keys no dataclass knows, from the
        config file or ``--set`` (YAML values), and flags no dataclass knows (``--key value`` pairs, raw strings)
        to their values, for a second parser (e.g. a trainer config); without it such keys are errors.
        """
        saved = ({a: a.default for a in self._actions}, dict(self._defaults))
        try:
            return self._parse(list(sys.argv[1:] if argv is None else argv), remaining, strict)
        except (ConfigError, ValueError, TypeError, OSError, yaml.YAMLError) as e:
            self.error(one_line(e))
        finally:  # config values are defaults of this parse only: the parser can parse again
            for a, d in saved[0].items():
                a.default = d
            self._defaults = saved[1]

    def peek(self, argv: Sequence[str]) -> Any:
        """The dataclass instances from the options this parser knows, ignoring everything else (a first stage
        that decides which parser parses the whole command line, e.g. the bench scenario)."""
        return self.parse(argv, remaining=True, strict=False)[0]

    def _parse(self, argv: list[str], remaining: bool, strict: bool) -> Any:
        ns, rest = self.parse_known_args(self._split_commas(argv))
        values = _load_config(ns.config) | _parse_sets(ns.set)
        known = {a.dest for a in self._actions}
        unknown = {k: v for k, v in values.items() if k not in known}
        if unknown and not remaining:
            raise ConfigError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(self._field_names())}")
        if values:  # config file and --set values become this parse's defaults: flags still win
            lists = {a.dest for a in self._list_actions()}
            given = {k: v for k, v in values.items() if k in known}
            self.set_defaults(**{k: _listed(v, k in lists) for k, v in given.items()})
            ns, rest = self.parse_known_args(self._split_commas(argv))
        if rest and not remaining:
            raise ConfigError(f"unknown argument(s) {rest}; valid options: {sorted(self._field_names())}")
        objs = tuple(self._build(dtype, ns) for dtype in self.dataclass_types)
        objs_out = objs[0] if len(objs) == 1 else objs
        return (objs_out, {**unknown, **_pairs(rest, strict)}) if remaining else objs_out

    def typed(self, values: dict[str, Any], known_as: str | None = None) -> dict[str, Any]:
        """``values`` (YAML values or command-line strings, e.g. the ``extra`` of :meth:`parse`) checked against
        this parser's dataclass fields and converted to their types; only the given keys come back.

        For options that belong to a second config (a trainer's) without building it: unknown keys and values
        of the wrong type are one-line errors (exit 2), like everything else this parser reads. ``known_as``
        names the valid keys in the unknown-key error (default: this parser's dataclasses)."""
        try:
            return self._typed(values, known_as)
        except (ConfigError, ValueError, TypeError) as e:
            self.error(one_line(e))

    def _typed(self, values: dict[str, Any], known_as: str | None) -> dict[str, Any]:
        unknown = sorted(set(values) - self._field_names())
        if unknown:
            known_as = known_as or " or ".join(d.__name__ for d in self.dataclass_types)
            raise ConfigError(f"unknown option(s) {unknown}: not {known_as} fields")
        hints: dict[str, Any] = {}
        for dtype in self.dataclass_types:
            hints.update(typing.get_type_hints(dtype))
        saved = [(a, a.default) for a in self._actions]
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        try:
            ns, _ = self.parse_known_args(self._split_commas(_as_argv({k: v for k, v in values.items() if _text(v)})))
        finally:
            for a, d in saved:
                a.default = d
        typed = {k: v for k, v in values.items() if not _text(v)} | vars(ns)
        return {k: check_value(k, v, hints[k]) for k, v in typed.items() if k in values}

    def _field_names(self) -> set[str]:
        return {f.name for d in self.dataclass_types for f in dataclasses.fields(d) if f.init}

    def _build(self, dtype: type, ns: argparse.Namespace) -> Any:
        hints = typing.get_type_hints(dtype)
        fields = [f for f in dataclasses.fields(dtype) if f.init]
        kw = {f.name: check_value(f.name, getattr(ns, f.name), hints[f.name]) for f in fields}
        return dtype(**kw)

    def _list_actions(self) -> list[argparse.Action]:
        return [a for a in self._actions if a.nargs in ("+", "*") or (isinstance(a.nargs, int) and a.nargs > 0)]

    def _split_commas(self, argv: list[str]) -> list[str]:
        """``--ks 2,4`` and ``--ks=2,4`` -> ``--ks 2 4`` for list/tuple options."""
        lists = {
            s for a in self._actions if a.nargs in ("+", "*") or isinstance(a.nargs, int) for s in a.option_strings
        }
        out: list[str] = []
        in_list = False
        for tok in argv:
            flag, eq, val = tok.partition("=")
            if tok.startswith("-") and not _is_number(tok):
                in_list = flag in lists
                if in_list and eq:
                    out += [flag, *[x for x in val.split(",") if x]]
                    continue
                out.append(tok)
            elif in_list:
                out += [x for x in tok.split(",") if x]
            else:
                out.append(tok)
        return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _listed(v: Any, is_list: bool) -> Any:
    """A YAML string for a list option (``ks: 2,4``) as its items."""
    return v.split(",") if is_list and isinstance(v, str) else v


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {one_line(e)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a YAML mapping of option: value")
    for key, value in (values.pop("env", None) or {}).items():  # TrlParser's convention: env vars for the run
        os.environ[str(key)] = str(value)
    return values


def _yaml_mapping(text: str) -> dict[str, Any]:
    """A mapping flag's value: a YAML (or JSON) mapping."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not YAML: {one_line(e)}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{key: value}}', got {text!r}")
    return value


def _parse_sets(items: Iterable[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _text(v: Any) -> bool:
    """A command-line value (a string or a list of strings), to be converted by argparse."""
    return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v))


def _as_argv(values: dict[str, str | list[str]]) -> list[str]:
    return [tok for k, v in values.items() for tok in (f"--{k}", *([v] if isinstance(v, str) else v))]


def _pairs(rest: list[str], strict: bool = True) -> dict[str, Any]:
    """``["--a", "1", "--b", "x", "y", "--c"]`` -> ``{"a": "1", "b": ["x", "y"], "c": True}`` (strings);
    ``strict=False`` drops what is not ``--key [values]`` instead of raising."""
    out: dict[str, Any] = {}
    key = None
    for tok in rest:
        if tok.startswith("--") and not _is_number(tok):
            name, eq, val = tok[2:].partition("=")
            key = name.replace("-", "_")
            out[key] = val if eq else True
            key = None if eq else key
        elif key is None:
            if strict:
                raise ConfigError(f"unexpected argument {tok!r}")
        elif out[key] is True:
            out[key] = tok
        else:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [tok]
    return out
