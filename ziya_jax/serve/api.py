"""OpenAI's chat-completions API over the engine (FastAPI): POST /v1/chat/completions (streamed or not),
GET /v1/models, GET /health, GET /metrics (Prometheus). Every refusal is a 4xx in OpenAI's error JSON.

Messages become Ziya turns: system text goes before the first turn; a user message's text parts are joined by
newlines, each image part becomes `<image>` where it stands, except images that open the first user message,
which go before the conversation as training and `python -m ziya_jax.generate` place them; an assistant
message is the answer to the user messages before it. The last message must be the user's.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import time
import uuid

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ziya_jax.data import formats
from ziya_jax.serve.engine import Sampling
from ziya_jax.serve.service import ServeError, Service


class ChatRequest(BaseModel):
    """The fields this server honours; others are accepted and ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict | None = None


def error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def conversation(messages: list[dict]) -> tuple[str, list[formats.Turn], list[str]]:
    """OpenAI messages -> (text before the first turn, turns (the last one open), image URLs in order)."""
    prefix, turns, urls, question = [], [], [], None
    for k, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        text, images = _content(content, k, first=not turns and question is None)
        urls += images
        if role in ("system", "developer"):
            if turns or question is not None or images:
                raise ServeError(400, f"messages[{k}]: a {role} message (text only) must come first", "messages")
            prefix.append(text)
        elif role == "user":
            question = text if question is None else f"{question}\n{text}"
        elif role == "assistant":
            if question is None:
                raise ServeError(400, f"messages[{k}]: an assistant message must answer a user message", "messages")
            if images:
                raise ServeError(400, f"messages[{k}]: an assistant message cannot hold images", "messages")
            turns.append(formats.Turn(question, text))
            question = None
        else:
            raise ServeError(400, f"messages[{k}]: unknown role {role!r:.40}", "messages")
    if question is None:
        raise ServeError(400, "the last message must be the user's", "messages")
    return "\n".join(prefix), [*turns, formats.Turn(question, None)], urls


def _content(content, k: int, first: bool) -> tuple[str, list[str]]:
    """A message's content -> (its text, `<image>` where each image stands, and the image URLs)."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ServeError(400, f"messages[{k}].content must be a string or a list of parts", "messages")
    text, urls = "", []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if formats.IMAGE in part["text"]:
                raise ServeError(
                    400, f"messages[{k}]: text cannot hold {formats.IMAGE}; send images as image_url parts"
                )
            text += ("\n" if text and not text.endswith(formats.IMAGE) else "") + part["text"]
        elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
            url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
            urls.append(str(url))
            if not (first and not text):  # images opening the first message go before the conversation
                text += formats.IMAGE
        else:
            raise ServeError(400, f"messages[{k}]: parts must be text or image_url", "messages")
    return text, urls


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes before it is all read (Starlette sets no limit of its own)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the request body is {declared} bytes; this server takes at most {limit}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ServeError(413, f"the request body is over {limit} bytes, the most this server takes")
    return bytes(body)


def sampling(body: ChatRequest) -> Sampling:
    if body.n not in (None, 1):
        raise ServeError(400, "only n=1 is supported", "n")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ServeError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    return Sampling(
        max_tokens=body.max_completion_tokens if body.max_tokens is None else body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=secrets.randbits(32) if body.seed is None else body.seed,
    )


def stop_strings(stop, limit: int) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > limit:
        raise ServeError(400, f"at most {limit} stop strings", "stop")
    return stop


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    """The API app; the engine runs from startup to shutdown (which waits for what is in flight)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="ziya_jax", lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def refused(request, e: ServeError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return error(e.status, e.message, e.param, e.code, headers)

    def authorise(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ServeError(401, "a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "live_slots": service.engine.live()}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorise(request)
        return Response(prom.generate_latest(service.engine.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "ziya_jax"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorise(request)
        raw = await read_body(request, service.limits.max_body_bytes)
        try:
            body = ChatRequest.model_validate(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(400, f"the body is not valid JSON: {e}") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise ServeError(400, f"{where}: {first['msg']}", where) from None
        if body.model != service.model_name:
            raise ServeError(
                404,
                f"the model {body.model!r:.80} does not exist; this server has {service.model_name!r}",
                "model",
                "model_not_found",
            )
        settings, stop = sampling(body), stop_strings(body.stop, service.limits.max_stop)
        prefix, turns, urls = conversation(body.messages)
        service.check_image_count(len(urls))  # before decoding any
        pixels = [service.load_image(url) for url in urls]
        generation = service.submit(turns, pixels, settings, prefix)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(generation, stop, reply, usage), media_type="text/event-stream")
        text, last = [], None
        async for chunk in generation.chunks(stop):
            text.append(chunk.text)
            last = chunk
        message = {"role": "assistant", "content": "".join(text)}
        choice = {"index": 0, "message": message, "finish_reason": last.finish, "logprobs": None}
        return {**reply, "object": "chat.completion", "choices": [choice], "usage": _usage(last)}

    return app


def _usage(chunk) -> dict:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


async def _events(generation, stop, reply: dict, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""

    def event(delta: dict, finish=None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        chunk = {**reply, "object": "chat.completion.chunk", "choices": [choice], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    async for chunk in generation.chunks(stop):
        if chunk.text:
            yield event({"content": chunk.text})
        if chunk.finish is not None:
            yield event({}, chunk.finish)
            if include_usage:
                usage = {**reply, "object": "chat.completion.chunk", "choices": [], "usage": _usage(chunk)}
                yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"
