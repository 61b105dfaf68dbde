"""Train on a multi-node GPU cluster with SLURM: one process per node, each with all of its node's GPUs.

    python launch/slurm.py --settings cluster.ini --nodes 4 --config configs/ziya_chat_14b.py:stage=3 submit

Actions: `submit` writes an sbatch script into --log-dir and submits it (srun starts
`python -m ziya_jax.train` in this checkout on every node with ZIYA_DISTRIBUTED=1; jax finds the coordinator
from SLURM's environment), then follows the job's log until the job ends (--detach returns at once); `logs --job-id N`
follows a log again; `cancel --job-id N` cancels (the trainers get SIGTERM, checkpoint and exit). The config's
mesh puts data parallelism across nodes (dcn) and fsdp inside each. --dry-run prints the script and every
command instead.

Partition, account, nodes, GPUs per node, workdir and the environment setup come from flags or from the
[slurm] section of an INI file given with --settings (flags win).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LaunchError, Shell, main_guard, settings, split_at_dashes  # noqa: E402

ACTIONS = ("submit", "logs", "cancel")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # on the cluster's shared filesystem


def sbatch_script(s: dict, train_args: list[str]) -> str:
    """The batch script: SBATCH options, the environment setup line, then srun of the trainer on every node."""
    options = {
        "job-name": s["name"],
        "nodes": s["nodes"],
        "ntasks-per-node": 1,
        "gpus-per-node": s["gpus_per_node"],
        "partition": s.get("partition"),
        "account": s.get("account"),
        "time": s.get("time"),
        "chdir": REPO,
        "output": _log_path(s, "%j"),
    }
    train = shlex.join(
        ["python", "-m", "ziya_jax.train", "--config", s["config"], "--workdir", s["workdir"], *train_args]
    )
    lines = ["#!/bin/bash", *(f"#SBATCH --{k}={v}" for k, v in options.items() if v), "set -euo pipefail"]
    if s.get("setup"):
        lines.append(s["setup"])  # e.g. module load cuda; source ~/venv/bin/activate
    # jax on SLURM would give each process one GPU (one task per GPU); this job runs one process per node that
    # drives all of the node's GPUs, so that fsdp stays inside a node and only data parallelism crosses nodes.
    gpus = ",".join(str(i) for i in range(int(s["gpus_per_node"])))
    lines += ["export ZIYA_DISTRIBUTED=1", f"export JAX_LOCAL_DEVICE_IDS={gpus}", f"srun --kill-on-bad-exit=1 {train}"]
    return "\n".join(lines) + "\n"


def _log_path(s: dict, job: str) -> str:
    return os.path.join(os.path.abspath(s.get("log_dir") or "slurm-logs"), f"{s['name']}-{job}.log")


def follow(shell: Shell, s: dict, job: str) -> None:
    """The job's log from the start until the job leaves the queue (tail exits with the squeue poll)."""
    log = shlex.quote(_log_path(s, job))
    shell.run(
        [
            "bash",
            "-c",
            f"while [ ! -e {log} ] && squeue -h -j {job} | grep -q .; do sleep 10; done; "
            f"tail -n +1 -F {log} & t=$!; while squeue -h -j {job} | grep -q .; do sleep 30; done; "
            f"sleep 5; kill $t",
        ]
    )


def main(argv=None) -> int:
    argv, train_args = split_at_dashes(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python launch/slurm.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--settings", help="INI file whose [slurm] section gives any of the settings below")
    parser.add_argument("--name", help="job name (default ziya-train)")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", help="wall-clock limit, e.g. 24:00:00")
    parser.add_argument("--setup", help="shell line run before training, e.g. 'source ~/venv/bin/activate'")
    parser.add_argument("--config", help="training config, e.g. configs/ziya_chat_14b.py:stage=3")
    parser.add_argument("--workdir", help="where the trainer writes checkpoints and metrics (shared filesystem)")
    parser.add_argument("--log-dir", help="where the script and logs go (default ./slurm-logs)")
    parser.add_argument("--job-id", help="for logs and cancel")
    parser.add_argument("--detach", action="store_true", help="submit returns without following the log")
    parser.add_argument("--dry-run", action="store_true", help="print the script and commands instead of running")
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("action", "settings", "job_id", "detach", "dry_run")}
    need = ("nodes", "gpus_per_node", "config", "workdir") if args.action == "submit" else ()
    s = settings(args.settings, "slurm", flags, required=need)
    s["name"] = s.get("name") or "ziya-train"
    shell = Shell(args.dry_run)
    if args.action != "submit":
        if not args.job_id:
            raise LaunchError(f"{args.action} needs --job-id")
        if args.action == "cancel":
            shell.run(["scancel", args.job_id])
        else:
            follow(shell, s, args.job_id)
        return 0
    script = sbatch_script(s, train_args)
    path = os.path.join(os.path.abspath(s.get("log_dir") or "slurm-logs"), f"{s['name']}.sbatch")
    if args.dry_run:
        print(f"# {path}\n{script}", end="")
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(script)
    job = shell.output(["sbatch", "--parsable", path], dry_value="JOBID")
    if job is None:
        raise LaunchError(f"sbatch refused {path}")
    job = job.split(";")[0]  # --parsable prints 'id' or 'id;cluster'
    print(f"job {job}: log {_log_path(s, job)}", flush=True)
    if not args.detach:
        follow(shell, s, job)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
