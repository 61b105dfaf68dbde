"""HF <-> ziya_jax round trips, the CLI, and the converter's handling of bad input."""

import json
import os

import numpy as np
import pytest
import torch
from hf_models import make_hf_model, make_inputs
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, LlamaForCausalLM

from ziya_jax.convert import ConversionError, load_hf, read_tensors
from ziya_jax.convert.__main__ import main as convert_cli


def state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_cli_round_trip_is_bit_exact_and_loads_in_transformers(kind, tmp_path):
    model = make_hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    original = read_tensors(str(tmp_path / "hf"))
    assert convert_cli(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert (
        convert_cli(
            [
                "to-hf",
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--out",
                str(tmp_path / "back"),
                "--max-shard-size",
                "40KB",
            ]
        )
        == 0
    )
    assert os.path.isfile(tmp_path / "back" / "model.safetensors.index.json")  # sharded at this size
    back = read_tensors(str(tmp_path / "back"))
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded) is type(model)
    ids, mask, pixels, qids, qmask = make_inputs()
    kwargs = dict(qformer_input_ids=qids, qformer_attention_mask=qmask) if kind == "instructblip" else {}
    with torch.no_grad():
        a = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits
        b = reloaded(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits
    assert torch.equal(a, b)


def test_llm_only_export_and_separate_llm_dir(tmp_path):
    """The Ziya layout: vision side and LLaMA in separate directories; and export of the bare LLaMA."""
    model = make_hf_model("blip2")
    full = state(model)
    vision_side = {k: torch.from_numpy(v) for k, v in full.items() if not k.startswith("language_model.")}
    os.makedirs(tmp_path / "vision")
    save_file(vision_side, str(tmp_path / "vision" / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("text_config")
    (tmp_path / "vision" / "config.json").write_text(json.dumps(config))
    model.language_model.save_pretrained(tmp_path / "llama")

    params, cfg = load_hf(str(tmp_path / "vision"), llm_dir=str(tmp_path / "llama"))
    assert (
        convert_cli(
            [
                "from-hf",
                "--hf-dir",
                str(tmp_path / "vision"),
                "--llm-dir",
                str(tmp_path / "llama"),
                "--out",
                str(tmp_path / "ckpt"),
            ]
        )
        == 0
    )
    assert (
        convert_cli(["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "llm"), "--llm-only"])
        == 0
    )
    llm = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    for name, tensor in state(model.language_model).items():
        assert np.array_equal(state(llm)[name], tensor), name


def test_llama_delta_is_merged(tmp_path):
    model = make_hf_model("blip2")
    base = LlamaForCausalLM(model.config.text_config)
    delta = model.language_model  # published delta: target = base + delta, embeddings/lm_head from delta
    base.save_pretrained(tmp_path / "base")
    delta.save_pretrained(tmp_path / "delta")
    vision = {k: torch.from_numpy(v) for k, v in state(model).items() if not k.startswith("language_model.")}
    os.makedirs(tmp_path / "vision")
    save_file(vision, str(tmp_path / "vision" / "model.safetensors"))
    (tmp_path / "vision" / "config.json").write_text(json.dumps(model.config.to_dict()))

    params, cfg = load_hf(
        str(tmp_path / "vision"), llm_dir=str(tmp_path / "base"), llm_delta_dir=str(tmp_path / "delta")
    )
    lm = params["language_model"]
    b, d = state(base), state(delta)
    np.testing.assert_array_equal(lm["embed_tokens"]["embedding"], d["model.embed_tokens.weight"])
    np.testing.assert_array_equal(lm["lm_head"]["kernel"], d["lm_head.weight"].T)
    q0 = b["model.layers.0.self_attn.q_proj.weight"] + d["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(lm["layers"]["self_attn"]["q_proj"]["kernel"][0], q0.T, rtol=0, atol=0)


def test_mismatched_tensors_are_all_listed(tmp_path):
    model = make_hf_model("blip2")
    model.save_pretrained(tmp_path / "hf")
    tensors = {k: torch.from_numpy(v.copy()) for k, v in read_tensors(str(tmp_path / "hf")).items()}
    del tensors["language_projection.bias"]
    tensors["surplus.weight"] = torch.zeros(3)
    tensors["query_tokens"] = torch.zeros(1, 5, 32)
    os.remove(tmp_path / "hf" / "model.safetensors")
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        load_hf(str(tmp_path / "hf"))
    text = str(err.value)
    assert "missing: language_projection.bias" in text
    assert "unexpected: surplus.weight" in text
    assert "query_tokens: got (1, 5, 32), config wants (1, 4, 32)" in text
    assert convert_cli(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert not os.path.exists(tmp_path / "ckpt")  # nothing half-written


def test_pickle_refused_unless_allowed(tmp_path):
    model = make_hf_model("blip2")
    model.save_pretrained(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="--allow-pickle"):
        load_hf(str(tmp_path / "hf"))
    params, _ = load_hf(str(tmp_path / "hf"), allow_pickle=True)
    np.testing.assert_array_equal(params["query_tokens"], state(model)["query_tokens"])


def test_cli_reports_bad_paths_without_traceback(tmp_path, capsys):
    assert convert_cli(["from-hf", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
