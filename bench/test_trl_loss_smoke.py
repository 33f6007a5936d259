"""bench/trl_loss.py keeps working: its --tiny run (docs/trl.md's table at a tiny shape) gives a
row per trainer and path, every path's loss TRL's own within fp32 rounding, and its JSON."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("liger_kernel")
sys.path.insert(0, os.path.dirname(__file__))
import trl_loss  # noqa: E402


def test_tiny_run(tmp_path, capsys):
    out = tmp_path / "trl_loss.json"
    rows = trl_loss.main(["--tiny", "--json", str(out)])
    assert [(r["run"], r["path"]) for r in rows] == [(run, p) for run, (paths, _) in trl_loss.RUNS.items()
                                                     for p in paths]
    for r in rows:
        assert r["loss_rel_diff_to_trl"] < 1e-4, r  # the same objective: rounding apart
        assert r["median_s"] > 0 and r["peak_rss_mib"] >= 0
    assert json.loads(out.read_text())["rows"] == rows
    assert "| gkd | liger |" in capsys.readouterr().out
