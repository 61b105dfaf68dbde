"""The chat page at / (Gradio), on the API's own FastAPI app: it answers through the same Service and engine as
the API, so a page user's question is decoded in the same batch as API requests, not by a second model.

The browser keeps the conversation and sends all of it with each question; it becomes turns and images by the
API's placement rule: images given with the first question go before the conversation, later ones become
`<image>` at the start of their question. A refused question (gr.Error) stays in the box, out of the conversation.

A Blocks layout rather than gr.ChatInterface: Gradio 6's front end runs no `.then` listener after an event fails,
and ChatInterface re-enables its textbox in one, so a single refusal would leave its page unable to ask again.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets

import gradio as gr

from ziya_jax.data import formats
from ziya_jax.serve.engine import Sampling
from ziya_jax.serve.service import ServeError, Service

EXAMPLES = ["Describe the image briefly.", "请简要描述这张图片。"]


def refusal(message: str) -> gr.Error:
    """A question the page refuses, shown in its error toast; not a server error, so no traceback is logged."""
    return gr.Error(message, print_exception=False)


def conversation(history: list[dict], message: dict) -> tuple[list[formats.Turn], list[str]]:
    """Gradio's chat (messages whose content is a list of text and file parts) and the box's new message
    ({"text", "files"}) -> (turns, the last one open; image paths in order). An exchange whose answer is blank is
    left out: a prompt cannot hold an empty turn."""
    files = [{"type": "file", "file": {"path": path}} for path in message["files"]]
    turns, paths, asked = [], [], None
    for m in [*history, {"role": "user", "content": [*files, {"type": "text", "text": message["text"]}]}]:
        text = "\n".join(part["text"] for part in m["content"] if part["type"] == "text")
        given = [part["file"]["path"] for part in m["content"] if part["type"] == "file"]
        if m["role"] == "user":
            asked = (formats.IMAGE * len(given) if turns else "") + text, given
        elif asked is not None and text.strip():
            turns.append(formats.Turn(asked[0], text))
            paths += asked[1]
            asked = None
    return [*turns, formats.Turn(asked[0], None)], paths + asked[1]


def mount_page(app, service: Service, api_key: str | None):
    """Mount the chat page at / (after the API's routes, which keep precedence); with api_key the page asks for
    it (any user name, the key as password)."""

    def pixels(path: str):
        try:
            return service.decode_image(path)
        except ServeError as e:
            raise refusal(e.message) from None

    async def respond(message: dict, history: list[dict], temperature: float):
        """Stream the answer into the chat, the box disabled meanwhile. A refusal raises gr.Error before anything
        changes."""
        if not message["text"].strip():
            raise refusal("Type a question to go with the images.")
        if formats.IMAGE in message["text"]:
            raise refusal(f"A question cannot hold {formats.IMAGE}; upload the images instead.")
        turns, paths = conversation(history, message)
        loaded = await asyncio.to_thread(lambda: [pixels(p) for p in paths])  # decoding must not stall the API
        try:
            generation = service.submit(
                turns, loaded, Sampling(max_tokens=None, temperature=temperature, seed=secrets.randbits(32))
            )
        except ServeError as e:
            hint = " Clear the conversation to go on." if e.code == "context_length_exceeded" else ""
            raise refusal(e.message + hint) from None
        question = {"role": "user", "content": [*({"path": path} for path in message["files"]), message["text"]]}
        answer = {"role": "assistant", "content": "…"}  # until the first token: the chat shows no progress bar
        yield gr.MultimodalTextbox(value=None, interactive=False), [*history, question, answer]
        answer["content"] = ""
        async for chunk in generation.chunks():
            answer["content"] += chunk.text
            yield gr.skip(), [*history, question, answer]
        yield gr.MultimodalTextbox(interactive=True), [*history, question, answer]

    with gr.Blocks(title="Ziya-Visual", analytics_enabled=False) as page:
        gr.Markdown(
            "# Ziya-Visual\nUpload images and ask about them, in English or Chinese. The whole conversation, "
            "images included, is sent with each question."
        )
        chat = gr.Chatbot(label="Conversation", buttons=["copy", "copy_all"], height="60vh")
        box = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", placeholder="Ask about the images…", show_label=False
        )
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)", scale=4)
            clear = gr.Button("Clear", scale=1)
        gr.Examples([[{"text": text, "files": []}] for text in EXAMPLES], [box])
        # concurrency_limit=None: the engine batches and queues requests itself. show_progress_on=[]: a refusal
        # shows as its toast alone, without "Error" overlays hiding the chat and the box.
        answering = box.submit(
            respond, [box, chat, temperature], [box, chat], concurrency_limit=None, show_progress_on=[]
        )
        reset = lambda: (gr.MultimodalTextbox(value=None, interactive=True), [])
        gr.on([clear.click, chat.clear], reset, None, [box, chat], cancels=[answering])

    def auth(_user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), api_key.encode())

    return gr.mount_gradio_app(
        app, page, path="/", auth=auth if api_key else None, max_file_size=service.limits.max_body_bytes
    )
