"""Parsing for `fastsd.config`: a YAML value or an override string made the field's type, a dotted
key (or a section's main key, or a section from a mapping) set on the tree, and the line of each
key in a YAML file (for error messages)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Literal

import yaml

__all__ = ["coerce", "set_key", "fields_of", "key_lines", "line_of"]

def coerce(key: str, value, hint):
    """Convert `value` (a YAML value or an override string) to the field type `hint`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(hint)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in typing.get_args(hint):
            raise ValueError(f"{key}: expected one of {typing.get_args(hint)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(key, value, args[0])
    if origin is dict:  # a YAML mapping, or on the command line a flow mapping: {enable_thinking: false}
        try:
            items = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError:
            items = value
        items = {} if items is None else items
        if not isinstance(items, dict) or not all(isinstance(k, str) for k in items):
            raise ValueError(f"{key}: expected a mapping such as {{name: value}}, got {value!r}")
        return dict(items)
    if origin is list:  # a YAML list, or an override "[a, b]" or "a,b"
        items = yaml.safe_load(value) if isinstance(value, str) else value
        if isinstance(items, str):
            items = [v.strip() for v in items.split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(hint)
        return [coerce(key, v, arg) for v in items]
    if origin is tuple:
        items = yaml.safe_load(value) if isinstance(value, str) else value
        args = typing.get_args(hint)
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(key, v, a) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, str):
            value = {"true": True, "false": False, "1": True, "0": False,  # and YAML 1.1's words
                     "on": True, "off": False, "yes": True, "no": False}.get(value.lower(), value)
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        parsed = value
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string: parse numbers ourselves
            try:
                parsed = hint(value.strip())
            except ValueError:  # not a number, or more digits than Python reads
                raise ValueError(f"{key}: expected {hint.__name__}, got {_shown(value)}") from None
        ok = isinstance(parsed, int) if hint is int else isinstance(parsed, (int, float))
        if not ok or isinstance(parsed, bool):
            raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
        if hint is int and not -2**63 <= parsed < 2**63:  # every int key feeds a 64-bit counter or seed
            raise ValueError(f"{key}: {_shown(parsed)} is out of range (at most a 64-bit integer)")
        if hint is float and not math.isfinite(parsed):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return hint(parsed)
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {hint} for {key}")


def _shown(value) -> str:
    """`value` for an error message, a long one cut (a number of 5000 digits is not repeated)."""
    text = repr(value) if isinstance(value, str) else str(value) if isinstance(value, int) else repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _closest(word: str, known) -> str | None:
    """The name of `known` that `word` most likely meant: a close spelling (difflib), else one that
    holds it or that it holds, at least 3 characters long ("url" -> "base_url", "critic_model" -> "model")."""
    known = list(known)
    close = difflib.get_close_matches(word, known, n=1)
    if close:
        return close[0]
    w = word.lower()
    holds = [k for k in known if min(len(w), len(k)) >= 3 and (w in k or k in w)]
    return max(holds, key=lambda k: difflib.SequenceMatcher(None, w, k).ratio(), default=None)


def _dotted(node, prefix: str = ""):
    """Every key of the tree under `node`, dotted."""
    for name, value in ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node)):
        yield from _dotted(value, f"{prefix}{name}.") if dataclasses.is_dataclass(value) else [prefix + name]


def unknown(what: str, name: str, known, root=None) -> ValueError:
    """ValueError for the unknown `name`, with a "did you mean": the keys of other sections with
    that very name (`lr` -> optim.lr), else a name of its own section (`known`) like it, else a key
    of any section (`root`, the whole tree) whose name is like it (`critic.max_retries` -> critic.retries)."""
    section, _, word = name.rpartition(".")
    keys = list(_dotted(root)) if root is not None else []
    same = [k for k in keys if k.rsplit(".", 1)[-1] == word]
    close = _closest(word, known)
    if same:
        guess = " or ".join(same)
    elif close:
        guess = f"{section + '.' if section else ''}{close}"
    else:
        last = _closest(word, [k.rsplit(".", 1)[-1] for k in keys])
        guess = next((k for k in keys if k.rsplit(".", 1)[-1] == last), None) if last else None
    return ValueError(f"{name}: unknown config {what}{f' (did you mean {guess}?)' if guess else ''}")


def set_key(cfg, dotted: str, value) -> list[str]:
    """Set `dotted` (a key, a section's main key, or a section from a mapping); returns the keys set."""
    parts = dotted.split(".")
    node, path = cfg, []
    for part in parts[:-1]:
        path.append(part)
        child = getattr(node, part, None) if part in fields_of(node) else None
        if not dataclasses.is_dataclass(child):
            sections = [k for k in fields_of(node) if dataclasses.is_dataclass(getattr(node, k))]
            raise unknown("section", ".".join(path), sections, cfg)
        node = child
    name = parts[-1]
    if name not in fields_of(node):
        raise unknown("key", dotted, fields_of(node), cfg)
    current = getattr(node, name)
    if dataclasses.is_dataclass(current):
        if isinstance(value, dict):
            return [key for k, v in value.items() for key in set_key(cfg, f"{dotted}.{k}", v)]
        if getattr(current, "main", None) is None:
            raise ValueError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.{next(iter(fields_of(current)))}")
        return set_key(cfg, f"{dotted}.{current.main}", value)
    setattr(node, name, coerce(dotted, value, fields_of(node)[name]))
    return [dotted]


def fields_of(node) -> dict:
    hints = typing.get_type_hints(type(node))
    return {f.name: hints[f.name] for f in dataclasses.fields(node)}


def key_lines(path: str) -> dict[str, int]:
    """Dotted key -> 1-based line of each key in a YAML mapping file (for error messages).
    A key set twice in one mapping is a ValueError naming both lines (YAML keeps the last, silently)."""
    with open(path) as f:
        root = yaml.compose(f)
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                key, line = f"{prefix}{k.value}", k.start_mark.line + 1
                if key in seen:
                    raise ValueError(f"{path}:{line}: {key}: set twice (first at line {seen[key]})")
                seen[key] = line
                out.setdefault(key, line)
                walk(v, key + ".")

    walk(root, "")
    return out


def line_of(lines: dict[str, int], key: str) -> int | None:
    """The line of `key`, or of the shorthand that set it (`teacher: ema` sets teacher.kind)."""
    parts = key.split(".")
    return next((lines[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if k in lines), None)
