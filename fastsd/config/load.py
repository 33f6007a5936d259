"""Loading a `TrainConfig`: defaults, then a YAML file, then dotted `key=value` overrides, validated.

    fastsd-train --config run.yaml condition=reference optim.lr=3e-4 teacher=ema
"""

from __future__ import annotations

import dataclasses

import yaml

from .check import check
from .parse import key_lines, line_of, set_key
from .tree import TrainConfig

__all__ = ["load_config", "to_dict", "to_yaml"]


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    cfg = TrainConfig()
    lines: dict[str, int] = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"--config: cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--config: {path} is not valid YAML: {e}") from None
        except ValueError as e:  # an integer of more digits than Python reads
            raise ValueError(f"--config: {path}: a value YAML cannot read ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config: {path} must hold a mapping of keys to values")
        lines = key_lines(path)
        for key, value in data.items():
            try:
                set_key(cfg, str(key), value)
            except ValueError as e:
                line = line_of(lines, str(e).split(":", 1)[0]) or lines.get(str(key))
                raise ValueError(f"{path}{f':{line}' if line else ''}: {e}") from None
    overridden = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item}: overrides are key=value")
        overridden.update(set_key(cfg, key.strip(), _unquote(value)))
    try:
        check(cfg)
    except ValueError as e:
        bad = str(e).split(":", 1)[0]  # every message starts with the dotted key
        line = line_of(lines, bad)
        if line and bad not in overridden:  # the value came from the file
            raise ValueError(f"{path}:{line}: {e}") from None
        raise
    return cfg


def to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)
    out["optim"]["betas"] = list(out["optim"]["betas"])
    return out


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _unquote(value: str):
    """An override in quotes is a YAML string, unquoted (a shell passes `key="a b"` without them,
    but `key='"a b"'` or a config tool may not): `templates.student="Q: {question}"` is the text
    inside, `optim.lr="1e-4"` the number. Anything else is passed on as written."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            unquoted = yaml.safe_load(text)
        except yaml.YAMLError:
            return value
        if isinstance(unquoted, str):
            return unquoted
    return value
