"""What the API and the web page share: a conversation (turns and images) becomes the prompt every other inference
path builds (formats.prompt_input), goes to the one engine, and comes back as streamed text."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import os
import urllib.parse
from collections.abc import AsyncIterator, Sequence

import numpy as np

from ziya_jax.data import errors, formats, images
from ziya_jax.paths import inside
from ziya_jax.serve.engine import Engine, Event, QueueFull, Request, Sampling


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 2**20
    max_pixels: int = 25_000_000  # per image, read from its header before decoding
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    max_stop: int = 4  # stop strings per request


class ServeError(Exception):
    """A request the server refuses: an HTTP status and a message for the person who sent it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of the answer's text; the last one also says why it ended and what it cost."""

    text: str
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextStream:
    """Token ids in, text out as it becomes final: the whole prefix is decoded each time (so characters that span
    tokens come out whole), and text that may still turn out to begin a stop string is held back."""

    def __init__(self, tok, stop: Sequence[str]):
        self.tok, self.stop, self.ids, self.sent = tok, [s for s in stop if s], [], 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        """-> (new final text, whether a stop string ended the answer)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            return self._send(text[:cut]), True
        if text.endswith("\ufffd"):
            return "", False
        return self._send(text[: len(text) - self.hold]), False

    def flush(self) -> str:
        return self._send(self.tok.decode(self.ids))

    def _send(self, text: str) -> str:
        new, self.sent = text[self.sent :], max(self.sent, len(text))
        return new


class Service:
    """The model behind the server: one engine, its tokenizers and the request limits."""

    def __init__(self, engine: Engine, tok, qtok, model_name: str, limits: Limits, image_root: str | None = None):
        self.engine, self.tok, self.qtok, self.cfg = engine, tok, qtok, engine.cfg
        self.model_name, self.limits, self.image_root = model_name, limits, image_root

    def load_image(self, url: str) -> np.ndarray:
        """A `data:image/...;base64,` URI, or `file://` under --image-root -> normalised pixels [H, W, 3]."""
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            header, _, payload = url.partition(",")
            if not header.startswith("data:image/") or not header.endswith(";base64"):
                raise ServeError(400, "an image data URI must be data:image/<type>;base64,<data>", "messages")
            try:
                source = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ServeError(400, "the image data URI is not valid base64", "messages") from None
        elif scheme == "file":
            path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
            if self.image_root is None or not inside(self.image_root, path):
                raise ServeError(
                    400,
                    "file:// images are served only from under the server's --image-root"
                    + ("" if self.image_root is None else " (this path is outside it)"),
                    "messages",
                )
            source = os.path.realpath(path)
        elif scheme in ("http", "https"):
            raise ServeError(
                400, "the server fetches nothing: send the image inline as a data:image/...;base64, URI", "messages"
            )
        else:
            raise ServeError(400, f"unsupported image URL scheme {scheme!r:.20}", "messages")
        return self.decode_image(source)

    def decode_image(self, source) -> np.ndarray:
        """Image bytes or a file path -> normalised pixels [H, W, 3], within the server's limits."""
        try:
            image = images.open_rgb(source, max_pixels=self.limits.max_pixels, max_bytes=self.limits.max_body_bytes)
            return images.to_pixels(image, self.cfg.vision.image_size)
        except errors.BadSample as e:
            if e.reason == errors.DECOMPRESSION_BOMB:
                raise ServeError(
                    400, f"an image is larger than this server takes ({self.limits.max_pixels} pixels)", "messages"
                ) from None
            raise ServeError(400, f"an image could not be read: {e.reason}: {e.detail}"[:300], "messages") from None

    def check_image_count(self, n: int):
        if n > self.engine.max_images:
            raise ServeError(400, f"{n} images; this server takes at most {self.engine.max_images}", "messages")

    def request(
        self,
        turns: Sequence[formats.Turn],
        pixels: list[np.ndarray],
        sampling: Sampling,
        prefix: str = "",
        deliver=None,
    ) -> Request:
        """The engine's request for the last turn's question (its answer None), built as every inference path
        builds its prompt."""
        self.check_image_count(len(pixels))
        if sampling.max_tokens is None:  # as much as the context leaves, up to the cap
            room = self.cfg.llm.max_position_embeddings - len(self._prompt(turns, pixels, 0, prefix)["input_ids"])
            sampling = dataclasses.replace(sampling, max_tokens=max(1, min(self.limits.max_tokens, room)))
        if sampling.max_tokens > self.limits.max_tokens or sampling.max_tokens < 1:
            raise ServeError(
                400, f"max_tokens must be in [1, {self.limits.max_tokens}], got {sampling.max_tokens}", "max_tokens"
            )
        arrays = self._prompt(turns, pixels, sampling.max_tokens, prefix)
        return Request(
            input_ids=arrays["input_ids"],
            images=pixels,
            sampling=sampling,
            deliver=deliver,
            qformer_ids=arrays.get("qformer_ids"),
            qformer_mask=arrays.get("qformer_mask"),
        )

    def _prompt(self, turns, pixels, max_tokens: int, prefix: str) -> dict[str, np.ndarray]:
        try:
            return formats.prompt_input(turns, len(pixels), self.tok, self.qtok, self.cfg, max_tokens, prefix=prefix)
        except formats.PromptTooLong as e:
            raise ServeError(400, f"the prompt is too long: {e}", "messages", "context_length_exceeded") from None
        except ValueError as e:
            raise ServeError(400, str(e), "messages") from None

    def submit(
        self, turns: Sequence[formats.Turn], pixels: list[np.ndarray], sampling: Sampling, prefix: str = ""
    ) -> Generation:
        """Start answering (on the running event loop); refusals raise ServeError before anything is streamed."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = self.request(
            turns, pixels, sampling, prefix, deliver=lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
        )
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise ServeError(429, f"the server is busy ({e}); retry shortly", code="queue_full") from None
        return Generation(self, request, events)


@dataclasses.dataclass
class Generation:
    service: Service
    request: Request
    events: asyncio.Queue

    async def chunks(self, stop: Sequence[str] = ()) -> AsyncIterator[Chunk]:
        """The answer as it is decoded. Leaving the iteration early (a client gone) cancels the request."""
        text, finish = TextStream(self.service.tok, stop), None
        try:
            while finish is None:
                event: Event = await self.events.get()
                if event.finish is not None:
                    finish = event.finish
                    piece = text.flush()
                else:
                    piece, stopped = text.push(event.token)
                    if stopped:
                        self.service.engine.cancel(self.request)
                        finish = "stop"
                if finish is not None:
                    yield Chunk(piece, finish, len(self.request.input_ids), self.request.generated)
                elif piece:
                    yield Chunk(piece)
        finally:
            if finish is None:
                self.service.engine.cancel(self.request)
