"""python -m ziya_jax.bench {decode,train,data,agreement,serve} [options]"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    decode = sub.add_parser("decode", help="ziya_jax decoding vs transformers generate, same weights")
    decode.add_argument("--new-tokens", type=int, default=64)
    decode.add_argument(
        "--repeats", type=int, default=3, help="timed runs per row, interleaved with transformers' (median reported)"
    )
    decode.add_argument("--small", action="store_true", help="a tiny model, to check the benchmark itself quickly")
    decode.add_argument(
        "--profile",
        metavar="DIR",
        help="trace ziya_jax's greedy decoding (batch 1 and 8) on float32 "
        "and on int8 weights into DIR (jax.profiler, Perfetto JSON) and print where a token's time goes",
    )
    train = sub.add_parser("train", help="stage-3 LoRA train step vs a PyTorch reference, and MFU")
    train.add_argument("--batch", type=int, default=8)
    train.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps per side, run back to back as a training loop runs them (their mean is reported)",
    )
    train.add_argument("--small", action="store_true", help="a tiny model, to check the benchmark itself quickly")
    train.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of both sides (weights and optimizer stay float32)",
    )
    train.add_argument(
        "--frozen-dtype",
        choices=("", "bfloat16"),
        default="",
        help="store what does not train in bfloat16 on both sides (ziya_jax: train.frozen_dtype)",
    )
    train.add_argument(
        "--scan-unroll",
        type=int,
        default=1,
        help="ziya_jax's model.scan_unroll (layers per loop iteration of each layer stack; 12 or more: no loops)",
    )
    train.add_argument(
        "--profile",
        metavar="DIR",
        help="trace --steps more ziya_jax steps into DIR "
        "(jax.profiler, Perfetto JSON) and print each device timeline's busy time and top ops",
    )
    data = sub.add_parser("data", help="input pipeline examples/s vs the demo train step's consumption")
    data.add_argument("--config", default="configs/demo.py:stage=2")
    data.add_argument("--workers", type=int, default=2)
    data.add_argument("--batches", type=int, default=20)
    data.add_argument("--steps", type=int, default=5)
    agree = sub.add_parser(
        "agreement",
        help="generate and chat (subprocesses) against evaluate's answers to the "
        "synthetic test questions, on a trained model",
    )
    agree.add_argument("--checkpoint", required=True)
    agree.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    agree.add_argument("--n", type=int, default=200, help="test images per language")
    agree.add_argument("--generate-n", type=int, default=20, help="questions per language asked through generate")
    agree.add_argument("--quantize", choices=("int8",))
    serve = sub.add_parser(
        "serve",
        help="the ziya_jax server (python -m ziya_jax.serve) vs transformers generate behind a batching "
        "server, same weights and OpenAI requests over loopback, 1/4/16 clients",
    )
    serve.add_argument("--requests", type=int, default=4, help="requests per client at each client count")
    serve.add_argument("--new-tokens", type=int, default=64, help="max_tokens of every request (all run to it)")
    serve.add_argument("--small", action="store_true", help="a tiny model, to check the benchmark itself quickly")
    args = parser.parse_args(argv)
    if args.name == "train" and args.frozen_dtype and args.dtype != "bfloat16":
        parser.error(
            "--frozen-dtype bfloat16 needs --dtype bfloat16 (without autocast PyTorch's layers would mix "
            "float32 inputs with bfloat16 weights)"
        )
    # The train and decode benchmarks put ziya_jax and PyTorch on one accelerator: JAX must not take 75% of its
    # memory up front (set before jax is imported, which the benchmark modules do).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.name == "data":
        from ziya_jax.bench import data as bench_data

        bench_data.run(args)
        return 0
    if args.name == "agreement":
        from ziya_jax.bench import agreement

        agreement.run(args)
        return 0
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("error: the benchmarks compare against transformers; pip install -e '.[dev]'", file=sys.stderr)
        return 2
    if args.name == "train":
        from ziya_jax.bench import train as bench_train

        bench_train.run(args)
        return 0
    if args.name == "serve":
        from ziya_jax.bench import serve as bench_serve

        bench_serve.run(args)
        return 0
    from ziya_jax.bench import decode as bench_decode

    bench_decode.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
