"""An LLM judge behind any OpenAI-compatible chat-completions server (a local vLLM server or a hosted API).

Each ordered query (prompt, first, second) fills `template` as the user message and asks for one
answer. `mode: logprobs` reads the label tokens' log-probabilities from the first answer position
that lists either label (`logprobs: true, top_logprobs: k`),

    q(first, second) = exp(ℓ_A) / (exp(ℓ_A) + exp(ℓ_B)),        a label absent from the list: ℓ = −∞,

with several listed spellings of a label (" A", "A") summed; `mode: text` reads the answer's first
word: label A → 1, label B → 0. An answer naming neither label is "unparsed": a tie (½, counted and
logged) or, with `on_unparsed: error`, a NashalignError. Position bias is removed as for every
oracle (see oracles.py): both orders are asked and averaged.

Robustness. The API key is read from the environment variable named by `api_key_env` and lives only
in the HTTP client's headers: it is never logged, cached, put in an error message or a repr.
Timeouts (`timeout` seconds per connect/read/write), HTTP 408, 429 and 5xx, connection errors,
truncated bodies, malformed JSON and answers without the expected structure are retried with
exponential backoff (`backoff`·2^(attempt−1) seconds, jittered to 50–100 %, capped at `backoff_max`;
or the server's Retry-After) up to `max_retries` times; then, or at once on any other 4xx, a
NashalignError stops the call. At most `concurrency` requests are in flight (a thread pool over one
httpx client).

Cache. With `cache_dir`, every answer is appended to `cache_dir/judgments.jsonl` and flushed and
fsynced before it is used, keyed by a SHA-256 of everything that shapes the request (model, system,
template, mode, labels, sampling options, prompt, both responses in order). A restarted run (a new
oracle on the same directory) never asks for a cached judgment again, including those answered
before an error stopped the previous call. One process writes a cache directory at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nashalign import NashalignError, progress
from nashalign.config import ConfigFieldError, from_mapping
from nashalign.judges.oracles import Oracle, parse_config, symmetrized, template_problem

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "Which response to the user's request is better: more helpful, correct and clear?\n\n"
    "[REQUEST]\n{prompt}\n\n[RESPONSE A]\n{first}\n\n[RESPONSE B]\n{second}\n\n"
    "Answer with a single letter: A or B."
)
CACHE_FILE = "judgments.jsonl"


def _bounds(default, **bounds):
    return dataclasses.field(default=default, metadata=bounds)


@dataclasses.dataclass(frozen=True)
class HttpJudgeConfig:
    """base_url: up to and including the API version, e.g. http://127.0.0.1:8000/v1.
    api_key_env: name of the environment variable holding the key (none: no Authorization header).
    extra_body: more request fields (for example {"seed": 0}), part of the cache key.
    timeout: seconds per network operation (connect, read, write), not for the whole request."""

    base_url: str
    model: str
    api_key_env: str | None = None
    template: str = DEFAULT_TEMPLATE
    system: str | None = None
    mode: Literal["logprobs", "text"] = "logprobs"
    labels: list[str] = dataclasses.field(default_factory=lambda: ["A", "B"])
    top_logprobs: int = _bounds(5, ge=1, le=20)
    max_tokens: int = _bounds(1, ge=1)
    temperature: float = _bounds(0.0, ge=0.0)
    extra_body: dict[str, Any] = dataclasses.field(default_factory=dict)
    timeout: float = _bounds(60.0, gt=0.0)
    max_retries: int = _bounds(6, ge=0)
    backoff: float = _bounds(1.0, ge=0.0)
    backoff_max: float = _bounds(60.0, ge=0.0)
    concurrency: int = _bounds(4, ge=1)
    cache_dir: str | None = None
    both_orders: bool = True
    on_unparsed: Literal["tie", "error"] = "tie"

    def check(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigFieldError("base_url", f"expected an http:// or https:// URL, got {self.base_url!r}")
        problem = template_problem(self.template, {"prompt", "first", "second"})
        if problem:
            raise ConfigFieldError("template", problem)
        if len(self.labels) != 2 or self.labels[0] == self.labels[1] or not all(s.strip() for s in self.labels):
            raise ConfigFieldError("labels", f"expected two different non-empty labels, got {self.labels}")


class JudgmentCache:
    """Append-only JSONL of {"key", "p", "answer", "parsed"}; each append is flushed and fsynced.

    A last line cut short by a crash is dropped (the file is truncated to the last whole record);
    any other unreadable line is an error naming the file and line.
    """

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / CACHE_FILE
        self.entries: dict[str, float] = {}
        created = not self.path.exists()
        self._load()
        self._handle = self.path.open("a", encoding="utf-8")
        if created:
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1], 1):
            try:
                record = json.loads(line)
                p = float(record["p"])
                key = record["key"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise NashalignError(f"{self.path}:{number}: not a judgment record; delete the line or the file") from None
            if not (isinstance(key, str) and 0.0 <= p <= 1.0):
                raise NashalignError(f"{self.path}:{number}: not a judgment record; delete the line or the file")
            self.entries[key] = p
        if lines[-1]:
            logger.warning("%s: dropping a record cut short by an interrupted write", self.path)
            os.truncate(self.path, len(data) - len(lines[-1]))

    def append(self, key: str, p: float, answer: str, parsed: bool) -> None:
        record = {"key": key, "p": p, "answer": answer, "parsed": parsed}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.entries[key] = p

    def close(self) -> None:
        self._handle.close()


class _Malformed(Exception):
    """A 200 answer without the expected structure (retried like a transport error)."""


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip("*\"'`.,:;!()[]{}") if words else ""


class HttpJudgeOracle(Oracle):
    """P(first ≻ second) from an OpenAI-compatible chat-completions judge; see the module docstring."""

    name = "http_judge"
    slow = True

    def __init__(self, config: HttpJudgeConfig, where: str = "oracle") -> None:
        import httpx

        super().__init__()
        self.config = config = from_mapping(HttpJudgeConfig, dataclasses.asdict(config), source=where)
        headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise NashalignError(f"{where}: api_key_env: the environment variable {config.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency),
        )
        self._url = f"{config.base_url.rstrip('/')}/chat/completions"
        self._cache = JudgmentCache(config.cache_dir) if config.cache_dir else None
        self._random = random.Random()
        self._fingerprint = [
            config.model, config.system, config.template, config.mode, config.labels,
            config.top_logprobs, config.max_tokens, config.temperature, config.extra_body,
        ]

    def __repr__(self) -> str:
        return (
            f"HttpJudgeOracle(url={self._url!r}, model={self.config.model!r}, "
            f"api_key_env={self.config.api_key_env!r}, cache_dir={self.config.cache_dir!r})"
        )

    def close(self) -> None:
        self._client.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _scrub(self, text: str) -> str:
        """`text` with the API key (should a server echo it) replaced by ***."""
        authorization = self._client.headers.get("authorization", "")
        key = authorization.removeprefix("Bearer ")
        return text.replace(key, "***") if key else text

    def cache_key(self, prompt: str, first: str, second: str) -> str:
        payload = json.dumps([*self._fingerprint, prompt, first, second], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _body(self, prompt: str, first: str, second: str) -> dict:
        config = self.config
        messages = [{"role": "system", "content": config.system}] if config.system else []
        messages.append({"role": "user", "content": config.template.format(prompt=prompt, first=first, second=second)})
        body = {**config.extra_body, "model": config.model, "messages": messages}
        body.update(max_tokens=config.max_tokens, temperature=config.temperature)
        if config.mode == "logprobs":
            body.update(logprobs=True, top_logprobs=config.top_logprobs)
        return body

    def _parse(self, data) -> tuple[float | None, str]:
        """(q(first, second) or None when the answer names neither label, a short answer text)."""
        label_a, label_b = self.config.labels
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError("message.content is not a string")
            if self.config.mode == "logprobs":
                positions = choice["logprobs"]["content"]
                for position in positions:
                    entries = [position, *(position.get("top_logprobs") or [])]
                    # a set of (token, logprob): the sampled token is listed again in top_logprobs
                    found: dict[str, set] = {label_a: set(), label_b: set()}
                    for entry in entries:
                        token = str(entry["token"])
                        if token.strip() in found:
                            found[token.strip()].add((token, float(entry["logprob"])))
                    if found[label_a] or found[label_b]:
                        ell_a, ell_b = (
                            np.logaddexp.reduce([ell for _, ell in found[label]] or [-math.inf])
                            for label in (label_a, label_b)
                        )
                        return float(np.exp(ell_a - np.logaddexp(ell_a, ell_b))), content[:200]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
            raise _Malformed(f"unexpected answer structure ({type(error).__name__}: {error})") from None
        word = _first_word(content)
        if word == label_a:
            return 1.0, content[:200]
        if word == label_b:
            return 0.0, content[:200]
        return None, content[:200]

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(self.config.backoff_max, max(0.0, float(retry_after)))
            except ValueError:
                pass
        base = min(self.config.backoff_max, self.config.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + 0.5 * self._random.random())

    def _request(self, prompt: str, first: str, second: str, stop: threading.Event):
        """(q or None, answer text, attempts) for one ordered query; None if `stop` was set first."""
        import httpx

        body = self._body(prompt, first, second)
        last_error, retry_after = "", None
        for attempt in range(self.config.max_retries + 1):
            if attempt and stop.wait(self._delay(attempt, retry_after)):
                return None
            if stop.is_set():
                return None
            retry_after = None
            try:
                response = self._client.post("/chat/completions", json=body)
            except httpx.TimeoutException:
                last_error = f"timed out after {self.config.timeout:g} s"
                continue
            except httpx.RequestError as error:
                last_error = f"{type(error).__name__}: {error}"
                continue
            status = response.status_code
            if status in (408, 429) or status >= 500:
                last_error = f"HTTP {status}"
                retry_after = response.headers.get("retry-after")
                continue
            if status >= 400:
                key_hint = f" and the key in ${self.config.api_key_env}" if self.config.api_key_env else ""
                raise NashalignError(self._scrub(
                    f"http_judge: {self._url} answered HTTP {status} ({response.text[:200]!r}); not retried: "
                    f"check base_url, model{key_hint}"
                ))
            try:
                q, answer = self._parse(response.json())
            except ValueError:
                last_error = "malformed JSON in the answer"
                continue
            except _Malformed as error:
                last_error = str(error)
                continue
            logger.debug("http_judge: answered after %d attempt(s)", attempt + 1)
            return q, self._scrub(answer), attempt + 1
        resume = (
            f"the answers received so far are cached in {self.config.cache_dir}, rerun to resume"
            if self._cache
            else "set cache_dir to keep answers across runs"
        )
        raise NashalignError(self._scrub(
            f"http_judge: {self._url}: no valid answer after {self.config.max_retries + 1} attempts "
            f"(last: {last_error}); {resume}"
        ))

    def _record(self, key: str, answer: tuple, results: dict) -> None:
        q, text, attempts = answer
        parsed = q is not None
        if not parsed:
            if self.config.on_unparsed == "error":
                raise NashalignError(self._scrub(f"http_judge: the judge's answer names neither label {self.config.labels}: {text[:80]!r}"))
            self.counts.unparsed += 1
            logger.warning("http_judge: an answer names neither label %s; counted as a tie", self.config.labels)
            q = 0.5
        self.counts.judge_calls += 1
        self.counts.retries += attempts - 1
        if self._cache is not None:
            self._cache.append(key, q, text, parsed)
        results[key] = q

    def judge(self, prompts, first, second) -> np.ndarray:
        """(B,) the judge's own, position-biased q(first, second): cached answers, then requests."""
        keys = [self.cache_key(p, a, b) for p, a, b in zip(prompts, first, second)]
        cached = self._cache.entries if self._cache is not None else {}
        results: dict[str, float] = {key: cached[key] for key in keys if key in cached}
        self.counts.cache_hits += sum(key in cached for key in keys)
        todo = {key: query for key, query in zip(keys, zip(prompts, first, second)) if key not in results}
        unique = set(keys)
        stop = threading.Event()
        error: NashalignError | None = None
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency)
        try:
            futures = {pool.submit(self._request, *query, stop): key for key, query in todo.items()}
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    answer = future.result()
                    if answer is not None:
                        self._record(futures[future], answer, results)
                        progress.report(len(results), len(unique))
                except NashalignError as failure:
                    # stop asking, but keep recording the answers of requests already in flight
                    if error is None:
                        error = failure
                        stop.set()
                        for pending in futures:
                            pending.cancel()
        finally:
            # also on KeyboardInterrupt: workers waiting to retry return at once
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error
        return np.array([results[key] for key in keys], dtype=np.float64)

    def _prob(self, prompts, first, second):
        return symmetrized(self.judge, prompts, first, second, self.config.both_orders)


def build_http_judge(spec, where: str = "oracle") -> HttpJudgeOracle:
    return HttpJudgeOracle(parse_config(HttpJudgeConfig, spec, where), where)
