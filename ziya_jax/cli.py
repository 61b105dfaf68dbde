"""What the inference commands (generate, chat, evaluate) share: loading a model as the user asks for it
(--dtype, --mesh, --quantize), its tokenizers, and the decoding flags."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ziya_jax.config import ModelConfig
from ziya_jax.decode import DecodeConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    params: dict
    cfg: ModelConfig
    tok: object  # SentencePieceTokenizer, or None where no tokenizer is needed
    qtok: object  # QFormerTokenizer, or None (Base models)


def add_model_flags(parser: argparse.ArgumentParser, tokenizer: bool = True, checkpoint_required: bool = True):
    parser.add_argument(
        "--checkpoint", required=checkpoint_required, help="a model folder (train's stageN/model, convert's output)"
    )
    if tokenizer:
        parser.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="store and compute the weights in this dtype, cast as each tensor is read (default: as saved)",
    )
    parser.add_argument(
        "--mesh",
        help="DATA,FSDP,TENSOR: restore the weights sharded over the local devices, e.g. "
        "1,-1,1 (fsdp over all) or 1,2,4; default: one device",
    )
    parser.add_argument(
        "--quantize", choices=("int8",), help="int8 weight-only quantisation of the LLM's and the ViT's linear layers"
    )


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"--mesh wants three integers DATA,FSDP,TENSOR (one may be -1), got {text!r}")
    return shape


def load(args, decode: bool = True, need_tokenizer: bool = True) -> LoadedModel:
    """The model and tokenizers named by add_model_flags' flags. decode=True gives the per-layer form that
    decoding runs fastest on (ziya_jax.decode.decode_params); the stacked copy is dropped."""
    from ziya_jax.checkpoint import load_model
    from ziya_jax.data.tokenizers import check_vocabularies, load_tokenizers
    from ziya_jax.decode import decode_params

    mesh = None
    if args.mesh:
        from ziya_jax.sharding import make_mesh

        mesh = make_mesh(parse_mesh(args.mesh))
    params, cfg = load_model(args.checkpoint, dtype=args.dtype, mesh=mesh)
    if args.quantize:
        from ziya_jax.quantize import quantize

        params, cfg = quantize(params, cfg, args.quantize)
    if decode:
        params = decode_params(params)
    tok = qtok = None
    if need_tokenizer:
        tok, qtok = load_tokenizers(args.tokenizer or os.path.join(args.checkpoint, "tokenizer"))
        if cfg.variant == "chat" and qtok is None:
            raise ValueError("a Chat model needs the Q-Former tokenizer (qformer.model or vocab.txt)")
        check_vocabularies(tok, qtok, cfg)
    return LoadedModel(params, cfg, tok, qtok)


def add_decode_flags(parser: argparse.ArgumentParser, default: DecodeConfig):
    parser.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens)
    parser.add_argument("--min-new-tokens", type=int, default=default.min_new_tokens)
    parser.add_argument("--num-beams", type=int, default=default.num_beams)
    parser.add_argument("--length-penalty", type=float, default=default.length_penalty)
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="no sampling (the default unless a sampling flag is given, or the demo settings are)",
    )
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, default=0)


def decode_config(args, default: DecodeConfig) -> DecodeConfig:
    sampling = {
        k: v
        for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
        if v is not None
    }
    do_sample = bool(sampling) or (default.do_sample and not args.greedy and args.num_beams == 1)
    return DecodeConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        do_sample=do_sample,
        temperature=sampling.get("temperature", default.temperature if do_sample else 1.0),
        top_p=sampling.get("top_p", default.top_p if do_sample else 1.0),
        top_k=sampling.get("top_k", default.top_k if do_sample else 0),
        repetition_penalty=(
            args.repetition_penalty if args.repetition_penalty is not None else default.repetition_penalty
        ),
    )
