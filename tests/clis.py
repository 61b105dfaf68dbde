"""The project's commands as the tests run them, as a user does: `python -m ziya_jax.MODULE` from the repository
root on the CPU, and the server on a free loopback port."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(module: str, *args, stdin=None, text=True) -> subprocess.CompletedProcess:
    """`python -m ziya_jax.MODULE ARGS` -> the finished process, its output captured (bytes unless `text`)."""
    return subprocess.run(
        [sys.executable, "-m", f"ziya_jax.{module}", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=text,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def run_cli(module: str, *args, stdin=None) -> str:
    """`python -m ziya_jax.MODULE ARGS`, which must succeed -> its stdout."""
    done = cli(module, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m ziya_jax.serve --checkpoint CHECKPOINT FLAGS` on a free loopback port, up once /health answers;
    stopped by SIGTERM on close() or at the end of a `with`. Its output goes to a file: a pipe that nobody reads
    while it runs could fill up and stall it."""

    def __init__(self, checkpoint, *flags):
        self.checkpoint, self.port = checkpoint, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ziya_jax.serve", "--checkpoint", str(checkpoint), "--port", str(self.port), *flags],
            cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 180
        while self.proc.poll() is None and time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        why = "did not come up in 180 s" if self.proc.poll() is None else f"exited ({self.proc.returncode})"
        raise RuntimeError(f"the server {why}:\n{self.close()}")

    def close(self) -> str:
        """Stop the server (SIGTERM; SIGKILL if it is still there after 60 s) -> all it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.seek(0)
        with self.log:
            return self.log.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
