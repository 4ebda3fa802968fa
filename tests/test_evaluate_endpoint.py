"""Evaluation through OpenAI-compatible endpoints: against our own ``codegen-lm serve`` of a tiny model the samples
and pass@k equal an in-process run's; through a proxy that injects faults (429 with Retry-After, 500, a reset
mid-response, a response slower than the client waits, malformed JSON, refused n / seed) the run still ends with
exactly n samples per task; a run killed in the middle resumes exactly; keys never reach the run folder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings, strategies as st

from conftest import require_bwrap, save_checkpoint
from codegen_lm.evaluate import endpoint
from codegen_lm.evaluate.endpoint import Retry, base_url, cut_at_stops, read_api_key
from codegen_lm.evaluate.humaneval import STOP as HUMANEVAL_STOP
from codegen_lm.evaluate.mtpb import STOP as MTPB_STOP
from codegen_lm.evaluate.runs import SettingsMismatchError, read_jsonl
from codegen_lm.session import truncate_code

SRC = Path(__file__).resolve().parents[1] / "src"
NAME = "tiny"
FAST = Retry(attempts=4, base=0.01, cap=0.05, busy_seconds=60)
NAMES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
# Whether a sample passes depends on its text (the length of the string it ends up in), so pass@k is neither 0 nor 1.
PROBLEMS = [{"task_id": f"T/{i}", "prompt": f'def {name}():\n    return 1\n\n\nNOTE = """{name}:', "entry_point": name,
             "test": '"""\n\n\ndef check(candidate):\n    assert len(NOTE) % 2 == 0\n'} for i, name in enumerate(NAMES)]
MTPB_PROBLEM = {"id": "1", "category": "math", "name": "t", "description": "t", "max_gen_length": 6,
                "prompts": ["Assign {a} to x.", "Print x."], "inputs": [{"a": i} for i in range(5)], "outputs": list(range(5))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, seconds: float = 180.0) -> None:
    """Wait until ``condition()`` holds; the bound only catches a hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("endpoint") / NAME, vocab_size=50295, n_embd=32, n_layer=1, n_head=4,
                           n_positions=2048)


@pytest.fixture(scope="module")
def server(tiny) -> str:
    """``codegen-lm serve`` of the tiny model, in a process of its own (as a replica would be)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "codegen_lm.cli", "serve", "--model", str(tiny), "--port", str(port),
                             "--served-model-name", NAME, "--dtype", "fp32", "--device", "cpu", "--log-level", "warning"],
                            env=dict(os.environ, PYTHONPATH=str(SRC)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"the server exited: {proc.stderr.read().decode()[-2000:]}"
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, "the server to start")
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("problems")
    (folder / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    (folder / "mtpb.jsonl").write_text(json.dumps(MTPB_PROBLEM) + "\n")
    return folder


def cli(*args: str):
    from typer.testing import CliRunner

    from codegen_lm.cli import app

    return CliRunner().invoke(app, list(args))


def humaneval_args(files: Path, out: Path, *extra: str, n: int = 2, temperature: str = "0") -> list[str]:
    return ["eval", "humaneval", "--problems", str(files / "problems.jsonl"), "--n", str(n), "--k", "1,2",
            "--temperature", temperature, "--max-new-tokens", "8", "--out", str(out), *extra]


def keyed(path: Path, *fields: str) -> dict:
    records = read_jsonl(path)
    table = {tuple(r[f] for f in fields): r for r in records}
    assert len(table) == len(records), "a sample or verdict appears twice"
    return table


@pytest.fixture(scope="module")
def in_process(tiny, files, tmp_path_factory) -> Path:
    """The reference: the same evaluation, greedy, in-process."""
    require_bwrap()
    out = tmp_path_factory.mktemp("reference") / "run"
    r = cli(*humaneval_args(files, out, "--model", str(tiny), "--dtype", "fp32", "--device", "cpu"))
    assert r.exit_code == 0, r.output
    return out


def same_run(out: Path, reference: Path) -> None:
    """Exactly n samples per task, none twice, the reference's samples, verdicts and pass@k."""
    samples = keyed(out / "samples.jsonl", "task_id", "completion_id")
    want = keyed(reference / "samples.jsonl", "task_id", "completion_id")
    assert sorted(samples) == sorted(want) == sorted((p["task_id"], j) for p in PROBLEMS for j in range(2))
    assert {k: s["completion"] for k, s in samples.items()} == {k: s["completion"] for k, s in want.items()}
    verdicts = {k: r["passed"] for k, r in keyed(out / "results.jsonl", "task_id", "completion_id").items()}
    assert verdicts == {k: r["passed"] for k, r in keyed(reference / "results.jsonl", "task_id", "completion_id").items()}
    ours, theirs = (json.loads((p / "summary.json").read_text())["pass_at_k"] for p in (out, reference))
    assert ours == theirs


# -- a proxy that injects faults ---------------------------------------------------------------------------

class FaultProxy:
    """HTTP between eval and a server. Completion requests take the next of ``faults`` ("429", "500", "reset",
    "slow", "malformed", "pass") and then pass; ``refuse`` names request fields answered with a 400 naming them
    (``n`` only when above 1); ``gate_after`` holds every completion request after that many until ``release``;
    ``key`` demands that API key; ``models`` replaces the /v1/models list. Every request is logged."""

    def __init__(self, upstream: str, faults=(), refuse=(), gate_after: int | None = None, key: str | None = None,
                 models: list[str] | None = None, fail_after: int | None = None):
        self.upstream, self.faults, self.refuse = upstream, list(faults), set(refuse)
        self.gate_after, self.key, self.models, self.fail_after = gate_after, key, models, fail_after
        self.log: list[dict] = []  # {"body", "action", "time", "status"}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._gate = asyncio.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        self._started.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._gate.set)

    def completions(self, status: int | None = None) -> list[dict]:
        return [e for e in self.log if status is None or e["status"] == status]

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()

        async def main() -> None:
            self._client = httpx.AsyncClient(timeout=120)
            server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._started.set()
            await self._stop.wait()
            server.close()
            self._gate.set()
            await self._client.aclose()

        self._loop.run_until_complete(main())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if self.key and headers.get("authorization") != f"Bearer {self.key}":
                    await self._answer(writer, 401, {"error": {"message": "bad key", "param": None}})
                elif path.endswith("/v1/models") and self.models is not None:
                    await self._answer(writer, 200, {"object": "list", "data": [{"id": m} for m in self.models]})
                elif path.endswith("/v1/completions"):
                    if not await self._completion(reader, writer, json.loads(body)):
                        return
                else:
                    r = await self._client.request(method, self.upstream + path, content=body)
                    await self._answer(writer, r.status_code, r.content)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _completion(self, reader, writer, body: dict) -> bool:
        """Answer one completion request; False when the connection is gone."""
        entry = {"body": body, "time": time.monotonic(), "status": None}
        self.log.append(entry)
        number = len(self.log)
        refused = [f for f in self.refuse if f in body and (f != "n" or body["n"] > 1)]
        if refused:
            action = "refuse"
        elif self.faults:
            action = self.faults.pop(0)
        elif self.fail_after is not None and number > self.fail_after:
            action = "500"
        elif self.gate_after is not None and number > self.gate_after:
            action = "gate"
        else:
            action = "pass"
        entry["action"] = action
        if action == "gate":
            await self._gate.wait()
            return False
        if action == "refuse":
            entry["status"] = 400
            await self._answer(writer, 400, {"error": {"message": f"{refused[0]} is not supported here", "param": refused[0]}})
        elif action == "429":
            entry["status"] = 429
            await self._answer(writer, 429, {"error": {"message": "busy"}}, {"Retry-After": "1"})
        elif action == "500":
            entry["status"] = 500
            await self._answer(writer, 500, {"error": {"message": "boom"}})
        elif action == "malformed":
            entry["status"] = 200
            await self._answer(writer, 200, b'{"choices": [{"text": ')
        elif action == "reset":  # headers and half a body, then RST
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"choi")
            await writer.drain()
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif action == "slow":  # no answer until the client gives up and closes
            await asyncio.wait_for(reader.read(1), 120)
            return False
        else:
            r = await self._client.post(self.upstream + "/v1/completions", json=body)
            entry["status"] = r.status_code
            await self._answer(writer, r.status_code, r.content)
        return True

    @staticmethod
    async def _answer(writer, status: int, body, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
                     .encode() + data)
        await writer.drain()


# -- the same numbers either way -----------------------------------------------------------------------------

@pytest.mark.slow
def test_greedy_humaneval_through_our_server_equals_in_process(server, files, in_process, tmp_path):
    out = tmp_path / "run"
    r = cli(*humaneval_args(files, out, "--base-url", server + "/v1"))
    assert r.exit_code == 0, r.output
    same_run(out, in_process)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["served_model"] == NAME and settings["model"] is None and settings["temperature"] == 0
    assert 0 < json.loads((out / "summary.json").read_text())["pass_at_k"]["1"] < 1  # a comparison that means something


@pytest.mark.slow
def test_greedy_mtpb_through_our_server_equals_in_process(server, tiny, files, tmp_path):
    require_bwrap()
    runs = {}
    for how, args in (("in-process", ["--model", str(tiny), "--dtype", "fp32", "--device", "cpu"]),
                      ("endpoint", ["--base-url", server, "--concurrency", "3"])):
        out = tmp_path / how
        r = cli("eval", "mtpb", "--problems", str(files / "mtpb.jsonl"), "--n", "2", "--temperature", "0", "--out", str(out), *args)
        assert r.exit_code == 0, r.output
        runs[how] = out
    samples = [keyed(runs[h] / "samples.jsonl", "id", "case", "sample") for h in runs]
    assert len(samples[0]) == 10 and samples[0] == samples[1]
    verdicts = [{k: v["passed"] for k, v in keyed(runs[h] / "results.jsonl", "id", "case", "sample").items()} for h in runs]
    assert verdicts[0] == verdicts[1]


# -- faults ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_faults_between_eval_and_server(server, files, in_process, tmp_path, monkeypatch):
    """429 with Retry-After, 500, a reset mid-response, a response slower than the client waits, a malformed body,
    and n and seed refused: the run still ends with the reference's samples, verdicts and pass@k."""
    monkeypatch.setattr(endpoint, "DEFAULT_RETRY", FAST)
    out = tmp_path / "run"
    faults = ["429", "500", "reset", "slow", "malformed"]
    with FaultProxy(server, faults=faults, refuse={"n", "seed"}) as proxy:
        r = cli(*humaneval_args(files, out, "--base-url", proxy.url, "--request-timeout", "3", "--concurrency", "3"))
        assert r.exit_code == 0, r.output
    same_run(out, in_process)
    said = " ".join(r.output.split())  # as the console wrapped it
    for note in ("refused n=2", "refused 5 stop strings", "sampling without seeds, so a rerun will not give the same"):
        assert said.count(note) == 1, r.output  # said once each
    actions = [e["action"] for e in proxy.log]
    assert set(faults) <= set(actions) and "refuse" in actions
    served = [e["body"] for e in proxy.completions(200) if e["action"] == "pass"]
    assert served and all(b["n"] == 1 and "seed" not in b and len(b["stop"]) <= 4 for b in served)  # the fallbacks held
    busy = next(e for e in proxy.log if e["action"] == "429")
    again = next(e for e in proxy.log if e["body"] == busy["body"] and e["time"] > busy["time"])
    assert again["time"] - busy["time"] >= 1.0  # Retry-After: 1 was honoured


@pytest.mark.slow
def test_a_server_that_keeps_failing_ends_the_run_and_keeps_what_was_done(server, files, in_process, tmp_path, monkeypatch):
    monkeypatch.setattr(endpoint, "DEFAULT_RETRY", FAST)
    out = tmp_path / "run"
    with FaultProxy(server, fail_after=3) as proxy:  # the first 3 requests (one 400 for the 5 stop strings) get through
        r = cli(*humaneval_args(files, out, "--base-url", proxy.url, "--concurrency", "1"))
    assert r.exit_code == 1 and "keeps failing: 4 attempts in a row, the last: 500" in r.output, r.output
    assert "run the same command again to resume" in r.output and "Traceback" not in r.output
    kept = keyed(out / "samples.jsonl", "task_id", "completion_id")
    assert len(kept) == 2 * 2 and not (out / "results.jsonl").exists()
    with FaultProxy(server) as proxy:
        r = cli(*humaneval_args(files, out, "--base-url", proxy.url))
    assert r.exit_code == 0, r.output
    assert len(proxy.completions(200)) == len(PROBLEMS) - 2  # only what was missing
    same_run(out, in_process)


@pytest.mark.slow
def test_resume_after_a_kill_in_the_middle(server, files, in_process, tmp_path):
    out = tmp_path / "run"
    with FaultProxy(server, gate_after=4) as proxy:  # 1 refused (5 stop strings), 3 served, then everything waits
        proc = subprocess.Popen([sys.executable, "-m", "codegen_lm.cli", *humaneval_args(files, out, "--base-url", proxy.url,
                                                                                            "--concurrency", "1")],
                                env=dict(os.environ, PYTHONPATH=str(SRC)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: len(read_jsonl(out / "samples.jsonl")) == 3 * 2 and proxy.log[-1]["action"] == "gate",
                 "three problems' samples")
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        proxy.release()
    done = {task for task, _ in keyed(out / "samples.jsonl", "task_id", "completion_id")}
    with FaultProxy(server) as proxy:
        r = cli(*humaneval_args(files, out, "--base-url", proxy.url))
    assert r.exit_code == 0, r.output
    asked = [e["body"]["prompt"] for e in proxy.completions(200)]
    assert sorted(asked) == sorted(p["prompt"] for p in PROBLEMS if p["task_id"] not in done)  # only the missing, once
    same_run(out, in_process)
    # other settings are refused, as for in-process runs
    r = cli(*humaneval_args(files, out, "--base-url", server, temperature="0.5"))
    assert isinstance(r.exception, SettingsMismatchError) and "temperature: 0.0 there, 0.5 now" in str(r.exception)


# -- the model's name and the key -----------------------------------------------------------------------------

@pytest.mark.slow
def test_api_key_from_a_file_or_the_environment_is_never_written(server, files, tmp_path, monkeypatch):
    require_bwrap()
    key = "sk-secret-0123456789abcdef"
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"\n{key}\n")
    with FaultProxy(server, key=key) as proxy:
        out = tmp_path / "with-file"
        r = cli(*humaneval_args(files, out, "--base-url", proxy.url, "--api-key-file", str(key_file)))
        assert r.exit_code == 0, r.output
        monkeypatch.setenv("MY_KEY", key)
        r = cli(*humaneval_args(files, tmp_path / "with-env", "--base-url", proxy.url, "--api-key-env", "MY_KEY"))
        assert r.exit_code == 0, r.output
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        r = cli(*humaneval_args(files, tmp_path / "without", "--base-url", proxy.url))
        assert r.exit_code == 1 and "refused the API key (401)" in r.output, r.output
    for folder in (out, tmp_path / "with-env"):
        for path in folder.rglob("*"):
            assert key.encode() not in path.read_bytes(), path


def test_the_served_model_name(server, files, tmp_path):
    with FaultProxy(server, models=["a", "b"]) as proxy:
        r = cli(*humaneval_args(files, tmp_path / "x", "--base-url", proxy.url))
        assert r.exit_code != 0 and "do not serve exactly one model" in str(r.exception) and "--served-model-name" in str(r.exception)
        r = cli(*humaneval_args(files, tmp_path / "x", "--base-url", proxy.url, "--base-url", server))
        assert "do not serve exactly one model" in str(r.exception)
    r = cli(*humaneval_args(files, tmp_path / "x", "--base-url", server, "--served-model-name", "other"))
    assert "does not serve 'other' (it lists tiny)" in str(r.exception)


def test_bad_endpoint_options(files, tmp_path):
    require_bwrap()  # the sandbox is checked first
    r = cli(*humaneval_args(files, tmp_path / "x", "--base-url", "localhost:8000"))
    assert "is not an http(s) URL" in str(r.exception)
    r = cli(*humaneval_args(files, tmp_path / "x", "--base-url", "http://127.0.0.1:9", "--model", "m"))
    assert "give one of them" in str(r.exception)
    r = cli("eval", "humaneval", "--samples", str(files / "problems.jsonl"), "--base-url", "http://127.0.0.1:9")
    assert "leave out --model and --base-url" in str(r.exception)
    r = cli(*humaneval_args(files, tmp_path / "x", "--base-url", f"http://127.0.0.1:{free_port()}"))
    assert r.exit_code == 1 and "cannot reach http://127.0.0.1" in r.output
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_api_key(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(str(tmp_path / "empty"))


def test_base_urls_and_retry_after():
    assert base_url("http://h:8000") == base_url("http://h:8000/") == base_url("http://h:8000/v1/") == "http://h:8000"
    assert endpoint._retry_after(httpx.Response(429, headers={"Retry-After": "3"})) == 3.0
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < endpoint._retry_after(httpx.Response(503, headers={"Retry-After": when})) <= 31
    assert endpoint._retry_after(httpx.Response(429)) is None


# -- cutting at stop strings here gives what the engine gives --------------------------------------------------

TEXT = st.lists(st.sampled_from(["\n", "#", " x", "print(1)", "def f():", "'''", '"""', "if", "class", "<|endoftext|>", "y = 2"]),
                max_size=30).map("".join)


@given(TEXT)
@settings(max_examples=300, deadline=None)
def test_cutting_at_some_stop_strings_then_all_equals_all(text):
    """A server allowed 4 of HumanEval's 5 stop strings, then the 5 cut here: the engine's cut at all 5."""
    assert cut_at_stops(cut_at_stops(text, HUMANEVAL_STOP[:4]), HUMANEVAL_STOP) == cut_at_stops(text, HUMANEVAL_STOP)


@given(TEXT)
@settings(max_examples=300, deadline=None)
def test_mtpb_stop_never_changes_the_turn(text):
    """Generation may stop at MTPB's stop string: the truncated turn is the same as from the whole text."""
    assert truncate_code(cut_at_stops(text, MTPB_STOP)) == truncate_code(text)
