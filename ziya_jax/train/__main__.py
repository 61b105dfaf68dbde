"""python -m ziya_jax.train --config configs/X.py[:arg] --workdir DIR [--config.some.key=value ...]

Trains the config's stage (or each of its stages) into DIR; rerunning the same command resumes. Overrides name
existing config keys only (a typo is an error). Exit status: 0 done, 1 error, 2 bad usage, 3 diverged (non-finite
loss), 143 stopped by SIGTERM after saving.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m ziya_jax.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/X.py[:arg], the file defines get_config(arg)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard events, models")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r} (config overrides look like --config.train.seed=3)")
        overrides.append(item[len("--config.") :])
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ziya_jax.config import load_config, override
    from ziya_jax.sharding import initialize_distributed

    initialize_distributed()  # several hosts (TPU pod, SLURM, ZIYA_DISTRIBUTED=1): join the job first

    try:
        config = load_config(args.config)
        for item in overrides:
            override(config, item)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if "://" in args.workdir:
        print(
            f"error: --workdir {args.workdir}: give a filesystem path (every host of a multi-host job must see "
            "the same one; mount a bucket with gcsfuse, as launch/tpu.py does)",
            file=sys.stderr,
        )
        return 2
    from ziya_jax.train.loop import Preempted, TrainingDiverged, check_config, run

    try:
        check_config(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        print(f"error: --workdir {args.workdir} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.workdir, exist_ok=True)
        with open(os.path.join(args.workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=1))
    except OSError as e:
        print(f"error: --workdir {args.workdir}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return 2
    try:
        results = run(config, args.workdir)
    except (ValueError, FileNotFoundError) as e:  # settings only the run itself can check
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return 143
    report(results)
    return 0


def report(results: dict) -> None:
    """Each stage's evaluation: the synthetic table (and example answers), and the benchmark scores."""
    for name, scores in results.items():
        benchmarks = scores.get("benchmarks", {})
        synthetic = {k: v for k, v in scores.items() if k != "benchmarks"}
        if synthetic:
            from ziya_jax.evaluate.synthetic import format_table

            print(f"\n== {name}: synthetic test split ==")
            print(format_table(synthetic))
        for task, task_scores in benchmarks.items():
            shown = " ".join(f"{k}={v:.1f}" for k, v in task_scores.items() if isinstance(v, float))
            print(f"== {name}: {task}: {shown}")


if __name__ == "__main__":
    sys.exit(main())
