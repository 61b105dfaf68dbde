"""The server as its users run it: `python -m ziya_jax.serve` in a subprocess on a loopback port, spoken to with the
official `openai` client and raw HTTP. Answers are checked against `python -m ziya_jax.generate` and
`python -m ziya_jax.chat` (themselves checked against a reference forward pass) on conftest's tiny_chat model;
and the engine in process, for what only it can show (what compiles, how seeds draw)."""

import base64
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from clis import Server, run_cli
from PIL import Image

from ziya_jax.checkpoint import load_model, save_model

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

KEY = "test-key-0123"
QUESTIONS = ["What colour is the circle?", "How many squares are there?", "请简要描述这张图片。", "Where is the dog?"]


class APIServer(Server):
    """The server as this module's clients speak to it, with its key."""

    def idle(self):
        """Wait until no request runs or waits: an earlier test's clients may have just left."""
        return self.settle(live=0, waiting=0)

    def settle(self, live: int, waiting: int) -> dict[str, float]:
        """Wait (bounded) until `live` requests run and `waiting` wait. A stream's first line (the role) can be sent
        before the engine's thread takes the request from its queue, so it does not show that a slot is taken."""
        deadline = time.time() + 30
        while time.time() < deadline:
            m = self.metrics()
            if (m["ziya_live_slots"], m["ziya_queue_length"]) == (live, waiting):
                return m
            time.sleep(0.1)
        raise AssertionError(f"the server did not reach {live} running and {waiting} waiting: {m}")

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        request = urllib.request.Request(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        text = urllib.request.urlopen(request, timeout=10).read().decode()
        return {
            name: float(value)
            for name, _, value in (line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))
        }


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def user(text, *images):
    """A user message: its images, then its text."""
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def save_variant(tiny_chat, folder, context=None):
    """conftest's tiny_chat with its LLM's attention values and the image projection scaled up, so that answers
    depend on the question (the untrained model's answer otherwise follows its last prompt token alone); context:
    another LLM context (RoPE has no position table, so the weights stay as they are). -> its checkpoint."""
    params, cfg = load_model(str(tiny_chat[0] / "ckpt"))
    attention = params["language_model"]["layers"]["self_attn"]
    for name in ("v_proj", "o_proj"):
        attention[name]["kernel"] = attention[name]["kernel"] * 10
    params["language_projection"]["kernel"] = params["language_projection"]["kernel"] * 30
    if context:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_position_embeddings=context))
    save_model(str(folder / "ckpt"), params, cfg)
    shutil.copytree(tiny_chat[0] / "ckpt" / "tokenizer", folder / "ckpt" / "tokenizer")
    (folder / "key").write_text(KEY)
    return folder / "ckpt"


@pytest.fixture(scope="module")
def server(tiny_chat, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    checkpoint = save_variant(tiny_chat, folder)
    flags = ("--api-key-file", str(folder / "key"), "--image-root", str(tiny_chat[0]), "--no-page")
    with APIServer(checkpoint, *flags) as s:
        yield s


@pytest.fixture(scope="module")
def slow_server(tiny_chat, tmp_path_factory):
    """One slot, a queue of one, and a 65536-token context: a long request runs for minutes (each step attends over
    the whole context), far longer than a test needs it to hold its slot on a busy machine."""
    folder = tmp_path_factory.mktemp("long")
    checkpoint = save_variant(tiny_chat, folder, context=65536)
    flags = ("--api-key-file", str(folder / "key"), "--slots", "1", "--queue", "1", "--max-tokens", "65000")
    with APIServer(checkpoint, *flags, "--no-page") as s:
        yield s


def generate_cli(checkpoint, image, question, tokens) -> dict:
    flags = ("--prompt", question, "--max-new-tokens", tokens, "--json")
    out = run_cli("generate", "--checkpoint", checkpoint, "--image", image, *flags)
    return json.loads(out.strip().splitlines()[-1])


def ask(client, messages, tokens=8, **kw):
    return client.chat.completions.create(model="ckpt", messages=messages, max_tokens=tokens, temperature=0, **kw)


def test_answers_equal_generate_streamed_or_not(server, tiny_chat):
    root = tiny_chat[0]
    want = generate_cli(server.checkpoint, root / "img.png", QUESTIONS[0], 8)
    assert want["answer"].strip()
    messages = [user(QUESTIONS[0], data_url(root / "img.png"))]
    reply = ask(server.client(), messages)
    assert reply.choices[0].message.content == want["answer"]
    assert reply.usage.completion_tokens == len(want["token_ids"])
    assert reply.choices[0].finish_reason == ("stop" if want["token_ids"][-1] == tiny_chat[3].eos_id else "length")

    chunks = list(ask(server.client(), messages, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == want["answer"]
    assert sum(bool(p) for p in pieces) > 1, "the answer should arrive in pieces"
    assert chunks[-1].usage.completion_tokens == len(want["token_ids"])
    # an image given by file:// under --image-root reads the same file
    same = ask(server.client(), [user(QUESTIONS[0], f"file://{root / 'img.png'}")])
    assert same.choices[0].message.content == want["answer"]


def test_two_images_two_turns_answer_as_chat_does(server, tiny_chat):
    root = tiny_chat[0]
    script = f"/image {root / 'img.png'}\n{QUESTIONS[0]}\n/image {root / 'img2.png'}\n{QUESTIONS[1]}\n"
    flags = ("--greedy", "--repetition-penalty", "1", "--max-new-tokens", "8")
    lines = run_cli(
        "chat", "--checkpoint", server.checkpoint, *flags, stdin=script
    ).splitlines()  # banner, (image 1 added), answer 1, (image 2 added), answer 2
    first, second = lines[2], lines[4]
    messages = [
        user(QUESTIONS[0], data_url(root / "img.png")),
        {"role": "assistant", "content": first},
        user(QUESTIONS[1], data_url(root / "img2.png")),
    ]
    reply = ask(server.client(), messages)
    assert reply.choices[0].message.content == second
    assert reply.usage.prompt_tokens > 2 * tiny_chat[2].num_query_tokens


def test_sixteen_concurrent_clients_get_their_answers_alone(server, tiny_chat):
    root = tiny_chat[0]
    images = [data_url(root / "img.png"), data_url(root / "img2.png")]
    cases = [[user(QUESTIONS[i % 4] + " " * (i // 8), images[i % 2])] for i in range(16)]
    alone = [ask(server.client(), m, tokens=12).choices[0].message.content for m in cases]
    assert len(set(alone)) > 2, "the answers should depend on the input for this check to mean anything"
    together, start = [None] * 16, threading.Barrier(16)

    def run(i):
        start.wait()
        together[i] = ask(server.client(), cases[i], tokens=12).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


def bomb_png() -> bytes:
    """A small file that decodes to 36 megapixels."""
    out = io.BytesIO()
    Image.new("L", (6000, 6000)).save(out, "PNG")
    return out.getvalue()


def post(server, body: bytes, key=KEY) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_bad_requests_get_their_4xx_and_the_server_goes_on(server, tiny_chat):
    root = tiny_chat[0]
    good = {"model": "ckpt", "messages": [user(QUESTIONS[0], data_url(root / "img.png"))], "max_tokens": 4}
    image = lambda url: {**good, "messages": [user(QUESTIONS[0], url)]}
    b64 = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()
    cases = {
        "no key": (401, json.dumps(good).encode(), None),
        "too many images": (400, json.dumps({**good, "messages": [user("q", *[b64(b"x")] * 5)]}).encode(), KEY),
        "decompression bomb": (400, json.dumps(image(b64(bomb_png()))).encode(), KEY),
        "undecodable image": (400, json.dumps(image(b64(os.urandom(300)))).encode(), KEY),
        "not base64": (400, json.dumps(image("data:image/png;base64,@@@")).encode(), KEY),
        "http url": (400, json.dumps(image("https://example.com/a.png")).encode(), KEY),
        "file outside the root": (400, json.dumps(image("file:///etc/hostname")).encode(), KEY),
        "prompt too long": (400, json.dumps({**good, "messages": [user("word " * 400)]}).encode(), KEY),
        "max_tokens above the cap": (400, json.dumps({**good, "max_tokens": 100000}).encode(), KEY),
        "unknown model": (404, json.dumps({**good, "model": "gpt-4o"}).encode(), KEY),
        "malformed JSON": (400, b'{"model": "ckpt", "messages": [', KEY),
        "no messages": (400, json.dumps({"model": "ckpt"}).encode(), KEY),
        "n=2": (400, json.dumps({**good, "n": 2}).encode(), KEY),
        "last message not the user's": (
            400,
            json.dumps({**good, "messages": [*good["messages"], {"role": "assistant", "content": "a"}]}).encode(),
            KEY,
        ),
    }
    for name, (status, body, key) in cases.items():
        got, reply, headers = post(server, body, key)
        assert got == status, (name, reply)
        assert set(reply["error"]) >= {"message", "type"} and len(reply["error"]["message"]) > 10, (name, reply)
    assert (
        "larger than this server takes"
        in post(server, json.dumps(image(b64(bomb_png()))).encode())[1]["error"]["message"]
    )
    for declared in (True, False):  # refused from Content-Length, or once the chunked body passes the limit
        assert oversized_post(server, 32 * 2**20 + 1, declared).startswith(b"HTTP/1.1 413")
    status, reply, _ = post(server, json.dumps(good).encode())
    assert status == 200 and reply["choices"][0]["message"]["content"]


def oversized_post(server, size: int, declared: bool) -> bytes:
    """A body of `size` bytes, sent by hand (a client library would not read a reply sent before its body is
    out): with its Content-Length, the headers alone; chunked, the whole body. -> the reply's first bytes."""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        if declared:
            sock.sendall(f"{head}Content-Length: {size}\r\n\r\n".encode())
        else:
            sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            piece = b"x" * 2**20
            for start in range(0, size, len(piece)):
                part = piece[: min(len(piece), size - start)]
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        return sock.recv(64)


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == ["ckpt"]
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert json.load(urllib.request.urlopen(f"{server.url}/health"))["status"] == "ok"
    metrics = server.metrics()
    for name in ("ziya_queue_length", "ziya_live_slots", "ziya_tokens_per_second", "ziya_generated_tokens_total"):
        assert name in metrics
    assert metrics["ziya_generated_tokens_total"] > 0
    assert metrics["ziya_time_to_first_token_seconds_count"] > 0
    assert metrics["ziya_time_per_output_token_seconds_count"] > 0


def long_request(server, tokens=65000):
    return {
        "model": "ckpt",
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }


def test_a_client_gone_mid_stream_frees_its_slot(slow_server):
    cancelled = 'ziya_requests_finished_total{reason="cancelled"}'
    before = slow_server.idle().get(cancelled, 0)
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        with client.stream("POST", f"{slow_server.url}/v1/chat/completions", json=long_request(slow_server)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            slow_server.settle(live=1, waiting=0)
    metrics = slow_server.idle()
    assert metrics[cancelled] == before + 1
    assert metrics.get('ziya_requests_finished_total{reason="length"}', 0) == 0


def test_a_full_queue_answers_429_with_retry_after(slow_server):
    slow_server.idle()
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60, headers=headers) as a, httpx.Client(timeout=60, headers=headers) as b:
        with a.stream("POST", f"{slow_server.url}/v1/chat/completions", json=long_request(slow_server)) as running:
            lines = running.iter_lines()  # held: a dropped iterator closes the connection, which cancels the request
            next(lines)
            slow_server.settle(live=1, waiting=0)  # the one slot is taken
            with b.stream("POST", f"{slow_server.url}/v1/chat/completions", json=long_request(slow_server)) as queued:
                assert queued.status_code == 200  # waits in the queue of one
                third = httpx.post(
                    f"{slow_server.url}/v1/chat/completions",
                    json=long_request(slow_server),
                    headers=headers,
                    timeout=60,  # httpx's default of 5 s is short on a busy machine
                )
                assert third.status_code == 429
                assert third.headers["retry-after"] == "1"
                assert "busy" in third.json()["error"]["message"]


def test_sigterm_finishes_what_is_in_flight_and_exits_0(slow_server):
    slow_server.idle()
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        with client.stream("POST", f"{slow_server.url}/v1/chat/completions", json=long_request(slow_server, 300)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            slow_server.proc.send_signal(signal.SIGTERM)
            events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish[-1] in ("length", "stop")
    assert slow_server.proc.wait(60) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{slow_server.url}/health", timeout=2)


def test_sampling_settings_never_recompile_and_a_seed_repeats_its_draws(tiny_chat):
    """In process: requests with other temperatures, top_p and seeds reuse the one compiled step; a prompt compiles
    once per length bucket; the same seed draws the same tokens, beside other requests or not."""
    import queue

    from ziya_jax.data import formats
    from ziya_jax.decode import decode_params
    from ziya_jax.serve import engine as serving

    root, params, cfg, tok, qtok = tiny_chat
    engine = serving.Engine(
        decode_params(params), cfg, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, decodable=tok.vocab_size, slots=4
    )
    engine.start()

    def run(settings: list[serving.Sampling], question=QUESTIONS[2]):
        arrays = formats.prompt_input([formats.Turn(question, None)], 0, tok, qtok, cfg, 16)
        channels = [queue.Queue() for _ in settings]
        for sampling, channel in zip(settings, channels):
            request = serving.Request(
                arrays["input_ids"], [], sampling, channel.put, arrays["qformer_ids"], arrays["qformer_mask"]
            )
            engine.submit(request)
        answers = []
        for channel in channels:
            tokens = []
            while (event := channel.get(timeout=60)).finish is None:
                tokens.append(event.token)
            answers.append(tokens)
        return answers

    try:
        run([serving.Sampling(16, 0.0)])
        steps, prefills = serving._decode_step._cache_size(), serving._prefill_into._cache_size()
        drawn = run([serving.Sampling(16, 1.5, 0.9, seed) for seed in (1, 2, 1)])
        alone = run([serving.Sampling(16, 1.5, 0.9, 1)])
        run([serving.Sampling(16, 0.7, 0.5, 3), serving.Sampling(16, 0.0)], question=QUESTIONS[0])
    finally:
        engine.stop()
    assert serving._decode_step._cache_size() == steps
    assert serving._prefill_into._cache_size() == prefills  # every prompt here fits the first bucket (64)
    assert drawn[0] == drawn[2] == alone[0]
    assert drawn[0] != drawn[1]


def test_only_ids_the_tokenizer_can_decode_are_drawn():
    """The image placeholder (and any id past the tokenizer) is never an answer token, greedy or sampled, even
    where the model likes it best."""
    from ziya_jax.serve import engine as serving

    logits = jnp.zeros((4, 10)).at[:, 8].set(50.0).at[:, 9].set(60.0)  # ids 8, 9: past a tokenizer of 8 pieces
    settings = {
        "temperature": jnp.array([0.0, 1.0, 2.0, 0.5]),
        "top_p": jnp.array([1.0, 1.0, 0.5, 1.0]),
        "seed": jnp.arange(4, dtype=jnp.uint32),
    }
    for step in range(20):
        tokens = serving._sample(logits, settings, jnp.full((4,), step), 8)
        assert (np.asarray(tokens) < 8).all(), tokens
