"""The HTTP judge against a real, scripted OpenAI-compatible server on 127.0.0.1 (ephemeral port).

The server judges by a known rule with a position bias, so the expected probabilities are derived by
hand; it can be scripted to answer 500, 503, 429, to time out (answer nothing until the test ends,
so the client's timeout fires however loaded the machine is), to send malformed JSON or a truncated body (Content-Length larger than the
body), to leave out the log-probs, to answer text naming no label, and to echo the API key in an error.
It counts the judgments it served per distinct request, which shows that no judgment is paid twice.

Nothing depends on timing: the client's timeout (TIMEOUT) is far longer than any answer takes, and
is reached only by the requests the server holds on purpose; concurrency is observed by holding
requests until as many are in flight as the client may send.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socketserver
import threading
import traceback
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from nashalign import NashalignError
from nashalign.judges.http_judge import CACHE_FILE, HttpJudgeOracle
from nashalign.judges.registry import build_oracle

TEMPLATE = "P: {prompt}\nX: {first}\nY: {second}"
BIAS = 0.5
SECRET = "sk-test-5ecret-DO-NOT-LEAK-0123456789"
TIMEOUT = 3.0


def judge_logit(first: str, second: str) -> float:
    """The server's rule: d = (len(first) − len(second))/4 + BIAS; it answers q = σ(d) for "A"."""
    return (len(first) - len(second)) / 4 + BIAS


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def expected_logprob_mode(first: str, second: str) -> float:
    """P(a ≻ b) = ½[q(a, b) + 1 − q(b, a)] = ½[σ(Δ + β) + σ(Δ − β)], Δ = (len a − len b)/4, β = BIAS."""
    return 0.5 * (sigmoid(judge_logit(first, second)) + 1 - sigmoid(judge_logit(second, first)))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: avoid the delayed-ACK stall

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        state: JudgeServer = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with state.lock:
            state.requests += 1
            state.inflight += 1
            state.max_inflight = max(state.max_inflight, state.inflight)
            behaviour = state.script.popleft() if state.script else state.default
            state.lock.notify_all()
            if state.gate is not None:  # hold until `gate` requests are in flight (or none is left to come)
                state.lock.wait_for(lambda: state.inflight >= state.gate or state.requests >= state.expected,
                                    timeout=60)
        try:
            self._answer(state, body, behaviour)
        finally:
            with state.lock:
                state.inflight -= 1

    def _answer(self, state, body, behaviour):
        authorization = self.headers.get("Authorization", "")
        if state.key is not None and authorization != f"Bearer {state.key}":
            return self._send(401, b'{"error": {"message": "invalid api key"}}')
        if behaviour in ("500", "503"):
            return self._send(int(behaviour), b'{"error": "overloaded"}')
        if behaviour == "429":
            return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
        if behaviour == "echo_key":
            return self._send(403, json.dumps({"error": f"key {authorization} may not use this model"}).encode())
        if behaviour == "timeout":
            state.released.wait()  # set when the test's server closes: the client has given up long before
            self.close_connection = True
            return None
        if behaviour == "malformed":
            return self._send(200, b'{"choices": [{"message": ')
        content = body["messages"][-1]["content"]
        match = re.fullmatch(r"P: (.*)\nX: (.*)\nY: (.*)", content, flags=re.S)
        d = judge_logit(match.group(2), match.group(3))
        answer = {"index": 0, "message": {"role": "assistant", "content": "**A**" if d > 0 else "B."}}
        if behaviour == "unparsed":
            answer["message"]["content"] = "Both are fine."
        if body.get("logprobs"):
            tops = [
                {"token": " A", "logprob": math.log(sigmoid(d))},
                {"token": "B", "logprob": math.log(sigmoid(-d))},
                {"token": "C", "logprob": -9.0},
            ]
            answer["logprobs"] = {"content": [{**tops[0 if d > 0 else 1], "top_logprobs": tops}]}
            if behaviour == "no_logprobs":
                answer["logprobs"] = None
        payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [answer]}).encode()
        if behaviour == "truncated":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload) + 100))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        if behaviour == "ok":
            with state.lock:
                state.served[content] += 1
        return self._send(200, payload)


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def server_bind(self):
        # HTTPServer.server_bind looks up the host's FQDN, a slow DNS query on a machine without network
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class JudgeServer:
    """Scripted behaviours are consumed one per request, then `default` applies."""

    def __init__(self, key: str | None = SECRET) -> None:
        self.key = key
        self.lock = threading.Condition()
        self.script: deque[str] = deque()
        self.default = "ok"
        self.served: Counter[str] = Counter()
        self.requests = self.inflight = self.max_inflight = 0
        self.gate: int | None = None  # see do_POST
        self.expected = 0
        self.released = threading.Event()
        self.httpd = LocalServer(("127.0.0.1", 0), Handler)
        self.httpd.state = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NASHALIGN_TEST_JUDGE_KEY", SECRET)
    judge = JudgeServer()
    yield judge
    judge.close()


def _spec(server, tmp_path, **overrides):
    spec = {
        "type": "http_judge",
        "base_url": server.url,
        "model": "judge-1",
        "api_key_env": "NASHALIGN_TEST_JUDGE_KEY",
        "template": TEMPLATE,
        "timeout": TIMEOUT,
        "max_retries": 8,
        "backoff": 0.01,
        "backoff_max": 0.05,
        "concurrency": 2,
        "cache_dir": str(tmp_path / "judge_cache"),
    }
    spec.update(overrides)
    return spec


PROMPTS = ["p0", "p1", "p2", "p3"]
FIRST = ["a long answer here", "short", "same length!", "x"]
SECOND = ["tiny", "a much longer answer", "same length?", "a very very long answer"]
EXPECTED = [expected_logprob_mode(a, b) for a, b in zip(FIRST, SECOND)]


def test_judging_survives_every_fault(server, tmp_path):
    """Seven scripted faults (500, 429, timeout, malformed JSON, truncated body, 503, missing
    log-probs) each cost one retry; the 4 comparisons (8 ordered queries) all complete, match the
    hand formula, and each judgment is served exactly once. Asking again, on the same or a new oracle
    over the same cache directory, sends no request."""
    server.script.extend(["500", "429", "timeout", "malformed", "truncated", "503", "no_logprobs"])
    oracle = build_oracle(_spec(server, tmp_path))
    got = oracle.prob(PROMPTS, FIRST, SECOND)
    np.testing.assert_allclose(got, EXPECTED, atol=1e-9)
    assert len(server.served) == 8 and set(server.served.values()) == {1}
    assert server.requests == 15
    assert (oracle.counts.judge_calls, oracle.counts.retries, oracle.counts.cache_hits) == (8, 7, 0)
    # the judge itself is position-biased; the oracle is not
    # σ(Δ + β) + σ(−Δ + β) > 1 for β > 0
    q = oracle.judge(PROMPTS, FIRST, SECOND) + oracle.judge(PROMPTS, SECOND, FIRST)
    assert np.all(q > 1.004)
    np.testing.assert_allclose(got + oracle.prob(PROMPTS, SECOND, FIRST), 1.0, atol=1e-6)
    restarted = build_oracle(_spec(server, tmp_path))
    np.testing.assert_allclose(restarted.prob(PROMPTS, FIRST, SECOND), EXPECTED, atol=1e-9)
    assert server.requests == 15 and restarted.counts.cache_hits == 8 and restarted.counts.judge_calls == 0


def test_a_stopped_run_resumes_without_paying_twice(server, tmp_path):
    """Five answers, then the server fails for good: after 3 attempts (max_retries = 2) the call stops
    with an error saying where the answers are cached; the five are on disk. A new oracle on the same
    directory, once the server recovers, requests only the 12 − 5 = 7 missing judgments."""
    server.script.extend(["ok"] * 5)
    server.default = "500"
    prompts, first, second = PROMPTS + ["p4", "p5"], FIRST + ["one", "three"], SECOND + ["two", "four"]
    oracle = build_oracle(_spec(server, tmp_path, max_retries=2))
    with pytest.raises(NashalignError, match=r"no valid answer after 3 attempts \(last: HTTP 500\).*judge_cache, rerun to resume"):
        oracle.prob(prompts, first, second)
    lines = (tmp_path / "judge_cache" / CACHE_FILE).read_text().splitlines()
    assert len(lines) == 5 == sum(server.served.values())
    server.default = "ok"
    before = server.requests
    resumed = build_oracle(_spec(server, tmp_path, max_retries=2))
    got = resumed.prob(prompts, first, second)
    np.testing.assert_allclose(got, [expected_logprob_mode(a, b) for a, b in zip(first, second)], atol=1e-9)
    assert server.requests - before == 7
    assert len(server.served) == 12 and set(server.served.values()) == {1}
    assert resumed.counts.cache_hits == 5


def test_the_api_key_never_leaks(server, tmp_path, caplog, monkeypatch):
    """The server only answers with the right key (so it was sent), yet the key appears in no log
    record (DEBUG, all loggers), no repr, no cached file, no error message or traceback, even when the
    server echoes it in an error body; a 4xx other than 429 is not retried."""
    caplog.set_level(logging.DEBUG)
    server.script.extend(["500", "timeout", "truncated"])
    oracle = build_oracle(_spec(server, tmp_path))
    oracle.prob(PROMPTS, FIRST, SECOND)
    assert oracle.counts.retries == 3
    server.script.append("echo_key")
    before = server.requests
    single = build_oracle(_spec(server, tmp_path, both_orders=False, concurrency=1))
    with pytest.raises(NashalignError) as caught:
        single.prob(["new prompt"], ["a"], ["bb"])
    assert server.requests - before == 1
    message = str(caught.value)
    assert "HTTP 403" in message and "***" in message and "$NASHALIGN_TEST_JUDGE_KEY" in message
    leaks = [message, "".join(traceback.format_exception(caught.value)), repr(oracle), str(oracle), caplog.text]
    leaks += [path.read_bytes().decode() for path in (tmp_path / "judge_cache").rglob("*") if path.is_file()]
    assert "HTTP Request" in caplog.text  # the HTTP client's own logging was captured
    assert all(SECRET not in text for text in leaks)

    monkeypatch.setenv("NASHALIGN_TEST_JUDGE_KEY", "sk-wrong")
    wrong = build_oracle(_spec(server, tmp_path, cache_dir=None))
    with pytest.raises(NashalignError, match=r"HTTP 401 .*not retried: check base_url, model and the key in \$NASHALIGN_TEST_JUDGE_KEY"):
        wrong.prob(["p"], ["a"], ["b"])
    monkeypatch.delenv("NASHALIGN_TEST_JUDGE_KEY")
    with pytest.raises(NashalignError, match=r"oracle: api_key_env: the environment variable NASHALIGN_TEST_JUDGE_KEY is not set"):
        build_oracle(_spec(server, tmp_path))


def test_text_mode_and_unparsed_answers(server, tmp_path):
    """Text mode reads the first word ("**A**" → A, "B." → B): q ∈ {0, 1}, so P = ½[q(a, b) + 1 − q(b, a)]
    is 1 when the first text wins in both orders, ½ when the position decides (equal lengths: d = β > 0
    in both orders, q = 1 both ways). An answer naming no label is a tie, or an error on request."""
    oracle = build_oracle(_spec(server, tmp_path, mode="text", max_tokens=8, cache_dir=None, concurrency=1))
    np.testing.assert_allclose(oracle.prob(PROMPTS, FIRST, SECOND), [1.0, 0.0, 0.5, 0.0])
    server.script.append("unparsed")
    got = oracle.prob(["p"], ["abc"], ["a"])  # q(a, b) unparsed → ½; q(b, a): d = −0.5 + β = 0 → "B" → 0
    np.testing.assert_allclose(got, [0.5 * (0.5 + 1 - 0.0)])
    assert oracle.counts.unparsed == 1
    strict = build_oracle(_spec(server, tmp_path, mode="text", cache_dir=None, on_unparsed="error"))
    server.script.extend(["unparsed", "unparsed"])
    with pytest.raises(NashalignError, match=r"names neither label \['A', 'B'\]: 'Both are fine.'"):
        strict.prob(["p"], ["abc"], ["a"])


def test_concurrency_is_bounded(server, tmp_path):
    """The server holds each request until 3 are in flight (or the 20th has arrived): the client,
    allowed 3 at once, reaches exactly 3 and never more."""
    server.gate, server.expected = 3, 20
    oracle = build_oracle(_spec(server, tmp_path, concurrency=3, cache_dir=None))
    oracle.prob([f"p{i}" for i in range(10)], [f"answer {i}" for i in range(10)], ["b"] * 10)
    assert server.requests == 20
    assert server.max_inflight == 3


def test_cache_drops_a_record_cut_short_and_rejects_corruption(server, tmp_path):
    """A crash mid-append leaves a partial last line: it is dropped and the file truncated to the last
    whole record. A bad line anywhere else is an error naming the file and line."""
    oracle = build_oracle(_spec(server, tmp_path))
    oracle.prob(PROMPTS[:2], FIRST[:2], SECOND[:2])
    oracle.close()
    path = tmp_path / "judge_cache" / CACHE_FILE
    whole = path.read_text()
    path.write_text(whole + '{"key": "abc", "p": 0.')
    requests = server.requests
    reopened = build_oracle(_spec(server, tmp_path))
    assert path.read_text() == whole
    np.testing.assert_allclose(reopened.prob(PROMPTS[:2], FIRST[:2], SECOND[:2]), EXPECTED[:2], atol=1e-9)
    assert server.requests == requests
    reopened.close()
    lines = whole.splitlines()
    path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(NashalignError, match=rf"{path}:2: not a judgment record"):
        build_oracle(_spec(server, tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": "ftp://127.0.0.1/v1"}, r"oracle: base_url: expected an http:// or https:// URL, got 'ftp://127.0.0.1/v1'"),
        ({"mode": "vote"}, r"oracle: mode: expected one of 'logprobs', 'text', got 'vote'"),
        ({"template": "{prompt} {first}"}, r"oracle: template: the template must use exactly \{first\}, \{prompt\}, \{second\}"),
        ({"labels": ["A", "A"]}, r"oracle: labels: expected two different non-empty labels"),
        ({"concurrency": 0}, r"oracle: concurrency: expected an integer >= 1, got 0"),
        ({"timeout": 0}, r"oracle: timeout: expected a float > 0, got 0"),
        ({"top_logprobs": 21}, r"oracle: top_logprobs: expected an integer >= 1 and <= 20, got 21"),
        ({"api_key": "inline"}, r"oracle: api_key: unknown key"),
    ],
)
def test_config_errors(server, tmp_path, overrides, message):
    with pytest.raises(NashalignError, match=message):
        build_oracle(_spec(server, tmp_path, **overrides))


def test_repr_names_the_variable_not_the_key(server, tmp_path):
    oracle = build_oracle(_spec(server, tmp_path))
    assert isinstance(oracle, HttpJudgeOracle)
    assert "NASHALIGN_TEST_JUDGE_KEY" in repr(oracle) and SECRET not in repr(oracle) + str(vars(oracle))
