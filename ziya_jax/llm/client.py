"""Chat-completion requests to an OpenAI-compatible endpoint: bounded concurrency, retries, a persistent cache,
reply validation, token usage and cost. See the package docstring for the interface."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


@dataclasses.dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    concurrency: int = 8
    timeout: float = 120.0  # seconds per HTTP request
    max_retries: int = 6  # per request, on 429, 5xx, timeouts, connection errors and malformed responses
    backoff: float = 1.0  # seconds before the first retry; doubles each time (a Retry-After header wins)
    price_prompt: float | None = None  # per million prompt tokens
    price_completion: float | None = None  # per million completion tokens


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    params: dict = dataclasses.field(default_factory=dict)  # temperature, max_tokens, top_p, seed, ...


@dataclasses.dataclass
class Result:
    value: Any = None  # parse(text), or the text itself without a parse function
    text: str | None = None  # the accepted reply
    error: str | None = None  # why the request failed (a reason of RunStats.failures)
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class RunStats:
    requests: int = 0  # as given, duplicates included
    cached: int = 0  # distinct requests answered from the cache
    answered: int = 0  # distinct requests answered by the endpoint in this run
    failed: int = 0  # distinct requests that failed
    calls: int = 0  # HTTP calls made
    retries: Counter = dataclasses.field(default_factory=Counter)  # reason -> retries
    failures: Counter = dataclasses.field(default_factory=Counter)  # reason -> failed requests
    prompt_tokens: int = 0  # spent in this run (rejected replies included)
    completion_tokens: int = 0
    cost: float | None = None  # from the endpoint's prices, when it has them
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"retries": dict(self.retries), "failures": dict(self.failures)}

    def summary(self) -> str:
        cost = "" if self.cost is None else f", cost {self.cost:.4f}"
        failures = f" ({', '.join(f'{k}: {v}' for k, v in self.failures.items())})" if self.failed else ""
        return (
            f"{self.requests} requests: {self.answered} answered, {self.cached} from the cache, "
            f"{self.failed} failed{failures}; {self.calls} calls; tokens {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion{cost}; {self.seconds:.1f} s"
        )


def add_endpoint_args(parser: argparse.ArgumentParser, prefix: str = "", required: bool = True) -> None:
    """--{prefix}base-url, model, api-key-file, concurrency, timeout, max-retries, retry-backoff, price-prompt,
    price-completion, cache. The API key is read from --api-key-file or OPENAI_API_KEY, never from argv.
    required=False leaves the endpoint to the caller to check (a command where only some tasks need it)."""
    d, group = Endpoint, parser.add_argument_group(f"{prefix or 'LLM '}endpoint")
    group.add_argument(f"--{prefix}base-url", required=required, help="OpenAI-compatible API root, e.g. http://host/v1")
    group.add_argument(f"--{prefix}model", required=required, help="the model name the endpoint serves")
    group.add_argument(f"--{prefix}api-key-file", help="a file holding the API key (default: $OPENAI_API_KEY)")
    group.add_argument(f"--{prefix}concurrency", type=int, default=d.concurrency, help="requests in flight")
    group.add_argument(f"--{prefix}timeout", type=float, default=d.timeout, help="seconds per HTTP request")
    group.add_argument(f"--{prefix}max-retries", type=int, default=d.max_retries, help="retries per request")
    group.add_argument(f"--{prefix}retry-backoff", type=float, default=d.backoff, help="first retry wait (s)")
    group.add_argument(f"--{prefix}price-prompt", type=float, help="price per million prompt tokens")
    group.add_argument(f"--{prefix}price-completion", type=float, help="price per million completion tokens")
    group.add_argument(f"--{prefix}cache", help="SQLite file caching replies across runs")


def _arg(args, prefix: str, name: str):
    return getattr(args, (prefix + name).replace("-", "_"))


def endpoint_from_args(args: argparse.Namespace, prefix: str = "") -> Endpoint:
    key_file = _arg(args, prefix, "api-key-file")
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            api_key = f.read().strip()
        if not api_key:
            raise ValueError(f"{key_file} is empty")
    else:
        api_key = os.environ.get("OPENAI_API_KEY")
    concurrency = _arg(args, prefix, "concurrency")
    if concurrency < 1:
        raise ValueError(f"--{prefix}concurrency must be >= 1, got {concurrency}")
    return Endpoint(
        base_url=_arg(args, prefix, "base-url"),
        model=_arg(args, prefix, "model"),
        api_key=api_key,
        concurrency=concurrency,
        timeout=_arg(args, prefix, "timeout"),
        max_retries=_arg(args, prefix, "max-retries"),
        backoff=_arg(args, prefix, "retry-backoff"),
        price_prompt=_arg(args, prefix, "price-prompt"),
        price_completion=_arg(args, prefix, "price-completion"),
    )


def request_key(model: str, request: ChatRequest) -> str:
    """The cache key: a hash of the model, the messages and the sampling parameters."""
    canonical = json.dumps(
        {"model": model, "messages": request.messages, "params": request.params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ReplyCache:
    """Accepted replies by request key, in SQLite. Each reply is committed when it arrives (a killed run loses
    only the requests in flight); WAL lets shards share the file."""

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(os.fspath(path), timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT NOT NULL, reply TEXT NOT NULL, "
            "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL NOT NULL)"
        )

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, reply: str, usage: tuple[int, int]) -> None:
        """REPLACE only ever meets an older reply its caller's parse function now rejects."""
        self.db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)", (key, model, reply, *usage, time.time())
        )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class _Fail(Exception):
    pass


def _retry_after(headers) -> float | None:
    """Seconds a Retry-After (or retry-after-ms) header asks for, if any."""
    if headers is None:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        date = email.utils.parsedate_tz(value)
        return max(0.0, email.utils.mktime_tz(date) - time.time()) if date else None


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("empty reply")
    return text


class LLMClient:
    """Runs chat requests against one endpoint; see the package docstring."""

    def __init__(self, endpoint: Endpoint, cache: str | os.PathLike | None = None, parse_retries: int = 2):
        self.endpoint = endpoint
        self.cache = ReplyCache(cache) if cache else None
        self.parse_retries = parse_retries

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(
        self,
        requests: Sequence[ChatRequest],
        parse: Callable[[str], Any] | Sequence[Callable[[str], Any]] | None = None,
        desc: str = "LLM",
        progress: bool = True,
    ) -> tuple[list[Result], RunStats]:
        """Results in request order, and the run's stats. Never raises for a failed request. `parse` is one
        function for all requests or a list of one per request; without one an empty reply is rejected.
        `requests` may be any sequence, e.g. one that builds each request when indexed (it is indexed twice)."""
        return asyncio.run(self.arun(requests, parse, desc, progress))

    async def arun(
        self,
        requests: Sequence[ChatRequest],
        parse: Callable[[str], Any] | Sequence[Callable[[str], Any]] | None = None,
        desc: str = "LLM",
        progress: bool = True,
    ) -> tuple[list[Result], RunStats]:
        import openai
        from tqdm.auto import tqdm

        start = time.perf_counter()
        parsers = parse if isinstance(parse, Sequence) else [parse or _nonempty] * len(requests)
        if len(parsers) != len(requests):
            raise ValueError(f"{len(parsers)} parse functions for {len(requests)} requests")
        stats = RunStats(requests=len(requests))
        # Requests are indexed, not held: a sequence that builds each request when indexed keeps memory flat.
        keys = [request_key(self.endpoint.model, requests[i]) for i in range(len(requests))]
        unique: dict[str, int] = {}  # identical requests are asked once and share the result
        for i, key in enumerate(keys):
            unique.setdefault(key, i)
        results: dict[str, Result] = {}
        pending = []
        for key, i in unique.items():
            text = self.cache.get(key) if self.cache is not None else None
            if text is not None:
                try:
                    results[key] = Result(parsers[i](text), text, cached=True)
                    stats.cached += 1
                    continue
                except ValueError:
                    pass  # a reply the parse function now rejects is asked again
            pending.append((key, i))
        bar = tqdm(total=len(unique), initial=len(results), desc=desc, disable=not progress, unit="req")
        # The SDK's own retries stay off: this loop shares one budget between transport failures and rejected
        # replies, counts each reason, and honours Retry-After beyond the SDK's 60 s cap.
        client = openai.AsyncOpenAI(
            base_url=self.endpoint.base_url,
            api_key=self.endpoint.api_key or "no-key",
            timeout=self.endpoint.timeout,
            max_retries=0,
        )
        queue = iter(pending)

        async def worker():
            for key, i in queue:
                results[key] = await self._ask(client, key, requests[i], parsers[i], stats)
                if results[key].ok:
                    stats.answered += 1
                else:
                    stats.failed += 1
                    stats.failures[results[key].error] += 1
                bar.update()

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.endpoint.concurrency, len(pending)))))
        finally:
            await client.close()
            bar.close()
        e = self.endpoint
        if e.price_prompt is not None or e.price_completion is not None:
            stats.cost = (
                stats.prompt_tokens * (e.price_prompt or 0) + stats.completion_tokens * (e.price_completion or 0)
            ) / 1e6
        stats.seconds = time.perf_counter() - start
        return [dataclasses.replace(results[k]) for k in keys], stats

    async def _ask(self, client, key: str, request: ChatRequest, parse, stats: RunStats) -> Result:
        transport_retries = rejections = 0
        while True:
            try:
                text, usage = await self._call(client, request, stats)
                try:
                    value = parse(text)
                except ValueError as e:
                    rejections += 1
                    if rejections > self.parse_retries:
                        log.info("request %s: reply rejected %d times, last: %s", key[:12], rejections, e)
                        return Result(text=text, error="rejected")
                    stats.retries["rejected"] += 1
                    continue
                if self.cache is not None:
                    self.cache.put(key, self.endpoint.model, text, usage)
                return Result(value, text)
            except _Retry as r:
                transport_retries += 1
                if transport_retries > self.endpoint.max_retries:
                    return Result(error=r.reason)
                stats.retries[r.reason] += 1
                backoff = min(self.endpoint.backoff * 2 ** (transport_retries - 1), MAX_BACKOFF_S)
                await asyncio.sleep(r.wait if r.wait is not None else backoff * random.uniform(0.5, 1.0))
            except _Fail as f:
                return Result(error=str(f))

    async def _call(self, client, request: ChatRequest, stats: RunStats) -> tuple[str, tuple[int, int]]:
        """One HTTP call -> (content, (prompt, completion) tokens); _Retry or _Fail otherwise. An answer without
        text content is returned as "" for the parse function to reject."""
        import openai

        stats.calls += 1
        try:
            completion = await client.chat.completions.create(
                model=self.endpoint.model, messages=request.messages, **request.params
            )
        except openai.APITimeoutError:
            raise _Retry("timeout") from None
        except openai.APIConnectionError:
            raise _Retry("connection") from None
        except openai.APIStatusError as e:
            status = e.status_code
            if status == 429:
                raise _Retry("rate_limited", _retry_after(e.response.headers)) from None
            if status >= 500 or status == 408:
                raise _Retry(f"http_{status}", _retry_after(e.response.headers)) from None
            raise _Fail(f"http_{status}") from None
        except (openai.APIResponseValidationError, ValueError):
            raise _Retry("malformed_response") from None
        usage = getattr(completion, "usage", None)
        tokens = (getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
        stats.prompt_tokens += tokens[0]
        stats.completion_tokens += tokens[1]
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
            raise _Retry("malformed_response")
        content = choices[0].message.content
        return content if isinstance(content, str) else "", tokens


def as_messages(system: str | None, examples: Sequence[tuple[str, str]], query: str | list) -> list[dict]:
    """A system message, in-context examples as alternating user/assistant turns, then the query."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in examples:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": query}]
