"""A client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, `python -m ziya_jax.serve`, ...),
built on the official `openai` package (pip install 'ziya_jax[llm]').

    parser = argparse.ArgumentParser()
    add_endpoint_args(parser, prefix="")          # --base-url --model --api-key-file --concurrency --timeout
                                                  # --max-retries --retry-backoff --price-prompt
                                                  # --price-completion --cache
    args = parser.parse_args()
    endpoint = endpoint_from_args(args)           # Endpoint; the key comes from --api-key-file or OPENAI_API_KEY
    with LLMClient(endpoint, cache=args.cache) as client:
        results, stats = client.run(
            [ChatRequest(messages, {"temperature": 0.2, "max_tokens": 512}), ...],
            parse=json.loads,                     # optional; raising ValueError rejects a reply; or a list
                                                  # of one function per request
            desc="judge",                         # the progress bar's label
        )
    print(stats.summary())

- `requests` is any sequence (one that builds each request when indexed keeps a long run's memory flat).
- `results[i]` answers `requests[i]`: `Result.value` (what parse returned, or the text), `.text`, `.error`
  (None when ok: `.ok`), `.cached`. A failed request is a Result with an error, never an exception.
- Up to `endpoint.concurrency` requests are in flight. 429, 5xx, 408, timeouts, connection errors and malformed
  responses are retried up to `max_retries` times, waiting what Retry-After (or retry-after-ms) asks, else
  `backoff * 2**k` seconds with jitter (at most 60). Other 4xx fail at once (error "http_<status>").
- A reply the parse function rejects is asked again (a new call, not the cache) up to `parse_retries` times
  (default 2), then the request fails with error "rejected".
- With a cache (a SQLite file), each accepted reply is committed as it arrives, keyed by a hash of (model,
  messages, params): a rerun sends only what is not there, and a killed run loses only the requests in flight.
  Identical requests within a run are sent once. Failures are not cached, so a rerun asks them again.
- `RunStats`: requests, cached, answered, failed, calls, retries and failures by reason, prompt and completion
  tokens spent in this run (rejected replies included) and their cost when the endpoint has per-million-token
  prices. `await client.arun(...)` is the same inside a running event loop.
"""

from ziya_jax.llm.client import (
    ChatRequest,
    Endpoint,
    LLMClient,
    ReplyCache,
    Result,
    RunStats,
    add_endpoint_args,
    as_messages,
    endpoint_from_args,
    request_key,
)

__all__ = [
    "ChatRequest",
    "Endpoint",
    "LLMClient",
    "ReplyCache",
    "Result",
    "RunStats",
    "add_endpoint_args",
    "as_messages",
    "endpoint_from_args",
    "request_key",
]
