"""Sampling through OpenAI-compatible ``/v1/completions`` endpoints: vLLM (serving the GPT-J export), TGI, or
``codegen-lm serve`` replicas, so that an evaluation outgrows one machine.

Each request goes to the least-loaded replica. ``n``, ``seed`` and stop strings are sent where the server takes
them; where it refuses one (a 400 naming it), the request is split into smaller ones down to one sample each,
sent without a seed, or with fewer stop strings, and callers cut completions at every stop string themselves
in any case. Sample ``j`` of a prompt is asked for with ``seed + j``, so any split gives the same samples from a
server that seeds each sample as ``codegen-lm serve`` does.

429 and 503 are retried after their ``Retry-After`` (for as long as ``Retry.busy_seconds``); other server
errors, timeouts, dropped connections and malformed bodies with exponential backoff and full jitter, at most
``Retry.attempts`` times in a row. Past that the run ends with an :class:`EndpointError`; what was done is kept.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


class EndpointError(RuntimeError):
    """The endpoints cannot give what the run needs: a refused request, or a server that keeps failing."""


@dataclass(frozen=True)
class Retry:
    attempts: int = 8  # failures in a row (5xx, timeouts, dropped connections, bad bodies) before giving up
    base: float = 0.5  # seconds; the n-th retry waits uniform(0, min(cap, base * 2**n))
    cap: float = 30.0
    busy_seconds: float = 900.0  # how long 429/503 answers may go on for one request


DEFAULT_RETRY = Retry()


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...] = ()


def read_api_key(file: str | None, env: str = "OPENAI_API_KEY") -> str | None:
    """The API key: the first non-empty line of ``file``, else ``$env``; None when neither is set."""
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"API key file {file} does not exist")
        key = next((line.strip() for line in path.read_text().splitlines() if line.strip()), "")
        if not key:
            raise ValueError(f"API key file {file} is empty; put the key on its first line")
        return key
    return os.environ.get(env) or None


def base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all mean the same server."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"--base-url {url!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
    return re.sub(r"/v1/?$", "", url.rstrip("/"))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` before the earliest stop string: what an engine given all of them returns."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


@dataclass
class _Replica:
    url: str
    in_flight: int = 0
    failures: int = 0  # in a row
    requests: int = 0


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class _Capabilities:
    """What the servers have accepted so far (shrinks on refusals, shared by all requests)."""

    per_request: int  # samples per request
    stops: int | None = None  # None: all of them
    seed: bool = True


class Endpoints:
    """One or more OpenAI-compatible servers that serve the same model. Use as ``async with``."""

    def __init__(self, urls: Sequence[str], api_key: str | None = None, concurrency: int = 16, timeout: float = 600.0,
                 retry: Retry | None = None):
        if not urls:
            raise ValueError("give at least one --base-url")
        if concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
        self.replicas = [_Replica(base_url(u)) for u in urls]
        self.concurrency, self.timeout, self.retry = concurrency, timeout, retry or DEFAULT_RETRY
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self.model: str | None = None
        self.max_model_len: int | None = None
        self.caps = _Capabilities(per_request=1 << 30)
        self.requests = 0  # sent, retries included
        self.notes: list[str] = []  # how generation adapted to the servers, once each, for the person running it

    async def __aenter__(self) -> "Endpoints":
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 30.0)),
            limits=httpx.Limits(max_connections=self.concurrency + len(self.replicas),
                                max_keepalive_connections=self.concurrency),
        )
        self._slots = asyncio.Semaphore(self.concurrency)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    # -- the model -------------------------------------------------------------------------------------------
    async def resolve_model(self, name: str | None) -> str:
        """The served model's name: ``name``, checked against each replica's ``/v1/models``, or the one model
        they all list. Also reads its context length (``max_model_len``) when the server says it."""
        listed: dict[str, list[str]] = {}
        for replica in self.replicas:
            body = await self._get(replica, "/v1/models")
            try:
                cards = body["data"]
                listed[replica.url] = [card["id"] for card in cards]
                lengths = [card.get("max_model_len") for card in cards if card["id"] == name or len(cards) == 1]
            except (KeyError, TypeError):
                raise EndpointError(f"{replica.url}/v1/models did not answer with an OpenAI model list") from None
            if lengths and isinstance(lengths[0], int):
                self.max_model_len = lengths[0] if self.max_model_len is None else min(self.max_model_len, lengths[0])
        if name is None:
            names = {n for ids in listed.values() for n in ids}
            if len(names) != 1 or any(len(ids) != 1 for ids in listed.values()):
                where = "; ".join(f"{url}: {', '.join(ids) or 'none'}" for url, ids in listed.items())
                raise ValueError(f"the endpoints do not serve exactly one model ({where}); name it with --served-model-name")
            name = names.pop()
        missing = [url for url, ids in listed.items() if name not in ids]
        if missing:
            raise ValueError(f"{', '.join(missing)} does not serve {name!r} (it lists {', '.join(listed[missing[0]]) or 'none'})")
        self.model = name
        return name

    async def _get(self, replica: _Replica, path: str) -> Any:
        try:
            r = await self._client.get(replica.url + path, headers=self._headers)
        except httpx.HTTPError as e:
            raise EndpointError(f"cannot reach {replica.url}: {type(e).__name__}: {e}") from None
        if r.status_code in (401, 403):
            raise EndpointError(f"{replica.url} refused the API key ({r.status_code}); set it with --api-key-file or "
                                f"the API key environment variable")
        if r.status_code != 200:
            raise EndpointError(f"{replica.url}{path} answered {r.status_code}: {_message(r)[0]}")
        try:
            return r.json()
        except ValueError:
            raise EndpointError(f"{replica.url}{path} did not answer with JSON; is this an OpenAI-compatible server?") from None

    # -- sampling ----------------------------------------------------------------------------------------------
    async def samples(self, prompt: str, indices: Sequence[int], sampling: Sampling) -> AsyncIterator[tuple[int, str]]:
        """``(j, text)`` for each sample index ``j`` of ``prompt`` (drawn with ``seed + j``), as requests finish;
        texts are as the server returned them (cut by the caller)."""
        runs = _runs(sorted(indices))
        pending = {asyncio.ensure_future(self._run(prompt, first, count, sampling)) for first, count in runs}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    for item in future.result():
                        yield item
        finally:
            for future in pending:
                future.cancel()

    async def _run(self, prompt: str, first: int, count: int, sampling: Sampling) -> list[tuple[int, str]]:
        """Samples first .. first + count - 1, in as many requests as the server wants."""
        out: list[tuple[int, str]] = []
        while count:
            texts = await self._complete(prompt, first, count, sampling)
            out += [(first + j, t) for j, t in enumerate(texts)]
            first, count = first + len(texts), count - len(texts)
        return out

    async def _complete(self, prompt: str, first: int, count: int, sampling: Sampling) -> list[str]:
        """Up to ``count`` samples from ``first`` on, in one request; none when a refusal narrowed what the next
        request asks for. The request is made once it holds a concurrency slot, with what the servers accept by then."""
        async with self._slots:
            caps = self.caps
            n = min(count, caps.per_request)
            stops = list(sampling.stop if caps.stops is None else sampling.stop[: caps.stops])
            body: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": n, "max_tokens": sampling.max_tokens,
                                    "temperature": sampling.temperature, "top_p": sampling.top_p}
            if stops:
                body["stop"] = stops
            if caps.seed:
                body["seed"] = sampling.seed + first
            try:
                data = await self._post(body)
            except _Refused as e:
                self._adapt(e, n, len(stops), "seed" in body)
                return []
        choices = sorted(data["choices"], key=lambda c: c["index"])
        if len(choices) < n and n > 1:  # n ignored: one sample per request from now on
            if caps.per_request > 1:
                caps.per_request = 1
                self.notes.append(f"the server returned {len(choices)} of n={n} samples; asking for one per request")
            return []
        if len(choices) != n:
            raise EndpointError(f"asked for {n} samples, the server returned {len(choices)}")
        return [c["text"] for c in choices]

    def _adapt(self, e: _Refused, n: int, stops: int, seed: bool) -> None:
        """Fall back on a refused parameter that the request sent (n > 1, stop strings, seed): other requests in
        flight may be refused for it too, so each change only ever narrows. Anything else ends the run."""
        what, text, caps = (e.param or "").lower(), e.message.lower(), self.caps
        if (what == "n" or re.search(r"\bn\b|best_of", text)) and n > 1:
            if caps.per_request > n // 2:
                caps.per_request = max(1, n // 2)
                self.notes.append(f"the server refused n={n} ({e.message}); asking for {caps.per_request} per request")
        elif (what == "stop" or "stop" in text) and stops:
            fewer = 4 if stops > 4 else 0
            if caps.stops is None or caps.stops > fewer:
                caps.stops = fewer
                self.notes.append(f"the server refused {stops} stop strings ({e.message}); sending {fewer}, cutting at "
                                  "all of them here")
        elif (what == "seed" or "seed" in text) and seed:
            if caps.seed:
                caps.seed = False
                self.notes.append(f"the server refused seed ({e.message}); sampling without seeds, so a rerun will "
                                  "not give the same samples")
        else:
            raise EndpointError(f"the server refused the request ({e.status}): {e.message}")

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One completion request, retried as the module docstring says (the caller holds a concurrency slot)."""
        failures, busy_since = 0, None
        while True:
            replica = min(self.replicas, key=lambda r: (r.in_flight, r.failures, r.requests))
            replica.in_flight += 1
            replica.requests += 1
            self.requests += 1
            try:
                r = await self._client.post(replica.url + "/v1/completions", json=body, headers=self._headers)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                r, problem = None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            finally:
                replica.in_flight -= 1
            if r is not None and r.status_code in (429, 503):  # busy, not failing: wait as told
                busy_since = busy_since or time.monotonic()
                if time.monotonic() - busy_since > self.retry.busy_seconds:
                    raise EndpointError(f"{replica.url} has been too busy ({r.status_code}) for "
                                        f"{self.retry.busy_seconds:g} s; try again later, or with a lower --concurrency")
                delay = _retry_after(r)
                delay = self._backoff(failures) if delay is None else delay * random.uniform(1.0, 1.1)
                await asyncio.sleep(delay)
                continue
            if r is not None:
                if r.status_code == 200:
                    data = _completion_body(r)
                    if data is not None:
                        replica.failures = 0
                        return data
                    problem = "a malformed completion body"
                elif r.status_code in (401, 403):
                    raise EndpointError(f"{replica.url} refused the API key ({r.status_code}); set it with "
                                        "--api-key-file or the API key environment variable")
                elif 400 <= r.status_code < 500 and r.status_code != 408:
                    raise _Refused(r.status_code, *_message(r))
                else:
                    problem = f"{r.status_code} {_message(r)[0]}"
            replica.failures += 1
            failures += 1
            if failures >= self.retry.attempts:
                raise EndpointError(f"{replica.url} keeps failing: {failures} attempts in a row, the last: {problem}; "
                                    "the samples made so far are kept: run the same command again to resume")
            await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        return random.uniform(0, min(self.retry.cap, self.retry.base * 2 ** failures))


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as (first, count)."""
    runs: list[tuple[int, int]] = []
    for j in indices:
        if runs and runs[-1][0] + runs[-1][1] == j:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((j, 1))
    return runs


def _completion_body(r: httpx.Response) -> dict[str, Any] | None:
    try:
        data = r.json()
        choices = data["choices"]
        if not isinstance(choices, list) or not all(isinstance(c["text"], str) and isinstance(c["index"], int)
                                                      for c in choices):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return data


def _message(r: httpx.Response) -> tuple[str, str | None]:
    """The error message and parameter of an OpenAI (``{"error": {...}}``), vLLM or TGI error body."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:300].strip() or r.reason_phrase, None
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))[:500], error.get("param")
    return str(error)[:500], None


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 600.0)


def show_notes(endpoints: Endpoints, progress_bar: Any = None) -> None:
    """Say how generation adapted to the servers (on the progress bar's console, else as warnings)."""
    for note in endpoints.notes:
        if progress_bar is not None:
            progress_bar.console.print(f"note: {note}")
        else:
            warnings.warn(note, stacklevel=2)


def connect(urls: Sequence[str], served_model_name: str | None = None, api_key: str | None = None,
            concurrency: int = 16, timeout: float = 600.0) -> Endpoints:
    """Endpoints with their model resolved (``Endpoints.resolve_model``), ready for ``async with``."""
    endpoints = Endpoints(urls, api_key, concurrency, timeout)

    async def resolve() -> None:
        async with endpoints:
            await endpoints.resolve_model(served_model_name)

    asyncio.run(resolve())
    return endpoints
