"""`fastsd-train --dry-run`: the resolved config as YAML that `--config` reads back, every key under
its docstring (from `fastsd.config`) as a comment, automatic settings with the value they take
here, and the keys the chosen condition (or another setting) leaves unused marked as ignored."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap

import yaml

from ..feedback.condition import CONDITION_KEYS
from ..feedback.registry import get_condition
from . import tree as config_mod
from .check import LORA_FROM_PATH
from .load import to_dict
from .tree import TrainConfig

__all__ = ["annotated_yaml", "field_docs", "ignored", "resolved"]

_HTTP_KEYS = ("base_url", "model", "api_key_env", "timeout", "step_timeout", "concurrency", "retries", "backoff",
              "max_tokens", "prompt_file", "extra_body")


@functools.cache
def field_docs() -> dict[str, dict[str, str]]:
    """Class name -> field name -> the docstring written under the field in fastsd/config/tree.py."""
    tree = ast.parse(inspect.getsource(config_mod))
    out: dict[str, dict[str, str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        docs = out.setdefault(cls.name, {})
        for stmt, nxt in zip(cls.body, cls.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return out


_TOPK = ("topk", "topk_from", "tail")


def ignored(cfg: TrainConfig, device_type: str = "cpu") -> dict[str, str]:
    """Dotted key (or section) -> why this run does not use it."""
    out: dict[str, str] = {}
    c, cond = cfg.condition, get_condition(cfg)
    if not cond.teacher:
        out["teacher"] = f"{c} has no teacher"
        out.update({f"loss.{k}": f"{c} trains on rewards" for k in ("kind", "divergence", "clip", "beta", *_TOPK)})
        out["loss.is_clip"] = f"{c}'s ratio is to the policy itself (one update per rollout)"
        out["loss.pg_weight"] = f"{c} has no teacher to blend with"
    else:
        if cfg.loss.pg_weight == 0:
            out["loss.pg_clip"] = "grpo only (or loss.pg_weight > 0)"
        if cfg.loss.kind == "sampled_token":
            out.update({f"loss.{k}": "loss=sampled_token uses no divergence"
                        for k in ("divergence", "clip", "beta", *_TOPK)})
        else:
            if cfg.loss.divergence != "jsd":
                out["loss.beta"] = "loss.divergence=jsd only"
            if not cfg.loss.topk:
                out.update({f"loss.{k}": "loss.topk=0 (the full vocabulary)" for k in _TOPK[1:]})
        if cfg.teacher.kind != "ema":
            out["teacher.ema_rate"] = "teacher=ema only"
    used = cond.keys()
    for key in CONDITION_KEYS:
        if key not in used:
            out[key] = f"condition={c} does not read it"
    if "critic" in used and cfg.critic.kind == "builtin":
        out.update({f"critic.{k}": "critic=http only" for k in _HTTP_KEYS})
    if not cfg.eval.enabled:
        out.update({f"eval.{k}": "eval=off" for k in ("every", "k", "temperature")})
        out.update({f"data.{k}": "eval=off" for k in ("eval_path", "eval_size")})
    if cfg.data.path != "builtin":
        out["data.train_size"] = "data.path is a file"
    if cfg.data.eval_path != "builtin" and "data.eval_size" not in out:
        out["data.eval_size"] = "data.eval_path is a file"
    if cfg.data.path != "builtin" and (cfg.data.eval_path != "builtin" or not cfg.eval.enabled):
        out["data.seed"] = out["data.task"] = "no built-in data in this run"
    if device_type != "cuda":
        out["model.liger"] = "CUDA only"
    if cfg.model.lora.path:
        out.update({f"model.lora.{k}": "model.lora.path's adapter sets it" for k in LORA_FROM_PATH})
    return out


def resolved(cfg: TrainConfig, device_type: str = "cpu") -> dict[str, str]:
    """Dotted key -> a comment on what its automatic value stands for in this run, on this device type."""
    out = {}
    if cfg.rollout.group_size == 0:
        out["rollout.group_size"] = f"resolved: {cfg.group_size} ({_default_owner(cfg)}'s default)"
    if cfg.rollout.engine == "auto":
        out["rollout.engine"] = f"resolved: {cfg.sampler(device_type)} (on {'CUDA' if device_type == 'cuda' else 'a CPU'})"
    auto = "reverse_kl" if cfg.model.path == "builtin" else "forward_kl"
    if cfg.loss.divergence == auto:
        out["loss.divergence"] = f"what auto resolves to for {'the built-in model' if auto == 'reverse_kl' else 'model=PATH'}"
    if cfg.model.dtype == "auto":
        out["model.dtype"] = "resolved: " + ("bf16 compute over fp32 parameters (CUDA)" if device_type == "cuda" else "float32 (a CPU)")
    return out


def _default_owner(cfg: TrainConfig) -> str:
    """Whose default group size a run takes: grpo's, self-distillation's (1), or its condition's."""
    size = get_condition(cfg).group_size
    return cfg.condition if cfg.condition == "grpo" or size != 1 else "self-distillation"


def _scalar(value) -> str:
    if isinstance(value, str) and (not value.isprintable() or value != value.strip()):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar: escapes stay visible
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 96 - len(indent))]


def annotated_yaml(cfg: TrainConfig, device_type: str = "cpu") -> str:
    """The config as YAML (`yaml.safe_load` gives `to_dict(cfg)`), with the comments described in the
    module docstring. `device_type` ("cuda", "cpu") is the one the run would use."""
    skip, auto = ignored(cfg, device_type), resolved(cfg, device_type)
    lines = [f"# fastsd-train config for condition={cfg.condition}, resolved; --config reads this file back.",
             "# Each key is under its meaning. 'resolved:' is what an automatic value stands for here;",
             f"# 'ignored:' marks what this run does not use (condition={cfg.condition} or another setting)."]

    def walk(node, values: dict, prefix: str, indent: str) -> None:
        docs = field_docs().get(type(node).__name__, {})
        for f in dataclasses.fields(node):
            key, value = f"{prefix}{f.name}", values[f.name]
            note = f"  # ignored: {skip[key]}" if key in skip else f"  # {auto[key]}" if key in auto else ""
            child = getattr(node, f.name)
            if dataclasses.is_dataclass(child):
                lines.append("")
                lines.append(f"{indent}{f.name}:{note}")
                walk(child, value, key + ".", indent + "  ")
                continue
            if f.name in docs:
                lines.extend(_comment(docs[f.name], indent))
            lines.append(f"{indent}{f.name}: {_scalar(value)}{note}")

    walk(cfg, to_dict(cfg), "", "")
    return "\n".join(lines) + "\n"
