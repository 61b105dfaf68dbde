"""Train on a Cloud TPU slice (or several: multi-slice) in one command.

    python launch/tpu.py --settings pod.ini --config configs/ziya_chat_14b.py:stage=3 all [-- TRAIN FLAGS]

Actions: `up` creates the TPU VM (or, with --queued or --num-slices > 1, a queued resource) unless it already
exists, and waits until it is ready; `install` copies the committed code (git archive of HEAD) to every worker
and installs it with the TPU extra; `run` starts `python -m ziya_jax.train` on every worker of every slice
(ZIYA_DISTRIBUTED=1, so each joins the job) and streams worker 0's log until training ends; `logs` streams the
log again; `stop` sends the trainers SIGTERM (they checkpoint and exit); `down` deletes the slice; `all` is up,
install, run, down (--keep skips the down). --dry-run prints every command instead of running it.

Project, zone, name, accelerator (v5e-64, v6e-16, v4-32, v5p-128, ...) and bucket come from flags or from the
[tpu] section of an INI file given with --settings (flags win); nothing is assumed. `install` mounts the bucket
with gcsfuse at /gcs/BUCKET on every worker, so that all of them read and write the same workdir.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LaunchError, Shell, main_guard, settings, split_at_dashes, truthy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIONS = ("up", "install", "run", "logs", "stop", "down", "all")
# Cloud TPU's base software versions per generation (overridable with --runtime-version).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
LOG, PID, CODE = "~/ziya_train.log", "~/ziya_train.pid", "~/ziya_jax"
MOUNT = "/gcs"  # the bucket is mounted here (gcsfuse) on every worker: the trainer writes plain files
GCSFUSE = (
    "if ! command -v gcsfuse >/dev/null; then "
    'echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | '
    "sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
    "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
)


def accelerator_type(accelerator: str) -> tuple[str, str]:
    """('v5litepod-64', 'v5e') for 'v5e-64' (or 'v5e:8x8'): gcloud's accelerator type and the generation."""
    from ziya_jax.compile import parse_topology

    try:
        topo = parse_topology(accelerator)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    return topo.accelerator_type, topo.chip.libtpu_name


class Pod:
    def __init__(self, s: dict, shell: Shell):
        self.s, self.shell = s, shell
        self.slices = int(s.get("num_slices") or 1)
        self.queued = self.slices > 1 or truthy(s.get("queued"))
        self.type, generation = accelerator_type(s["accelerator"])
        self.version = s.get("runtime_version") or RUNTIME[generation]
        self.where = [f"--project={s['project']}", f"--zone={s['zone']}"]
        name = s["name"]
        self.nodes = [f"{name}-{i}" for i in range(self.slices)] if self.slices > 1 else [name]

    def gcloud(self, *args) -> list[str]:
        return ["gcloud", "compute", "tpus", *args, *self.where]

    def ssh(self, node: str, command: str, worker: str = "all") -> None:
        self.shell.run(self.gcloud("tpu-vm", "ssh", node, f"--worker={worker}", f"--command={command}"))

    def up(self) -> None:
        name, spot = self.s["name"], ["--spot"] if truthy(self.s.get("spot")) else []
        kind = "queued-resources" if self.queued else "tpu-vm"
        state_field = "state.state" if self.queued else "state"
        describe = self.gcloud(kind, "describe", name, f"--format=value({state_field})")
        if self.shell.output(describe, dry_value=None) is None:  # absent (a dry run shows the creation)
            if self.queued:
                nodes = (
                    [f"--node-count={self.slices}", f"--node-prefix={name}"]
                    if self.slices > 1
                    else [f"--node-id={name}"]
                )
                self.shell.run(
                    self.gcloud(
                        "queued-resources",
                        "create",
                        name,
                        f"--accelerator-type={self.type}",
                        f"--runtime-version={self.version}",
                        *nodes,
                        *spot,
                    )
                )
            else:
                self.shell.run(
                    self.gcloud(
                        "tpu-vm", "create", name, f"--accelerator-type={self.type}", f"--version={self.version}", *spot
                    )
                )
        ready = "ACTIVE" if self.queued else "READY"
        deadline = time.time() + 60 * float(self.s.get("wait_minutes") or 60)
        while (state := self.shell.output(describe, dry_value=ready)) != ready:
            if time.time() > deadline:
                raise LaunchError(
                    f"{name} is {state or 'absent'}, not {ready}, after waiting; see `{shlex.join(describe)}`"
                )
            time.sleep(30)

    def install(self) -> None:
        """The committed code on every worker, and the bucket (if any) mounted at MOUNT/BUCKET."""
        archive = os.path.join(tempfile.gettempdir(), f"ziya-launch-{self.s['name']}.tar.gz")
        self.shell.run(["git", "-C", REPO, "archive", "--format=tar.gz", "-o", archive, "HEAD"])
        mount = ""
        if self.s.get("bucket"):
            bucket = _bucket_name(self.s["bucket"])
            mount = (
                f" && {GCSFUSE} && sudo mkdir -p {MOUNT}/{bucket} && sudo chown $USER {MOUNT}/{bucket} && "
                f"(mountpoint -q {MOUNT}/{bucket} || gcsfuse --implicit-dirs {bucket} {MOUNT}/{bucket})"
            )
        for node in self.nodes:
            self.shell.run(self.gcloud("tpu-vm", "scp", archive, f"{node}:ziya_jax.tar.gz", "--worker=all"))
            self.ssh(
                node,
                f"rm -rf {CODE} && mkdir -p {CODE} && tar -xzf ziya_jax.tar.gz -C {CODE} && "
                f"cd {CODE} && python3 -m pip install -q -e '.[tpu]'{mount}",
            )

    def run(self, train_args: list[str]) -> None:
        if not self.s.get("config"):
            raise LaunchError("run needs --config (the training config, e.g. configs/ziya_chat_14b.py:stage=3)")
        workdir = self.s.get("workdir") or (
            f"{MOUNT}/{_bucket_name(self.s['bucket'])}/runs/{self.s['name']}" if self.s.get("bucket") else None
        )
        if not workdir:
            raise LaunchError(
                f"run needs --workdir or --bucket (the run's directory is then "
                f"{MOUNT}/BUCKET/runs/NAME, the bucket mounted on every worker)"
            )
        train = shlex.join(
            ["python3", "-m", "ziya_jax.train", "--config", self.s["config"], "--workdir", workdir, *train_args]
        )
        for node in self.nodes:  # detached, so that every slice starts before any log is followed
            self.ssh(node, f"cd {CODE} && ZIYA_DISTRIBUTED=1 nohup {train} > {LOG} 2>&1 < /dev/null & echo $! > {PID}")
        self.logs()

    def logs(self) -> None:
        """Worker 0's log from the start, until its trainer exits."""
        self.ssh(self.nodes[0], f"tail --pid=$(cat {PID}) -n +1 -F {LOG}", worker="0")

    def stop(self) -> None:
        for node in self.nodes:
            self.ssh(node, f"kill -TERM $(cat {PID}) 2>/dev/null || true")

    def down(self) -> None:
        if self.queued:
            self.shell.run(self.gcloud("queued-resources", "delete", self.s["name"], "--force", "--quiet"))
        else:
            self.shell.run(self.gcloud("tpu-vm", "delete", self.s["name"], "--quiet"))


def _bucket_name(bucket: str) -> str:
    name = bucket.removeprefix("gs://").strip("/")
    if not name or "/" in name:
        raise LaunchError(f"bucket {bucket!r}: give gs://BUCKET (no folder)")
    return name


def main(argv=None) -> int:
    argv, train_args = split_at_dashes(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python launch/tpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--settings", help="INI file whose [tpu] section gives any of the settings below")
    parser.add_argument("--project")
    parser.add_argument("--zone")
    parser.add_argument("--name", help="the TPU VM or queued resource (slices are NAME-0, NAME-1, ...)")
    parser.add_argument("--accelerator", help="v5e-64, v6e-16, v4-32, v5p-128, ... (per slice)")
    parser.add_argument("--num-slices", type=int, help="multi-slice: this many slices (a queued resource)")
    parser.add_argument("--queued", action="store_const", const="true", help="a queued resource even for one slice")
    parser.add_argument("--spot", action="store_const", const="true", help="spot capacity")
    parser.add_argument("--runtime-version", help="TPU software version (default: the generation's base image)")
    parser.add_argument(
        "--bucket",
        help="gs://BUCKET, mounted with gcsfuse at /gcs/BUCKET on every worker; the "
        "run's workdir defaults to /gcs/BUCKET/runs/NAME",
    )
    parser.add_argument(
        "--workdir",
        help="where the trainer writes checkpoints and metrics: a path every worker "
        "shares (checkpoints are written by all of them)",
    )
    parser.add_argument("--config", help="training config, e.g. configs/ziya_chat_14b.py:stage=3")
    parser.add_argument("--wait-minutes", type=float, help="how long `up` waits for the slice (default 60)")
    parser.add_argument("--keep", action="store_true", help="`all` leaves the slice up at the end")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("action", "settings", "keep", "dry_run")}
    s = settings(args.settings, "tpu", flags, required=("project", "zone", "name", "accelerator"))
    pod = Pod(s, Shell(args.dry_run))
    if args.action == "all":
        pod.up()
        pod.install()
        try:
            pod.run(train_args)
        finally:
            if not args.keep:
                pod.down()
    elif args.action == "run":
        pod.run(train_args)
    else:
        getattr(pod, args.action)()
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
