"""A server under test in its own process: started, waited for until /health answers, its peak RSS sampled while it
runs, and stopped. Shared by the serving benchmarks."""

from __future__ import annotations

import socket
import subprocess
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``args`` (a command that serves on ``port``) run as a context manager; ``peak_rss`` in bytes."""

    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None):
        self.args, self.env, self.port, self.peak_rss = args, env, port, 0
        self.url = f"http://127.0.0.1:{port}"
        self._stop = threading.Event()

    def __enter__(self) -> "ServerProcess":
        import httpx
        import psutil

        self.process = subprocess.Popen(self.args, env=self.env)
        while True:  # (a first compile or a large model may take minutes: no deadline but the process's own exit)
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        process = psutil.Process(self.process.pid)

        def sample() -> None:
            while not self._stop.wait(0.1):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)

        threading.Thread(target=sample, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def metric(self, name: str) -> float:
        """The sum of a Prometheus series (all its labels) from /metrics."""
        import httpx

        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
