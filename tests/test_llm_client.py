"""ziya_jax.llm against the scripted chat-completions server over loopback HTTP: retries on 429 (Retry-After),
5xx, timeouts and malformed responses; rejected replies re-asked then counted; the cache; usage and cost;
bounded concurrency; results in request order; the endpoint flags."""

import argparse
import json
import sqlite3
import time

import pytest
from llm_server import (
    Reply,
    ScriptedServer,
    last_user_text,
    malformed_json,
    rate_limited,
    server_error,
    slow,
)

from ziya_jax.llm import ChatRequest, Endpoint, LLMClient, add_endpoint_args, endpoint_from_args, request_key


def ask(text, **params):
    return ChatRequest([{"role": "system", "content": "be brief"}, {"role": "user", "content": text}], params)


def endpoint(server, **kw):
    return Endpoint(**{"base_url": server.base_url, "model": "scripted", "api_key": "k", "backoff": 0.01, **kw})


def run(server, requests, cache=None, parse=None, parse_retries=2, **kw):
    with LLMClient(endpoint(server, **kw), cache=cache, parse_retries=parse_retries) as client:
        return client.run(requests, parse=parse, progress=False)


def received(server, text):
    """Times the server received the request whose user text is `text`, in order."""
    return [e["received"] for e in server.log if e["user"] == text]


def test_rate_limit_waits_for_retry_after():
    with ScriptedServer(lambda body, n: rate_limited(0.6) if n == 1 else "fine") as server:
        results, stats = run(server, [ask("q")])
        first, second = received(server, "q")
    assert [r.value for r in results] == ["fine"]
    assert second - first >= 0.6  # the backoff alone would have waited about 0.01 s
    assert stats.retries == {"rate_limited": 1} and stats.calls == 2


def test_server_errors_are_retried_then_counted():
    def reply(body, n):
        text = last_user_text(body)
        if text == "flaky":
            return server_error(500) if n <= 2 else "recovered"
        return server_error(503) if text == "down" else "ok"

    with ScriptedServer(reply) as server:
        results, stats = run(server, [ask("flaky"), ask("down"), ask("fine")], max_retries=3)
        assert len(received(server, "down")) == 4  # the first call and three retries
    assert [(r.value, r.error) for r in results] == [("recovered", None), (None, "http_503"), ("ok", None)]
    assert stats.failed == 1 and stats.failures == {"http_503": 1} and stats.answered == 2
    assert stats.retries == {"http_500": 2, "http_503": 3}


def test_client_errors_fail_without_retry():
    with ScriptedServer(lambda body, n: Reply(None, 400)) as server:
        results, stats = run(server, [ask("q")])
        assert len(server.log) == 1
    assert results[0].error == "http_400" and stats.failures == {"http_400": 1}


def test_timeouts_are_retried():
    with ScriptedServer(lambda body, n: slow(1.5, "late") if n == 1 else "in time") as server:
        results, stats = run(server, [ask("q")], timeout=0.4)
    assert results[0].value == "in time"
    assert stats.retries == {"timeout": 1}


def test_malformed_responses_and_rejected_replies():
    """A malformed body is retried; a reply parse rejects is asked again (the server sees it each time) until the
    budget is spent, then counted as failed while the other requests succeed."""

    def reply(body, n):
        text = last_user_text(body)
        if text == "garbled once":
            return malformed_json() if n == 1 else '{"a": 1}'
        if text == "prose":
            return "not JSON at all"
        if text == "fixed on retry":
            return "not yet" if n == 1 else '{"a": 2}'
        return '{"a": 3}'

    requests = [ask("garbled once"), ask("prose"), ask("fixed on retry"), ask("plain")]
    with ScriptedServer(reply) as server:
        results, stats = run(server, requests, parse=json.loads, parse_retries=2)
        assert len(received(server, "prose")) == 3
    assert [r.value for r in results] == [{"a": 1}, None, {"a": 2}, {"a": 3}]
    assert results[1].error == "rejected" and results[1].text == "not JSON at all"
    assert stats.failures == {"rejected": 1}
    assert stats.retries == {"malformed_response": 1, "rejected": 3}


def test_cache_answers_a_rerun_without_requests(tmp_path):
    cache = tmp_path / "cache.sqlite"
    requests = [ask(f"q{i}") for i in range(6)] + [ask("broken")]

    def reply(body, n):
        text = last_user_text(body)
        return "" if text == "broken" else text.upper()

    with ScriptedServer(reply) as server:
        first, stats1 = run(server, requests, cache=cache, parse_retries=0)
        sent = len(server.log)
        again, stats2 = run(server, requests[:6], cache=cache)
        assert len(server.log) == sent  # nothing sent
        run(server, [requests[-1]], cache=cache, parse_retries=0)
        assert len(server.log) == sent + 1  # a failure is not cached: a rerun asks again
    assert [r.value for r in again] == [r.value for r in first[:6]] == [f"Q{i}" for i in range(6)]
    assert all(r.cached for r in again) and stats2.cached == 6 and stats2.calls == 0
    assert stats1.answered == 6 and stats1.failures == {"rejected": 1}
    rows = sqlite3.connect(cache).execute("SELECT key FROM replies").fetchall()
    assert sorted(k for (k,) in rows) == sorted(request_key("scripted", r) for r in requests[:6])


def test_the_cache_key_covers_model_messages_and_params(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with ScriptedServer(lambda body, n: f"{body['model']} {body.get('temperature')}") as server:
        run(server, [ask("q", temperature=0.1)], cache=cache)
        results, _ = run(server, [ask("q", temperature=0.1), ask("q", temperature=0.9), ask("q2", temperature=0.1)])
        results2, stats = run(server, [ask("q", temperature=0.1)], cache=cache, model="other")
    assert [r.value for r in results] == ["scripted 0.1", "scripted 0.9", "scripted 0.1"]
    assert results2[0].value == "other 0.1" and stats.cached == 0


def test_usage_and_cost_are_summed():
    def reply(body, n):
        text = last_user_text(body)
        if text == "rejected once" and n == 1:
            return Reply("", prompt_tokens=50, completion_tokens=0)
        return Reply("answer", prompt_tokens=100 + len(text), completion_tokens=7)

    requests = [ask("a"), ask("bb"), ask("rejected once")]
    with ScriptedServer(reply) as server:
        _, stats = run(server, requests, price_prompt=2.0, price_completion=8.0)
    prompt = (100 + 1) + (100 + 2) + 50 + (100 + 13)
    completion = 7 * 3
    assert (stats.prompt_tokens, stats.completion_tokens) == (prompt, completion)
    assert stats.cost == pytest.approx((prompt * 2.0 + completion * 8.0) / 1e6)
    with ScriptedServer() as server:
        assert run(server, [ask("a")])[1].cost is None  # no prices, no cost


def test_concurrency_is_bounded_and_results_keep_request_order():
    def reply(body, n):
        i = int(last_user_text(body))
        return slow(0.05 * (i % 4), str(i * i))

    requests = [ask(str(i)) for i in range(24)] + [ask("3")]  # a duplicate is sent once
    with ScriptedServer(reply) as server:
        results, stats = run(server, requests, concurrency=3)
        spans = [(e["received"], e["answered"]) for e in server.log]
    assert [r.value for r in results] == [str(i * i) for i in range(24)] + ["9"]
    assert stats.calls == 24 and len(spans) == 24
    peak = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert 2 <= peak <= 3


def test_endpoint_flags_read_the_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_endpoint_args(parser, prefix="judge-")
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    argv = ["--judge-base-url", "http://127.0.0.1:1/v1", "--judge-model", "m", "--judge-concurrency", "3"]
    e = endpoint_from_args(parser.parse_args([*argv, "--judge-api-key-file", str(key_file)]), prefix="judge-")
    assert (e.api_key, e.concurrency, e.model) == ("sk-from-file", 3, "m")
    assert "sk-from-file" not in repr(e)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert endpoint_from_args(parser.parse_args(argv), prefix="judge-").api_key == "sk-from-env"
    with pytest.raises(SystemExit):  # no flag takes the key itself
        parser.parse_args([*argv, "--judge-api-key", "sk"])


def test_an_unreachable_endpoint_fails_every_request_without_raising():
    with ScriptedServer() as server:
        url = server.base_url
    start = time.monotonic()
    with LLMClient(Endpoint(url, "m", max_retries=2, backoff=0.01)) as client:
        results, stats = client.run([ask("a"), ask("b")], progress=False)
    assert [r.error for r in results] == ["connection", "connection"]
    assert stats.retries == {"connection": 4} and time.monotonic() - start < 10
