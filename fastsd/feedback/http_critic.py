"""A frozen LLM critic behind an OpenAI-compatible `/chat/completions` server (vLLM, SGLang,
llama.cpp, or `tools/critic_server.py`).

The wire format. The request is one system message (`SCRIBE_INSTRUCTIONS`, the faithful-scribe
rules of docs/method.md; `critic_prompt.FREE_INSTRUCTIONS` for format=free; or `critic.prompt_file`,
see `fastsd.feedback.critic_prompt`) and one user message (`user_message`) holding the question, the
worked ground-truth solution, the final answer and the student's numbered steps; decoding is
greedy, and `critic.extra_body` is merged into the body last. The reply, after any
`<think>...</think>` block, is

    <first_error>K</first_error>            (K: the 1-based number of the earliest wrong step,
                                             or "none" when every student step is right)
    <step_1>...</step_1> ... <answer>...</answer>

and is accepted only if it is aligned with the student's steps (`parse_reply`): steps 1..K-1
copied verbatim (surrounding whitespace aside), step K present and different from the student's,
every step non-empty, and a final answer equal to the ground truth under the grader (config key
`grader`). The teacher then reads the trace re-rendered in the student's format (`format_steps`,
or `critic_prompt.free_text`), the copied prefix in the student's exact text.

Failure handling, per critique (a failed one is `Critique(ok=False, error=...)`, and the trainer
gives its rollout no loss):
- connection errors, timeouts, 408, 429 and 5xx are retried up to `retries` times, with
  exponential backoff and jitter (a Retry-After header in seconds is honoured); other 4xx are
  final, and a step whose every request gets one stops training (ValueError: a wrong model name
  or parameters would otherwise train on nothing);
- an answer that fails `parse_reply` (malformed JSON, or cut off at max_tokens, included) is asked
  for once more, telling the critic what was wrong, then fails;
- no request starts or runs past `step_timeout` seconds after the batch started.
At most `concurrency` requests are in flight. Validated replies are cached by the content of the
request, in jsonl files under the run directory, so a resumed run does not pay for them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from ..tasks.format import format_steps, parse_response
from .critic import Critic, Critique, check_items
from .critic_prompt import (
    FREE_INSTRUCTIONS,
    SCRIBE_INSTRUCTIONS,
    attempt_text,
    free_text,
    load_prompt,
    prompt_messages,
    user_message,
)

if TYPE_CHECKING:
    from ..config import CriticConfig

__all__ = ["HttpCritic", "ReplyCache", "SCRIBE_INSTRUCTIONS", "user_message", "parse_reply", "strip_think"]

_FIRST_ERROR = re.compile(r"<first_error>\s*(\w+)\s*</first_error>")


def strip_think(text: str) -> str:
    """Drop the critic's reasoning: everything up to the last `</think>` before its (last)
    `<first_error>` tag, opened by `<think>` or by the chat template. The trace after the tag copies
    the student's steps, which may hold think tags of their own: those are kept. A reply that opens
    `<think>` and never closes it before the tag is an error."""
    ends = [m.end() for m in re.finditer("</think>", text)]
    tags = [m.start() for m in _FIRST_ERROR.finditer(text)]
    before = [e for e in ends if tags and e <= tags[-1]]
    if before:
        return text[before[-1]:]
    if ends and not tags:  # no tag at all: the parse fails on that, after the reasoning
        return text[ends[-1]:]
    if text.lstrip().startswith("<think>"):
        raise ValueError("the reply ended inside <think> (out of tokens?)")
    return text


def parse_reply(reply: str, steps: list[str], answer: str, grader=None, fmt: str = "steps") -> Critique:
    """The critique in `reply` (see the module docstring), ValueError saying why it is unusable.

    `steps` are the student's steps, `answer` the ground-truth final answer, which the trace's
    answer must equal under `grader` (config key `grader`; exact match when None). Verdicts: steps
    before the first error are right; the critic judges nothing after it, so those count as wrong.
    The critique's text is in the student's format `fmt` (config key `format`).
    """
    body = strip_think(reply)
    marks = _FIRST_ERROR.findall(body)
    if len(marks) != 1:
        raise ValueError(f"expected one <first_error> tag, found {len(marks)}")
    mark = marks[0].lower()
    if mark == "none":
        k = None
    elif mark.isdigit() and 1 <= int(mark) <= len(steps):
        k = int(mark) - 1
    else:
        raise ValueError(f"<first_error>{marks[0]}</first_error>: the attempt has {len(steps)} steps")
    parsed = parse_response(_FIRST_ERROR.sub("", body))
    ours = parsed.steps
    if parsed.truncated or parsed.answer is None:
        raise ValueError("the trace has no complete <answer>")
    if not parsed.well_formed:
        raise ValueError("the trace is not only <step_1>..</step_1> ... <answer>..</answer> (text outside "
                         "the tags, steps out of order, or something after the answer)")
    right = (lambda a: grader.equal(a, answer)) if grader is not None else (lambda a: a == answer.strip())
    if not right(parsed.answer):
        raise ValueError(f"the trace ends in {parsed.answer!r}, not the correct answer {answer.strip()!r}")
    if not ours or any(not s.strip() for s in ours):
        raise ValueError("the trace has no steps, or an empty one")
    keep = len(steps) if k is None else k
    if len(ours) < keep + (k is not None):
        raise ValueError(f"the trace has {len(ours)} steps, fewer than the {keep} it must copy (plus the correction)")
    for i in range(keep):
        if ours[i].strip() != steps[i].strip():
            raise ValueError(f"step {i + 1} is not the student's step {i + 1} copied verbatim")
    if k is not None and "".join(ours[k].split()) == "".join(steps[k].split()):
        raise ValueError(f"step {k + 1} is marked wrong but copied unchanged (up to spacing)")
    verdicts = [i < keep for i in range(len(steps))]
    trace = list(steps[:keep]) + ours[keep:]
    if fmt != "free":
        return Critique(format_steps(trace, parsed.answer), verdicts, k)
    text = free_text(trace, answer.strip())
    boxed = parse_response(text, "free").answer  # what the teacher reads as the critique's answer
    if boxed is None or not right(boxed):
        raise ValueError(f"the last step's \\boxed{{}} holds {boxed!r}, not the correct answer {answer.strip()!r}"
                         if boxed is not None else "the last step has a \\boxed{ that is never closed")
    return Critique(text, verdicts, k)


class ReplyCache:
    """Validated replies keyed by a hash of the request body, in `directory/rank{R}.jsonl`.

    Every file in the directory is read (any rank may reuse any reply); each process appends to
    its own, one flushed line per reply, so a crash loses at most the line being written (a torn
    last line is skipped when read back).
    """

    def __init__(self, directory: str | os.PathLike, rank: int = 0):
        self.dir = Path(directory)  # made by the first put: building a critic writes nothing
        self.replies: dict[str, str] = {}
        for path in sorted(self.dir.glob("*.jsonl")):
            with open(path, "rb") as f:
                for line in f:  # ASCII lines (json escapes the rest): a torn one fails to parse
                    try:
                        row = json.loads(line)
                        self.replies[row["key"]] = row["reply"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn line from an interrupted write
        self._path = self.dir / f"rank{rank}.jsonl"
        if self._path.exists() and self._path.stat().st_size:
            with open(self._path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # end a torn line, so the next record starts on its own

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        self.replies[key] = reply
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self._path, "a", encoding="ascii") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")


class _Retry(Exception):
    """A transient failure: retry after `delay` seconds at least."""

    def __init__(self, reason: str, delay: float = 0.0):
        super().__init__(reason)
        self.reason, self.delay = reason, delay


class _Final(Exception):
    """A failure not worth retrying."""


class HttpCritic(Critic):
    """The `Critic` interface over HTTP; `critique_batch` sends a step's requests concurrently.

    `stats` counts the outcomes of the last `critique_batch` (ok, cached, failed, requests,
    max_in_flight, and one `failed: REASON` entry per failure reason).
    """

    RETRY_STATUS = frozenset({408, 429})  # and every 5xx

    def __init__(self, cfg: CriticConfig, cache_dir: str | os.PathLike | None = None, rank: int = 0, grader=None,
                 fmt: str = "steps"):
        self.cfg = cfg
        self.grader = grader  # the final-answer check (fastsd.tasks.grading); None: exact match
        self.fmt = fmt  # the student's response format: the critique is written back in it
        self.instructions = (load_prompt(cfg.prompt_file) if cfg.prompt_file
                             else FREE_INSTRUCTIONS if fmt == "free" else SCRIBE_INSTRUCTIONS)
        self.url = cfg.base_url.rstrip("/")
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.cache = ReplyCache(cache_dir, rank) if cache_dir is not None else None
        self.model = self._check_server()
        self.stats: Counter = Counter()
        self._in_flight = 0
        self._jitter = random.Random()  # never the trainer's random stream

    def _check_server(self) -> str:
        """Ask {base_url}/models, before any training: the server is up, takes the key, serves
        critic.model (or exactly one model, when it is empty). Returns the model name; ValueError
        naming the config key otherwise. A server without /models is trusted with critic.model."""
        try:
            r = httpx.get(f"{self.url}/models", headers=self._headers, timeout=min(self.cfg.timeout, 30.0))
        except httpx.HTTPError as e:
            raise ValueError(f"critic.base_url: cannot reach {self.url} ({type(e).__name__}: {e}); is the server up?") from None
        if r.status_code in (401, 403):
            raise ValueError(f"critic.api_key_env: {self.url} refused the key in ${self.cfg.api_key_env} "
                             f"(http {r.status_code}{'' if self._headers else '; that variable is not set'})")
        if r.status_code == 404 and self.cfg.model:
            return self.cfg.model
        try:
            r.raise_for_status()
            names = [m["id"] for m in r.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"critic.base_url: cannot list the models at {self.url}/models ({type(e).__name__}: {e})") from None
        if self.cfg.model and self.cfg.model not in names:
            raise ValueError(f"critic.model: {self.cfg.model!r} is not served at {self.url} (it serves {names})")
        if not self.cfg.model and len(names) != 1:
            raise ValueError(f"critic.model: the server at {self.url} serves {names}; name one")
        return self.cfg.model or names[0]

    def request(self, question: str, ground_truth: str, steps: list[str], answer: str | None = None,
                reference: str | None = None) -> dict:
        """The /chat/completions body for one attempt."""
        reference = reference or ground_truth
        text = user_message(question, reference, ground_truth, list(steps), answer)
        values = {"question": question, "reference": reference, "answer": ground_truth,
                  "attempt": attempt_text(list(steps), answer)}
        return {"model": self.model, "temperature": 0.0, "max_tokens": self.cfg.max_tokens,
                "messages": prompt_messages(self.instructions, text, values), **self.cfg.extra_body}

    def critique(self, question, ground_truth, steps, answer=None, reference=None) -> Critique:
        return self.critique_batch([(question, ground_truth, steps, answer, reference)])[0]

    def critique_batch(self, items: Iterable[Sequence]) -> list[Critique]:
        items = check_items(items)
        self.stats = Counter()
        bodies = [self.request(*item) for item in items]
        keys = [ReplyCache.key(b) for b in bodies]
        out: list[Critique | None] = [None] * len(items)
        todo = []
        for i, (item, key) in enumerate(zip(items, keys)):
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                try:
                    out[i] = parse_reply(cached, list(item[2]), str(item[1]), self.grader, self.fmt)
                    self.stats["cached"] += 1
                    continue
                except ValueError:
                    pass  # validated under other rules: ask again
            todo.append(i)
        if todo:
            results = asyncio.run(self._run([(bodies[i], items[i]) for i in todo]))
            for i, (crit, reply) in zip(todo, results):
                out[i] = crit
                if crit.ok and self.cache is not None:
                    self.cache.put(keys[i], reply)
        for crit in out:
            self.stats["ok" if crit.ok else "failed"] += 1
            if not crit.ok:
                self.stats[f"failed: {crit.error}"] += 1
        if out and all(not c.ok and c.error.startswith("http 4") for c in out):
            raise ValueError(f"critic: {self.url} refused every request of this step ({out[0].error}); "
                             f"check critic.model and critic.max_tokens")
        return out

    # ------------------------------------------------------------ async part

    async def _run(self, jobs: list[tuple[dict, Sequence]]) -> list[tuple[Critique, str]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.step_timeout
        sem = asyncio.Semaphore(self.cfg.concurrency)
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(headers=self._headers, limits=limits, timeout=self.cfg.timeout) as client:
            tasks = [asyncio.create_task(self._one(client, sem, body, item, deadline)) for body, item in jobs]
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()) + 0.5)
            results = []
            for t in tasks:
                if t.done():
                    results.append(t.result())
                else:  # only if a request ignored its own bound
                    t.cancel()
                    results.append((Critique("", ok=False, error="step time bound"), ""))
            await asyncio.gather(*tasks, return_exceptions=True)
        return results

    async def _one(self, client, sem, body, item, deadline) -> tuple[Critique, str]:
        """One critique with its retries; never raises."""
        loop = asyncio.get_running_loop()
        steps, truth = list(item[2]), str(item[1])
        retries, invalid_retry = self.cfg.retries, True
        reply = None
        while True:
            if loop.time() >= deadline:
                return Critique("", ok=False, error="step time bound"), ""
            try:
                # the step bound covers queueing for a slot too
                reply = await asyncio.wait_for(self._attempt(client, sem, body), deadline - loop.time())
                return parse_reply(reply, steps, truth, self.grader, self.fmt), strip_think(reply)
            except ValueError as e:  # an unusable answer: ask once more, saying what was wrong
                if invalid_retry:
                    invalid_retry = False
                    if reply is not None:
                        body = {**body, "messages": [*body["messages"], {"role": "assistant", "content": reply},
                                                     {"role": "user", "content": f"That reply cannot be used: {e}. "
                                                      "Reply again, in exactly the format asked for."}]}
                    continue
                return Critique("", ok=False, error=f"invalid reply: {e}"), ""
            except _Final as e:
                return Critique("", ok=False, error=str(e)), ""
            except (_Retry, asyncio.TimeoutError, httpx.TransportError) as e:
                if loop.time() >= deadline:
                    return Critique("", ok=False, error="step time bound"), ""
                reason = e.reason if isinstance(e, _Retry) else (
                    "timeout" if isinstance(e, (asyncio.TimeoutError, httpx.TimeoutException))
                    else f"connection error ({type(e).__name__})")
                reply = None
                if retries == 0:
                    return Critique("", ok=False, error=reason), ""
                used = self.cfg.retries - retries
                delay = self.cfg.backoff * 2 ** min(used, 5) * self._jitter.uniform(0.5, 1.0)
                delay = max(delay, getattr(e, "delay", 0.0) * self._jitter.uniform(1.0, 1.25))
                if loop.time() + delay >= deadline:
                    return Critique("", ok=False, error=f"{reason}; no time left to retry"), ""
                retries -= 1
                await asyncio.sleep(delay)
            except httpx.HTTPError as e:  # after TransportError, its subclass: a bad body encoding, redirects...
                return Critique("", ok=False, error=f"http error ({type(e).__name__}: {e})"), ""

    async def _attempt(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, body: dict) -> str:
        async with sem:
            self.stats["requests"] += 1
            self._in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)
            try:
                return await asyncio.wait_for(self._post(client, body), self.cfg.timeout)
            finally:
                self._in_flight -= 1

    async def _post(self, client: httpx.AsyncClient, body: dict) -> str:
        """The reply text; _Retry, _Final, or ValueError for a body that is no chat completion
        (transport errors propagate)."""
        r = await client.post(f"{self.url}/chat/completions", json=body)
        if r.status_code in self.RETRY_STATUS or r.status_code >= 500:
            raise _Retry(f"http {r.status_code}", _retry_after(r))
        if r.status_code >= 400:
            raise _Final(f"http {r.status_code}: {r.text[:200]}")
        try:
            choice = r.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"not a chat completion: {r.text[:200]!r}") from None
        if not isinstance(content, str):
            raise ValueError("the chat completion has no message content")
        if choice.get("finish_reason") == "length":
            raise ValueError("the reply was cut off at critic.max_tokens (finish_reason=length)")
        return content


def _retry_after(r: httpx.Response) -> float:
    """Seconds a retried answer asks us to wait (Retry-After in seconds; an HTTP date counts as 0)."""
    try:
        return max(0.0, float(r.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0
