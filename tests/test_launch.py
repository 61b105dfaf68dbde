"""The pod and cluster launchers: the commands a dry run prints, settings from a file overridden by flags,
clear errors, and (with stand-in gcloud / sbatch programs on PATH) what a real run executes."""

import os
import shlex
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args, env=None):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    return done.returncode, done.stdout.splitlines(), done.stderr


def commands(lines):
    return [shlex.split(line) for line in lines if line and not line.startswith(("#", "job "))]


def test_tpu_dry_run_runs_the_whole_job_with_names_from_settings_and_flags(tmp_path):
    ini = tmp_path / "pod.ini"
    ini.write_text(
        "[tpu]\nproject = proj-from-file\nzone = zone-from-file\nname = pod-q\naccelerator = v5e-64\n"
        "bucket = gs://bucket-x\n"
    )
    rc, out, err = launch(
        "tpu.py",
        "all",
        "--settings",
        str(ini),
        "--zone",
        "zone-from-flag",
        "--config",
        "configs/ziya_chat_14b.py:smoke=1,init=/gcs/bucket-x/weights,data_dir=/gcs/bucket-x/data",
        "--dry-run",
        "--",
        "--config.stages.stage1.train.seed=7",
    )
    assert rc == 0, err
    cmds = commands(out)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert all("--project=proj-from-file" in c and "--zone=zone-from-flag" in c for c in gcloud)
    assert not any("zone-from-file" in line for line in out)
    create = next(c for c in gcloud if c[3:5] == ["tpu-vm", "create"])
    assert create[5] == "pod-q" and "--accelerator-type=v5litepod-64" in create
    assert "--version=v2-alpha-tpuv5-lite" in create
    archive = next(c for c in cmds if c[0] == "git")[-2]
    scp = next(c for c in gcloud if c[4] == "scp")
    assert scp[5] == archive and scp[6] == "pod-q:ziya_jax.tar.gz" and "--worker=all" in scp
    ssh = [c for c in gcloud if c[4] == "ssh"]
    install, train, logs = ssh
    assert "pip install" in install[7] and "'.[tpu]'" in install[7]
    assert "gcsfuse --implicit-dirs bucket-x /gcs/bucket-x" in install[7]
    assert "--worker=all" in train
    assert (
        "ZIYA_DISTRIBUTED=1 nohup python3 -m ziya_jax.train --config "
        "configs/ziya_chat_14b.py:smoke=1,init=/gcs/bucket-x/weights,data_dir=/gcs/bucket-x/data "
        "--workdir /gcs/bucket-x/runs/pod-q --config.stages.stage1.train.seed=7" in train[7]
    )
    assert "--worker=0" in logs and "tail" in logs[7]
    assert gcloud[-1][3:6] == ["tpu-vm", "delete", "pod-q"]
    order = [c[4] for c in gcloud]
    assert order.index("create") < order.index("scp") < order.index("ssh") < order.index("delete")


def test_tpu_multislice_uses_a_queued_resource_and_starts_every_slice():
    rc, out, err = launch(
        "tpu.py",
        "all",
        "--project",
        "p1",
        "--zone",
        "z1",
        "--name",
        "ms",
        "--accelerator",
        "v4-32",
        "--num-slices",
        "2",
        "--workdir",
        "/tmp/w",
        "--config",
        "c.py",
        "--dry-run",
        "--keep",
    )
    assert rc == 0, err
    cmds = commands(out)
    create = next(c for c in cmds if c[3:5] == ["queued-resources", "create"])
    assert "--node-count=2" in create and "--node-prefix=ms" in create and "--accelerator-type=v4-32" in create
    started = [c[5] for c in cmds if c[4] == "ssh" and "ziya_jax.train" in c[7]]
    assert started == ["ms-0", "ms-1"]
    assert not any(c[4] == "delete" for c in cmds if c[0] == "gcloud")  # --keep


def test_tpu_missing_settings_and_bad_topology_are_clear_errors():
    rc, out, err = launch("tpu.py", "up", "--zone", "z", "--name", "n", "--accelerator", "v5e-64", "--dry-run")
    assert rc == 2 and "missing settings: --project" in err and "Traceback" not in err and not out
    rc, _, err = launch(
        "tpu.py", "up", "--project", "p", "--zone", "z", "--name", "n", "--accelerator", "v9x-8", "--dry-run"
    )
    assert rc == 2 and "unknown topology" in err and "Traceback" not in err
    rc, _, err = launch(
        "tpu.py", "run", "--project", "p", "--zone", "z", "--name", "n", "--accelerator", "v5e-8", "--dry-run"
    )
    assert rc == 2 and "--config" in err


def fake(bin_dir, name, body):
    """A stand-in program that logs its arguments (one call per line) and then runs `body`."""
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{bin_dir}/calls"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_tpu_up_reuses_an_existing_slice_and_down_deletes_it(tmp_path):
    fake(tmp_path, "gcloud", 'case "$*" in *describe*) echo READY;; esac')
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    base = ["--project", "p", "--zone", "z", "--name", "live", "--accelerator", "v6e-16"]
    for action in ("up", "stop", "down"):
        rc, _, err = launch("tpu.py", action, *base, env=env)
        assert rc == 0, err
    calls = (tmp_path / "calls").read_text().splitlines()
    assert not any(" create " in c for c in calls)  # it exists: reused
    assert any(" ssh live --worker=all --command=kill -TERM" in c for c in calls)
    assert calls[-1].startswith("gcloud compute tpus tpu-vm delete live --quiet")


def test_slurm_dry_run_script_and_submission(tmp_path):
    ini = tmp_path / "cluster.ini"
    ini.write_text(
        "[slurm]\npartition = part-a\naccount = acct-b\ngpus_per_node = 8\nsetup = source /opt/venv/bin/activate\n"
    )
    rc, out, err = launch(
        "slurm.py",
        "submit",
        "--settings",
        str(ini),
        "--nodes",
        "4",
        "--config",
        "c.py:stage=3",
        "--workdir",
        "/shared/run",
        "--log-dir",
        str(tmp_path / "logs"),
        "--dry-run",
        "--",
        "--x=1",
    )
    assert rc == 0, err
    text = "\n".join(out)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=part-a",
        "#SBATCH --account=acct-b",
        f"#SBATCH --chdir={ROOT}",
        "source /opt/venv/bin/activate",
        "export ZIYA_DISTRIBUTED=1",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
        "srun --kill-on-bad-exit=1 python -m ziya_jax.train --config c.py:stage=3 --workdir /shared/run --x=1",
    ):
        assert line in out, (line, text)
    assert f"sbatch --parsable {tmp_path / 'logs' / 'ziya-train.sbatch'}" in out
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_slurm_submit_writes_the_script_and_reports_the_job(tmp_path):
    fake(tmp_path, "sbatch", "echo '4242;cluster'")
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    rc, out, err = launch(
        "slurm.py",
        "submit",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--config",
        "c.py",
        "--workdir",
        "/w",
        "--log-dir",
        str(tmp_path / "logs"),
        "--detach",
        env=env,
    )
    assert rc == 0, err
    script = tmp_path / "logs" / "ziya-train.sbatch"
    assert "#SBATCH --nodes=2" in script.read_text()
    assert f"job 4242: log {tmp_path / 'logs' / 'ziya-train-4242.log'}" in out
    rc, _, err = launch("slurm.py", "cancel", env=env)
    assert rc == 2 and "--job-id" in err and "Traceback" not in err


def test_the_example_settings_file_is_complete_for_both_launchers():
    example = os.path.join(ROOT, "launch", "settings.example.ini")
    rc, out, err = launch("tpu.py", "up", "--settings", example, "--dry-run")
    assert rc == 0 and "--accelerator-type=v5litepod-64" in out[1], err
    rc, out, err = launch("slurm.py", "submit", "--settings", example, "--config", "c.py", "--dry-run", "--detach")
    assert rc == 0 and "#SBATCH --nodes=2" in out, err
