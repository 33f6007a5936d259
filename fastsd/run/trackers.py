"""Experiment trackers (`log.report_to`): TensorBoard, Weights & Biases, trackio.

Every row `RunLog` writes to metrics.jsonl goes to each tracker as it is written: its numbers
(loss, reward, counters, timings), an evaluation's under `eval/` (`eval/avg@k`, ..., `eval/k`),
at the row's `step`; with an evaluation, a table of `log.samples` held-out questions with a
sampled response each (`eval/samples`). The config goes in when the tracker starts. Only rank 0
reports; the other ranks get a `Trackers` that does nothing.

`check_installed` (in `fastsd.run.preflight`) and `start_trackers` (before the model loads) fail
with a ValueError naming `log.report_to`, the package and the extra that installs it.

Resume: `run_dir/trackers.json` keeps the W&B run id and the trackio run name, so a resumed run
logs into the same run (W&B `resume="allow"`, trackio `resume="allow"`); a fresh start gets new
ones. TensorBoard writes to `run_dir/tensorboard` with `purge_step` at the first step the run
writes again, so the rows of steps after the checkpoint, cut from metrics.jsonl, are hidden in
TensorBoard too. W&B and trackio cannot take rows back: rows logged after the checkpoint a run
resumes from appear twice there (W&B charts use the logged `step` as their x axis, so its own
`_step` counter never goes back).
"""

from __future__ import annotations

import importlib
import json
import uuid
from pathlib import Path

from ..config import to_dict, to_yaml

__all__ = ["PACKAGES", "Trackers", "check_installed", "scalars", "start_trackers", "table"]

# tracker -> (the module imported, the pip package, the extra)
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}
COLUMNS = ["question", "truth", "response", "answer", "correct"]


def _needs(name: str, why: str) -> ValueError:
    package = PACKAGES[name][1]
    return ValueError(f"log.report_to: {name} {why} (the package {package}: pip install 'fastsd[{name}]' "
                      f"or pip install {package})")


def check_installed(cfg) -> None:
    """Each tracker in log.report_to can be imported; ValueError naming the key and the package."""
    for name in cfg.log.report_to:
        try:
            importlib.import_module(PACKAGES[name][0])
        except ImportError as e:
            raise _needs(name, f"cannot be imported ({e})") from None


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, an evaluation's as eval/NAME; `step` and `final` left out."""
    out = {}
    for key, value in row.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if key in ("step", "final") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out[key if sub is None else f"{key}/{sub}"] = v
    return out


def table(samples: list[dict], n: int) -> list[list]:
    """`n` questions of an evaluation's samples (`fastsd.evaluation.evaluate`), each with its first
    sampled response: rows of COLUMNS."""
    return [[s["question"], s["truth"], s["responses"][0], s["answers"][0], bool(s["correct"][0])]
            for s in samples[:n] if s["responses"]]


class _TensorBoard:
    def __init__(self, cfg, ids: dict, resumed: bool):
        self.dir, self.writer, self.cfg = Path(cfg.run_dir) / "tensorboard", None, cfg
        self.dir.mkdir(parents=True, exist_ok=True)  # the writer opens at the first step known (begin)

    def begin(self, step: int, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Steps after `step` come again: hide what an earlier process wrote for them (all of it when fresh).
        first = step + 1 if resumed else 0
        self.writer = SummaryWriter(str(self.dir), purge_step=first)
        yaml = "\n".join("    " + line for line in to_yaml(self.cfg).splitlines())  # markdown: a code block
        self.writer.add_text("config", yaml, first)  # the config the steps from `first` on ran with

    def log(self, step: int, numbers: dict, rows: list[list] | None) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)
        if rows:
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
            lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
            self.writer.add_text("eval/samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _WandB:
    def __init__(self, cfg, ids: dict, resumed: bool):
        import wandb

        self.wandb = wandb
        ids["wandb"] = ids.get("wandb") if resumed and ids.get("wandb") else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=cfg.log.project, name=Path(cfg.run_dir).name, id=ids["wandb"], resume="allow",
                              dir=cfg.run_dir, config=to_dict(cfg))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # the x axis: fastsd's step, not W&B's own counter

    def begin(self, step: int, resumed: bool) -> None:
        pass

    def log(self, step: int, numbers: dict, rows: list[list] | None) -> None:
        extra = {"eval/samples": self.wandb.Table(columns=COLUMNS, data=rows)} if rows else {}
        self.run.log({"step": step, **numbers, **extra})

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, cfg, ids: dict, resumed: bool):
        import trackio

        self.trackio = trackio
        fresh = f"{Path(cfg.run_dir).name}-{uuid.uuid4().hex[:8]}"
        ids["trackio"] = ids.get("trackio") if resumed and ids.get("trackio") else fresh
        self.run = trackio.init(project=cfg.log.project, name=ids["trackio"], config=to_dict(cfg),
                                resume="allow" if resumed else "never", auto_log_gpu=False, auto_log_cpu=False)

    def begin(self, step: int, resumed: bool) -> None:
        pass

    def log(self, step: int, numbers: dict, rows: list[list] | None) -> None:
        extra = {"eval/samples": self.trackio.Table(columns=COLUMNS, data=rows)} if rows else {}
        self.trackio.log({**numbers, **extra}, step=step)

    def close(self) -> None:
        self.trackio.finish()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}


class Trackers:
    """The started trackers of a run (none on ranks other than 0, or with log.report_to empty)."""

    def __init__(self, backends: list, samples: int = 0, resumed: bool = False):
        self.backends, self.samples, self.resumed = backends, samples, resumed

    def begin(self, step: int) -> None:
        """The run writes from step `step` on (after `step`, when resumed)."""
        for b in self.backends:
            b.begin(step, self.resumed)

    def log(self, row: dict, samples: list[dict] | None = None) -> None:
        """A metrics.jsonl row as written; `samples`: its evaluation's, for the table."""
        if not self.backends:
            return
        rows = table(samples, self.samples) if samples and self.samples else None
        numbers = scalars(row)
        for b in self.backends:
            b.log(row["step"], numbers, rows)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def start_trackers(cfg, d, resume: Path | None) -> Trackers:
    """Start log.report_to's trackers (rank 0); called before the model loads. A failure closes
    those started and raises ValueError naming log.report_to and the package."""
    if not d.main or not cfg.log.report_to:
        return Trackers([])
    check_installed(cfg)
    saved = Path(cfg.run_dir) / "trackers.json"
    try:
        ids = json.loads(saved.read_text()) if resume is not None and saved.exists() else {}
    except (OSError, ValueError):
        ids = {}
    started = Trackers([], cfg.log.samples, resume is not None)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    for name in cfg.log.report_to:
        try:
            started.backends.append(BACKENDS[name](cfg, ids, resume is not None))
        except Exception as e:  # noqa: BLE001 - whatever the library raises, told as the key
            started.close()
            raise _needs(name, f"failed to start ({type(e).__name__}: {e})") from e
    saved.write_text(json.dumps(ids) + "\n")
    return started
