"""What the server tests share: a tiny checkpoint with the real tokenizer, a server running in a thread (with the
production connection settings), a scheduler whose steps the test releases, and small helpers."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import torch

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.engine import Generator, SamplingParams, Scheduler
from codegen_lm.serve import Limits, ServerConfig, create_app
from codegen_lm.serve.connections import DrainingServer, http_config

DATA = Path(__file__).resolve().parents[1] / "src" / "codegen_lm" / "data"
KEY = "sk-test-0123456789"
MODEL = "codegen-tiny"
N_POSITIONS = 1024


def save_tiny_checkpoint(folder: Path, padding_bias: float | None = None) -> Path:
    """A random 2-layer model with the released models' 51200 logit rows and the real tokenizer. With
    ``padding_bias``, the 905 padding rows' biases are set to it (a model that would pick them if it could)."""
    torch.manual_seed(0)
    config = CodeGenConfig(vocab_size=51200, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=N_POSITIONS)
    model = CodeGenForCausalLM(config)
    if padding_bias is not None:
        with torch.no_grad():
            model.lm_head.bias[50295:] = padding_bias
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, folder / name)
    return folder


class GatedScheduler(Scheduler):
    """A scheduler that takes a step only when the test lets it (``run``, ``open``), so that no test races the
    machine's speed. While held, a step makes no progress and returns at once, and the engine loop goes on applying
    adds and aborts between such steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.stepped = threading.Semaphore(0), threading.Semaphore(0)
        self.opened = False

    def step(self):
        if self.opened:
            return super().step()
        if not self.gate.acquire(timeout=0.01):
            return []
        try:
            return super().step()
        finally:
            self.stepped.release()

    def run(self, steps: int = 1) -> None:
        """Let ``steps`` steps run, and wait until they have (there must be work to step)."""
        for _ in range(steps):
            self.gate.release()
            assert self.stepped.acquire(timeout=60), "the engine did not take the step"

    def open(self) -> None:
        """Stop holding: every later step runs at once."""
        self.opened = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(generator: Generator, keys: tuple[str, ...] = (KEY,), max_batch: int = 8, max_queue: int = 64,
            scheduler: type[Scheduler] = Scheduler, header_timeout: float = 10.0, max_connections: int = 1024,
            shutdown_timeout: float = 2.0, **limits):
    """A server for ``generator`` on a free port, configured as ``codegen-lm serve`` configures it."""
    app = create_app(scheduler(generator.model, generator.tokenizer, max_batch, prefix_cache=generator.prefix_cache),
                     ServerConfig(MODEL, keys, max_batch, max_queue, Limits(**limits)))
    port = free_port()
    config = http_config(app, "127.0.0.1", port, header_timeout=header_timeout, max_connections=max_connections,
                         log_level="warning")
    server = DrainingServer(config, lambda: app.state.server.engine.drain(shutdown_timeout))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    gated = app.state.server.engine.scheduler
    try:
        yield SimpleNamespace(url=url, port=port, state=app.state.server, server=server, thread=thread,
                              scheduler=gated, headers={"Authorization": f"Bearer {KEY}"},
                              client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60))
    finally:
        if isinstance(gated, GatedScheduler):
            gated.open()
        server.should_exit = True
        thread.join(30)


def alone(generator: Generator, prompt: str, **params) -> list:
    """What a request gets when it is the only one: its own scheduler, nothing else in the batch."""
    return generator.complete([prompt], SamplingParams(**params))[0]


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Wait for something the server does on its own (not for the machine to be fast enough: the bound is generous)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def settle(state) -> None:
    """Wait until the engine holds no sequence (what every test leaves behind)."""
    engine = state.engine
    wait_until(lambda: not (engine.pending or engine.jobs or engine.num_running or engine.num_waiting),
               "the engine holds no sequence")


def metric(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", headers=srv.headers).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def raw(srv, data: bytes) -> socket.socket:
    """A socket to the server that has sent ``data``."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(data)
    return sock


def read_all(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply
