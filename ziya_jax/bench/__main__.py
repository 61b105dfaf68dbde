"""python -m ziya_jax.bench {decode} [options]"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    decode = sub.add_parser("decode", help="ziya_jax decoding vs transformers generate, same weights")
    decode.add_argument("--new-tokens", type=int, default=64)
    decode.add_argument("--repeats", type=int, default=2, help="timed runs per row (best is reported)")
    decode.add_argument("--small", action="store_true", help="a tiny model, to check the benchmark itself quickly")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("error: the benchmarks compare against transformers; pip install -e '.[dev]'", file=sys.stderr)
        return 2
    from ziya_jax.bench import decode as bench_decode

    bench_decode.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
