"""A hostile or failing critic server (issue 25): rate limiting and Retry-After, replies past the
size bound, time bounds scaled by critic.max_tokens, Ctrl-C while waiting, a key pasted where an
environment variable's name goes, and a run stopped after critic.max_failed_steps failed steps."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from test_http_critic import SMALL, attempts, http_cfg, serve  # noqa: F401

from fastsd import cli
from fastsd.config import CriticConfig, load_config
from fastsd.feedback import critic_transport
from fastsd.feedback.conditions import CriticFailed, FailedSteps
from fastsd.feedback.critic_transport import bounds, retry_after
from fastsd.feedback.http_critic import HttpCritic
from fastsd.model.dist import Dist
from fastsd.train import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def slept(monkeypatch):
    """The back-off waits asked for, none of them taken."""
    waits, real_sleep = [], asyncio.sleep

    async def record(delay, *a, **k):
        if delay > 0:
            waits.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr(critic_transport.asyncio, "sleep", record)
    return waits


@pytest.mark.parametrize("status", [429, 503])
def test_rate_limiting_on_every_try_is_transient_not_a_refusal(serve, slept, status):  # noqa: F811
    srv = serve(fault="status", status=status)
    srv.retry_after = "3"
    got = HttpCritic(http_cfg(srv.url, retries=2, step_timeout=60.0)).critique_batch(attempts(1)[:2])  # no ValueError
    assert all(not g.ok and g.error == f"http {status}" for g in got)
    assert srv.stats["requests"] == 2 * 3 and len(slept) == 2 * 2
    assert all(3 <= s <= 3 * 1.25 for s in slept)  # Retry-After: 3 beats the 10 ms back-off


def test_retry_after_as_an_http_date(serve, slept):  # noqa: F811
    assert retry_after(format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)) == \
        pytest.approx(30, abs=2)
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past
    assert retry_after("7") == 7.0 and retry_after("soon") == 0.0 and retry_after(None) == 0.0
    srv = serve(fault="status", status=429, fail_first=1)
    srv.retry_after = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=20), usegmt=True)
    assert HttpCritic(http_cfg(srv.url, step_timeout=60.0)).critique_batch(attempts(1)[:1])[0].ok
    assert len(slept) == 1 and 17 <= slept[0] <= 20 * 1.25


def test_a_wait_past_the_step_bound_is_not_taken(serve):  # noqa: F811
    srv = serve(fault="status", status=429)
    srv.retry_after = "100"
    t0 = time.monotonic()
    got = HttpCritic(http_cfg(srv.url, step_timeout=5.0)).critique_batch(attempts(1)[:1])
    assert time.monotonic() - t0 < 4.0
    assert got[0].error == "http 429; the server asks to wait 100 s (critic.step_timeout)"
    assert srv.stats["requests"] == 1


@pytest.mark.parametrize("fault, why", [
    ("huge", "the reply is larger than critic.max_reply_bytes=100000 (Content-Length "),
    ("endless", "the reply is larger than critic.max_reply_bytes=100000"),
])
def test_a_reply_past_the_size_bound_fails_its_critique(serve, fault, why):  # noqa: F811
    srv = serve(fault=fault)
    t0 = time.monotonic()
    got = HttpCritic(http_cfg(srv.url, max_reply_bytes=100_000)).critique_batch(attempts(1)[:2])
    assert time.monotonic() - t0 < 4.0
    assert all(not g.ok and g.error.startswith(why) for g in got), [g.error for g in got]
    assert srv.stats["requests"] == 2  # not retried
    if fault == "huge":  # the same reply under a larger bound is the right critique
        assert HttpCritic(http_cfg(srv.url, max_reply_bytes=4 << 20)).critique_batch(attempts(1)[:1])[0].ok


def test_the_bounds_scale_with_max_tokens_unless_set():
    assert bounds(CriticConfig()) == (30 + 8192 / 40, 2 * (30 + 8192 / 40), 65536 + 32 * 8192)
    assert bounds(CriticConfig(max_tokens=1024)) == (55.6, 111.2, 65536 + 32 * 1024)
    assert bounds(CriticConfig(timeout=7, step_timeout=9, max_reply_bytes=5)) == (7.0, 9.0, 5)
    assert bounds(CriticConfig(timeout=7)).step_timeout == 14.0
    c = load_config(overrides=["critic.max_tokens=16384"]).critic  # resolved when the config loads
    assert (c.timeout, c.step_timeout, c.max_reply_bytes) == (439.6, 879.2, 65536 + 32 * 16384)
    with pytest.raises(ValueError, match=r"^critic.max_reply_bytes: must be > 0 \(or null\), got 0"):
        load_config(overrides=["critic.max_reply_bytes=0"])


@pytest.mark.parametrize("value", ["sk-proj-abc123XYZ", "hf_abcdefghijklmnop", "a3f9c0d1e2b34f5a6b7c8d9e0f1a2b3c",
                                   "key with spaces"])
def test_a_key_pasted_into_api_key_env_is_refused_without_being_shown(tmp_path, capsys, value):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["critic=http", f"critic.api_key_env={value}", f"run_dir={run_dir}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "critic.api_key_env: the value" in err and "looks like an API key" in err
    assert value not in err and not run_dir.exists()  # not echoed, no config.yaml
    f = tmp_path / "run.yaml"
    f.write_text(f"critic:\n  kind: http\n  api_key_env: {value!r}\n")
    with pytest.raises(ValueError, match=r"run\.yaml:3: critic\.api_key_env: the value") as e:
        load_config(str(f))
    assert value not in str(e.value)
    for name in ("FASTSD_CRITIC_API_KEY", "OPENAI_API_KEY", "my_key", ""):
        assert load_config(overrides=[f"critic.api_key_env={name}"]).critic.api_key_env == name


def test_ctrl_c_while_waiting_is_clean(serve):  # noqa: F811
    """SIGINT during a step's requests: KeyboardInterrupt within a moment, the connections closed,
    and no asyncio 'Task exception was never retrieved' reports."""
    srv = serve(fault="hang")
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        sys.path.insert(0, {str(REPO / 'tests' / 'feedback')!r})
        from test_http_critic import attempts, http_cfg
        from fastsd.feedback.http_critic import HttpCritic
        critic = HttpCritic(http_cfg({srv.url!r}, timeout=60.0, step_timeout=60.0, concurrency=8))
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            critic.critique_batch(attempts(4))
        except KeyboardInterrupt:
            print(f"interrupted after {{time.monotonic() - t0:.1f}} s", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("interrupted after ") and float(out.stdout.split()[2]) < 5
    assert "never retrieved" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    deadline = time.monotonic() + 5
    while srv.in_flight and time.monotonic() < deadline:  # the hanging handlers saw their clients go
        time.sleep(0.05)
    assert srv.in_flight == 0


def test_failed_steps_counts_steps_where_every_critique_failed():
    cfg = load_config(overrides=["questions_per_step=2", "critic.max_failed_steps=2"])
    rolls = [type("R", (), {"critique_error": "http 500"})()] * 2
    watch = FailedSteps(cfg)
    assert watch.after(1, {"critique_failed": 2}, rolls) is None
    assert watch.after(2, {"critique_failed": 1}, rolls) is None  # one critique came back: the count starts again
    assert watch.after(3, {"critique_failed": 2}, rolls) is None
    stop = watch.after(4, {"critique_failed": 2}, rolls)
    assert isinstance(stop, CriticFailed) and "in 2 consecutive steps (3 to 4; critic.max_failed_steps=2)" in str(stop)
    assert "the last step's reasons: 2 http 500" in str(stop)
    never = FailedSteps(load_config(overrides=["questions_per_step=2", "critic.max_failed_steps=0"]))
    assert all(never.after(s, {"critique_failed": 2}, rolls) is None for s in range(1, 6))


def test_a_run_whose_critiques_all_fail_stops_after_max_failed_steps(serve, tmp_path):  # noqa: F811
    srv = serve(fault="status", status=500)
    over = [*SMALL, "steps=4", "critic.max_failed_steps=2", "eval=off", f"run_dir={tmp_path}",
            f"critic.base_url={srv.url}", "critic.retries=0"]
    with pytest.raises(CriticFailed, match=r"every critique failed in 2 consecutive steps \(1 to 2;.*3 http 500"):
        train(load_config(overrides=over), Dist())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["critique_failed"] == 3 for r in rows)
    assert (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").exists()  # kept for the same command
