"""Start ptychostream IOCs as subprocesses on a private loopback network (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ptychostream.testing.loopback import EpicsNet, Slot

__all__ = ["IOCProcess"]


@dataclass
class IOCProcess:
    """``python -m ptychostream ARGS`` on one port slot of ``net``; ready when it prints ``ready``."""

    args: list[str]
    prefix: str
    slot: Slot
    net: EpicsNet
    proc: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)
    echo: bool = False

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.net.server_env(self.slot))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, timeout: float = 60.0, ready_text: str = "ready") -> "IOCProcess":
        self.output = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ptychostream", *self.args], env=self.env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line.rstrip())
                if self.echo:
                    print(line.rstrip(), flush=True)
                if ready_text in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{' '.join(self.args)} did not start:\n" + "\n".join(self.output[-40:]))
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def log(self) -> str:
        return "\n".join(self.output)
