"""The HTTP layer: OpenAI- and FauxPilot-compatible routes over the engine loop, API keys, limits, metrics and
the playground page. It only translates: every token comes from ``generate.Scheduler`` via ``engine.Engine``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..engine import Completion, Generator, Scheduler, SequenceOutput
from ..session import CodeCutter, build_prompt
from . import protocol as P
from .connections import DrainingServer, http_config
from .engine import Engine, EngineClosedError, Job, JobError, QueueFullError
from .metrics import CountRequests, Metrics
from .openapi import document as openapi_document

log = logging.getLogger("codegen_lm.serve")
STATIC = Path(__file__).resolve().parent / "static"
API_KEYS_ENV = "CODEGEN_LM_API_KEYS"
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_TOKENS = 256


@dataclass
class ServerConfig:
    model_name: str
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_batch: int = 16
    max_queue: int = 64  # sequences waiting beyond the decode batch before 429
    limits: P.Limits = field(default_factory=P.Limits)


def load_api_keys(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Keys from a file (one per line; blank lines and # comments ignored) and from $CODEGEN_LM_API_KEYS
    (comma-separated)."""
    keys: list[str] = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"API key file {path} does not exist; put one key per line in it")
        text = Path(path).read_text()
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"{path} holds no API key; put one key per line")
    keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return tuple(keys)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Server:
    """The state behind the routes: engine, tokenizer, limits, metrics."""

    def __init__(self, scheduler: Scheduler, config: ServerConfig):
        self.config, self.limits = config, config.limits
        self.tokenizer = scheduler.tokenizer
        self.n_positions = scheduler.config.n_positions
        self.vocab_size = len(self.tokenizer)
        self.engine = Engine(scheduler, config.max_queue)
        self.metrics = Metrics(self.engine)
        self.key_digests = [_digest(k) for k in config.api_keys]
        name = config.model_name
        self.model_names = {name, name.rstrip("/").split("/")[-1]}

    # -- checks ---------------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> None:
        if not self.key_digests:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise P.ApiError(401, "missing API key; send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = _digest(given.strip())
        matched = False
        for known in self.key_digests:  # constant time, and no early exit that would tell which key
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise P.ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.model_names:
            raise P.ApiError(404, f"model {model!r} is not served here; GET /v1/models lists the one that is",
                             param="model", code="model_not_found")
        return self.config.model_name

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, at most ``max_body_bytes``, received within ``body_timeout`` seconds."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise P.ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
        body = bytearray()

        async def receive() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise P.ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")

        try:
            await asyncio.wait_for(receive(), self.limits.body_timeout)
        except ClientDisconnect:
            raise _ClientGone() from None
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
            raise P.ApiError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s") from None
        return await asyncio.to_thread(P.loads, bytes(body))  # a megabyte of JSON must not stall other streams

    async def encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt (encoded off the event loop: a long prompt must not stall other streams)."""
        if not prompts:
            raise P.ApiError(400, "prompt is an empty list; give at least one prompt", param="prompt")
        if len(prompts) > self.limits.max_prompts:
            raise P.ApiError(400, f"{len(prompts)} prompts given; at most {self.limits.max_prompts} per request",
                             param="prompt")
        ids = await asyncio.to_thread(lambda: [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts])
        for row in ids:
            if any(not 0 <= t < self.vocab_size for t in row):
                raise P.ApiError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        return ids

    def submit(self, prompts: list[list[int]], params: Any) -> Job:
        P.check_prompt_length(prompts, params.max_new_tokens, self.n_positions)
        try:
            job = self.engine.submit(prompts, params)
        except QueueFullError as e:
            raise P.ApiError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except EngineClosedError as e:
            raise P.ApiError(503, str(e)) from None
        except ValueError as e:
            raise P.ApiError(400, str(e), param="n") from None
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return job

    # -- running a job --------------------------------------------------------------------------------

    async def collect(self, job: Job, outputs: AsyncIterator[list[tuple[int, SequenceOutput]]], request: Request,
                      endpoint: str, start: float) -> dict[tuple[int, int], Completion]:
        """Every completion in a job's ``outputs``; aborts the job at once if the client goes away or time runs out."""
        results: dict[tuple[int, int], Completion] = {}

        async def gather() -> None:
            first = True
            async for batch in outputs:
                if first:
                    self.metrics.ttft.labels(endpoint).observe(time.monotonic() - start)
                    first = False
                for p, out in batch:
                    if out.completion is not None:
                        results[(p, out.index)] = out.completion

        work = asyncio.create_task(gather())
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                self.metrics.aborted.labels("disconnect").inc()
                raise _ClientGone()
            try:
                work.result()
            except asyncio.TimeoutError:
                self.metrics.aborted.labels("timeout").inc()
                raise P.ApiError(504, f"the request did not finish within {self.limits.request_timeout:g} s; "
                                      "lower max_tokens or n") from None
            except JobError as e:
                raise P.ApiError(e.status, str(e)) from None
        finally:
            work.cancel()
            watcher.cancel()
            self.engine.abort(job)
        self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
        return results

    async def stream(self, job: Job, outputs: AsyncIterator[list[tuple[int, SequenceOutput]]], endpoint: str,
                     start: float, chunks: Any) -> AsyncIterator[str]:
        """Server-sent events: ``chunks(p, out)`` turns each of a job's outputs into chunk dicts; ends with
        [DONE]. When the client disconnects, Starlette cancels this generator and the ``finally`` frees the rows."""
        first = True
        try:
            if opening := "".join(map(_sse, chunks(None, None))):  # role, echoed prompts
                yield opening
            async for batch in outputs:
                if first:
                    self.metrics.ttft.labels(endpoint).observe(time.monotonic() - start)
                    first = False
                if events := "".join(_sse(chunk) for p, out in batch for chunk in chunks(p, out)):
                    yield events
            if closing := "".join(map(_sse, chunks(None, "end"))):  # usage, when asked for
                yield closing
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
        except asyncio.TimeoutError:
            self.metrics.aborted.labels("timeout").inc()
            self.metrics.stream_errors.labels(endpoint, "timeout").inc()
            yield _sse(P.ApiError(504, f"the request did not finish within {self.limits.request_timeout:g} s").body())
        except JobError as e:
            self.metrics.stream_errors.labels(endpoint, e.reason).inc()
            yield _sse(P.ApiError(e.status, str(e)).body())
        except asyncio.CancelledError:
            self.metrics.aborted.labels("disconnect").inc()
            raise
        finally:
            self.engine.abort(job)
        yield "data: [DONE]\n\n"


class _ClientGone(Exception):
    """The client closed the connection; nobody reads the answer."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stream_response(events: AsyncIterator[str], job: Job, server: Server) -> StreamingResponse:
    # The background abort covers a client that leaves before the first event (the generator never starts).
    return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(server.engine.abort, job),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def turn_codes(outputs: AsyncIterator[list[tuple[int, SequenceOutput]]], n: int
                     ) -> AsyncIterator[list[tuple[int, SequenceOutput]]]:
    """A chat job's outputs cut into turn code the way a session cuts them (``session.CodeCutter``, MTPB's
    truncation, applied as the text streams): text is passed on once it is sure to be code, a sample finishes
    at its cut, and the job ends once every sample is cut."""
    cutters = [CodeCutter() for _ in range(n)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    async for batch in outputs:
        cut = []
        for p, out in batch:
            cutter = cutters[out.index]
            if cutter.done:  # cut already; the rest of this sample is not code
                continue
            tokens[out.index] += out.token_ids
            piece = cutter.add(out.text)
            if out.finished and not cutter.done:
                piece += cutter.finish(out.finish_reason)
            completion = Completion(cutter.code, tokens[out.index], cutter.reason,
                                    cached_tokens=out.cached_tokens) if cutter.done else None
            cut.append((p, SequenceOutput(out.request_id, out.index, piece, out.token_ids, cutter.done,
                                          cutter.reason, completion, cached_tokens=out.cached_tokens)))
        yield cut
        if all(c.done for c in cutters):
            return


def create_app(scheduler: Scheduler, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``scheduler``'s model under ``config.model_name``."""
    server = Server(scheduler, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        log.info("serving %s (max batch %d, capacity %d sequences)", config.model_name, scheduler.max_batch,
                 server.engine.capacity)
        yield
        await server.engine.shutdown()

    app = FastAPI(title="codegen-lm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  version=__version__)
    app.state.server = server
    app.add_middleware(CountRequests, metrics=server.metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    auth = Depends(server.authenticate)

    @app.exception_handler(P.ApiError)
    async def api_error(request: Request, e: P.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, e: _ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        error = P.ApiError(e.status_code, message.get(e.status_code, str(e.detail)))
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(P.ApiError(500, f"internal error ({type(e).__name__})").body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = server.engine
        body = {"status": "shutting down" if engine.closed else "ok", "model": config.model_name,
                "running": engine.num_running, "waiting": engine.num_waiting, "pending": engine.pending,
                "capacity": engine.capacity}
        return JSONResponse(body, status_code=503 if engine.closed else 200)

    @app.get("/openapi.json", dependencies=[auth], include_in_schema=False)
    async def openapi() -> JSONResponse:
        if not hasattr(app.state, "openapi"):
            app.state.openapi = openapi_document(app.openapi(), config.limits, bool(config.api_keys))
        return JSONResponse(app.state.openapi)

    @app.get("/metrics", dependencies=[auth])
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "codegen-lm",
                "max_model_len": server.n_positions}
        return {"object": "list", "data": [card]}

    async def completions(request: Request, engine_name: str | None = None) -> Any:
        start = time.monotonic()
        req = P.parse(P.CompletionRequest, await server.read_json(request))
        # The engines route is FauxPilot's: editors put their own engine name in the path, so any is taken.
        model = config.model_name if engine_name is not None else server.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise P.ApiError(400, "best_of is not supported; leave it out or equal to n", param="best_of")
        if req.suffix:
            raise P.ApiError(400, "suffix (fill-in-the-middle) is not supported by CodeGen", param="suffix")
        if req.echo and req.logprobs is not None:
            raise P.ApiError(400, "echo with logprobs is not supported (prompt log-probabilities are not computed)",
                             param="echo")
        params = P.sampling_params(req, server.limits, req.max_tokens, COMPLETION_DEFAULT_TOKENS,
                                   logprobs=req.logprobs is not None)
        prompts = P.prompt_list(req.prompt)
        ids = await server.encode(prompts)
        job = server.submit(ids, params)
        texts = [p if isinstance(p, str) else server.tokenizer.decode(p) for p in prompts] if req.echo else None
        response_id, n, endpoint = P.new_id("cmpl"), req.n, "/v1/completions"
        outputs = job.outputs(server.limits.request_timeout)
        prompt_tokens = sum(map(len, ids))

        def logprobs_of(completion: Completion) -> dict[str, Any] | None:
            return None if req.logprobs is None else P.completion_logprobs(server.tokenizer, completion, 0)

        if req.stream:
            generated, cached = [0], {}

            def chunks(p: int | None, out: Any) -> list[dict[str, Any]]:
                if out is None:  # opening: the echoed prompts
                    return [P.envelope("text_completion", response_id, model,
                                       [{"text": texts[q], "index": q * n + j, "logprobs": None, "finish_reason": None}])
                            for q in range(len(prompts)) for j in range(n)] if texts else []
                if out == "end":
                    return [P.envelope("text_completion", response_id, model, [], usage=P.usage(
                        prompt_tokens, generated[0], P.cached_tokens(cached)))] if req.include_usage else []
                generated[0] += len(out.token_ids)
                cached[p] = out.cached_tokens
                if not out.text and not out.finished:
                    return []
                choice = {"text": out.text, "index": p * n + out.index, "finish_reason": out.finish_reason,
                          "logprobs": logprobs_of(out.completion) if out.finished else None}
                return [P.envelope("text_completion", response_id, model, [choice])]

            return _stream_response(server.stream(job, outputs, endpoint, start, chunks), job, server)

        results = await server.collect(job, outputs, request, endpoint, start)
        choices = []
        for (p, j), c in sorted(results.items()):
            prefix = texts[p] if texts else ""
            choices.append({"text": prefix + c.text, "index": p * n + j, "finish_reason": c.finish_reason,
                            "logprobs": logprobs_of(c)})
        completion_tokens = sum(len(c.token_ids) for c in results.values())
        cached = P.cached_tokens({p: c.cached_tokens for (p, _), c in results.items()})
        return P.envelope("text_completion", response_id, model, choices,
                          usage=P.usage(prompt_tokens, completion_tokens, cached))

    @app.post("/v1/completions", dependencies=[auth])
    async def openai_completions(request: Request) -> Any:
        return await completions(request)

    @app.post("/v1/engines/{engine}/completions", dependencies=[auth])
    async def engine_completions(engine: str, request: Request) -> Any:
        return await completions(request, engine)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request) -> Any:
        start = time.monotonic()
        req = P.parse(P.ChatRequest, await server.read_json(request))
        model = server.check_model(req.model)
        if len(req.messages) > server.limits.max_messages:
            raise P.ApiError(400, f"{len(req.messages)} messages given; at most {server.limits.max_messages}",
                             param="messages")
        if req.logprobs:
            raise P.ApiError(400, "logprobs is not supported on chat (a turn's code is cut from the sample); use "
                                  "/v1/completions with logprobs", param="logprobs")
        params = P.sampling_params(req, server.limits, req.max_completion_tokens or req.max_tokens,
                                   min(CHAT_DEFAULT_TOKENS, server.limits.max_tokens))
        prelude, turns, spec = P.chat_turns(req.messages)
        try:  # like a session, leave out the oldest turns when the conversation outgrows the model's positions
            prompt, _ = await asyncio.to_thread(build_prompt, prelude, turns, spec, server.tokenizer,
                                                server.n_positions, params.max_new_tokens)
        except ValueError as e:
            raise P.ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        ids = await server.encode([prompt])
        job = server.submit(ids, params)
        response_id, endpoint = P.new_id("chatcmpl"), "/v1/chat/completions"
        outputs = turn_codes(job.outputs(server.limits.request_timeout), req.n)

        if req.stream:
            generated, cached = [0], {}

            def chunks(p: int | None, out: Any) -> list[dict[str, Any]]:
                if out is None:
                    return [P.envelope("chat.completion.chunk", response_id, model,
                                       [{"index": j, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]) for j in range(req.n)]
                if out == "end":
                    return [P.envelope("chat.completion.chunk", response_id, model, [], usage=P.usage(
                        len(ids[0]), generated[0], P.cached_tokens(cached)))] if req.include_usage else []
                generated[0] += len(out.token_ids)
                cached[p] = out.cached_tokens
                result = []
                if out.text:
                    result.append({"index": out.index, "delta": {"content": out.text}, "logprobs": None,
                                   "finish_reason": None})
                if out.finished:
                    result.append({"index": out.index, "delta": {}, "logprobs": None,
                                   "finish_reason": out.finish_reason})
                return [P.envelope("chat.completion.chunk", response_id, model, [c]) for c in result]

            return _stream_response(server.stream(job, outputs, endpoint, start, chunks), job, server)

        results = await server.collect(job, outputs, request, endpoint, start)
        choices = [{"index": j, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for (_, j), c in sorted(results.items())]
        completion_tokens = sum(len(c.token_ids) for c in results.values())
        cached = P.cached_tokens({p: c.cached_tokens for (p, _), c in results.items()})
        return P.envelope("chat.completion", response_id, model, choices,
                          usage=P.usage(len(ids[0]), completion_tokens, cached))

    return app


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, *, served_model_name: str | None = None,
          quantize: str | None = None, compile: bool = False, dtype: str | None = None, device: str | None = None,
          api_key_file: str | None = None, max_batch: int = 16, max_queue: int = 64,
          limits: P.Limits | None = None, max_connections: int = 1024, header_timeout: float = 10.0,
          shutdown_timeout: float = 30.0, log_level: str = "info", prefix_cache_mb: float | None = None,
          prefill_chunk: int | None = None, speculative: Any = None) -> None:
    """Load ``model`` and serve it with uvicorn until SIGINT/SIGTERM. Shutting down drains first: ``/health`` answers
    503 and in-flight requests get ``shutdown_timeout`` seconds to finish, then end with an error (see
    ``connections``)."""
    keys = load_api_keys(api_key_file)
    if shutdown_timeout < 0:
        raise ValueError(f"the shutdown timeout must be >= 0 (got {shutdown_timeout:g} s)")
    if host not in LOOPBACK and not keys:
        log.warning("listening on %s without API keys: anyone who can reach it can use it", host)
    # The same loading as every other command (on CPU, fp32 weights through oneDNN's matmul).
    generator = Generator.from_pretrained(model, max_batch, compile, prefix_cache_mb, prefill_chunk, speculative,
                                          dtype=dtype, device=device or "auto", quantize=quantize)
    if compile:  # before the first request, which would otherwise wait for the compiles (and everyone behind it)
        from rich.console import Console

        console, started = Console(stderr=True), time.perf_counter()
        with console.status("compiling the decode step for the batch shapes a server meets (a minute or more on CPU)"):
            graphs = generator.warm_up()
        console.print(f"compiled {graphs} decode graphs in {time.perf_counter() - started:.0f} s")
    config = ServerConfig(served_model_name or model, keys, max_batch, max_queue, limits or P.Limits())
    app = create_app(generator.scheduler(), config)
    http = http_config(app, host, port, header_timeout=header_timeout, max_connections=max_connections,
                       log_level=log_level)
    DrainingServer(http, lambda: app.state.server.engine.drain(shutdown_timeout)).run()
