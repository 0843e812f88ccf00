"""Processes for tests and benchmarks: a free port, a uvicorn server on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO

__all__ = ["UvicornProcess", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class UvicornProcess:
    """One uvicorn process serving ``app`` on 127.0.0.1 and a free port, for tests and
    benchmarks that need a real server (several of them share one PostgreSQL).

    Args:
        app: the import string, e.g. ``"mymodule:create_app"``.
        factory: ``app`` is a factory to call (uvicorn's ``--factory``).
        app_dir: a directory to import ``app`` from.
        cwd: the working directory of the process.
        env: its environment (default: this process's).
        args: more uvicorn options.

    ``stop()`` terminates it (then kills it if it lingers); it is also a context manager.
    """

    def __init__(
        self,
        app: str,
        *,
        factory: bool = False,
        app_dir: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--lifespan", "on", "--log-level", "warning"]
        command += ["--no-access-log", *(["--factory"] if factory else [])]
        command += [*(["--app-dir", str(app_dir)] if app_dir is not None else []), *args]
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self, limit: int = 3000) -> str:
        """The last ``limit`` characters the process printed."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Wait until the server accepts connections (uvicorn listens only after its
        lifespan startup is done); raise ``RuntimeError`` with its output otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited at startup:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"uvicorn did not listen within {timeout}s:\n{self.output()}"
                    ) from None
                time.sleep(0.05)  # waiting for a subprocess to listen, not moving time

    def stop(self) -> None:
        """Terminate the process (kill it after 10 s) and close its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()

    def __enter__(self) -> UvicornProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
