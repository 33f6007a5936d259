"""bench/cpu_peers.py keeps working: a tiny run of every installed peer, its JSON, and the peers
computing the same loss and gradients as fastsd (their beta conventions mapped right)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import cpu_peers  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
FAST = [n for n in cpu_peers.VARIANTS if n != "liger_compiled"]  # torch.compile: ~20 s, below


def _installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "logprob"])
def test_tiny_run_writes_json_and_peers_agree(divergence, tmp_path, capsys):
    out = tmp_path / "peers.json"
    memory = [] if divergence == "forward_kl" else ["--no-memory"]  # one child process per variant
    only = FAST if divergence != "logprob" else list(cpu_peers.LOGPROB_VARIANTS)
    cpu_peers.main(["--shape", "48,16,300", "--divergence", divergence, "--rounds", "2", "--json", str(out),
                    "--variants", *only, *memory])
    got = json.loads(out.read_text())
    assert set(got["meta"]) >= {"date", "machine", "versions", "loadavg_start", "loadavg_end"}
    (entry,) = got["results"]
    res = entry["variants"]
    expect = {n for n in only if _installed(cpu_peers.VARIANTS.get(n, (None,))[0] or "torch")}
    assert set(res) == expect and "fastsd" in res
    assert res["fastsd"]["time_ratio"] == 1.0
    for name, r in res.items():
        assert r["median_s"] > 0 and len(r["times_s"]) == 2
        # loss, dX, dW against fastsd's: same function, fp32 rounding apart
        assert max(r["rel_diff_to_first"]) < 1e-4, (name, r["rel_diff_to_first"])
        if not memory:
            assert r["peak_rss_mib"] > 0
    for module, names in (("liger_kernel", ["liger"]), ("trl", ["trl"])):
        for n in names:
            if divergence != "logprob":
                assert (n in res) == _installed(module) and (n in entry["skipped"]) != _installed(module)
    if divergence == "logprob":
        assert "liger_flce" in entry["skipped"]
    assert "fastsd" in capsys.readouterr().out


def test_topk_option_runs_fastsd_and_eager_topk_beside_the_full_vocabulary(tmp_path):
    out = tmp_path / "topk.json"
    cpu_peers.main(["--shape", "48,16,300", "--divergence", "reverse_kl", "--rounds", "1", "--json", str(out),
                    "--topk", "8", "--variants", "fastsd", "fastsd_topk8", "eager_topk8"])
    res = json.loads(out.read_text())["results"][0]["variants"]
    assert list(res) == ["fastsd", "fastsd_topk8", "eager_topk8"]
    assert res["fastsd_topk8"]["rel_diff_to_first"] == [0.0, 0.0, 0.0]  # the first of its objective
    assert max(res["eager_topk8"]["rel_diff_to_first"]) < 1e-4  # the same top-k loss and gradients
    assert all(r["peak_rss_mib"] > 0 for r in res.values())
    full, _, _ = cpu_peers.call(cpu_peers.VARIANTS["fastsd"][1], cpu_peers.inputs(48, 16, 300), "reverse_kl")
    top, _, _ = cpu_peers.call(cpu_peers._fastsd_topk(8), cpu_peers.inputs(48, 16, 300), "reverse_kl")
    assert not torch.allclose(full, top, rtol=1e-2)  # a different objective, compared apart


def test_missing_peer_is_skipped_and_named(monkeypatch):
    monkeypatch.setitem(cpu_peers.VARIANTS, "absent", ("no_such_module_fastsd", None))
    have, skipped = cpu_peers.variants_for("forward_kl")
    assert "absent" not in have and "no_such_module_fastsd" in skipped["absent"]


@pytest.mark.slow
@pytest.mark.skipif(not _installed("liger_kernel"), reason="liger-kernel not installed")
def test_liger_compiled_runs(tmp_path):
    out = tmp_path / "peers.json"
    cpu_peers.main(["--shape", "48,16,300", "--rounds", "1", "--json", str(out), "--no-memory",
                    "--variants", "fastsd", "liger_compiled"])
    r = json.loads(out.read_text())["results"][0]["variants"]["liger_compiled"]
    assert max(r["rel_diff_to_first"]) < 1e-4 and r["first_call_s"] > r["median_s"]
