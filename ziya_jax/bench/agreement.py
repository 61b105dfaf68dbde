"""python -m ziya_jax.bench agreement --checkpoint CKPT: do `generate` and `chat`, run as a user runs them,
answer the synthetic test questions as `evaluate --task synthetic` does?

All three are run as subprocesses on the same model: evaluate answers every VQA question in batches (its
predictions file names each question's test image); the images are written as PNG files; chat answers every
question in one session (`/reset`, `/image`, the question), generate the first --generate-n of each language,
one process each. Decoding is greedy with the same token budget everywhere. The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from PIL import Image

from ziya_jax.checkpoint import load_model_config
from ziya_jax.data import synthetic
from ziya_jax.data.tokenizers import load_tokenizers
from ziya_jax.evaluate.synthetic import max_new_tokens_for


def _run(module: str, args: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", f"ziya_jax.{module}", *args], input=stdin, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"error: {module} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def chat_answers(out: str, questions: int) -> list[str]:
    """Chat's answer lines: after each question, the first line that is not a note in brackets."""
    lines = [line for line in out.splitlines()[1:] if not (line.startswith("(") and line.endswith(")"))]
    if len(lines) != questions:
        raise SystemExit(f"error: chat printed {len(lines)} answers for {questions} questions")
    return lines


def run(args) -> dict:
    model = ["--checkpoint", args.checkpoint] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    model += ["--quantize", args.quantize] if args.quantize else []
    size = load_model_config(args.checkpoint).vision.image_size
    tok, _ = load_tokenizers(args.tokenizer or os.path.join(args.checkpoint, "tokenizer"))
    with tempfile.TemporaryDirectory() as tmp:
        _run("evaluate", [*model, "--task", "synthetic", "--limit", str(args.n), "--show", "0", "--out", tmp])
        with open(os.path.join(tmp, "synthetic.predictions.jsonl"), encoding="utf-8") as f:
            rows = [r for r in map(json.loads, f) if r["task"] == "vqa"]
        for i in sorted({r["image"] for r in rows}):
            Image.fromarray(synthetic.generate("test", i, size)[0]).save(os.path.join(tmp, f"{i}.png"))
        budget = str(max_new_tokens_for(tok, [r["reference"] for r in rows]))
        greedy = ["--greedy", "--repetition-penalty", "1", "--max-new-tokens", budget]
        script = "".join(f"/reset\n/image {os.path.join(tmp, str(r['image']))}.png\n{r['question']}\n" for r in rows)
        chat = chat_answers(_run("chat", [*model, *greedy], stdin=script), len(rows))
        picked = [r for lang in ("en", "zh") for r in [r for r in rows if r["lang"] == lang][: args.generate_n]]
        generate = [
            _run(
                "generate",
                [*model, *greedy, "--image", os.path.join(tmp, f"{r['image']}.png"), "--prompt", r["question"]],
            ).strip()
            for r in picked
        ]
    result = {"questions": len(rows), "checkpoint": args.checkpoint, "quantize": args.quantize or "none"}
    for lang in ("en", "zh"):
        mine = [(r, c) for r, c in zip(rows, chat) if r["lang"] == lang]
        result[f"chat_agrees_{lang}"] = f"{sum(r['prediction'] == c.strip() for r, c in mine)}/{len(mine)}"
        picks = [(r, g) for r, g in zip(picked, generate) if r["lang"] == lang]
        result[f"generate_agrees_{lang}"] = f"{sum(r['prediction'] == g for r, g in picks)}/{len(picks)}"
    for r, c in zip(rows, chat):
        if r["prediction"] != c.strip():
            print(f"chat differs [{r['lang']}] {r['question']!r}: evaluate {r['prediction']!r}, chat {c.strip()!r}")
    print(json.dumps(result, ensure_ascii=False))
    return result
