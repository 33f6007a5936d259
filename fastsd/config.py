"""One dataclass tree for `fastsd-train`: defaults, YAML files and dotted `key=value` overrides.

    fastsd-train --config run.yaml condition=reference optim.lr=3e-4 teacher=ema

A bare section name set to a string sets that section's main field: `model=PATH` is
`model.path=PATH`, `data=PATH` is `data.path`, `teacher=ema` is `teacher.kind`, `critic=http`
is `critic.kind`, `loss=sampled_token` is `loss.kind`, `eval=off` is `eval.enabled` (booleans
read true/false, on/off, yes/no, 1/0). Unknown keys and bad values raise ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from .conditions import CRITIQUE_TEMPLATE, REFERENCE_TEMPLATE, STUDENT_TEMPLATE, TEMPLATE_FIELDS, check_template
from .critic_prompt import load_prompt


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    main: ClassVar[str] = "r"
    r: int = 0
    """LoRA rank (peft); 0 trains every weight (full fine-tuning). The paper: 64."""
    alpha: float | None = None
    """LoRA scale numerator (the update is alpha / r * B A); none: 2 * r (the paper's 128 at r=64)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (teachers run without it)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names to adapt (a module matches by its last name parts, as in peft): by default the
    attention and MLP projections. The lm_head and embeddings cannot be adapted (the fused loss
    reads the base head weight)."""
    path: str = ""
    """An existing PEFT adapter folder to start from (its r, alpha, dropout and target modules are
    used); empty: a fresh adapter (B = 0, so step 0 is the base model)."""


@dataclass
class ModelConfig:
    main: ClassVar[str] = "path"
    path: str = "builtin"
    """Local transformers causal-LM checkpoint (with its tokenizer); "builtin" is the shipped tiny model."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter and compute dtype: auto is bf16 mixed precision on CUDA, fp32 on CPUs."""
    liger: bool = True
    """On CUDA, apply liger-kernel's RMSNorm/RoPE/SwiGLU kernels where the architecture allows."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward (less memory, ~30% more compute)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train a LoRA adapter instead of every weight (see LoraConfig)."""


@dataclass
class FieldsConfig:
    question: str = "question"
    """Column (jsonl key or parquet column) holding the question, e.g. OpenMathReasoning's problem."""
    answer: str = "answer"
    """Column holding the ground-truth final answer (text or a number), e.g. expected_answer."""
    reference_solution: str = "reference_solution"
    """Column holding a worked solution, e.g. generated_solution: required with condition=reference
    (the teacher's context); otherwise optional per record (the http critic shows it when present);
    empty: no such column."""


@dataclass
class DataConfig:
    main: ClassVar[str] = "path"
    path: str = "builtin"
    """Training questions: a jsonl or .parquet file (columns: data.fields); "builtin" is the arithmetic task."""
    eval_path: str = "builtin"
    """Held-out questions (same format); "builtin" is the arithmetic task's held-out split."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    """Which columns of data.path and data.eval_path hold each field."""
    train_size: int = 2000
    """Built-in task: number of training questions."""
    eval_size: int = 128
    """Built-in task: number of held-out questions."""
    seed: int = 0
    """Built-in task: generator seed (also fixes the split)."""


@dataclass
class TemplateConfig:
    student: str = STUDENT_TEMPLATE
    """Student prompt; fields: {question}. Only the fields are replaced: other braces, as in
    \\boxed{}, are kept as written."""
    reference: str = REFERENCE_TEMPLATE
    """Teacher prompt for condition=reference; fields: {question}, {reference}."""
    critique: str = CRITIQUE_TEMPLATE
    """Teacher prompt for condition=critique; fields: {question}, {critique}."""
    chat: Literal["auto", "on", "off"] = "auto"
    """Render prompts through the tokenizer's chat template (the filled template is the user turn):
    auto, when the tokenizer has one (the built-in model has none); on, required; off, never."""
    student_chat_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the student's apply_chat_template, e.g. {enable_thinking: false}."""
    teacher_chat_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the teacher's apply_chat_template, e.g. {enable_thinking: true}."""
    student_system: str = ""
    """System message before the student's user turn (chat template only; empty: none)."""
    teacher_system: str = ""
    """System message before the teacher's user turn (chat template only; empty: none)."""


@dataclass
class RolloutConfig:
    temperature: float = 1.1
    """Sampling temperature for on-policy rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off)."""
    max_new_tokens: int = 128
    """Longest response, in tokens."""
    group_size: int = 0
    """Rollouts per question; 0 picks the method's default (8 for grpo, 1 for self-distillation)."""
    engine: Literal["auto", "fastsd", "generate"] = "auto"
    """Sampler: fastsd (static KV cache, compiled decode step with fused sampling), generate
    (transformers), auto: fastsd on CUDA, generate on CPUs."""
    stop_at_answer: bool = False
    """Stop a response at the end of its answer tag, not only at EOS (the EOS token is then never
    sampled or trained). Matched on the tag's token ids encoded alone: exact for the built-in
    character tokenizer; a BPE tokenizer may merge the tag with what follows and miss it."""


@dataclass
class LossConfig:
    main: ClassVar[str] = "kind"
    kind: Literal["divergence", "sampled_token"] = "divergence"
    """Self-distillation loss: full-vocabulary divergence, or -(A_t.detach() * log p_s(y_t))."""
    divergence: Literal["auto", "forward_kl", "reverse_kl", "jsd"] = "auto"
    """Divergence between teacher and student next-token distributions: forward_kl KL(p_t || p_s),
    reverse_kl KL(p_s || p_t), jsd. auto: forward_kl (the paper's), except reverse_kl for the
    built-in tiny model (model=builtin), which forward KL collapses (README, "Why reverse KL")."""
    temperature: float = 1.0
    """Temperature applied to both heads' logits inside the loss."""
    clip: float | None = None
    """forward_kl only: clamp each per-vocabulary summand at this value (OPSD uses 0.05)."""
    beta: float = 0.5
    """jsd only: mixture weight of the teacher, in (0, 1)."""
    pg_clip: float = 0.2
    """grpo: PPO-style ratio clip epsilon."""


@dataclass
class TeacherConfig:
    main: ClassVar[str] = "kind"
    kind: Literal["initial", "current", "ema"] = "initial"
    """initial: frozen step-0 weights; current: the live model without gradient; ema: an average."""
    ema_rate: float = 0.99
    """ema: teacher <- rate * teacher + (1 - rate) * student after every optimizer step."""


@dataclass
class CriticConfig:
    main: ClassVar[str] = "kind"
    kind: Literal["builtin", "http"] = "builtin"
    """Who writes the step-aligned critique (condition=critique): builtin, the programmatic critic of
    the arithmetic task, or http, a frozen LLM behind an OpenAI-compatible server."""
    base_url: str = "http://127.0.0.1:8100/v1"
    """http: the server's API root (requests go to {base_url}/chat/completions)."""
    model: str = ""
    """http: the served model name; empty asks {base_url}/models and takes the only one listed."""
    api_key_env: str = "FASTSD_CRITIC_API_KEY"
    """http: name of the environment variable holding the API key (sent as a bearer token if set)."""
    timeout: float = 300.0
    """http: seconds one request may take, reply included."""
    step_timeout: float = 1800.0
    """http: seconds all critiques of one optimizer step may take, retries included; past it the
    rest fail (their rollouts get no loss)."""
    concurrency: int = 32
    """http: requests in flight at once, per process (the server batches them)."""
    retries: int = 4
    """http: retries after a connection error, timeout, 408, 429 or 5xx (other 4xx are final)."""
    backoff: float = 1.0
    """http: first retry delay in seconds; doubles per retry (at most 32x), with jitter."""
    max_tokens: int = 8192
    """http: reply length limit, thinking included (reasoning critics such as QwQ may need more;
    a reply cut off here counts as invalid)."""
    prompt_file: str = ""
    """http: a text file with the critic's instructions (empty: the built-in faithful-scribe ones for
    the response format). Without fields it is the system message, before fastsd's user message;
    with any of {question} {reference} {answer} {attempt} it is the whole user message, filled in."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """http: fields merged into every request body, overriding fastsd's (e.g. {top_p: 0.95, seed: 0,
    chat_template_kwargs: {enable_thinking: true}}); model, messages and stream are fastsd's."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 2
    """Linear warm-up, in optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate shape after warm-up."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    micro_batch: int = 16
    """Sequences per forward/backward; a step's rollouts are split into micro-batches (accumulation)."""


@dataclass
class EvalConfig:
    main: ClassVar[str] = "enabled"
    enabled: bool = True
    """Evaluate on the held-out questions at all (eval=off: no evaluation, for a smoke run)."""
    every: int = 0
    """Evaluate every N optimizer steps (0: only at start and end)."""
    k: int = 12
    """Samples per held-out question: avg@k, pass@k, maj@k."""
    temperature: float = 1.1
    """Sampling temperature for evaluation."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep: int = 2
    """Keep the last K complete checkpoints."""


@dataclass
class TrainConfig:
    condition: Literal["grpo", "reference", "critique"] = "critique"
    """Feedback: grpo (binary reward), reference (teacher sees a reference solution), critique."""
    steps: int = 60
    """Optimizer steps."""
    questions_per_step: int = 16
    """Questions per optimizer step (across all ranks)."""
    seed: int = 0
    """Seed for sampling, data order and initialisation."""
    run_dir: str = "runs/default"
    """Where the config, logs, rollouts and checkpoints go."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint in run_dir, if any; never; or a checkpoint path."""
    log_every: int = 1
    """Heartbeat/metrics line every N steps."""
    format: Literal["steps", "free"] = "steps"
    """Solver response format: steps (<step_k>...</step_k> tags then <answer>...</answer>, the
    built-in task's) or free (free-form reasoning, answer in the last \\boxed{...}, steps are its
    paragraphs); see fastsd/format.py."""
    grader: Literal["exact", "math"] = "exact"
    """Final-answer check for the reward, avg@k/pass@k/maj@k and the http critic's answer: exact
    (string match after stripping) or math (math-verify: 0.75 = 3/4 = \\frac{3}{4})."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    templates: TemplateConfig = field(default_factory=TemplateConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def group_size(self) -> int:
        return self.rollout.group_size or (8 if self.condition == "grpo" else 1)

    def sampler(self, device_type: str) -> str:
        """rollout.engine resolved for a device type ("cuda", "cpu"): auto is fastsd on CUDA, else generate."""
        if self.rollout.engine != "auto":
            return self.rollout.engine
        return "fastsd" if device_type == "cuda" else "generate"


# ---------------------------------------------------------------- parsing

def _coerce(key: str, value, hint):
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
        return _coerce(key, value, args[0])
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
        return [_coerce(key, v, arg) for v in items]
    if origin is tuple:
        items = yaml.safe_load(value) if isinstance(value, str) else value
        args = typing.get_args(hint)
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(items, args))
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
            except ValueError:
                raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}") from None
        ok = isinstance(parsed, int) if hint is int else isinstance(parsed, (int, float))
        if not ok or isinstance(parsed, bool):
            raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
        if hint is float and not math.isfinite(parsed):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return hint(parsed)
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {hint} for {key}")


def _unknown(what: str, name: str, known) -> ValueError:
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(known), n=1)
    hint = f" (did you mean {name.rsplit('.', 1)[0] + '.' if '.' in name else ''}{close[0]}?)" if close else ""
    return ValueError(f"{name}: unknown config {what}{hint}")


def _set(cfg, dotted: str, value) -> list[str]:
    """Set `dotted` (a key, a section's main key, or a section from a mapping); returns the keys set."""
    parts = dotted.split(".")
    node, path = cfg, []
    for part in parts[:-1]:
        path.append(part)
        child = getattr(node, part, None) if part in _fields(node) else None
        if not dataclasses.is_dataclass(child):
            sections = [k for k in _fields(node) if dataclasses.is_dataclass(getattr(node, k))]
            raise _unknown("section", ".".join(path), sections)
        node = child
    name = parts[-1]
    if name not in _fields(node):
        raise _unknown("key", dotted, _fields(node))
    current = getattr(node, name)
    if dataclasses.is_dataclass(current):
        if isinstance(value, dict):
            return [key for k, v in value.items() for key in _set(cfg, f"{dotted}.{k}", v)]
        if getattr(current, "main", None) is None:
            raise ValueError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.{next(iter(_fields(current)))}")
        return _set(cfg, f"{dotted}.{current.main}", value)
    setattr(node, name, _coerce(dotted, value, _fields(node)[name]))
    return [dotted]


def _fields(node) -> dict:
    hints = typing.get_type_hints(type(node))
    return {f.name: hints[f.name] for f in dataclasses.fields(node)}


def _check_answers(cfg: TrainConfig) -> None:
    """format, grader and data.fields."""
    f = cfg.data.fields
    for key in ("question", "answer"):
        if not getattr(f, key).strip():
            raise ValueError(f"data.fields.{key}: must name a column, got {getattr(f, key)!r}")
    if f.question == f.answer:
        raise ValueError(f"data.fields.answer: the same column as data.fields.question ({f.answer!r})")
    if cfg.condition == "reference" and not f.reference_solution.strip():
        raise ValueError("data.fields.reference_solution: condition=reference needs a column of reference solutions")
    if cfg.format != "steps" and cfg.rollout.stop_at_answer:
        raise ValueError(f"rollout.stop_at_answer: only with format=steps (it stops at </answer>), got format={cfg.format}")


def _check(cfg: TrainConfig) -> None:
    _check_answers(cfg)
    positive = {"steps": cfg.steps, "questions_per_step": cfg.questions_per_step,
                "rollout.max_new_tokens": cfg.rollout.max_new_tokens, "optim.micro_batch": cfg.optim.micro_batch,
                "eval.k": cfg.eval.k, "checkpoint.keep": cfg.checkpoint.keep, "log_every": cfg.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")
    nonneg = {"rollout.group_size": cfg.rollout.group_size, "optim.warmup_steps": cfg.optim.warmup_steps,
              "eval.every": cfg.eval.every, "checkpoint.every": cfg.checkpoint.every, "optim.grad_clip": cfg.optim.grad_clip}
    for key, value in nonneg.items():
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value}")
    if cfg.data.path == "builtin" and cfg.data.train_size < 1:
        raise ValueError(f"data.train_size: must be >= 1, got {cfg.data.train_size}")
    if cfg.data.eval_path == "builtin" and cfg.data.eval_size < 1:
        raise ValueError(f"data.eval_size: must be >= 1, got {cfg.data.eval_size}")
    if cfg.optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay: must be >= 0, got {cfg.optim.weight_decay}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ValueError(f"optim.betas: each must be in [0, 1), got {list(cfg.optim.betas)}")
    for key, value in {"rollout.temperature": cfg.rollout.temperature, "loss.temperature": cfg.loss.temperature,
                       "eval.temperature": cfg.eval.temperature, "optim.lr": cfg.optim.lr}.items():
        if not value > 0:
            raise ValueError(f"{key}: must be > 0, got {value}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ValueError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.loss.divergence == "auto":  # resolved here, so the saved config says what ran
        cfg.loss.divergence = "reverse_kl" if cfg.model.path == "builtin" else "forward_kl"
    if cfg.loss.clip is not None and cfg.loss.divergence != "forward_kl":
        raise ValueError(f"loss.clip: only with loss.divergence=forward_kl, got {cfg.loss.divergence}")
    if cfg.loss.clip is not None and not cfg.loss.clip > 0:
        raise ValueError(f"loss.clip: must be > 0 (or none), got {cfg.loss.clip}")
    if not cfg.loss.pg_clip > 0:
        raise ValueError(f"loss.pg_clip: must be > 0, got {cfg.loss.pg_clip}")
    if not 0 < cfg.loss.beta < 1:
        raise ValueError(f"loss.beta: must be in (0, 1), got {cfg.loss.beta}")
    if not 0 <= cfg.teacher.ema_rate < 1:
        raise ValueError(f"teacher.ema_rate: must be in [0, 1), got {cfg.teacher.ema_rate}")
    _check_lora(cfg)
    c = cfg.critic
    for name in ("timeout", "step_timeout", "concurrency", "max_tokens"):
        if not getattr(c, name) > 0:
            raise ValueError(f"critic.{name}: must be > 0, got {getattr(c, name)}")
    for name in ("retries", "backoff"):
        if getattr(c, name) < 0:
            raise ValueError(f"critic.{name}: must be >= 0, got {getattr(c, name)}")
    if c.kind == "http" and not c.base_url.startswith(("http://", "https://")):
        raise ValueError(f"critic.base_url: expected http://HOST:PORT/v1 or https://..., got {c.base_url!r}")
    if cfg.condition == "grpo" and cfg.group_size < 2:
        raise ValueError(f"rollout.group_size: grpo needs at least 2 rollouts per question, got {cfg.group_size}")
    # Options the condition ignores: said, not refused (tools pass one set of options to every condition).
    unused = []
    if cfg.condition == "grpo" and cfg.teacher.kind != "initial":
        unused.append(f"teacher.kind={cfg.teacher.kind} (grpo has no teacher)")
    if cfg.condition == "grpo" and cfg.loss.kind != "divergence":
        unused.append(f"loss.kind={cfg.loss.kind} (grpo trains on rewards)")
    if cfg.condition != "critique" and cfg.critic.kind != "builtin":
        unused.append(f"critic.kind={cfg.critic.kind} (only condition=critique uses a critic)")
    for text in unused:
        logging.getLogger("fastsd").warning("condition=%s ignores %s", cfg.condition, text)
    _check_templates(cfg)
    _check_critic_prompt(cfg)


def _check_templates(cfg: TrainConfig) -> None:
    for name, fields in TEMPLATE_FIELDS.items():
        check_template(f"templates.{name}", getattr(cfg.templates, name), fields)


def _check_critic_prompt(cfg: TrainConfig) -> None:
    reserved = sorted(set(cfg.critic.extra_body) & {"model", "messages", "stream"})
    if reserved:
        raise ValueError(f"critic.extra_body: {reserved} are set by fastsd (critic.model, the prompt); "
                         "remove them from extra_body")
    if cfg.critic.prompt_file:
        load_prompt(cfg.critic.prompt_file)


def _check_lora(cfg: TrainConfig) -> None:
    lo = cfg.model.lora
    if lo.r < 0:
        raise ValueError(f"model.lora.r: must be >= 0 (0: full fine-tuning), got {lo.r}")
    if lo.alpha is not None and not lo.alpha > 0:
        raise ValueError(f"model.lora.alpha: must be > 0 (or none: 2 * r), got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise ValueError(f"model.lora.dropout: must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules or not all(t.strip() for t in lo.target_modules):
        raise ValueError(f"model.lora.target_modules: expected module names, got {lo.target_modules}")
    heads = sorted({"lm_head", "embed_tokens"} & {t.rsplit(".", 1)[-1] for t in lo.target_modules})
    if heads and (lo.r or lo.path):
        raise ValueError(f"model.lora.target_modules: {heads} cannot be adapted: the fused loss reads the "
                         "base head weight, and the head is tied to the embeddings in most small models")


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
        if not isinstance(data, dict):
            raise ValueError(f"--config: {path} must hold a mapping of keys to values")
        lines = _key_lines(path)
        for key, value in data.items():
            try:
                _set(cfg, str(key), value)
            except ValueError as e:
                line = _line_of(lines, str(e).split(":", 1)[0]) or lines.get(str(key))
                raise ValueError(f"{path}{f':{line}' if line else ''}: {e}") from None
    overridden = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item}: overrides are key=value")
        overridden.update(_set(cfg, key.strip(), value))
    try:
        _check(cfg)
    except ValueError as e:
        bad = str(e).split(":", 1)[0]  # every message starts with the dotted key
        line = _line_of(lines, bad)
        if line and bad not in overridden:  # the value came from the file
            raise ValueError(f"{path}:{line}: {e}") from None
        raise
    return cfg


def _key_lines(path: str) -> dict[str, int]:
    """Dotted key -> 1-based line of each key in a YAML mapping file (for error messages)."""
    with open(path) as f:
        root = yaml.compose(f)
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out.setdefault(key, k.start_mark.line + 1)
                walk(v, key + ".")

    walk(root, "")
    return out


def _line_of(lines: dict[str, int], key: str) -> int | None:
    """The line of `key`, or of the shorthand that set it (`teacher: ema` sets teacher.kind)."""
    parts = key.split(".")
    return next((lines[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if k in lines), None)


def to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)
    out["optim"]["betas"] = list(out["optim"]["betas"])
    return out


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
