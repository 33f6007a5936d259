"""select(): k samples of every problem, graded; the problems whose pass count lies in the band kept.

The problems are cut into batches of `batch` in the data's order; batch b is sampled from the
seed `seed * 1_000_003 + b` (torch and random), on rank b % world. What a problem's samples are
thus depends on the seed, k, the batch size and the sampling settings, never on the number of
processes or on where a run stopped: a restart grades the batches that are not whole in
OUT/graded.jsonl again, from their own seeds, and the output is the same (the generate and
fastsd samplers draw from the seeded torch generator; vLLM from its engine's own). Each rank loads the whole model and
samples its own batches; after each round rank 0 gathers the rows and appends them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.dist import Dist
from ..tasks.data import Example, load_data
from . import files

__all__ = ["SelectOptions", "select"]

log = logging.getLogger("fastsd")


@dataclass
class SelectOptions:
    out: str
    k: int = 16
    min_pass: int = 0
    max_pass: int = 4
    split: str = "train"
    batch: int = 16
    critic_check: bool = False

    def check(self) -> None:
        """ValueError naming the flag."""
        if self.k < 1:
            raise ValueError(f"--k: expected >= 1, got {self.k}")
        if not 0 <= self.min_pass <= self.max_pass <= self.k:
            raise ValueError(f"--min-pass, --max-pass: expected 0 <= min-pass <= max-pass <= k ({self.k}), "
                             f"got {self.min_pass} and {self.max_pass}")
        if self.batch < 1:
            raise ValueError(f"--batch: expected >= 1, got {self.batch}")
        if self.split not in ("train", "eval"):
            raise ValueError(f"--split: expected train or eval, got {self.split!r}")


def _aligned(full: list[Example], kept: list[Example]) -> list[int]:
    """Indices into `full` of `kept`, a subsequence of it (data.too_long=skip leaves some out)."""
    out, j = [], 0
    for i, ex in enumerate(full):
        if j < len(kept) and ex == kept[j]:
            out.append(i)
            j += 1
    return out


def _settings(cfg, opts: SelectOptions) -> dict:
    """What decides a problem's grading (OUT/select.json): a restart must match it."""
    r = cfg.rollout
    data = dataclasses.asdict(cfg.data)
    data.pop("too_long")
    out = {"model.path": cfg.model.path, "model.lora.path": cfg.model.lora.path, "data": data, "--split": opts.split,
           "seed": cfg.seed, "--k": opts.k, "--batch": opts.batch, "rollout.temperature": r.temperature,
           "rollout.top_p": r.top_p, "rollout.max_new_tokens": r.max_new_tokens,
           "rollout.stop_at_answer": r.stop_at_answer, "format": cfg.format, "grader": cfg.grader,
           "templates.student": cfg.templates.student, "--critic-check": opts.critic_check}
    if opts.critic_check:  # the critic is asked about problems in the band only
        out.update({"--min-pass": opts.min_pass, "--max-pass": opts.max_pass, "critic.kind": cfg.critic.kind})
    return out


def _critic_verdict(critic, rollouts) -> dict:
    """The critic's critique of the first failed sample: {"ok": bool, "error": why not}."""
    failed = next((r for r in rollouts if r.reward <= 0), None)
    if failed is None:
        return {"ok": True, "error": "no failed sample"}
    ex, p = failed.example, failed.parsed
    crit = critic.critique_batch([(ex.question, ex.answer, p.steps, p.answer, ex.reference_solution)])[0]
    return {"ok": bool(crit.ok), "error": None if crit.ok else (crit.error or "unknown")}


def _grade_batch(cfg, opts, local: Dist, policy, tok, critic, batch: int, items: list[tuple[int, Example]],
                 progress=None) -> list[dict]:
    from ..rollout import rollout

    seed = cfg.seed * 1_000_003 + batch
    random.seed(seed)
    torch.manual_seed(seed)
    exs = [ex for _, ex in items]
    rolls = rollout(cfg, local, policy, tok, exs, opts.k, cfg.rollout.temperature, progress=progress)
    rows = []
    for g, (i, ex) in enumerate(items):
        mine = rolls[g * opts.k:(g + 1) * opts.k]
        rewards = [float(r.reward) for r in mine]
        passes = sum(r > 0 for r in rewards)
        digest = hashlib.sha256(json.dumps([r.response for r in mine]).encode()).hexdigest()[:16]
        row = {"index": i, "question": ex.question, "passes": passes, "k": opts.k, "rewards": rewards,
               "samples_sha256": digest}  # of the sampled token ids: same seed, same samples
        if opts.critic_check and opts.min_pass <= passes <= opts.max_pass:
            row["critic"] = _critic_verdict(critic, mine)
        rows.append(row)
    return rows


def _same_questions(out: Path, graded: dict[int, dict], full: list[Example]) -> None:
    """Each graded problem is still the data's problem at its index (a data file edited between a
    stop and its restart would mix two files); ValueError naming the first that is not."""
    for i, row in sorted(graded.items()):
        if i >= len(full) or full[i].question != row.get("question"):
            now = "no problem" if i >= len(full) else repr(full[i].question[:80])
            raise ValueError(f"data.path: {out / files.GRADED} graded problem {i + 1} as {row.get('question', '')[:80]!r}, "
                             f"but the data now has {now} there; restore the data, or choose another --out")


def _in_band(row: dict, opts: SelectOptions) -> bool:
    if not opts.min_pass <= row["passes"] <= opts.max_pass:
        return False
    return not opts.critic_check or row.get("critic", {}).get("ok", False)


def select(cfg, opts: SelectOptions, d: Dist) -> dict:
    """Grade every problem of the split not yet in OUT/graded.jsonl, then write OUT/selected.jsonl
    (rank 0); returns the summary (also in OUT/select.json). ValueError naming the key or flag
    for bad input, before the model loads."""
    from ..run.preflight import preflight
    from ..run.progress import ItemProgress

    opts.check()
    out = Path(opts.out)
    cfg = dataclasses.replace(cfg, run_dir=str(out), resume="never")
    # data, templates, lengths (and the critic, with --critic-check): before the model loads
    ready = preflight(cfg if opts.critic_check else dataclasses.replace(cfg, condition="grpo"), d)
    if opts.critic_check and ready.critic is None:
        raise ValueError(f"--critic-check: condition={cfg.condition} uses no critic; set condition=critique "
                         "(critic.kind names the critic)")
    full_train, full_held = load_data(cfg)
    full, kept = (full_train, ready.train) if opts.split == "train" else (full_held, ready.held)
    indices = _aligned(full, kept)
    records = files.raw_records(cfg, opts.split)
    if len(records) != len(full):
        raise ValueError(f"data: {len(records)} records read but {len(full)} questions loaded")
    if d.main:
        files.check_settings(out, _settings(cfg, opts))
    d.barrier()
    graded = files.read_graded(out) if d.main else {}
    graded = d.gather_objects(graded)[0] if d.enabled else graded
    _same_questions(out, graded, full)
    batches = [indices[s:s + opts.batch] for s in range(0, len(indices), opts.batch)]
    todo = [b for b in range(len(batches)) if not all(i in graded for i in batches[b])]
    mine = [b for b in todo if b % d.world == d.rank]

    from ..run.build import build_models

    local = Dist(device=d.device)  # every rank samples alone, with the whole model
    policy, _, tok = build_models(dataclasses.replace(cfg, condition="grpo"), local)
    progress = ItemProgress("fastsd-select", len(indices), len(indices) - sum(len(batches[b]) for b in todo), on=d.main)
    t0 = time.perf_counter()
    for r in range(d.all_max(len(mine))):
        b = mine[r] if r < len(mine) else None
        rows = [] if b is None else _grade_batch(cfg, opts, local, policy, tok, ready.critic, b,
                                                 [(i, full[i]) for i in batches[b]], progress.within(len(batches[b])))
        every = d.gather_objects(rows)
        if d.main:
            new = [row for part in every for row in part]
            files.append_graded(out, new)
            graded.update({row["index"]: row for row in new})
            progress.done(len(new), sum(_in_band(row, opts) for row in new))
    progress.close()
    summary = {}
    if d.main:
        summary = _finish(cfg, opts, out, records, graded, indices, time.perf_counter() - t0, len(todo))
    d.barrier()
    return summary


def _finish(cfg, opts, out: Path, records, graded, indices, seconds: float, batches_run: int) -> dict:
    keep = [i for i in indices if _in_band(graded[i], opts)]
    meta = {"model": cfg.model.path, "seed": cfg.seed}
    path = files.write_selected(out, records, graded, keep, meta)
    hist = [0] * (opts.k + 1)
    for i in indices:
        hist[graded[i]["passes"]] += 1
    summary = {"problems": len(indices), "selected": len(keep), "band": [opts.min_pass, opts.max_pass], "k": opts.k,
               "passes_histogram": hist, "seconds_this_process": round(seconds, 1), "batches_this_process": batches_run}
    if opts.critic_check:
        summary["critic_refused"] = sum(1 for i in indices if graded[i].get("critic", {}).get("ok") is False)
    settings_path = out / files.SETTINGS
    doc = json.loads(settings_path.read_text())
    doc["summary"] = summary
    settings_path.write_text(json.dumps(doc, indent=1) + "\n")
    log.info("selected %d of %d problems (passes in [%d, %d] of %d) -> %s", len(keep), len(indices), opts.min_pass,
             opts.max_pass, opts.k, path)
    return summary
