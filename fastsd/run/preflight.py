"""Everything about a run that can be checked before the model loads, checked first.

`preflight` runs at the top of `fastsd.train.train`, after the config itself was validated
(`fastsd.config.load_config`) and before any weights are read or anything is written:

- resume: `resume=never` on a run directory that holds checkpoints, a `resume` path that is no
  complete checkpoint or holds a damaged file (`resume=auto` passes over damaged ones,
  `fastsd.run.checkpoint_check`), a key the checkpoint fixes changed on resume (`FIXED_ON_RESUME`);
- model.path: a transformers config is there (the weights load later), and loss.topk fits its vocabulary;
- data.path, data.eval_path: every line, through the loader training uses (`fastsd.tasks.data.load_data`);
- templates: the student and teacher prompts rendered for the first training question, through
  the functions training renders them with;
- length: every question's prompt plus rollout.max_new_tokens within the model's positions
  (`fastsd.run.prompt_fit`: an error, or under data.too_long=skip the question left out);
- fit: `critic=builtin` (the built-in arithmetic task's own critic) on questions that are not
  that task's is an error naming `critic.kind`;
- trackers: each one log.report_to names can be imported (`fastsd.run.trackers`; they start
  after these checks, still before the model loads);
- critic reachability: the http critic asks `{base_url}/models` when it is built, so it is built
  here (`fastsd.run.build.build_critic`); its reply cache makes no directory before it stores a reply.

Each failure is a ValueError naming the config key (and the file and line where there is one).
A failure leaves no new file or directory behind: nothing here creates one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import TrainConfig, to_dict
from ..feedback.critic import ArithCritic, Critic
from ..feedback.prompts import example_prompts
from ..feedback.registry import get_condition
from ..model.dist import Dist
from ..model.load import DEFAULT_MODEL_DIR, checkpoint_dir
from ..tasks.data import Example, key_error, load_data, record_places
from . import checkpoint as ckpt
from .build import build_critic
from .checkpoint_check import pick_resume
from .prompt_fit import fit_positions, model_positions
from .run_dir import flat_config
from .trackers import check_installed

__all__ = ["Ready", "critic_fits", "preflight", "show_prompts", "tokenizer"]


@dataclass
class Ready:
    """What the checks loaded, for the run to use: data, the checkpoint to resume from, the critic."""

    train: list[Example]
    held: list[Example]
    resume: Path | None
    critic: Critic | None
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints resume=auto passed over


def preflight(cfg: TrainConfig, d: Dist) -> Ready:
    """Run every check that needs no model (module docstring); ValueError naming the key on failure."""
    check_installed(cfg)  # log.report_to: each tracker's package
    resume, damaged = _resume(cfg)
    model_config = _model_config(cfg)
    train, held = load_data(cfg)
    tok = tokenizer(cfg)
    example_prompts(cfg, tok, train[0])  # a template or chat-kwargs error fails here, not at the first step
    train, held = fit_positions(cfg, tok, model_positions(model_config), train, held)
    critic_fits(cfg, train)
    if cfg.rollout.engine == "vllm" and cfg.vllm_unusable() is not None:
        raise ValueError(f"rollout.engine: vllm: {cfg.vllm_unusable()}")
    critic = build_critic(cfg, d)  # critic=http: asks /v1/models now
    return Ready(train, held, resume, critic, damaged)


# Keys a resumed run cannot honour, because the checkpoint holds what they made: the key, and why.
# Every other key changed on resume takes effect (the optimizer's through `build.resume_optim`).
FIXED_ON_RESUME = {
    "seed": "the checkpoint's random state goes on; the seed only started it",
    "model.path": "the checkpoint's weights were trained from it (it is also the initial teacher and LoRA's base)",
    "model.lora.r": "the checkpoint's adapter has its shape",
    "model.lora.alpha": "the checkpoint's adapter was trained at its scale",
    "model.lora.target_modules": "the checkpoint's adapter adapts those modules",
    "model.lora.path": "the checkpoint's adapter started from it",
}


def _resume(cfg: TrainConfig) -> tuple[Path | None, list[tuple[Path, str]]]:
    resume, damaged = pick_resume(cfg)
    earlier = ckpt.latest_checkpoint(cfg.run_dir) if cfg.resume == "never" else None
    if earlier is not None:
        raise ValueError(f"resume: never, but run_dir {cfg.run_dir} holds an earlier run's checkpoints "
                         f"(latest {earlier}); continue it with resume=auto, or choose another run_dir")
    if resume is not None:
        _fixed_on_resume(cfg, resume)
    return resume, damaged


def _fixed_on_resume(cfg: TrainConfig, resume: Path) -> None:
    """A key the checkpoint fixes, changed since the run that saved it (its run directory's
    config.yaml), is refused, naming the key and why, rather than logged as changed and ignored."""
    saved = resume.parent.parent / "config.yaml"
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return  # no record of what the checkpoint's run used: nothing to compare
    if not isinstance(old, dict):
        return
    old, new, missing = flat_config(old), flat_config(to_dict(cfg)), object()
    was, then = old.get("teacher.kind", missing), old.get("condition", missing)
    if (cfg.teacher.kind == "ema" and cfg.condition != "grpo" and missing not in (was, then)
            and (was != "ema" or then == "grpo")):
        raise ValueError(f"teacher.kind: ema, but the run that saved {resume} had condition={then} teacher={was} "
                         f"({saved}), so it holds no ema teacher to go on from; resume with that teacher, or start a "
                         "new run_dir")
    for key, why in FIXED_ON_RESUME.items():
        was, now = old.get(key, missing), new[key]
        if was is not missing and was != now:
            raise ValueError(f"{key}: {was!r} in the run that saved {resume} ({saved}), {now!r} now: a resumed run "
                             f"cannot change it ({why}); set it back, or start a new run_dir")


def _model_path(cfg: TrainConfig) -> Path:
    """The checkpoint's folder of model.path; ValueError naming model.path."""
    try:
        path = checkpoint_dir(DEFAULT_MODEL_DIR if cfg.model.path == "builtin" else cfg.model.path)
    except ValueError as e:
        raise key_error("model.path", e) from None
    return path


def _model_config(cfg: TrainConfig):
    """model.path's transformers config (the weights are read by build_models); ValueError naming model.path."""
    path = _model_path(cfg)
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model.path: {path}/config.json cannot be read by transformers ({e})") from None
    _topk_fits(cfg, model_config, path)
    return model_config


def _topk_fits(cfg: TrainConfig, model_config, path: Path) -> None:
    """loss.topk at most the model's vocabulary (where the run uses it)."""
    k = cfg.loss.topk
    if not k or not cfg.feedback_condition().teacher or cfg.loss.kind == "sampled_token":
        return
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    if vocab is not None and k > vocab:
        raise ValueError(f"loss.topk: {k} exceeds the vocabulary of model.path ({vocab} tokens, {path}/config.json)")


def tokenizer(cfg: TrainConfig):
    """The tokenizer of model.path (the weights are not read); ValueError naming model.path."""
    path = _model_path(cfg)
    _model_config(cfg)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path: cannot load the tokenizer of {path} ({e})") from None


def critic_fits(cfg: TrainConfig, train: list[Example]) -> None:
    """critic=builtin knows the built-in arithmetic task only: every training question must be one
    of its questions, with the answer its solver gets."""
    if not get_condition(cfg).uses_critic() or cfg.critic.kind != "builtin" or cfg.data.path == "builtin":
        return
    critic = ArithCritic()
    for i, ex in enumerate(train):
        try:
            critic.critique(ex.question, ex.answer, [])
        except ValueError as e:
            raise ValueError(
                f"critic.kind: critic=builtin is the built-in arithmetic task's own critic, but "
                f"{record_places(cfg.data.path, [i])[0]} is not one of that task's questions ({e}); for other data use "
                f"critic=http with a critic server (critic.base_url, docs/critic.md)") from None


def show_prompts(cfg) -> str:
    """What the student and the teacher read before the response, for the first training question
    (--dry-run). Loads the tokenizer and the data, not the model; ValueError naming the key."""
    tok = tokenizer(cfg)
    train = load_data(cfg)[0]
    critic_fits(cfg, train)
    example = train[0]
    prompts = example_prompts(cfg, tok, example)

    def lines(text: str) -> list[str]:  # every newline shown as \n, so the prompt's end is exact
        return [f"#   {line}" for line in text.replace("\n", "\\n\n").rstrip("\n").split("\n")]

    out = ["", "# The student's prompt for the first training question (the response follows it):",
           *lines(prompts["student"])]
    if prompts["teacher"] is None:
        out.append(f"# condition={cfg.condition}: no teacher")
    else:
        out += ["# The teacher's prompt (the student's response tokens follow it unchanged):",
                *lines(prompts["teacher"])]
    return "\n".join(out) + "\n"
