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

Requests are sent, retried and bounded in time and size by `fastsd.feedback.critic_transport`
(Retry-After honoured; 429 and 5xx transient; other 4xx final), the reply is checked by
`fastsd.feedback.critic_reply`, and validated replies are cached by the content of the request
(`fastsd.feedback.critic_cache`), so a resumed run does not pay for them again. A step whose every
request gets a final 4xx stops training (ValueError: a wrong model name or parameters would
otherwise train on nothing).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import httpx

from .critic import Critic, Critique, check_items
from .critic_cache import ReplyCache
from .critic_prompt import (
    FREE_INSTRUCTIONS,
    SCRIBE_INSTRUCTIONS,
    attempt_text,
    load_prompt,
    prompt_messages,
    user_message,
)
from .critic_reply import parse_reply, strip_think
from .critic_transport import bounds, send_all

if TYPE_CHECKING:
    from ..config import CriticConfig

__all__ = ["HttpCritic", "ReplyCache", "SCRIBE_INSTRUCTIONS", "user_message", "parse_reply", "strip_think"]


class HttpCritic(Critic):
    """The `Critic` interface over HTTP; `critique_batch` sends a step's requests concurrently.

    `stats` counts the outcomes of the last `critique_batch` (ok, cached, failed, requests,
    max_in_flight, refused: critiques that got a final 4xx, and one `failed: REASON` entry per
    failure reason).
    """

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
        self._jitter = random.Random()  # never the trainer's random stream

    def _check_server(self) -> str:
        """Ask {base_url}/models, before any training: the server is up, takes the key, serves
        critic.model (or exactly one model, when it is empty). Returns the model name; ValueError
        naming the config key otherwise. A server without /models is trusted with critic.model."""
        try:
            r = httpx.get(f"{self.url}/models", headers=self._headers, timeout=min(bounds(self.cfg).timeout, 30.0))
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
            results = send_all(self.cfg, self.url, self._headers, [(bodies[i], self._check(items[i])) for i in todo],
                               self.stats, self._jitter)
            for i, (crit, reply) in zip(todo, results):
                out[i] = crit
                if crit.ok and self.cache is not None:
                    self.cache.put(keys[i], reply)
        for crit in out:
            self.stats["ok" if crit.ok else "failed"] += 1
            if not crit.ok:
                self.stats[f"failed: {crit.error}"] += 1
        if out and self.stats["refused"] >= len(out):  # a final 4xx each (not 408 or 429: those are transient)
            raise ValueError(f"critic: {self.url} refused every request of this step ({out[0].error}); "
                             f"check critic.model and critic.max_tokens")
        return out

    def _check(self, item: Sequence):
        """The check of a reply to `item`: (critique, reply kept), or ValueError saying why it is unusable."""
        steps, truth = list(item[2]), str(item[1])
        return lambda reply: (parse_reply(reply, steps, truth, self.grader, self.fmt), strip_think(reply))
