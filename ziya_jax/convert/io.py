"""Reading and writing Hugging Face weight directories (safetensors, optionally sharded with an index)."""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Mapping

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from ziya_jax.convert.hf import ConversionError
from ziya_jax.paths import inside

INDEX = "model.safetensors.index.json"


def read_config(directory: str) -> dict:
    path = _file_in(directory, "config.json", os.path.join(directory, "config.json"))
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {directory}")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, got a {type(config).__name__}")
    return config


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def _file_in(directory: str, name, what: str) -> str:
    """directory/name, refused unless it stays inside `directory` (see ziya_jax.paths.inside); `what` names
    where the name came from."""
    if not isinstance(name, str) or not name:
        raise ConversionError(f"{what} is not a file name")
    if not inside(directory, name):
        raise ConversionError(f"{what} leads outside {directory}; refusing to read it")
    return os.path.join(directory, name)


def read_tensors(directory: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a HF directory. Safetensors only, unless allow_pickle: then `.bin` files are read with
    torch.load(weights_only=True), which refuses arbitrary pickled objects."""
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory} is not a directory")
    index = _file_in(directory, INDEX, os.path.join(directory, INDEX))
    if os.path.isfile(index):
        files = _shards(index, directory)
    else:
        files = _listed(directory, "*.safetensors")
    if files:
        tensors = {}
        for path in files:
            if not os.path.isfile(path):
                raise ConversionError(f"{path} is missing or not a regular file")
            try:
                with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
                    for key in f.keys():
                        tensors[key] = np.asarray(f.get_tensor(key))
            except SafetensorError as e:
                raise ConversionError(f"{path} is not a readable safetensors file: {e}") from None
        return _without_buffers(tensors)
    pickles = _listed(directory, "*.bin")
    if not pickles:
        raise ConversionError(f"no *.safetensors (or *.bin) weights in {directory}")
    if not allow_pickle:
        raise ConversionError(
            f"{directory} holds only pickle weights ({', '.join(map(os.path.basename, pickles))}); "
            "pickles can run code when loaded. Convert them to safetensors, or pass "
            "--allow-pickle to read them with torch.load(weights_only=True)."
        )
    import torch  # only for this explicitly requested path

    tensors = {}
    for path in pickles:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds (UnpicklingError, RuntimeError, EOFError)
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ConversionError(
                f"{path}: torch.load(weights_only=True) cannot read it: {type(e).__name__}: {first_line}"
            ) from None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{path} does not hold a state dict (names -> tensors)")
        tensors.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()})
    return _without_buffers(tensors)


def _shards(index: str, directory: str) -> list[str]:
    """The files a sharded index's weight_map names, every one checked to stay inside `directory` before any
    is opened."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: no weight_map object")
    return sorted(
        {_file_in(directory, name, f"{index}: weight_map[{key!r}] = {name!r}") for key, name in weight_map.items()}
    )


def _listed(directory: str, pattern: str) -> list[str]:
    """The directory's files matching `pattern`, each checked to stay inside it (a symlink may point out)."""
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
    return [_file_in(directory, os.path.basename(p), p) for p in paths]


def _without_buffers(tensors: dict) -> dict:
    """Drops rotary `inv_freq` buffers, which some older LLaMA checkpoints saved beside the weights."""
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def apply_llama_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ziya-LLaMA's published delta: target = base + delta for every tensor, except the (vocab-extended)
    embed_tokens and lm_head, which are taken from the delta alone. Both as read by read_tensors."""
    out, problems = {}, []
    for key, d in delta.items():
        if "embed_tokens" in key or "lm_head" in key:
            out[key] = d
        elif key not in base:
            problems.append(f"{key}: in the delta, not in the base")
        elif base[key].shape != d.shape:
            problems.append(f"{key}: base {base[key].shape} vs delta {d.shape}")
        else:
            out[key] = (base[key].astype(np.float32) + d.astype(np.float32)).astype(d.dtype)
    problems += [f"{k}: in the base, not in the delta" for k in base if k not in delta]
    if problems:
        raise ConversionError("base and delta LLaMA do not match:\n  " + "\n  ".join(sorted(problems)))
    return out


def write_hf_dir(
    directory: str, tensors: Mapping[str, np.ndarray], config: dict, max_shard_bytes: int = 5 * 2**30
) -> None:
    """config.json + safetensors (sharded with an index beyond max_shard_bytes), written to the hidden
    `.tmp-NAME` beside the directory first and moved into place, so a failure leaves nothing half-written; one
    that a killed run left behind is removed first."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise ConversionError(f"{directory} exists; choose a new output directory")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(directory)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        shards, current, size = [], {}, 0
        for key in sorted(tensors):
            nbytes = tensors[key].nbytes
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = tensors[key]
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(dict(shards[0]), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(dict(shard), os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.nbytes for t in tensors.values())
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_hf_tokenizers(out: str, llm_dirs: list[str], hf_dir: str, qformer_vocab: str | None) -> list[str]:
    """The tokenizers of a converted model into `out/tokenizer`, where training, generate, chat, evaluate and serve
    read them: the LLM's `tokenizer.model` (+ `added_tokens.json`) from the first of `llm_dirs` that has one, and
    the Q-Former's BERT `vocab.txt` from `qformer_vocab` or InstructBLIP's `hf_dir/qformer_tokenizer/`.
    -> what was copied, as "name (from path)"."""
    dst = os.path.join(out, "tokenizer")
    copied = []
    llm_dir = next((d for d in llm_dirs if d and os.path.isfile(os.path.join(d, "tokenizer.model"))), None)
    picks = []
    if llm_dir:
        picks += [(llm_dir, name, name) for name in ("tokenizer.model", "added_tokens.json")]
    if qformer_vocab:
        picks.append((os.path.dirname(os.path.abspath(qformer_vocab)), os.path.basename(qformer_vocab), "vocab.txt"))
    else:
        picks.append((os.path.join(hf_dir, "qformer_tokenizer"), "vocab.txt", "vocab.txt"))
    for directory, name, target in picks:
        if not os.path.isfile(os.path.join(directory, name)):
            continue
        src = _file_in(directory, name, os.path.join(directory, name))
        os.makedirs(dst, exist_ok=True)
        shutil.copyfile(src, os.path.join(dst, target))
        copied.append(f"{target} (from {src})")
    return copied
