"""python -m ziya_jax.bench serve: ziya_jax's server (continuous batching) against a transformers server on the same
weights, both taking the same OpenAI chat-completions requests over loopback.

Model: decode.py's benchmark model (`hf_model`: ViT-B/16-like tower at 224, 6-layer Q-Former with 32 queries,
12-layer 768-wide LLaMA; --small: its tiny version), random weights, changed only where serving needs it: the LLM
vocabulary is the demo tokenizer's (train_demo_tokenizers, 640 pieces) plus the image placeholder (id 640), where
decode.py has 32000 rows and no tokenizer; the LLM context is CONTEXT tokens, not LlamaConfig's 2048, because the
ziya_jax engine holds a KV cache row of the whole context per slot and attends over all of it at every step (a
request here needs about 50 + --new-tokens); and the LM head rows of EOS, of the placeholder and of the pieces that
decode to no text of their own (byte pieces, control pieces) are zeroed (the same weights on both sides), so that
greedy answers never end early (the API has no min_tokens; completion_tokens is checked on every answer), never hold
the placeholder, which the tokenizer cannot decode, and stream one content chunk per token (a byte piece's text waits
for the rest of its character, which would push ziya_jax's first chunk and chunk gaps past the tokens').

Baseline: `transformers serve` (5.x) cannot serve this checkpoint: it always loads with a device_map, which needs
accelerate (not a dependency); Blip2Processor drops the chat template it is given (`/v1/chat/completions` answers
400 "this processor does not have a chat template"); and it runs vision models one request at a time (continuous
batching is for text-only models). So the baseline is `baseline_server` below, what a transformers user writes: a
FastAPI server whose one worker takes the requests waiting (up to 16), left-pads them into one batch and runs one
greedy `model.generate` on it (static batching). It answers non-streamed: its time to first token is the whole
response time, and its per-token latency is n/a. Both servers read messages with ziya_jax.serve.api.conversation
and build prompts with formats.prompt_input (the image's query placeholders, then `<human>:{question}\\n<bot>:`)
and pixels with images.to_pixels, so both models get the same token ids and pixels.

The servers run one after the other (neither waits idle beside the other's measurement on the shared cores). For
1, 4 and 16 clients (threads, the openai client, max_retries=0), each sends --requests requests (one PNG data URI
and a question, temperature 0, max_tokens=--new-tokens); a 4-client round first (compilation) is not counted.
ziya_jax streams: time to first token is the first content chunk, per-token latency the gaps between content
chunks. Throughput is completion tokens / wall time of the round; "others CPU" is the share of the machine's CPU
time that other processes took during the round (on a shared machine they skew it). The last line printed is one
JSON object. Before the servers start, floor_costs measures what bounds the ratio ("ceiling"): ziya_jax's least
possible 16-client round, its image encodings at the encoder's best batch and its decoding steps at the memory-
bandwidth bound. On 2 CPU cores the default run takes about 6 minutes, --small about 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the string annotation (__future__) from here

CONTEXT = 256  # LLM context of the benchmark model (see the module docstring)
CLIENTS = (1, 4, 16)
SLOTS = 16
MODEL_NAME = "bench"
STARTUP_TIMEOUT_S = 600  # loading and (ziya_jax) the first compilations happen before /health answers
REQUEST_TIMEOUT_S = 900  # per request: bounds a round even if a server stalls
QUESTIONS = (
    "What colour is the square?",
    "How many shapes are in the picture?",
    "Describe the image.",
    "Where is the red circle?",
)


def build(small: bool, out: str) -> tuple[str, str]:
    """The benchmark model saved twice: as Hugging Face (the baseline's) and as a ziya_jax checkpoint with the
    demo tokenizers in ckpt/tokenizer (the server's default). -> (hf folder, ziya_jax checkpoint folder)."""
    import torch

    from ziya_jax.bench.decode import hf_model
    from ziya_jax.checkpoint import save_model
    from ziya_jax.convert import load_hf
    from ziya_jax.data.synthetic import train_demo_tokenizers
    from ziya_jax.data.tokenizers import load_tokenizers

    tok_dir, hf_dir, ckpt = (os.path.join(out, name) for name in ("tokenizer", "hf", "ckpt"))
    train_demo_tokenizers(tok_dir)
    tok, _ = load_tokenizers(tok_dir)
    image_token = tok.vocab_size  # the tokenizer never produces it (train_demo_tokenizers)
    model = hf_model(small)
    model.resize_token_embeddings(image_token + 1, mean_resizing=False)
    model.config.image_token_index = image_token
    model.config.text_config.max_position_embeddings = CONTEXT
    model.config.text_config.eos_token_id = tok.eos_id
    model.config.text_config.pad_token_id = tok.pad_id
    hidden = [i for i in range(image_token) if i == tok.eos_id or not _visible(tok.decode([i]))] + [image_token]
    with torch.no_grad():  # logit 0 for these: the argmax of hundreds of random logits is never one of them
        model.get_output_embeddings().weight[hidden] = 0.0
    model.save_pretrained(hf_dir)
    params, cfg = load_hf(hf_dir)
    assert cfg.image_token_id == image_token and cfg.llm.vocab_size == image_token + 1, cfg
    assert cfg.llm.max_position_embeddings == CONTEXT and cfg.llm.eos_token_id == tok.eos_id, cfg.llm
    save_model(ckpt, params, cfg)
    os.rename(tok_dir, os.path.join(ckpt, "tokenizer"))
    return hf_dir, ckpt


def _visible(text: str) -> bool:
    """Whether a token's text streams as soon as it is decoded (byte pieces wait for the rest of their character,
    control pieces and a lone leading space decode to nothing)."""
    return bool(text.strip()) and "\ufffd" not in text


def baseline_server(hf_dir: str, checkpoint: str, port: int):
    """transformers' generate behind FastAPI, one batch of every waiting request at a time (see the module
    docstring). Greedy, non-streamed, one image per request."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from transformers import Blip2ForConditionalGeneration

    from ziya_jax.checkpoint import load_model_config
    from ziya_jax.data import formats, images
    from ziya_jax.data.tokenizers import load_tokenizers
    from ziya_jax.serve.api import conversation
    from ziya_jax.serve.service import ServeError

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = load_model_config(checkpoint)
    tok, _ = load_tokenizers(os.path.join(checkpoint, "tokenizer"))
    model = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    waiting = queue.Queue()
    threading.Thread(target=_batches, args=(model, tok, waiting), daemon=True).start()
    app = FastAPI()

    @app.exception_handler(ServeError)
    async def refused(request, e: ServeError):
        return JSONResponse({"error": {"message": e.message, "type": "invalid_request_error"}}, e.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body.get("stream") or body.get("temperature") not in (None, 0):
            raise ServeError(400, "this baseline answers greedy (temperature 0), non-streamed requests only")
        prefix, turns, urls = conversation(body["messages"])
        if len(urls) != 1 or not urls[0].startswith("data:image/"):
            raise ServeError(400, "one image per request, as a data:image/...;base64, URI")
        image = images.open_rgb(base64.b64decode(urls[0].partition(",")[2]))
        pixels = images.to_pixels(image, cfg.vision.image_size)
        max_tokens = int(body.get("max_tokens") or 16)
        ids = formats.prompt_input(turns, 1, tok, None, cfg, max_tokens, prefix)["input_ids"]
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        waiting.put((ids, pixels, max_tokens, loop, done))
        text, tokens, finish = await done
        usage = {"prompt_tokens": len(ids), "completion_tokens": tokens, "total_tokens": len(ids) + tokens}
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        reply = {"id": f"chatcmpl-{id(done):x}", "object": "chat.completion", "created": int(time.time())}
        return {**reply, "model": body.get("model"), "choices": [choice], "usage": usage}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _batches(model, tok, waiting: queue.Queue):
    """The baseline's worker: the requests waiting (at most SLOTS, ziya_jax's batch) become one generate call;
    answers go back to the event loop."""
    while True:
        batch = [waiting.get()]
        while not waiting.empty() and len(batch) < SLOTS:
            batch.append(waiting.get_nowait())
        try:
            answers = _generate(model, tok, batch)
        except Exception as e:  # noqa: BLE001 (each request's caller gets the error)
            for *_, loop, done in batch:
                loop.call_soon_threadsafe(done.set_exception, e)
            continue
        for (*_, loop, done), answer in zip(batch, answers):
            loop.call_soon_threadsafe(done.set_result, answer)


def _generate(model, tok, batch) -> list[tuple[str, int, str]]:
    import torch

    width = max(len(ids) for ids, *_ in batch)
    ids = np.full((len(batch), width), tok.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for row, (prompt, *_) in enumerate(batch):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    pixels = np.stack([p.transpose(2, 0, 1) for _, p, *_ in batch])
    with torch.inference_mode():
        out = model.generate(
            pixel_values=torch.from_numpy(pixels),
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=max(n for _, _, n, *_ in batch),
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    answers = []
    for row, (_, _, n, *_) in enumerate(batch):
        new = out[row, width : width + n].tolist()
        finish = "length"
        if tok.eos_id in new:
            new, finish = new[: new.index(tok.eos_id)], "stop"
        answers.append((tok.decode(new), len(new), finish))
    return answers


def prompts(image_size: int = 64) -> list[tuple[str, str]]:
    """(question, PNG data URI) pairs: synthetic test scenes, each with one of QUESTIONS."""
    from PIL import Image

    from ziya_jax.data import synthetic

    out = []
    for k in range(8):
        buffer = io.BytesIO()
        Image.fromarray(synthetic.generate("test", k, image_size)[0]).save(buffer, "PNG")
        out.append(
            (QUESTIONS[k % len(QUESTIONS)], "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        )
    return out


def _ask(client, question: str, uri: str, new_tokens: int, stream: bool) -> dict:
    """One request -> its time to first token, gaps between content chunks, completion tokens and text."""
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": content}], temperature=0)
    start = time.perf_counter()
    if not stream:
        reply = client.chat.completions.create(**kwargs, max_tokens=new_tokens)
        total = time.perf_counter() - start
        text = reply.choices[0].message.content
        return dict(ttft=total, gaps=[], tokens=reply.usage.completion_tokens, text=text, chunks=1)
    times, text, tokens = [], [], None
    chunks = client.chat.completions.create(
        **kwargs, max_tokens=new_tokens, stream=True, stream_options={"include_usage": True}
    )
    for chunk in chunks:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    return dict(
        ttft=times[0] - start, gaps=np.diff(times).tolist(), tokens=tokens, text="".join(text), chunks=len(times)
    )


def load(url: str, clients: int, requests: int, new_tokens: int, stream: bool, asks: list) -> dict:
    """`clients` threads, each sending `requests` requests one after another; -> the round's numbers."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT_S)

    failed = threading.Event()  # one failure (or an interrupt) ends every client's loop

    def one_client(c: int) -> list[dict]:
        out = []
        for r in range(requests):
            if failed.is_set():
                break
            k = (c * requests + r) % len(asks)
            try:
                out.append({**_ask(client, *asks[k], new_tokens, stream), "prompt": k})
            except BaseException:
                failed.set()
                raise
        return out

    start = time.perf_counter()
    pool = ThreadPoolExecutor(clients)
    try:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    finally:  # on an error, return at once (the caller stops the server, which ends the requests in flight)
        failed.set()
        pool.shutdown(wait=False, cancel_futures=True)
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = [r["tokens"] for r in results]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return dict(
        clients=clients,
        requests=len(results),
        tokens=int(sum(tokens)),
        wall_s=wall,
        tok_s=sum(tokens) / wall,
        ttft_p50_s=pct(ttft, 50),
        ttft_p99_s=pct(ttft, 99),
        per_token_p50_s=pct(gaps, 50),
        per_token_p99_s=pct(gaps, 99),
        completion_tokens=sorted(set(tokens)),
        content_chunks=sorted({r["chunks"] for r in results}),
        answers={r["prompt"]: r["text"] for r in results},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 30) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _start(cmd: list[str], port: int, log_path: str) -> subprocess.Popen:
    """Start a server and wait (bounded) until /health answers; a server that dies or never answers is stopped
    and reported with the end of its log."""
    import httpx

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[2]} not healthy after {STARTUP_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(1)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen):
    """SIGTERM (both servers then finish what is in flight and exit), SIGKILL if that takes over 60 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_seconds(server_pid: int) -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and the server): what others
    ran during a round is the difference, and skews it on a shared machine."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        times = [int(v) for v in f.readline().split()[1:8]]
    busy = sum(times) - times[3] - times[4]  # all but idle and iowait
    ours = 0
    for pid in (os.getpid(), server_pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ours += int(fields[11]) + int(fields[12])  # utime, stime
    return busy / tick, ours / tick


def measure(name: str, cmd: list[str], port: int, log_path: str, stream: bool, args, asks) -> dict:
    """Start one server, warm it up, run the client rounds, stop it (whatever happens)."""
    started = time.perf_counter()
    proc = _start(cmd, port, log_path)
    print(f"{name}: up after {time.perf_counter() - started:.0f} s", flush=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.perf_counter()
        load(url, 4, 1, args.new_tokens, stream, asks)  # compilation and first-call costs, not counted
        print(f"{name}: warm-up {time.perf_counter() - started:.0f} s", flush=True)
        rows = {}
        for clients in CLIENTS:
            before = _cpu_seconds(proc.pid)
            rows[clients] = row = load(url, clients, args.requests, args.new_tokens, stream, asks)
            busy, ours = np.subtract(_cpu_seconds(proc.pid), before)
            row["others_cpu_share"] = max(0.0, busy - ours) / (row["wall_s"] * os.cpu_count())  # of the machine
            print(f"{name}: {clients} clients {row['tok_s']:.1f} tok/s", flush=True)
        return rows
    finally:
        _stop(proc)


def floor_costs(ckpt: str) -> dict:
    """What every round costs ziya_jax's server at least, measured in this process before any server starts: the
    image encoder's (ViT, Q-Former, projection) seconds per image at its best batch of 4, 8 or SLOTS (best of 3
    each; every request carries one image), and a decoding step's seconds at the memory-bandwidth bound (each step
    reads the LLM's weights once, whatever rows it advances)."""
    import jax
    import jax.numpy as jnp

    from ziya_jax.bench.decode import best_of, measure_bandwidth, step_bytes
    from ziya_jax.checkpoint import load_model
    from ziya_jax.decode import decode_params
    from ziya_jax.serve.engine import _encode_image

    params, cfg = load_model(ckpt)
    params = decode_params(params)  # as the server holds them
    size, per_image = cfg.vision.image_size, []
    for batch in (4, 8, SLOTS):
        pixels = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 1, size, size, 3)).astype(np.float32))
        encode = functools.partial(_encode_image, params, pixels, None, None, cfg=cfg, unrolled=True)
        per_image.append(best_of(lambda: jax.block_until_ready(encode()), 3) / batch)
    return dict(image_s=min(per_image), step_s=step_bytes(cfg) / measure_bandwidth())


def run(args) -> dict:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM unwinds too, so the servers get stopped
    started = time.perf_counter()
    asks = prompts()
    with tempfile.TemporaryDirectory(prefix="ziya_bench_serve_") as tmp:
        hf_dir, ckpt = build(args.small, tmp)
        floor = floor_costs(ckpt)
        print(
            f"ziya_jax image encoder: {floor['image_s'] * 1e3:.0f} ms per image; a decoding step at the bandwidth "
            f"bound: {floor['step_s'] * 1e3:.1f} ms",
            flush=True,
        )
        port = _free_port()
        ziya_cmd = [sys.executable, "-m", "ziya_jax.serve", "--checkpoint", ckpt, "--port", str(port)]
        ziya_cmd += ["--no-page", "--slots", str(SLOTS), "--served-model-name", MODEL_NAME]
        ziya_cmd += ["--max-tokens", str(max(args.new_tokens, 512))]
        ziya = measure("ziya_jax", ziya_cmd, port, os.path.join(tmp, "ziya.log"), True, args, asks)
        port = _free_port()
        base_cmd = [sys.executable, "-m", "ziya_jax.bench.serve", "--baseline-server", "--hf", hf_dir]
        base_cmd += ["--checkpoint", ckpt, "--port", str(port)]
        base = measure("transformers", base_cmd, port, os.path.join(tmp, "baseline.log"), False, args, asks)
    return report(ziya, base, args, time.perf_counter() - started, floor)


def report(ziya: dict, base: dict, args, runtime: float, floor: dict) -> dict:
    fmt = lambda x, scale=1e3: "n/a" if x is None else f"{x * scale:.0f}"  # noqa: E731
    print(
        f"{'server':<14}{'clients':>8}{'requests':>9}{'tok/s':>9}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
        f"{'tok p50 ms':>12}{'tok p99 ms':>12}{'completion_tokens':>19}{'others CPU':>12}"
    )
    for name, rows in (("ziya_jax", ziya), ("transformers", base)):
        for r in rows.values():
            print(
                f"{name:<14}{r['clients']:>8}{r['requests']:>9}{r['tok_s']:>9.1f}{fmt(r['ttft_p50_s']):>13}"
                f"{fmt(r['ttft_p99_s']):>13}{fmt(r['per_token_p50_s']):>12}{fmt(r['per_token_p99_s']):>12}"
                f"{str(r['completion_tokens']):>19}{r['others_cpu_share']:>12.0%}"
            )
    top, one = CLIENTS[-1], CLIENTS[0]
    vs_baseline = ziya[top]["tok_s"] / base[top]["tok_s"]
    scaling = ziya[top]["tok_s"] / ziya[one]["tok_s"]
    requests = top * args.requests  # the ceiling: the baseline's round over ziya_jax's least possible one
    steps = math.ceil(requests * args.new_tokens / SLOTS)
    ceiling = base[top]["wall_s"] / (requests * floor["image_s"] + steps * floor["step_s"])
    full = all(r["completion_tokens"] == [args.new_tokens] for rows in (ziya, base) for r in rows.values())
    same = {  # per client count: prompts whose greedy answers are equal on both servers / prompts compared
        c: (sum(text == base[c]["answers"].get(k) for k, text in ziya[c]["answers"].items()), len(ziya[c]["answers"]))
        for c in CLIENTS
    }
    print(
        f"ziya_jax {top} clients / transformers {top} clients: {vs_baseline:.2f}x throughput (target >= 3); "
        f"ziya_jax {top} clients / {one} client: {scaling:.2f}x (target >= 2.5); ceiling {ceiling:.2f}x: the "
        f"baseline's {top}-client round over {requests} image encodings and {requests * args.new_tokens} tokens "
        f"in steps of {SLOTS} rows at the bandwidth bound"
    )
    print(
        f"every answer {args.new_tokens} tokens: {full}; prompts answered the same by both servers (by clients): "
        + ", ".join(f"{c}: {e}/{n}" for c, (e, n) in same.items())
        + "; the baseline's TTFT is its whole response time (not streamed), its per-token latency n/a"
    )
    others = max(r["others_cpu_share"] for rows in (ziya, base) for r in rows.values())
    if others > 0.1:
        print(f"warning: other processes took up to {others:.0%} of the machine's CPU time during a round")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "answers"} for r in rows.values()]  # noqa: E731
    result = dict(
        model="small" if args.small else "decode-bench",
        context=CONTEXT,
        slots=SLOTS,
        new_tokens=args.new_tokens,
        requests_per_client=args.requests,
        ziya_jax=strip(ziya),
        transformers=strip(base),
        ratio_vs_baseline=vs_baseline,
        ratio_scaling=scaling,
        ceiling_ratio=ceiling,
        image_encoder_s_per_image=floor["image_s"],
        bound_step_s=floor["step_s"],
        all_answers_full_length=full,
        answers_equal={c: e for c, (e, _) in same.items()},
        answers_compared={c: n for c, (_, n) in same.items()},
        runtime_s=runtime,
        cpus=len(os.sched_getaffinity(0)),
    )
    print(json.dumps(result))
    return result


def main(argv=None) -> int:
    """The baseline server's entry point (run() starts it as a subprocess)."""
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.bench.serve", description=baseline_server.__doc__)
    parser.add_argument("--baseline-server", action="store_true", required=True)
    parser.add_argument("--hf", required=True, help="the Hugging Face model folder")
    parser.add_argument("--checkpoint", required=True, help="the same model as ziya_jax (its config and tokenizer)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    baseline_server(args.hf, args.checkpoint, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
