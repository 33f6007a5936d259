"""The conditions by name: the registered built-ins, and user conditions by import path.

`condition=NAME` picks a registered condition (`fastsd.feedback.condition.register`);
`condition=module.path:Class` imports `Class` from `module.path` when the config loads, before the
model does: a missing module or attribute, or a class that does not fit the interface, is a
ValueError naming the key.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

from . import conditions, peer  # noqa: F401  (the built-ins register themselves)
from .condition import _REGISTRY, Condition

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["condition_class", "get_condition", "registered"]


def registered() -> tuple[str, ...]:
    """The registered conditions' names."""
    return tuple(_REGISTRY)


def condition_class(name: str, key: str = "condition") -> type[Condition]:
    """The class `name` stands for: a registered name or `module.path:Class`; ValueError naming `key`."""
    names = registered()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise ValueError(f"{key}: unknown condition {name!r}; expected one of {', '.join(names)}, or a user "
                         "condition as module.path:Class (docs/conditions.md)")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{key}: cannot import module {module_name!r} of {name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"{key}: module {module_name!r} has no attribute {attr!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Condition)):
        raise ValueError(f"{key}: {name} is not a subclass of fastsd.feedback.Condition ({cls!r})")
    if cls.teacher and cls.context is Condition.context:
        raise ValueError(f"{key}: {name} has a teacher but does not define context(self, r, group, critique)")
    if not cls.teacher and cls.feedback is Condition.feedback:
        raise ValueError(f"{key}: {name} has no teacher (teacher = False) but does not define feedback()")
    return cls


def get_condition(cfg: TrainConfig) -> Condition:
    """The condition of `cfg`, built."""
    return condition_class(cfg.condition)(cfg)
