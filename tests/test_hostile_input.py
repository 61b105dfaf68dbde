"""Hostile and careless input to the CLIs, each run as a subprocess on crafted files: a refusal exits 2 with one
`error:` line naming the file and the problem and no traceback, reads nothing outside the folders it was given
(a named pipe there would block any open: the run finishing shows it was never opened), and leaves nothing
half-written; where a rerun should succeed, it does."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from test_train_loop import TEST_CONFIG, environment, train_command

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "eval")


def cli(module, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", f"ziya_jax.{module}", *map(str, args)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def refused(result, *words):
    """The run exited 2 with one `error:` line holding every one of `words`, and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert str(word) in lines[0], (word, lines[0])


def tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, dirs, files in os.walk(path) for n in dirs + files)


def png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- convert

# A Blip2 config.json of the size tests/hf_models.py makes.
HF_CONFIG = {
    "model_type": "blip-2",
    "num_query_tokens": 4,
    "image_token_index": 127,
    "vision_config": {
        "image_size": 28,
        "patch_size": 14,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    },
    "qformer_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "encoder_hidden_size": 32,
        "vocab_size": 100,
        "max_position_embeddings": 64,
    },
    "text_config": {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    },
}
INDEX = "model.safetensors.index.json"


def hf_dir(path, config=HF_CONFIG) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink", "etc_passwd"])
def test_sharded_index_pointing_outside_is_refused_before_any_file_is_opened(tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "x.safetensors")  # opening it would block: no writer ever comes
    hf = hf_dir(tmp_path / "hf")
    save_file({"query_tokens": np.zeros((1, 4, 32), np.float32)}, os.path.join(hf, "model-1.safetensors"))
    name = {
        "relative": "../outside/x.safetensors",
        "absolute": str(outside / "x.safetensors"),
        "symlink": "link/x.safetensors",
        "etc_passwd": "../" * 40 + "etc/passwd",
    }[how]
    if how == "symlink":
        os.symlink(outside, os.path.join(hf, "link"))
    weight_map = {"query_tokens": "model-1.safetensors", "language_projection.weight": name}
    with open(os.path.join(hf, INDEX), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    before = tree(tmp_path)
    result = cli("convert", "from-hf", "--hf-dir", hf, "--out", tmp_path / "ckpt", timeout=60)
    refused(result, INDEX, "'language_projection.weight'", repr(name), "leads outside")
    assert tree(tmp_path) == before  # nothing written


def test_symlinked_weight_file_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "weights")
    hf = hf_dir(tmp_path / "hf")
    os.symlink(outside / "weights", os.path.join(hf, "model.safetensors"))
    refused(
        cli("convert", "from-hf", "--hf-dir", hf, "--out", tmp_path / "ckpt", timeout=60),
        "model.safetensors",
        "leads outside",
    )


def truncated_safetensors(hf):
    path = os.path.join(hf, "model.safetensors")
    save_file({"query_tokens": np.zeros((1, 4, 32), np.float32)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "model.safetensors", "not a readable safetensors file"


def failing_pickle(hf):
    with open(os.path.join(hf, "pytorch_model.bin"), "wb") as f:
        f.write(b"this is no pickle")
    return "pytorch_model.bin", "torch.load(weights_only=True) cannot read it"


def bad_index(hf):
    with open(os.path.join(hf, INDEX), "w") as f:
        f.write('{"weight_map": ')
    return INDEX, "not valid JSON"


@pytest.mark.parametrize(
    "config,make,words",
    [
        ("{not json", None, ("config.json", "not valid JSON")),
        ("[1, 2]", None, ("config.json", "expected a JSON object, got a list")),
        (
            {k: v for k, v in HF_CONFIG.items() if k != "vision_config"},
            None,
            ("config.json", "missing key 'vision_config'"),
        ),
        (HF_CONFIG, truncated_safetensors, ()),
        (HF_CONFIG, failing_pickle, ()),
        (HF_CONFIG, bad_index, ()),
    ],
    ids=[
        "config_not_json",
        "config_a_list",
        "config_missing_key",
        "truncated_safetensors",
        "failing_pickle",
        "index_not_json",
    ],
)
def test_convert_refuses_broken_checkpoints_in_one_line(tmp_path, config, make, words):
    hf = hf_dir(tmp_path / "hf", config)
    if make is not None:
        words = make(hf)
    result = cli("convert", "from-hf", "--hf-dir", hf, "--allow-pickle", "--out", tmp_path / "ckpt")
    refused(result, *words)
    assert not (tmp_path / "ckpt").exists()


def test_to_hf_removes_the_temporary_folder_a_killed_run_left(tmp_path):
    import jax

    from ziya_jax.checkpoint import save_model
    from ziya_jax.config import ModelConfig, load_config
    from ziya_jax.model.ziya import init_params

    cfg = ModelConfig.from_dict(load_config(os.path.join(ROOT, "configs", "tiny.py") + ":stage=2").model.to_dict())
    save_model(str(tmp_path / "ckpt"), init_params(cfg, jax.random.key(0)), cfg)
    leftover = tmp_path / ".tmp-hf"  # what a to-hf killed while writing leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    result = cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not leftover.exists()
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------------------------- data manifest


def manifest(path, entries, junk=False):
    lines = [json.dumps(e) for e in entries] + (["{not json"] if junk else [])
    path.write_text("\n".join(lines) + "\n")
    return path


def qa(image, i=0):
    return {"id": f"q{i}", "image": image, "question": "What color?", "answer": "black"}


def built(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_manifest_images_are_refused_by_place_kind_and_size_before_they_are_read(tmp_path):
    images = tmp_path / "images"
    png(images / "good.png")
    os.mkfifo(images / "pipe.png")  # not a regular file: reading it would block
    with open(images / "huge.png", "wb") as f:
        f.truncate(2000)  # over the limit given below (sparse: nothing is written)
    outside = png(tmp_path / "elsewhere" / "x.png")
    entries = [
        qa("good.png", 0),
        qa("pipe.png", 1),
        qa("huge.png", 2),
        qa("../elsewhere/x.png", 3),
        qa(str(outside), 4),
        qa("/dev/zero", 5),
    ]
    path = manifest(tmp_path / "m.jsonl", entries)
    args = [
        "manifest",
        "--data-dir",
        tmp_path / "tfds",
        "--split",
        f"train={path}",
        "--image-dir",
        images,
        "--max-image-bytes",
        1000,
    ]
    result = cli("data", *args, "--name", "safe", timeout=60)
    assert built(result).endswith("train 1")
    assert (
        "left out 5 entries, by reason: {'unreadable_file': 1, 'file_too_large': 1, 'outside_image_dir': 3}"
        in result.stderr
    )
    # Trusted annotations may name images anywhere; /dev/zero is still refused unread (not a regular file).
    result = cli("data", *args, "--name", "anywhere", "--allow-any-image-path", timeout=60)
    assert built(result).endswith("train 3")
    assert "{'unreadable_file': 2, 'file_too_large': 1}" in result.stderr
    result = cli("data", *args, "--name", "strict", "--strict", timeout=60)
    refused(result, "pipe.png", "not a regular file")
    assert not (tmp_path / "tfds" / "llava_manifest" / "strict").exists()


def test_manifest_rebuilt_under_a_name_from_other_inputs_is_refused_unless_overwrite(tmp_path):
    png(tmp_path / "a.png")
    one = manifest(tmp_path / "one.jsonl", [qa("a.png")])
    two = manifest(tmp_path / "two.jsonl", [qa("a.png", 0), qa("a.png", 1)])

    def build(path, *flags):
        return cli(
            "data", "manifest", "--data-dir", tmp_path / "tfds", "--name", "mine", "--split", f"train={path}", *flags
        )

    assert built(build(one)).endswith("train 1")
    assert built(build(one)).endswith("train 1")  # the same inputs: kept
    refused(
        build(two), "llava_manifest/mine", "it was built from other inputs (split train manifest_sha256)", "--overwrite"
    )
    assert built(build(one)).endswith("train 1")  # the old build is untouched
    result = build(two, "--overwrite")
    assert built(result).endswith("train 2") and "rebuilding llava_manifest/mine" in result.stderr
    result = build(two, "--overwrite")  # e.g. after its image files changed, which are not compared
    assert built(result).endswith("train 2") and "asked to overwrite it" in result.stderr


def test_manifest_strict_bad_line_leaves_no_folder(tmp_path):
    png(tmp_path / "a.png")
    path = manifest(tmp_path / "m.jsonl", [qa("a.png")], junk=True)
    result = cli(
        "data", "manifest", "--data-dir", tmp_path / "tfds", "--name", "x", "--split", f"train={path}", "--strict"
    )
    refused(result, "m.jsonl:2", "not JSON")
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_every_manifest_line_read_is_in_a_batch_or_counted(tmp_path, workers):
    from ziya_jax.data import DataConfig, ManifestSource, Source, instruction_batches, synthetic, tokenizers

    llm, qformer = synthetic.train_demo_tokenizers(str(tmp_path / "tok"), num_scenes=60)
    tok = tokenizers.SentencePieceTokenizer.load(llm)
    qtok = tokenizers.QFormerTokenizer.from_sentencepiece(qformer)
    entries = [{"id": f"ok{i}", "question": f"question {i}?", "answer": str(i)} for i in range(9)]
    entries += [
        {"id": "empty", "question": "q?", "answer": " "},
        {"id": "out", "image": "../x.png", "question": "<image> q?", "answer": "a"},
    ]
    source = ManifestSource(manifest(tmp_path / "m.jsonl", entries, junk=True))
    assert len(source) == 12
    cfg = DataConfig(
        batch_size=4,
        text_len=64,
        image_size=28,
        num_query_tokens=4,
        image_token_id=tok.vocab_size,
        qformer_text_len=24,
        num_epochs=1,
        shuffle=False,
        num_workers=workers,
    )
    it = iter(instruction_batches([Source(source)], cfg, tok, qtok, 0, 1))
    try:
        rows = sum(len(batch["input_ids"]) for batch in it)
    finally:
        it.close()
    skipped = dict(it.skipped)
    partial = skipped.pop("partial_batch")
    assert skipped == {"empty_text": 1, "outside_image_dir": 1, "invalid_entry": 1}
    assert rows % 4 == 0 and rows + partial == 9


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate(tmp_path, task, data, *flags):
    """An evaluation whose data is refused before the (absent) checkpoint is read."""
    return cli(
        "evaluate",
        "--checkpoint",
        tmp_path / "no-checkpoint",
        "--task",
        task,
        "--data",
        data,
        "--out",
        tmp_path / "out",
        *flags,
    )


def vizwiz(tmp_path, records) -> str:
    path = tmp_path / "val.json"
    path.write_text(json.dumps(records))
    return str(path)


def viz(image="VizWiz_val_00000000.jpg", **kw):
    return {"image": image, "question": "What is this?", "answers": [{"answer": "cup"}] * 10, **kw}


def test_evaluation_images_outside_the_image_folder_are_refused_unless_allowed(tmp_path):
    png(tmp_path / "images" / "VizWiz_val_00000000.jpg")
    outside = png(tmp_path / "elsewhere" / "x.jpg")
    for image in ("../" * 40 + "etc/passwd", "../elsewhere/x.jpg", str(outside)):
        data = vizwiz(tmp_path, [viz(), viz(image)])
        refused(
            evaluate(tmp_path, "vizwiz", data, "--image-dir", tmp_path / "images"),
            repr(image),
            "leads outside the image folder",
            "--allow-any-image-path",
        )
    # Allowed, the data passes its checks and the run goes on to the checkpoint (absent here).
    result = evaluate(tmp_path, "vizwiz", data, "--image-dir", tmp_path / "images", "--allow-any-image-path")
    refused(result, "no checkpoint directory")
    assert not (tmp_path / "out").exists()


def scienceqa(tmp_path, problems) -> str:
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["5"]}))
    return str(tmp_path)


SCIENCEQA = {"5": {"question": "Which?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png"}}


def vqav2(tmp_path, answers) -> str:
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"questions": [{"question_id": 1, "image_id": 42, "question": "What?"}]})
    )
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps({"annotations": [{"question_id": 1, "image_id": 42, "answers": answers}]})
    )
    return str(tmp_path)


@pytest.mark.parametrize(
    "task,make,words",
    [
        ("vqav2", lambda p: vqav2(p, ["yes"] * 10), ("annotations.json", "missing field 'answer'")),
        ("vqav2", lambda p: vqav2(p, "yes"), ("annotations.json", "field 'answers' is str")),
        ("vizwiz", lambda p: vizwiz(p, [viz(image=7)]), ("val.json: [0]", "field 'image' is int")),
        ("vizwiz", lambda p: vizwiz(p, {"image": "a.jpg"}), ("val.json", "expected a list")),
        (
            "scienceqa_img",
            lambda p: scienceqa(p, {"5": dict(SCIENCEQA["5"], answer="A")}),
            ("problems.json: problem 5", "field 'answer' is str"),
        ),
        ("scienceqa_img", lambda p: scienceqa(p, [SCIENCEQA["5"]]), ("problems.json", "expected {problem id")),
    ],
    ids=[
        "vqav2_answers_strings",
        "vqav2_answers_a_string",
        "vizwiz_image_int",
        "vizwiz_not_a_list",
        "scienceqa_answer_str",
        "scienceqa_problems_a_list",
    ],
)
def test_evaluation_files_with_wrong_field_types_are_refused_in_one_line(tmp_path, task, make, words):
    data = make(tmp_path)
    refused(evaluate(tmp_path, task, data, "--image-dir", tmp_path), *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "task,make",
    [
        ("scienceqa_img", lambda p: DATA),  # the split "val" of pid_splits.json is empty
        ("vizwiz", lambda p: vizwiz(p, [])),
    ],
)
def test_empty_annotation_set_is_refused_and_writes_no_scores(tmp_path, task, make):
    refused(evaluate(tmp_path, task, make(tmp_path), "--split", "val"), f"no {task} examples", "'val'")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "test_config.py"
    path.write_text(TEST_CONFIG)
    return str(path)


def train(config_file, workdir, *args, timeout=600):
    return subprocess.run(
        train_command(config_file, workdir, *args),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def unwritable(tmp_path):
    """A workdir nobody can create: in a read-only folder, or (root may write anywhere else) in sysfs."""
    if os.geteuid() != 0:
        (tmp_path / "read-only").mkdir(mode=0o500)
        return tmp_path / "read-only" / "run"
    if not os.path.isdir("/sys"):
        pytest.skip("running as root without /sys: no folder is unwritable")
    return "/sys/ziya-jax-workdir"


@pytest.mark.parametrize(
    "case", ["steps_zero", "steps_negative", "tokenizers_not_a_folder", "workdir_a_file", "workdir_unwritable"]
)
def test_train_refuses_bad_settings_before_writing_anything(config_file, tmp_path, case):
    workdir, overrides, words = tmp_path / "run", [], []
    if case in ("steps_zero", "steps_negative"):
        steps = 0 if case == "steps_zero" else -3
        overrides, words = [f"--config.train.optimizer.total_steps={steps}"], [f"total_steps={steps}"]
    elif case == "tokenizers_not_a_folder":
        overrides, words = ["--config.data.tokenizers=5"], ["data.tokenizers='5'", "no such folder"]
    elif case == "workdir_a_file":
        workdir.write_text("a file")
        words = [str(workdir), "not a folder"]
    else:
        workdir = unwritable(tmp_path)
        words = [str(workdir), "cannot write there"]
    before = tree(tmp_path)
    refused(train(config_file, workdir, "stage=2", *overrides, timeout=120), *words)
    assert tree(tmp_path) == before


def test_train_writes_a_model_only_after_its_steps_and_a_leftover_tmp_model_does_not_block_a_rerun(
    config_file, tmp_path
):
    refused(train(config_file, tmp_path, "stage=2,steps=0"), "total_steps=0")
    assert not os.path.exists(tmp_path / "model")
    result = train(config_file, tmp_path, "stage=2,steps=2")  # correct settings now train
    assert result.returncode == 0 and "already trained" not in result.stdout, result.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    # Killed between writing the model and renaming it into place: model.tmp is left, model/ is not.
    os.rename(tmp_path / "model", tmp_path / "model.tmp")
    result = train(config_file, tmp_path, "stage=2,steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isdir(tmp_path / "model") and not os.path.exists(tmp_path / "model.tmp")
    # Fewer steps than the checkpoints already hold: no model of this config can come from them.
    shutil.rmtree(tmp_path / "model")
    refused(train(config_file, tmp_path, "stage=2,steps=1"), "checkpoint of step 2 is past", "total_steps=1")
    assert not os.path.exists(tmp_path / "model")


# ----------------------------------------------------------------------------------------------- damaged models


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import jax

    from ziya_jax.checkpoint import save_model
    from ziya_jax.config import ModelConfig, load_config
    from ziya_jax.model.ziya import init_params

    cfg = ModelConfig.from_dict(load_config(os.path.join(ROOT, "configs", "tiny.py") + ":stage=2").model.to_dict())
    path = tmp_path_factory.mktemp("model") / "ckpt"
    save_model(str(path), init_params(cfg, jax.random.key(0)), cfg)
    return path


def largest_array_file(ckpt) -> str:
    files = [
        os.path.join(d, n)
        for d, _, names in os.walk(os.path.join(ckpt, "params"))
        for n in names
        if os.sep + "d" + os.sep in os.path.join(d, n)
    ]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
@pytest.mark.parametrize(
    "command",
    [
        ("generate", "--input-ids", "5,6"),
        ("evaluate", "--task", "synthetic", "--limit", "2"),
        ("convert", "to-hf"),
    ],
)
def test_a_damaged_model_checkpoint_is_one_line(tiny_model_dir, tmp_path, damage, command):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    target = largest_array_file(ckpt)
    if damage == "missing":
        os.remove(target)
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    module, *args = command
    args = (
        ["to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf"]
        if module == "convert"
        else ["--checkpoint", ckpt, *args, *(["--out", tmp_path / "eval"] if module == "evaluate" else [])]
    )
    refused(cli(module, *args), ckpt)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "eval").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
