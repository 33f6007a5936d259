"""The HTTP critic client against tools/critic_server.py on 127.0.0.1: agreement with the in-process
critic, fault injection (hang, 429, 5xx, 4xx, reset, malformed JSON, misaligned critique), the
retry policy, the time bound, bounded concurrency, the reply cache, and a training run over HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsd import train as train_mod
from fastsd.config import CriticConfig, load_config, to_yaml
from fastsd.feedback import critic_transport
from fastsd.feedback.critic import ArithCritic
from fastsd.feedback.http_critic import HttpCritic, parse_reply, strip_think
from fastsd.model.dist import Dist
from fastsd.tasks import arith, make_split
from fastsd.tasks.format import format_steps, parse_response
from fastsd.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from critic_server import CriticServer  # noqa: E402


def attempts(n: int, seed: int = 0) -> list[tuple]:
    """(question, answer, steps, student answer, reference) for n questions, four kinds of attempt
    each: right, wrong at step 2 in spaced notation, wrong at step 1, cut off after one step."""
    out = []
    for p in make_split("test", n, seed):
        steps = parse_response(p.solution).steps
        s2 = arith.parse_step(steps[1])
        wrong2 = [steps[0], f"{s2.left} {s2.op} {s2.right} = {s2.result + 1}", *steps[2:]]
        s1 = arith.parse_step(steps[0])
        wrong1 = [f"{s1.left}{s1.op}{s1.right}={s1.result + 3}", *steps[1:]]
        out += [(p.question, p.answer, steps, p.answer, p.reference_solution),
                (p.question, p.answer, wrong2, str(int(p.answer) + 1), p.reference_solution),
                (p.question, p.answer, wrong1, None, p.reference_solution),
                (p.question, p.answer, steps[:1], None, p.reference_solution)]
    return out


@pytest.fixture
def serve():
    started = []

    def start(**kw) -> CriticServer:
        srv = CriticServer(**kw).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.close()


def http_cfg(url: str, **kw) -> CriticConfig:
    base = dict(kind="http", base_url=url, timeout=5.0, step_timeout=20.0, concurrency=3, retries=2, backoff=0.01)
    return CriticConfig(**{**base, **kw})


def same(got, want) -> bool:
    return got.ok and got.text == want.text and got.first_error == want.first_error


# ---------------------------------------------------------------- the happy path

def test_critiques_over_http_equal_the_in_process_critic(serve):
    srv = serve(think=True, latency=0.02)
    items = attempts(5)
    critic = HttpCritic(http_cfg(srv.url))  # model="" asks /v1/models
    assert critic.model == "fastsd-arith-critic"
    got = critic.critique_batch(items)
    want = ArithCritic().critique_batch(items)
    assert all(same(g, w) for g, w in zip(got, want))
    for g, w in zip(got, want):  # verdicts agree up to the first error (the HTTP critic judges no further)
        k = len(w.verdicts) if w.first_error is None else w.first_error + 1
        assert g.verdicts[:k] == w.verdicts[:k]
    assert {w.first_error for w in want} == {None, 0, 1}  # every kind of attempt was there
    assert srv.stats["requests"] == len(items) and critic.stats["ok"] == len(items)
    assert 2 <= srv.stats["max_in_flight"] <= 3  # concurrent, and never past the limit
    assert critic.critique(*items[1]).text == want[1].text  # the one-at-a-time path


def test_the_request_is_greedy_and_carries_the_ground_truth_and_the_numbered_steps(serve):
    critic = HttpCritic(http_cfg(serve().url, model="fastsd-arith-critic"))
    q, a, steps, ans, ref = attempts(1)[1]
    body = critic.request(q, a, steps, ans, ref)
    assert body["model"] == "fastsd-arith-critic" and body["temperature"] == 0
    system, user = body["messages"]
    assert "faithful scribe" in system["content"]
    text = user["content"]
    assert q in text and ref in text and f"<correct_answer>{a}</correct_answer>" in text
    assert all(f"<step_{i}>{s}</step_{i}>" in text for i, s in enumerate(steps, 1))


def test_api_key_comes_from_the_environment_and_stays_out_of_the_config(serve, monkeypatch):
    locked = serve(api_key="sk-secret-123")
    with pytest.raises(ValueError, match=r"critic.api_key_env: .* refused the key .* not set"):
        HttpCritic(http_cfg(locked.url, api_key_env="MY_CRITIC_KEY"))  # checked before any training
    monkeypatch.setenv("MY_CRITIC_KEY", "sk-secret-123")
    assert HttpCritic(http_cfg(locked.url, api_key_env="MY_CRITIC_KEY")).critique_batch(attempts(1)[:1])[0].ok
    srv = serve()
    cfg = http_cfg(srv.url, api_key_env="MY_CRITIC_KEY")
    assert HttpCritic(cfg).critique_batch(attempts(1)[:1])[0].ok
    assert srv.last_authorization == "Bearer sk-secret-123"
    full = load_config(overrides=["critic=http", f"critic.base_url={srv.url}", "critic.api_key_env=MY_CRITIC_KEY"])
    assert "MY_CRITIC_KEY" in to_yaml(full) and "sk-secret" not in to_yaml(full) + repr(full)
    monkeypatch.delenv("MY_CRITIC_KEY")
    assert HttpCritic(cfg).critique_batch(attempts(1)[:1])[0].ok
    assert srv.last_authorization is None  # no key, no header


# ---------------------------------------------------------------- faults

# (server options, critic options, requests per attempt, outcome): outcome None means every
# critique must come back right; otherwise every critique fails with an error starting so.
FAULTS = {
    "429-then-ok": (dict(fault="status", status=429, fail_first=1), {}, 2, None),
    "503-once": (dict(fault="status", status=503, fail_first=1), {}, 2, None),
    "500-always": (dict(fault="status", status=500), dict(retries=2), 3, "http 500"),
    "408-then-ok": (dict(fault="status", status=408, fail_first=2), {}, 3, None),
    "400-final": (dict(fault="status", status=400), dict(retries=2), 1, "refused"),
    "404-final": (dict(fault="status", status=404), dict(retries=2), 1, "refused"),
    "hang": (dict(fault="hang"), dict(timeout=0.3, retries=1), 2, "timeout"),
    "reset": (dict(fault="reset"), dict(retries=2), 3, "connection error"),
    "reset-once": (dict(fault="reset", fail_first=1), dict(retries=2), 2, None),
    "malformed-json": (dict(fault="malformed"), dict(retries=3), 2, "invalid reply"),
    "malformed-once": (dict(fault="malformed", fail_first=1), {}, 2, None),
    "misaligned": (dict(fault="misaligned"), dict(retries=3), 2, "invalid reply"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault(serve, name):
    server_kw, critic_kw, per_item, outcome = FAULTS[name]
    srv = serve(**server_kw)
    items = attempts(2)[:5]
    cfg = http_cfg(srv.url, **critic_kw)
    critic = HttpCritic(cfg)
    t0 = time.monotonic()
    if outcome == "refused":  # every request of the step got a final 4xx: a setup error, stop
        with pytest.raises(ValueError, match="refused every request"):
            critic.critique_batch(items)
    else:
        got = critic.critique_batch(items)  # never raises
    elapsed = time.monotonic() - t0
    assert elapsed < cfg.step_timeout
    assert critic.stats["max_in_flight"] <= cfg.concurrency
    if name not in ("hang", "reset"):  # a broken-off handler may outlive its client by a moment
        assert srv.stats["max_in_flight"] <= cfg.concurrency
    assert srv.stats["requests"] == per_item * len(items)  # only the listed cases are retried
    if outcome == "refused":
        assert critic.stats["failed"] == len(items)
    elif outcome is None:
        want = ArithCritic().critique_batch(items)
        assert all(same(g, w) for g, w in zip(got, want))
    else:
        assert all(not g.ok and g.error.startswith(outcome) and g.text == "" for g in got), [g.error for g in got]
        assert critic.stats["failed"] == len(items) and critic.stats["ok"] == 0


def test_a_step_never_outlasts_its_time_bound(serve):
    srv = serve(fault="hang")
    cfg = http_cfg(srv.url, timeout=30.0, step_timeout=0.6, retries=10, concurrency=2)
    critic = HttpCritic(cfg)
    t0 = time.monotonic()
    got = critic.critique_batch(attempts(2))
    assert time.monotonic() - t0 < 0.6 + 2.0  # the bound, plus closing the connections
    assert all(not g.ok and g.error == "step time bound" for g in got)


def test_backoff_doubles_with_jitter_and_honours_retry_after(serve, monkeypatch):
    srv = serve(fault="status", status=500)
    slept = []
    real_sleep = asyncio.sleep

    async def record(delay, *a, **k):
        if delay > 0:
            slept.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr(critic_transport.asyncio, "sleep", record)
    HttpCritic(http_cfg(srv.url, retries=4, backoff=0.1)).critique_batch(attempts(1)[:1])
    assert len(slept) == 4
    for i, d in enumerate(slept):
        assert 0.1 * 2**i * 0.5 <= d <= 0.1 * 2**i
    assert len({round(d / 2**i, 6) for i, d in enumerate(slept)}) > 1  # jittered, not a fixed ladder

    slept.clear()
    srv429 = serve(fault="status", status=429, fail_first=1)
    srv429.retry_after = "2"
    assert HttpCritic(http_cfg(srv429.url, backoff=0.01)).critique_batch(attempts(1)[:1])[0].ok
    assert slept and 2 <= slept[0] <= 2.5  # Retry-After: 2 (plus jitter) beats a 10 ms backoff


def test_unreachable_server_is_a_clear_error(serve):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="critic.base_url: cannot reach"):
        HttpCritic(http_cfg(f"http://127.0.0.1:{port}/v1"))
    srv = serve()
    with pytest.raises(ValueError, match="critic.model: 'nope' is not served"):
        HttpCritic(http_cfg(srv.url, model="nope"))
    critic = HttpCritic(http_cfg(srv.url, retries=1))
    srv.close()  # the server goes away during the run
    got = critic.critique_batch(attempts(1)[:2])
    assert all(not g.ok and g.error.startswith("connection error") for g in got)


# ---------------------------------------------------------------- cache

def test_cache_makes_a_second_run_free(serve, tmp_path):
    srv = serve()
    items, more = attempts(2), attempts(3)[8:]
    first = HttpCritic(http_cfg(srv.url), cache_dir=tmp_path).critique_batch(items)
    assert srv.stats["requests"] == len(items)
    with open(tmp_path / "rank0.jsonl", "a") as f:
        f.write('{"key": "torn, \\u00e9')  # an interrupted write
    HttpCritic(http_cfg(srv.url), cache_dir=tmp_path).critique_batch(more)  # appends after the torn line
    again = HttpCritic(http_cfg(srv.url), cache_dir=tmp_path, rank=1)
    second = again.critique_batch(items + more)
    assert srv.stats["requests"] == len(items) + len(more)  # nothing asked twice
    assert again.stats["cached"] == len(items) + len(more)
    assert [c.text for c in second[: len(items)]] == [c.text for c in first]
    other = HttpCritic(http_cfg(srv.url, max_tokens=100), cache_dir=tmp_path)
    other.critique_batch(items[:1])  # another request body is another request
    assert srv.stats["requests"] == len(items) + len(more) + 1


@pytest.mark.parametrize("fault", ["status", "misaligned"])
def test_failed_critiques_are_not_cached(serve, tmp_path, fault):
    srv = serve(fault=fault, status=500)
    got = HttpCritic(http_cfg(srv.url, retries=0), cache_dir=tmp_path).critique_batch(attempts(1))
    assert not any(g.ok for g in got)
    assert not (tmp_path / "rank0.jsonl").exists() or (tmp_path / "rank0.jsonl").read_text() == ""


# ---------------------------------------------------------------- reply validation

STEPS = ["12+7=19", "19*3=58", "58-5=53"]


def reply(first, steps, answer="52"):
    return f"<first_error>{first}</first_error>\n{format_steps(steps, answer)}"


def test_parse_reply_accepts_the_faithful_scribe_form():
    c = parse_reply(reply(2, ["12+7=19", "19*3=57", "57-5=52"]), STEPS, "52")
    assert c.ok and c.first_error == 1 and c.verdicts == [True, False, False]
    assert c.text == "<step_1>12+7=19</step_1><step_2>19*3=57</step_2><step_3>57-5=52</step_3><answer>52</answer>"
    # the copied prefix keeps the student's exact text even when the critic trimmed its spaces
    c = parse_reply(reply(3, ["12+7=19", "19*3=58", "57-5=52"]), [" 12+7=19 ", "19*3=58", "58-5=53"], "52")
    assert c.text.startswith("<step_1> 12+7=19 </step_1>")
    c = parse_reply(reply("none", ["12+7=19"] + ["19*3=57", "57-5=52"]), ["12+7=19"], "52")
    assert c.first_error is None and c.verdicts == [True]  # right so far, continued to the end


@pytest.mark.parametrize("bad, why", [
    ("<step_1>12+7=19</step_1><answer>52</answer>", "one <first_error>"),
    (reply(4, STEPS), "has 3 steps"),
    (reply(0, STEPS), "has 3 steps"),
    (reply(2, ["12+7=20", "19*3=57", "57-5=52"]), "step 1 is not the student's"),
    (reply(2, ["12+7=19", "19*3=58", "58-5=53"]), "copied unchanged"),
    (reply(2, ["12+7=19", "19 * 3 = 58", "58-5=53"]), "copied unchanged"),  # only respaced
    ("<first_error>2</first_error>Sure:<step_1>12+7=19</step_1><step_2>19*3=57</step_2><answer>52</answer>", "not only"),
    (reply(2, ["12+7=19", "19*3=57"]) + "<step_3>x</step_3>", "not only"),
    ("<first_error>2</first_error><step_1>12+7=19</step_1><step_3>19*3=57</step_3><answer>52</answer>", "not only"),
    (reply("none", ["12+7=19", "19*3=57"]), "fewer than"),
    (reply(2, ["12+7=19", "19*3=57", "57-5=52"], "53"), "not the correct answer"),
    ("<first_error>2</first_error><step_1>12+7=19</step_1><step_2>19*3=57</step_2>", "no complete <answer>"),
    (reply(2, ["12+7=19", " ", "57-5=52"]), "empty"),
    ("<think>step 2 looks wrong, so", "inside <think>"),
])
def test_parse_reply_rejects_what_does_not_align(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_reply(bad, STEPS, "52")


def test_strip_think():
    assert strip_think("<think>a</think>\nB") == "\nB"
    assert strip_think("a, so</think>B") == "B"  # templates that open <think> in the prompt
    assert strip_think("B") == "B"
    # The trace copies the student's steps verbatim, think tags and all (a random or a thinking
    # student writes them): they are the critique's, not the critic's reasoning.
    trace = "<first_error>2</first_error>\n<step_1>so <think> x</step_1><step_2>y </think></step_2>"
    assert strip_think(trace) == trace
    assert strip_think("<think>draft <first_error>1</first_error></think>" + trace) == trace
    assert strip_think("I check step 1.</think>" + trace) == trace
    with pytest.raises(ValueError, match="ended inside <think>"):
        strip_think("<think>step 2 is wrong because <first_error>2</first_error>")


# ---------------------------------------------------------------- in the trainer

SMALL = ["steps=2", "questions_per_step=3", "eval.k=2", "data.eval_size=2", "data.train_size=16",
         "rollout.max_new_tokens=40", "optim.micro_batch=2", "condition=critique", "critic=http",
         "critic.retries=1", "critic.backoff=0.01"]


def test_training_over_http_end_to_end(serve, tmp_path):
    srv = serve()
    cfg = load_config(overrides=[*SMALL, f"run_dir={tmp_path}", f"critic.base_url={srv.url}"])
    train(cfg, Dist())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["critique_failed"] for r in steps] == [0, 0]
    rolls = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(rolls) == 6 and all(r["trained"] and r["context"].endswith("</answer>") for r in rolls)
    assert srv.stats["requests"] == 6
    assert sum(1 for _ in (tmp_path / "critic_cache" / "rank0.jsonl").open()) == 6


def test_a_resumed_run_takes_repeated_critiques_from_the_cache(serve, tmp_path):
    srv = serve()
    over = [*SMALL, f"run_dir={tmp_path}", f"critic.base_url={srv.url}", "checkpoint.every=1", "checkpoint.keep=3"]
    step2 = lambda: [r for r in map(json.loads, (tmp_path / "rollouts.jsonl").read_text().splitlines())  # noqa: E731
                     if r["step"] == 2]
    train(load_config(overrides=over), Dist())
    assert srv.stats["requests"] == 6
    first = step2()
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000002")  # as if the run died before saving step 2
    train(load_config(overrides=over), Dist())  # resume=auto: step 2 again, same rollouts
    assert srv.stats["requests"] == 6  # its three critiques came from the cache
    assert len(first) == 3 and step2() == first  # logged once (cut back, then written again)


def test_failed_critiques_give_no_loss_and_are_counted(serve, tmp_path, capsys, monkeypatch):
    srv = serve(fault="status", status=500)
    cfg = load_config(overrides=[*SMALL, "steps=1", f"run_dir={tmp_path}", f"critic.base_url={srv.url}"])
    real_update, updates = train_mod.update, []

    def spy(cfg, d, policy, *a, **k):
        before = {n: p.detach().clone() for n, p in policy.lm.named_parameters()}
        out = real_update(cfg, d, policy, *a, **k)
        updates.append(all(torch.equal(before[n], p) for n, p in policy.lm.named_parameters()))
        return out

    monkeypatch.setattr(train_mod, "update", spy)
    train(cfg, Dist())
    assert updates == [True]  # the step ran, and took no AdamW step
    row = next(json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "reward" in l)
    assert row["critique_failed"] == 3 and row["usable"] == 0
    rolls = [json.loads(l) for l in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert all(not r["trained"] and r["context"] is None and r["critique_error"] == "http 500" for r in rolls)
    out = capsys.readouterr()
    assert "3 of 3 critiques failed" in out.out + out.err
    assert srv.stats["requests"] == 3 * 2
