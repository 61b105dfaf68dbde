"""python -m ziya_jax.serve --checkpoint CKPT [--tokenizer DIR] [--host 127.0.0.1] [--port 8000] [--slots 16]
                           [--dtype bfloat16] [--quantize int8] [--mesh D,F,T] [--api-key-file F] [--image-root DIR]

Serves the model: OpenAI's chat-completions API under /v1 (images as data: URIs), /health, /metrics, and a
chat page at /. It binds the loopback address unless --host says otherwise. With --api-key-file every API
call needs `Authorization: Bearer <key>` and the page asks for the key (any user name, the key as password).
SIGTERM (or Ctrl-C) stops taking requests, finishes those in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ziya_jax import cli


def main(argv=None) -> int:
    try:
        import uvicorn

        from ziya_jax.serve.api import create_app
        from ziya_jax.serve.engine import Engine
        from ziya_jax.serve.service import Limits, Service
    except ImportError as e:
        print(f"error: {e}; the server needs pip install 'ziya_jax[serve]'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m ziya_jax.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=16, help="requests decoded together (rows of the KV cache)")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: the checkpoint's folder)")
    parser.add_argument("--api-key-file", help="a file holding the API key (keys never go on the command line)")
    parser.add_argument("--image-root", help="file:// image URLs are read from under this folder only")
    parser.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="the largest max_tokens allowed")
    parser.add_argument("--max-images", type=int, default=4, help="images per request")
    parser.add_argument("--no-page", action="store_true", help="serve the API alone, without the chat page")
    args = parser.parse_args(argv)
    try:
        api_key = None
        if args.api_key_file:
            with open(args.api_key_file, encoding="utf-8") as f:
                api_key = f.read().strip()
            if not api_key:
                raise ValueError(f"{args.api_key_file} is empty")
        model = cli.load(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limits = Limits(max_tokens=args.max_tokens)
    engine = Engine(
        model.params,
        model.cfg,
        eos_token_id=model.tok.eos_id,
        pad_token_id=model.tok.pad_id,
        decodable=model.tok.vocab_size,
        slots=args.slots,
        max_images=args.max_images,
        max_queue=args.queue,
    )
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    service = Service(engine, model.tok, model.qtok, name, limits, args.image_root)
    app = create_app(service, api_key)
    if not args.no_page:
        from ziya_jax.serve.page import mount_page

        app = mount_page(app, service, api_key)
    # uvicorn drains on SIGTERM, then raises it again under the handler found at start: make that one a no-op, so
    # that a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
