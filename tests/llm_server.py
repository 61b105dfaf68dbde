"""A scripted OpenAI-compatible chat-completions server for tests: real HTTP on a free loopback port.

The test gives `reply(body, attempt) -> str | Reply`: `body` is the request's JSON, `attempt` counts how often
this same request (by `request_key`) has arrived, from 1. A str is the answer's content; a `Reply` can also
inject faults: `rate_limited(retry_after)`, `server_error()`, `slow(seconds, content)`, `malformed_json()`,
`no_content()`. Every request is logged once answered ({key, user: its last user text, attempt, status, received,
answered} in `log`, and in `log_path` as JSON lines when given), so a test can count how often each request was
answered.

In a test (a thread of the test process):

    with ScriptedServer(lambda body, attempt: "hi") as server:
        client = OpenAI(base_url=server.base_url, api_key="k")
        ...
        assert server.answered() == 1

As a subprocess (e.g. to be killed with the client): `python tests/llm_server.py --spec SPEC.py --port-file F
--log LOG.jsonl`, where SPEC.py defines `reply(body, attempt)` and may set `DELAY` (seconds before every
reply) and define `gate(answered) -> bool` (False holds requests until it turns True, e.g. once a file exists;
GET /state counts the held ones); the port is written to F once the server listens. `ScriptedSubprocess` does
this and waits for the port.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


@dataclasses.dataclass
class Reply:
    content: str | None = "ok"
    status: int = 200
    headers: dict = dataclasses.field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    raw: str | None = None  # a body sent as is (malformed JSON)
    prompt_tokens: int | None = None  # default: the request's characters / 4
    completion_tokens: int | None = None  # default: the content's characters / 4


def rate_limited(retry_after: float = 1.0) -> Reply:
    return Reply(None, 429, {"Retry-After": str(retry_after)})


def server_error(status: int = 500) -> Reply:
    return Reply(None, status)


def slow(seconds: float, content: str = "ok") -> Reply:
    return Reply(content, delay=seconds)


def malformed_json() -> Reply:
    return Reply(raw='{"id": "x", "choices": [{"message": {"content": "cut off')


def no_content() -> Reply:
    """A well-formed completion whose message has no content."""
    return Reply(None)


def request_key(body: dict) -> str:
    """Identifies a request: the same body (model, messages, parameters) is the same request."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def last_user_text(body: dict) -> str:
    """The text of the request's last user message (its text parts joined), for replies that echo it."""
    content = next((m for m in reversed(body.get("messages", [])) if m.get("role") == "user"), {}).get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def create_app(
    reply: Callable,
    delay: float = 0.0,
    log: list | None = None,
    log_path: str | None = None,
    gate: Callable[[int], bool] | None = None,
) -> FastAPI:
    """gate(requests answered so far) -> whether a request may be answered now; one that may not waits (and is
    counted by GET /state) until it may."""
    app = FastAPI()
    log = [] if log is None else log
    seen: Counter = Counter()
    lock = threading.Lock()
    waiting = [0]

    def record(entry: dict) -> None:
        with lock:
            log.append(entry)
            if log_path:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        received = time.time()
        body = await request.json()
        key = request_key(body)
        with lock:
            seen[key] += 1
            attempt = seen[key]
        if gate is not None and not gate(len(log)):
            waiting[0] += 1
            while not gate(len(log)):
                await asyncio.sleep(0.01)
            waiting[0] -= 1
        out = reply(body, attempt)
        out = Reply(out) if isinstance(out, str) else out
        if delay or out.delay:
            await asyncio.sleep(delay + out.delay)
        record(
            {
                "key": key,
                "user": last_user_text(body),
                "attempt": attempt,
                "status": out.status,
                "received": received,
                "answered": time.time(),
            }
        )
        if out.raw is not None:
            return Response(out.raw, out.status, out.headers, media_type="application/json")
        if out.status != 200:
            error = {"error": {"message": f"scripted {out.status}", "type": "scripted", "code": out.status}}
            return JSONResponse(error, out.status, out.headers)
        prompt_tokens = out.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = len(json.dumps(body["messages"], ensure_ascii=False)) // 4
        completion_tokens = out.completion_tokens
        if completion_tokens is None:
            completion_tokens = len(out.content or "") // 4
        return JSONResponse(
            {
                "id": f"chatcmpl-{key[:12]}-{attempt}",
                "object": "chat.completion",
                "created": int(received),
                "model": body.get("model", "scripted"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": out.content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            headers=out.headers,
        )

    @app.get("/log")
    async def get_log():
        with lock:
            return list(log)

    @app.get("/state")
    async def state():
        return {"answered": len(log), "waiting": waiting[0]}

    return app


def answered_counts(log: list[dict]) -> Counter:
    """request key -> how often it was answered with a 200."""
    return Counter(e["key"] for e in log if e["status"] == 200)


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


class ScriptedServer:
    """The scripted app in a thread of the test process, on a free loopback port."""

    def __init__(self, reply: Callable = lambda body, attempt: "ok", delay: float = 0.0):
        self.log: list[dict] = []
        self.reply = reply
        self.app = create_app(lambda body, attempt: self.reply(body, attempt), delay, self.log)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the scripted server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def answered(self) -> int:
        return sum(answered_counts(self.log).values())

    def counts(self) -> Counter:
        return answered_counts(self.log)


class ScriptedSubprocess:
    """The scripted server as a subprocess (`--spec` file), for tests that kill a client mid-run."""

    def __init__(self, spec: str, folder: str):
        self.log_path = os.path.join(folder, "server_log.jsonl")
        port_file = os.path.join(folder, "server_port")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--spec",
                spec,
                "--port-file",
                port_file,
                "--log",
                self.log_path,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the scripted server did not start: {self.proc.stdout.read()}")
            time.sleep(0.05)
        self.port = int(open(port_file).read())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def log(self) -> list[dict]:
        return read_log(self.log_path)

    def answered(self) -> int:
        return sum(answered_counts(self.log).values())

    def waiting(self) -> int:
        """Requests held by the spec's gate now."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/state", timeout=10) as r:
            return json.load(r)["waiting"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ScriptedSubprocess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _load_spec(path: str):
    spec = importlib.util.spec_from_file_location("llm_server_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the scripted chat-completions server as a process")
    p.add_argument("--spec", required=True, help="a .py file defining reply(body, attempt), optionally DELAY and gate")
    p.add_argument("--port-file", required=True, help="where to write the port once listening")
    p.add_argument("--log", required=True, help="JSON lines, one per answered request")
    args = p.parse_args(argv)
    spec = _load_spec(args.spec)
    app = create_app(spec.reply, getattr(spec, "DELAY", 0.0), log_path=args.log, gate=getattr(spec, "gate", None))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    async def serve():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(sock.getsockname()[1]))
        os.replace(args.port_file + ".tmp", args.port_file)
        await task

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
