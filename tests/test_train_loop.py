"""python -m ziya_jax.train end to end on a test-sized model: resumption after kill -9 and after SIGTERM gives
exactly the losses of an uninterrupted run with no step lost or repeated; a corrupt latest checkpoint falls back
to the previous one; a non-finite loss stops the run and leaves the last good checkpoint; a pipeline of stages
hands each stage the previous one's model; bad config overrides are clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from ziya_jax.checkpoint import load_model
from ziya_jax.config import load_config
from ziya_jax.train import loop, sharded
from ziya_jax.train.observe import read_metrics
from ziya_jax.tree import flatten, matches

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24

# The demo's stages (data, losses, trainable sets), with a model small enough to compile in seconds.
TEST_CONFIG = f"""
from ziya_jax.config import load_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, stage="all", steps={STEPS}, save_every=4)
    config = load_config({os.path.join(ROOT, "configs", "demo.py")!r} + f":stage={{args['stage']}}")
    for stage in (config.stages.values() if "stages" in config else [config]):
        m = stage.model
        m.vision.update(image_size=24, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
        m.qformer.update(width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=16)
        m.llm.update(width=32, depth=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
        m.num_query_tokens = 4
        stage.train.optimizer.update(total_steps=args["steps"], warmup_steps=2)
        stage.log_every = 1
        if stage.get("kind") == "vision":
            stage.data.update(batch_size=8, eval_n=16)
            continue
        stage.data.update(batch_size=8, text_len=48)
        stage.checkpoint.save_every = args["save_every"]
        stage.eval.tasks = ()
    return config
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "test_config.py"
    path.write_text(TEST_CONFIG)
    return str(path)


def train_command(config_file, workdir, arg="stage=2", *overrides, program=("-m", "ziya_jax.train")):
    return [
        sys.executable,
        *program,
        "--config",
        f"{config_file}:{arg}",
        "--workdir",
        str(workdir),
        *overrides,
    ]


def environment():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".pytest_cache", "jax-train-loop")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def train(config_file, workdir, *args, check=True):
    result = subprocess.run(
        train_command(config_file, workdir, *args),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def losses(workdir) -> dict[int, float]:
    rows = read_metrics(str(workdir))
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(rows) + 1)), f"steps lost or repeated: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    train(config_file, workdir)
    return workdir, losses(workdir)


def saved_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


# `python -m ziya_jax.train` with its periodic evaluation (eval.every) replaced by a hold that lasts until a SIGTERM,
# which the loop's own handler gets too; WORKDIR/held appears once the hold has begun. A test thus signals the run
# at a known step, however fast the machine.
HELD_TRAIN = """
import os, signal, sys, time

from ziya_jax.train import __main__ as train, loop


def hold(*args, **kwargs):
    loop_handler, received = signal.getsignal(signal.SIGTERM), []

    def handler(signum, frame):
        received.append(signum)
        loop_handler(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    open(os.path.join(sys.argv[sys.argv.index("--workdir") + 1], "held"), "w").close()
    while not received:
        time.sleep(0.05)
    return {}


loop.evaluate = hold
sys.exit(train.main())
"""
HELD_AT, LAST_SAVED = 10, 8  # the run is held two steps past its checkpoint of step 8 (save_every=4)


def interrupt(config_file, workdir, sig):
    """Start a run held at step HELD_AT, wait until it is held there and its checkpoint of step LAST_SAVED is
    final, then send `sig`."""
    proc = subprocess.Popen(
        train_command(config_file, workdir, "stage=2", f"--config.eval.every={HELD_AT}", program=("-c", HELD_TRAIN)),
        env=environment(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (os.path.exists(os.path.join(workdir, "held")) and LAST_SAVED in saved_steps(workdir)):
        assert proc.poll() is None, f"the run ended before step {HELD_AT}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"the run was not held at step {HELD_AT} with its checkpoint"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def test_loss_goes_down_on_the_synthetic_set(reference):
    _, ref = reference
    assert len(ref) == STEPS
    assert ref[STEPS] < ref[1] - 0.3, ref


def test_kill_9_then_rerun_gives_the_uninterrupted_losses(config_file, reference, tmp_path):
    ref_dir, ref = reference
    proc = interrupt(config_file, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert len(read_metrics(str(tmp_path))) == HELD_AT  # two steps past the checkpoint the rerun starts from
    result = train(config_file, tmp_path)
    assert "resuming from the checkpoint of step" in result.stdout
    np.testing.assert_allclose(list(losses(tmp_path).values()), list(ref.values()), rtol=1e-6)
    final, _ = load_model(os.path.join(tmp_path, "model"))
    expected, _ = load_model(os.path.join(ref_dir, "model"))
    for path, value in flatten(expected).items():
        np.testing.assert_allclose(np.asarray(flatten(final)[path]), np.asarray(value), rtol=1e-5, atol=1e-7)


def test_sigterm_saves_then_rerun_resumes(config_file, reference, tmp_path):
    _, ref = reference
    proc = interrupt(config_file, tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr.read()[-3000:]
    stopped_at = len(read_metrics(str(tmp_path)))
    assert stopped_at == HELD_AT + 1 and saved_steps(tmp_path)[-1] == stopped_at  # saved exactly where it stopped
    train(config_file, tmp_path)
    np.testing.assert_allclose(list(losses(tmp_path).values()), list(ref.values()), rtol=1e-6)


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(config_file, tmp_path):
    train(config_file, tmp_path, "stage=2,steps=4,save_every=2")
    assert saved_steps(tmp_path) == [2, 4]
    for root, _, files in os.walk(os.path.join(tmp_path, "checkpoints", "4")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    os.rename(os.path.join(tmp_path, "model"), os.path.join(tmp_path, "model-old"))
    result = train(config_file, tmp_path, "stage=2,steps=6,save_every=2")
    assert "step 4" in result.stderr and "unreadable" in result.stderr
    assert "resuming from the checkpoint of step 2" in result.stdout
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(1, 7))
    assert saved_steps(tmp_path) == [4, 6]  # step 4 saved again; the unreadable one kept aside
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "unreadable-4"))


@pytest.mark.parametrize("first_bad", [4, 3])  # a step that saves, and one whose loss is read after the next starts
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(config_file, tmp_path, monkeypatch, first_bad):
    config = load_config(f"{config_file}:stage=2,steps=6,save_every=2")
    real_step = sharded.train_step

    def poisoned(state, batch, **kwargs):  # the loss turns NaN from step `first_bad` on
        new_state, metrics = real_step(state, batch, **kwargs)
        return new_state, {**metrics, "loss": jnp.where(state.step < first_bad - 1, metrics["loss"], jnp.nan)}

    monkeypatch.setattr(sharded, "train_step", poisoned)
    with pytest.raises(loop.TrainingDiverged, match=f"step {first_bad}: loss nan"):
        loop.run(config, str(tmp_path))
    assert saved_steps(tmp_path) == [2]
    assert not os.path.exists(os.path.join(tmp_path, "model"))


def test_periodic_and_final_evaluation(config_file, tmp_path):
    result = train(
        config_file,
        tmp_path,
        "stage=2,steps=4",
        "--config.eval.every=2",
        "--config.eval.tasks=('vqa',)",
        "--config.eval.n=2",
    )
    assert "eval at step 2: en/vqa_em=" in result.stdout and "eval at step 4" not in result.stdout  # 4: the final
    with open(os.path.join(tmp_path, loop.EVAL_FILE), encoding="utf-8") as f:
        final = json.load(f)
    for lang in ("en", "zh"):
        assert 0 <= final[lang]["vqa_em"] <= 100
        assert [r["task"] for r in final[lang]["predictions"]] == ["vqa", "vqa"]


def test_stages_start_from_the_previous_model(config_file, tmp_path):
    train(config_file, tmp_path, "stage=all,steps=2")
    stage2, _ = load_model(os.path.join(tmp_path, "stage2", "model"))
    stage3, cfg3 = load_model(os.path.join(tmp_path, "stage3", "model"))
    trainable = load_config(f"{config_file}:stage=3").train.trainable
    s2, s3 = flatten(stage2), flatten(stage3)
    assert any("lora_a" in p[-1] for p in s3) and not any("lora_a" in p[-1] for p in s2)
    stage0, stage1 = (flatten(load_model(os.path.join(tmp_path, f"stage{s}", "model"))[0]) for s in ("0", "1b"))
    assert ("vision_proj", "kernel") in stage1  # stage 1's own heads
    for p in stage0:  # the pretrained ViT (stage 0), frozen in stage 1
        if p[0] == "vision_model":
            np.testing.assert_array_equal(np.asarray(stage1[p]), np.asarray(stage0[p]))
    frozen = [p for p in s3 if not matches(p, trainable)]
    assert frozen
    for p in frozen:  # stage 3's frozen parameters are stage 2's, untouched
        np.testing.assert_array_equal(np.asarray(s3[p]), np.asarray(s2[p]))
    result = train(config_file, tmp_path, "stage=all,steps=2")  # all done: nothing trains again
    assert result.stdout.count("already trained") == 5


def test_demo_stages_run_itg_alone_before_the_joint_stage_1():
    demo = os.path.join(ROOT, "configs", "demo.py")
    config = load_config(demo)
    assert list(config.stages) == ["stage0", "stage1a", "stage1b", "stage2", "stage3"]  # the order they run in
    assert dict(config.stages.stage1a.train.losses) == {"itg": 1.0}
    assert dict(config.stages.stage1b.train.losses) == {"itc": 1.0, "itm": 1.0, "itg": 1.0}
    with pytest.raises(ValueError, match="unknown demo stage '1'; known: .*'1a', '1b'"):
        load_config(f"{demo}:stage=1")
    for name, factor in (("stage1b", 0.1), ("stage2", 0.5), ("stage3", 0.1)):  # after 1a, the Q-Former learns slower
        assert dict(config.stages[name].train.optimizer.lr_multipliers) == {"qformer": factor, "query_tokens": factor}
    assert not config.stages.stage1a.train.optimizer.lr_multipliers
    chat2 = load_config(f"{demo}:stage=2").train.trainable
    base2 = load_config(f"{demo}:stage=2,variant=base").train.trainable
    assert matches(("qformer", "layer"), chat2)  # Chat's Q-Former reads the instruction: it trains in stage 2
    assert not matches(("qformer", "layer"), base2)


def test_tokenizers_larger_than_the_model_vocabulary_are_refused(tmp_path):
    from ziya_jax.config import ModelConfig
    from ziya_jax.data import synthetic
    from ziya_jax.data.tokenizers import check_vocabularies, load_tokenizers

    synthetic.train_demo_tokenizers(str(tmp_path), num_scenes=50)
    tok, qtok = load_tokenizers(str(tmp_path))
    cfg = ModelConfig.from_dict(load_config(os.path.join(ROOT, "configs", "demo.py") + ":stage=2").model.to_dict())
    check_vocabularies(tok, qtok, cfg)  # the demo's own tokenizers fit the demo model
    assert cfg.image_token_id == tok.vocab_size  # the placeholder is the one id past the tokenizer's
    small = ModelConfig.from_dict({**cfg.to_dict(), "llm": {**cfg.to_dict()["llm"], "vocab_size": tok.vocab_size - 1}})
    with pytest.raises(ValueError, match=f"LLM tokenizer has {tok.vocab_size} ids but model.llm.vocab_size"):
        check_vocabularies(tok, qtok, small)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.optimizer.lrr=1", "train.optimizer has no 'lrr'"),
        ("--config.data.batch_size=abc", "not a Python literal"),
        ("--bogus", "unrecognised argument"),
    ],
)
def test_bad_overrides_are_clear_errors(config_file, tmp_path, override, message):
    result = subprocess.run(
        train_command(config_file, tmp_path, "stage=2", override),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_url_workdir_is_refused(config_file):
    result = subprocess.run(
        train_command(config_file, "gs://bucket/run"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "gcsfuse" in result.stderr and "Traceback" not in result.stderr
