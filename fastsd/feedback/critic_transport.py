"""The HTTP critic's requests: sent concurrently, retried, bounded in time and size.

Per critique (a failed one is `Critique(ok=False, error=...)`, and the trainer gives its rollout no loss):
- connection errors, timeouts, 408, 429 and 5xx are transient: retried up to `critic.retries`
  times, after an exponential back-off with jitter (`critic.backoff` seconds, doubling, at most
  32x) or after the wait a `Retry-After` header asks for (seconds or an HTTP date), whichever is
  longer. A wait that would end past the step's time bound is not taken: the critique fails then,
  saying so. Other 4xx are final (counted in `stats["refused"]`);
- an answer the caller's check refuses (malformed JSON, cut off at max_tokens, not aligned with
  the student's steps) is asked for once more, telling the critic what was wrong, then fails;
- a reply body past `critic.max_reply_bytes` fails its critique, unread past the limit;
- one request may take `critic.timeout` seconds, reply included; no request starts or runs
  past `critic.step_timeout` seconds after the batch started. Left unset (null), both scale with
  `critic.max_tokens`, as does the size limit (`bounds`);
- Ctrl-C while waiting cancels every request and closes the connections before the
  KeyboardInterrupt goes on, without asyncio's "Task exception was never retrieved" reports.
At most `critic.concurrency` requests are in flight.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone

import httpx

from .critic import Critique

__all__ = ["Bounds", "bounds", "retry_after", "send_all"]

RETRY_STATUS = frozenset({408, 429})  # and every 5xx


class Bounds(tuple):
    """(timeout, step_timeout, max_reply_bytes) of a critic config, null ones made concrete."""

    timeout = property(lambda self: self[0])
    step_timeout = property(lambda self: self[1])
    max_reply_bytes = property(lambda self: self[2])


def bounds(cfg) -> Bounds:
    """The time and size bounds of `cfg` (a `CriticConfig`): what it sets, or for a null key a value
    scaled by max_tokens: a request 30 s + 1 s per 40 tokens (235 s at 8192), a step twice a
    request (a timed-out request is retried once within it), a reply 64 KiB + 32 bytes per token."""
    timeout = cfg.timeout if cfg.timeout is not None else 30.0 + cfg.max_tokens / 40
    step = cfg.step_timeout if cfg.step_timeout is not None else 2 * timeout
    size = cfg.max_reply_bytes if cfg.max_reply_bytes is not None else 65536 + 32 * cfg.max_tokens
    return Bounds((float(timeout), float(step), int(size)))


def retry_after(value: str | None) -> float:
    """Seconds a `Retry-After` header asks to wait: a number of seconds or an HTTP date (0 when
    absent, past or unreadable)."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _Retry(Exception):
    """A transient failure: retry after `delay` seconds at least."""

    def __init__(self, reason: str, delay: float = 0.0):
        super().__init__(reason)
        self.reason, self.delay = reason, delay


class _Final(Exception):
    """A failure not worth retrying."""


def send_all(cfg, url: str, headers: dict, jobs: list[tuple[dict, Callable]], stats: Counter,
             jitter: random.Random) -> list[tuple[Critique, str]]:
    """Send each job's body to {url}/chat/completions; returns per job (critique, reply kept).
    A job's check takes the reply text and returns (critique, reply kept) or raises ValueError
    saying why the reply is unusable. Never raises but for Ctrl-C."""
    return asyncio.run(_Batch(cfg, url, headers, stats, jitter).run(jobs))


class _Batch:
    def __init__(self, cfg, url, headers, stats, jitter):
        self.cfg, self.url, self.headers, self.stats, self.jitter = cfg, url, headers, stats, jitter
        self.bounds = bounds(cfg)
        self.in_flight = 0

    async def run(self, jobs):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bounds.step_timeout
        sem = asyncio.Semaphore(self.cfg.concurrency)
        n = self.cfg.concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(headers=self.headers, limits=limits, timeout=self.bounds.timeout) as client:
            tasks = [asyncio.create_task(self._one(client, sem, body, check, deadline)) for body, check in jobs]
            try:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()) + 0.5)
            finally:  # Ctrl-C (this task cancelled) included: every request ends before the client closes
                for t in tasks:
                    if not t.done():
                        t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return [t.result() if not t.cancelled() else (Critique("", ok=False, error="step time bound"), "")
                for t in tasks]

    async def _one(self, client, sem, body, check, deadline) -> tuple[Critique, str]:
        """One critique with its retries; never raises (but for its cancellation)."""
        loop = asyncio.get_running_loop()
        retries, invalid_retry = self.cfg.retries, True
        reply = None

        def failed(error: str) -> tuple[Critique, str]:
            return Critique("", ok=False, error=error), ""

        while True:
            if loop.time() >= deadline:
                return failed("step time bound")
            try:
                # the step bound covers queueing for a slot too
                reply = await asyncio.wait_for(self._attempt(client, sem, body), deadline - loop.time())
                return check(reply)
            except ValueError as e:  # an unusable answer: ask once more, saying what was wrong
                if invalid_retry:
                    invalid_retry = False
                    if reply is not None:
                        body = {**body, "messages": [*body["messages"], {"role": "assistant", "content": reply},
                                                     {"role": "user", "content": f"That reply cannot be used: {e}. "
                                                      "Reply again, in exactly the format asked for."}]}
                    continue
                return failed(f"invalid reply: {e}")
            except _Final as e:
                return failed(str(e))
            except (_Retry, asyncio.TimeoutError, httpx.TransportError) as e:
                if loop.time() >= deadline:
                    return failed("step time bound")
                reason = e.reason if isinstance(e, _Retry) else (
                    "timeout" if isinstance(e, (asyncio.TimeoutError, httpx.TimeoutException))
                    else f"connection error ({type(e).__name__})")
                reply = None
                if retries == 0:
                    return failed(reason)
                used = self.cfg.retries - retries
                delay = self.cfg.backoff * 2 ** min(used, 5) * self.jitter.uniform(0.5, 1.0)
                asked = getattr(e, "delay", 0.0)
                delay = max(delay, asked * self.jitter.uniform(1.0, 1.25))
                if loop.time() + delay >= deadline:
                    wait = f"the server asks to wait {asked:.0f} s" if asked else "no time left to retry"
                    return failed(f"{reason}; {wait} (critic.step_timeout)")
                retries -= 1
                await asyncio.sleep(delay)
            except httpx.HTTPError as e:  # after TransportError, its subclass: a bad body encoding, redirects...
                return failed(f"http error ({type(e).__name__}: {e})")

    async def _attempt(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, body: dict) -> str:
        async with sem:
            self.stats["requests"] += 1
            self.in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
            try:
                return await asyncio.wait_for(self._post(client, body), self.bounds.timeout)
            finally:
                self.in_flight -= 1

    async def _read(self, r: httpx.Response) -> bytes:
        """The body of `r`, _Final past the size bound (not read further)."""
        limit = self.bounds.max_reply_bytes
        past = f"the reply is larger than critic.max_reply_bytes={limit}"
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _Final(f"{past} (Content-Length {declared})")
        chunks, size = [], 0
        async for chunk in r.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise _Final(past)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _post(self, client: httpx.AsyncClient, body: dict) -> str:
        """The reply text; _Retry, _Final, or ValueError for a body that is no chat completion
        (transport errors propagate)."""
        async with client.stream("POST", f"{self.url}/chat/completions", json=body) as r:
            if r.status_code in RETRY_STATUS or r.status_code >= 500:
                raise _Retry(f"http {r.status_code}", retry_after(r.headers.get("retry-after")))
            raw = await self._read(r)
        text = raw.decode("utf-8", errors="replace")
        if r.status_code >= 400:
            self.stats["refused"] += 1
            raise _Final(f"http {r.status_code}: {text[:200]}")
        try:
            choice = json.loads(raw)["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"not a chat completion: {text[:200]!r}") from None
        if not isinstance(content, str):
            raise ValueError("the chat completion has no message content")
        if choice.get("finish_reason") == "length":
            raise ValueError("the reply was cut off at critic.max_tokens (finish_reason=length)")
        return content
