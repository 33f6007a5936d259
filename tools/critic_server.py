r"""Serve the built-in programmatic critic over an OpenAI-compatible API, on loopback.

    python tools/critic_server.py --port 8100
    fastsd-train critic=http critic.base_url=http://127.0.0.1:8100/v1

Endpoints: GET /v1/models and POST /v1/chat/completions. The request must be the one
`fastsd.feedback.http_critic` builds (the question, correct answer and student attempt are read back from
its user message); the reply is `fastsd.feedback.critic.ArithCritic`'s critique in the wire format of
`fastsd.feedback.http_critic`. So the whole critique pipeline runs over real HTTP without a GPU.

Fault injection, for testing clients (`--fault`; applied to the first `--fail-first N` attempts of
each distinct request, or to every attempt with N = 0):
    hang        never answer (until the server stops)
    status      answer with HTTP `--status` (e.g. 429, 500, 400); a 429 or 503 carries
                `Retry-After: --retry-after` (seconds or an HTTP date)
    reset       read the request, then reset the connection (TCP RST)
    malformed   answer 200 with a body that is not JSON
    misaligned  a critique whose steps do not line up with the attempt's (an extra first step)
    huge        the right critique in a body padded with 2 MB of JSON whitespace (Content-Length says so)
    endless     answer 200 with a chunked body that never ends (until the client hangs up)
`--think` wraps each reply in a <think>...</think> block first, as reasoning models do.

`--mode math` answers for any data (LaTeX answers, free-form or tagged responses) instead of the
arithmetic task: a scribe that copies the student's steps before step `--first-error K`
(default 2; 0: every step is right), writes a changed step K, and finishes with the correct
answer as `\boxed{...}` (so its critiques validate under `grader=math`, not `grader=exact`).
It judges nothing: it is a stand-in that exercises the whole pipeline, not a critic.

    python tools/critic_server.py --port 8100 --mode math
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastsd.feedback.critic import ArithCritic, Critique
from fastsd.tasks.format import format_steps, parse_response

FAULTS = ("none", "hang", "status", "reset", "malformed", "misaligned", "huge", "endless")
MODES = ("arith", "math")
_SECTION = {name: re.compile(rf"<{name}>\n?(.*?)\n?</{name}>", re.S)
            for name in ("question", "correct_answer", "student_attempt")}


def read_request(messages: list) -> tuple[str, str, list[str], str | None]:
    """(question, correct answer, student steps, student answer) from fastsd's user message
    (the first one: a retry appends the critic's last reply and a note)."""
    text = next(m["content"] for m in messages if m.get("role") == "user")
    found = {k: rx.search(text) for k, rx in _SECTION.items()}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise ValueError(f"the user message has no <{missing[0]}> section")
    attempt = found["student_attempt"].group(1)
    parsed = parse_response("" if attempt == "(no steps)" else attempt)
    return found["question"].group(1), found["correct_answer"].group(1), parsed.steps, parsed.answer


def math_scribe(answer: str, steps: list[str], first_error: int) -> Critique:
    """`--mode math`'s critique: steps before `first_error` (1-based; 0: none wrong) copied, a
    changed step there, then the correct answer in \\boxed{}."""
    k = first_error if 0 < first_error <= len(steps) else None
    keep = steps if k is None else steps[:k - 1]
    fixed = [] if k is None else [f"Checking step {k} against the correct solution, it should lead to {answer}."]
    final = f"Therefore the answer is $\\boxed{{{answer}}}$."
    trace = format_steps([*keep, *fixed, final], f"\\boxed{{{answer}}}")
    return Critique(trace, [k is None or i < k - 1 for i in range(len(steps))], None if k is None else k - 1)


class CriticServer(ThreadingHTTPServer):
    """The server; `stats` counts requests (`requests`, per status, `max_in_flight`);
    `last_authorization` is the Authorization header last seen, `last_body` the last request body
    that parsed as JSON."""

    daemon_threads = True

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, model: str = "fastsd-arith-critic",
                 fault: str = "none", status: int = 500, fail_first: int = 0, latency: float = 0.0,
                 think: bool = False, api_key: str | None = None, mode: str = "arith", first_error: int = 2):
        if fault not in FAULTS:
            raise ValueError(f"fault: expected one of {FAULTS}, got {fault!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode, self.first_error = mode, first_error
        super().__init__((host, port), _Handler)
        self.model, self.fault, self.status, self.fail_first = model, fault, status, fail_first
        self.latency, self.think, self.api_key = latency, think, api_key
        self.retry_after = "0"  # the Retry-After header of a 429 or 503
        self.last_authorization: str | None = None
        self.last_body: dict | None = None
        self.critic = ArithCritic()
        self.stats: Counter = Counter()
        self.attempts: Counter = Counter()  # per distinct request body
        self.in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> CriticServer:
        """Serve from a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()  # releases hanging handlers
        self.shutdown()
        self.server_close()

    def reply_text(self, body: dict) -> str:
        """The assistant message for a well-formed request (ValueError otherwise)."""
        question, answer, steps, student_answer = read_request(body["messages"])
        crit = (math_scribe(answer, steps, self.first_error) if self.mode == "math"
                else self.critic.critique(question, answer, steps, student_answer))
        first = "none" if crit.first_error is None else str(crit.first_error + 1)
        trace = crit.text
        if self.fault == "misaligned" and self._faulty(body):
            parsed = parse_response(crit.text)
            trace = format_steps(["restating the question"] + parsed.steps, parsed.answer)
            first = str(crit.first_error + 2) if crit.first_error is not None else "none"
        text = f"<first_error>{first}</first_error>\n{trace}"
        return f"<think>\nChecking each step against the correct solution.\n</think>\n{text}" if self.think else text

    def _faulty(self, body: dict) -> bool:
        """Does the fault apply to this attempt of this request (its first user message)?"""
        key = next((m.get("content") for m in body["messages"] if m.get("role") == "user"), "")
        with self.lock:
            self.attempts[key] += 1
            n = self.attempts[key]
        return self.fault != "none" and (self.fail_first == 0 or n <= self.fail_first)


class _Handler(BaseHTTPRequestHandler):
    server: CriticServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if code in (429, 503):
            self.send_header("Retry-After", self.server.retry_after)
        self.end_headers()
        self.wfile.write(payload)
        with self.server.lock:
            self.server.stats[f"status {code}"] += 1

    def _error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": {"message": message, "code": code}}).encode())

    def _hang(self) -> None:
        """Say nothing until the client gives up (closes the connection) or the server stops."""
        conn = self.connection
        while not self.server.stopping.wait(0.02):
            if select.select([conn], [], [], 0)[0]:
                try:
                    if not conn.recv(1, socket.MSG_PEEK):
                        return  # the client closed
                except OSError:
                    return

    def _authorized(self) -> bool:
        if self.server.api_key is None or self.headers.get("Authorization") == f"Bearer {self.server.api_key}":
            return True
        self._error(401, "invalid API key")
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": self.server.model, "object": "model"}]}).encode())
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        srv = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with srv.lock:
            srv.stats["requests"] += 1
            srv.last_authorization = self.headers.get("Authorization")
            srv.in_flight += 1
            srv.stats["max_in_flight"] = max(srv.stats["max_in_flight"], srv.in_flight)
        try:
            self._answer(raw)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _answer(self, raw: bytes) -> None:
        srv = self.server
        if not self._authorized():
            return None
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("expected a JSON object with messages")
        except ValueError as e:
            return self._error(400, f"bad request: {e}")
        srv.last_body = body
        if srv.latency:
            srv.stopping.wait(srv.latency)
        if srv.fault in ("hang", "status", "reset", "malformed", "endless") and srv._faulty(body):
            if srv.fault == "endless":
                return self._endless()
            if srv.fault == "hang":
                self._hang()
                return None
            if srv.fault == "status":
                return self._error(srv.status, f"injected HTTP {srv.status}")
            if srv.fault == "malformed":
                return self._send(200, b'{"choices": [{"message": {"content": "<first_er')
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # RST
            self.close_connection = True
            return None
        try:
            text = srv.reply_text(body)
        except (ValueError, KeyError, StopIteration) as e:
            return self._error(400, f"not a fastsd critique request: {e}")
        payload = json.dumps({
            "id": f"chatcmpl-{srv.stats['requests']}", "object": "chat.completion", "created": int(time.time()),
            "model": srv.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }).encode()
        if srv.fault == "huge" and srv._faulty(body):
            payload += b" " * (2 << 20)
        self._send(200, payload)
        return None

    def _endless(self) -> None:
        """A 200 whose chunked body never ends, until the client hangs up or the server stops."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in itertools.chain([b'{"choices": ['], itertools.repeat(b" " * 65536)):
                if self.server.stopping.is_set():
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the client hung up
        self.close_connection = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    ap.add_argument("--model", default="fastsd-arith-critic", help="the model name /v1/models lists")
    ap.add_argument("--fault", choices=FAULTS, default="none", help="inject a fault (listed below)")
    ap.add_argument("--status", type=int, default=500, help="HTTP status for --fault status")
    ap.add_argument("--fail-first", type=int, default=0, metavar="N",
                    help="fault only the first N attempts of each request (0: all)")
    ap.add_argument("--retry-after", default="0", metavar="S",
                    help="the Retry-After header of a 429 or 503: seconds or an HTTP date")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    ap.add_argument("--think", action="store_true", help="prefix each reply with a <think> block")
    ap.add_argument("--mode", choices=MODES, default="arith", help="arith: the built-in critic; math: a scribe "
                    "for any data (see above)")
    ap.add_argument("--first-error", type=int, default=2, metavar="K",
                    help="--mode math: the step it marks wrong (0: none; past the last step: none)")
    ap.add_argument("--api-key-env", metavar="VAR", help="require the key in this environment variable")
    args = ap.parse_args(argv)
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            ap.error(f"--api-key-env: ${args.api_key_env} is not set")
    try:
        srv = CriticServer(args.port, args.host, model=args.model, fault=args.fault, status=args.status,
                           fail_first=args.fail_first, latency=args.latency, think=args.think, api_key=key,
                           mode=args.mode, first_error=args.first_error)
        srv.retry_after = args.retry_after
    except OSError as e:
        print(f"critic_server: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"critic_server: serving {args.model} at {srv.url} (mode: {args.mode}, fault: {args.fault}); "
          "Ctrl-C stops", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
