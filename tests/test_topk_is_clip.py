"""The trainer's top-k divergence (loss.topk) together with loss.is_clip and the entropy log: the
importance weights reach the top-k loss, and the logged entropy is the student's over the full
vocabulary whatever loss.topk is."""

from __future__ import annotations

import pytest
from runs import config, train_rows

from fastsd.model.dist import Dist
from fastsd.train import train


def test_topk_run_weights_its_loss_and_logs_the_full_entropy(tmp_path):
    """CPU fp32, one process: every sampler/trainer ratio is ~1, so is_clip=0.5 cuts them all and
    halves the loss. Step 1's student and rollouts are the same in every run: so is its entropy."""
    common = ["eval=off", "condition=reference", "steps=1"]
    rows = {}
    for name, extra in (("full", []), ("topk", ["loss.topk=2"]),
                        ("topk_half", ["loss.topk=2", "loss.is_clip=0.5", "loss.tail=false"]),
                        ("topk_tail_half", ["loss.topk=2", "loss.is_clip=0.5"])):
        train(config(tmp_path / name, *common, *extra), Dist())
        (rows[name],) = train_rows(tmp_path / name)
    assert rows["topk"]["loss"] != pytest.approx(rows["full"]["loss"], rel=1e-5)  # top-k is what ran
    assert rows["topk_tail_half"]["is_clipped"] == 1.0 and "is_clipped" not in rows["topk"]
    assert rows["topk_tail_half"]["loss"] == pytest.approx(0.5 * rows["topk"]["loss"], rel=1e-5)
    assert rows["topk_half"]["loss"] != pytest.approx(rows["topk_tail_half"]["loss"], rel=1e-3)
    for name in ("topk", "topk_half", "topk_tail_half"):
        assert rows[name]["entropy"] == pytest.approx(rows["full"]["entropy"], rel=1e-6)
