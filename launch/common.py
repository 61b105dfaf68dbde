"""What both launchers share: settings from a file overridden by flags, and running (or, with --dry-run, only
printing) shell commands."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys


class LaunchError(Exception):
    """A problem the user can fix (a missing setting, a failed command); printed without a traceback."""


def settings(path: str | None, section: str, flags: dict, required: tuple[str, ...]) -> dict:
    """The [section] of an INI settings file, overridden by the flags given (None = not given). Every name in
    `required` must come from one or the other: projects, zones, buckets and topologies are never defaulted."""
    values = {}
    if path:
        if not os.path.isfile(path):
            raise LaunchError(f"settings file {path} not found")
        parser = configparser.ConfigParser()
        parser.read(path)
        if parser.has_section(section):
            values.update({k.replace("-", "_"): v for k, v in parser.items(section)})
        unknown = set(values) - set(flags)
        if unknown:
            raise LaunchError(f"{path} [{section}]: unknown settings {sorted(unknown)}; known: {sorted(flags)}")
    values.update({k: v for k, v in flags.items() if v is not None})
    missing = [k for k in required if not values.get(k)]
    if missing:
        raise LaunchError(
            "missing settings: "
            + ", ".join(f"--{k.replace('_', '-')}" for k in missing)
            + (f" (or in [{section}] of a --settings file)" if not path else f" (not in {path})")
        )
    return values


def truthy(value) -> bool:
    """A yes/no setting from a flag (True) or a settings file ('true', 'yes', '1')."""
    return value is True or str(value).lower() in ("1", "true", "yes")


class Shell:
    """Runs commands, echoing each first; with dry_run it only prints them (the test of a launcher reads them)."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, argv: list[str], check: bool = True) -> int:
        print(("" if self.dry_run else "+ ") + shlex.join(argv), flush=True)
        if self.dry_run:
            return 0
        code = subprocess.call(argv)
        if check and code:
            raise LaunchError(f"command failed with status {code}: {shlex.join(argv)}")
        return code

    def output(self, argv: list[str], dry_value: str | None) -> str | None:
        """stdout of a command (a job id, a state), or None when it fails (e.g. describing what does not exist);
        `dry_value` stands in for it in a dry run."""
        print(("" if self.dry_run else "+ ") + shlex.join(argv), flush=True)
        if self.dry_run:
            return dry_value
        done = subprocess.run(argv, capture_output=True, text=True)
        return None if done.returncode else done.stdout.strip()


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, the trainer's: everything after `--`)."""
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def main_guard(main) -> int:
    """Runs a launcher's main, turning LaunchError into one line on stderr and exit status 2."""
    try:
        return main()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
