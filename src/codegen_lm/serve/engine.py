"""The engine loop: one background thread owns the generation ``Scheduler`` and steps it; the server's event
loop talks to it only through a command queue (add / abort) and receives outputs on per-job asyncio queues.

A *job* is one HTTP request: one scheduler request per prompt, each asking for ``n`` samples. All
bookkeeping (capacity, which job a scheduler request belongs to) happens on the event loop's thread, so it
needs no locks; the engine thread touches nothing but the scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import SamplingParams, Scheduler, SequenceOutput

log = logging.getLogger("codegen_lm.serve")


class QueueFullError(Exception):
    """Every decode row and queue slot is taken; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is at capacity; retry after {retry_after} s")
        self.retry_after = retry_after


class EngineClosedError(Exception):
    """The server is shutting down and takes no new work."""


class JobError(Exception):
    """A job could not finish: the scheduler rejected it (400), generation failed (500), or the server shut down
    (503). ``reason`` labels it in the metrics."""

    REASONS = {400: "bad_request", 500: "generation_error", 503: "shutdown"}

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status, self.reason = status, self.REASONS[status]


@dataclass
class Job:
    """One HTTP request's share of the engine: its scheduler requests and the queue their outputs arrive on."""

    id: str
    request_ids: list[str]
    n: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: int = 0  # sequences not finished yet
    created: float = field(default_factory=time.monotonic)
    done: bool = False

    def __post_init__(self) -> None:
        self.unfinished = len(self.request_ids) * self.n
        self.prompt_index = {rid: i for i, rid in enumerate(self.request_ids)}

    async def outputs(self, timeout: float) -> AsyncIterator[list[tuple[int, SequenceOutput]]]:
        """Batches of ``(prompt index, output)`` pairs, each batch all that has arrived since the last one (a
        consumer that fell behind catches up in one write), until every sequence has finished. Raises
        ``asyncio.TimeoutError`` once the job is ``timeout`` seconds old, ``JobError`` when it fails."""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(timeout - (time.monotonic() - self.created), 0), self.queue.put_nowait, _EXPIRED)
        remaining = len(self.request_ids) * self.n
        try:
            while remaining:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                batch = []
                for item in items:
                    if item is _EXPIRED:
                        raise asyncio.TimeoutError
                    if isinstance(item, JobError):
                        raise item
                    remaining -= item.finished
                    batch.append((self.prompt_index[item.request_id], item))
                yield batch
        finally:
            timer.cancel()


_EXPIRED = object()  # put on a job's queue when its time is up


@dataclass
class StepCounts:
    """What one step did (or, kept by the engine, the totals so far)."""

    generated: int = 0  # tokens sampled
    prompt_computed: int = 0  # prompt tokens whose keys and values were computed
    prompt_reused: int = 0  # prompt tokens whose keys and values were copied from earlier work
    evictions: int = 0  # prefix cache leaves evicted
    decode_rows: int = 0  # decoding sequences in forward passes (row-steps)
    decode_tokens: int = 0  # tokens those rows appended (> rows when speculation keeps proposals)
    proposed: int = 0  # speculative tokens verified
    accepted: int = 0  # of them, kept


class Engine:
    """Drives ``scheduler`` in a background thread. ``capacity`` sequences may be in flight (decoding or
    queued) at once; ``submit`` refuses more with ``QueueFullError``."""

    def __init__(self, scheduler: Scheduler, max_queue: int = 64):
        self.scheduler = scheduler
        self.capacity = scheduler.max_batch + max_queue
        self.pending = 0  # sequences submitted and not finished (event-loop thread only)
        self.jobs: dict[str, Job] = {}  # scheduler request id -> job (event-loop thread only)
        self.closed = False
        self.num_waiting = 0  # scheduler state after the last step, for metrics (written by the engine thread)
        self.num_running = 0
        self.on_step: Any = None  # called with each step's ``StepCounts`` (metrics)
        self._counted = StepCounts()  # the scheduler's and prefix cache's running totals at the last step
        self._latency = 1.0  # smoothed seconds per finished job, for Retry-After
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- event-loop side --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="codegen-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Job:
        """Queue one scheduler request per prompt; all of them or none."""
        if self.closed:
            raise EngineClosedError("the server is shutting down; retry on another instance")
        wanted = len(prompts) * params.n
        if wanted > self.capacity:
            raise ValueError(f"this request asks for {wanted} sequences; the server holds at most {self.capacity}")
        if self.pending + wanted > self.capacity:
            backlog = (self.pending + wanted) / self.scheduler.max_batch
            raise QueueFullError(max(1, math.ceil(backlog * self._latency)))
        number = next(self._ids)
        job = Job(f"job-{number}", [f"{number}-{i}" for i in range(len(prompts))], params.n)
        for rid, ids in zip(job.request_ids, prompts):
            self.jobs[rid] = job
            self._commands.put(("add", rid, ids, params))
        self.pending += job.unfinished
        self._wake.set()
        return job

    def abort(self, job: Job) -> None:
        """Stop a job now (client gone, timeout): its rows are freed before the next decode step."""
        if job.done:
            return
        self._finish(job)
        for rid in job.request_ids:
            self._commands.put(("abort", rid))
        self._wake.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new work, give the jobs still running up to ``timeout`` seconds to finish, then ``shutdown``."""
        self.closed = True
        deadline = time.monotonic() + timeout
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.shutdown()

    async def shutdown(self) -> None:
        """Refuse new work, end the jobs still running with an error, and stop the thread."""
        self.closed = True
        for job in {id(j): j for j in self.jobs.values()}.values():
            job.queue.put_nowait(JobError("the server shut down before this request finished; retry on another "
                                          "instance", status=503))
            self.abort(job)
        self._commands.put(("stop",))
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _finish(self, job: Job) -> None:
        job.done = True
        self.pending -= job.unfinished
        job.unfinished = 0
        for rid in job.request_ids:
            self.jobs.pop(rid, None)
        self._latency = 0.8 * self._latency + 0.2 * (time.monotonic() - job.created)

    def _dispatch(self, outputs: list[SequenceOutput]) -> None:
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:  # aborted (or failed) while the step ran
                continue
            if out.error is not None:  # this request alone failed; the scheduler goes on with the others
                self._fail(out.request_id, JobError(f"generation failed for this request: {out.error}"))
                continue
            job.queue.put_nowait(out)
            if out.finished:
                job.unfinished -= 1
                self.pending -= 1
                if job.unfinished == 0:
                    self._finish(job)

    def _fail(self, request_id: str, error: JobError) -> None:
        job = self.jobs.get(request_id)
        if job is not None:
            job.queue.put_nowait(error)
            self.abort(job)

    # -- engine thread ----------------------------------------------------------------------------------

    def _post(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _count(self, outputs: list[SequenceOutput]) -> StepCounts:
        """This step's counts: the scheduler's and prefix cache's totals less those at the last step."""
        stats, cache = self.scheduler.stats, self.scheduler.prefix_cache
        now = StepCounts(0, stats.prompt_tokens_computed, stats.prompt_tokens_reused, cache.evictions if cache else 0,
                         stats.decode_rows, stats.decode_tokens, stats.proposed_tokens, stats.accepted_tokens)
        step = StepCounts(*(b - a for a, b in zip(dataclasses.astuple(self._counted), dataclasses.astuple(now))))
        step.generated = sum(len(o.token_ids) for o in outputs)
        self._counted = now
        return step

    def _apply_commands(self) -> bool:
        """Apply queued adds/aborts; False once asked to stop."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command[0] == "stop":
                return False
            if command[0] == "abort":
                self.scheduler.abort(command[1])
                continue
            _, rid, ids, params = command
            try:
                self.scheduler.add_request(ids, params, request_id=rid)
            except ValueError as e:
                self._post(self._fail, rid, JobError(str(e), status=400))

    def _run(self) -> None:
        with torch.inference_mode():  # the scheduler's cache tensors are inference tensors; abort() writes them
            self._loop_forever()

    def _loop_forever(self) -> None:
        while True:
            self._wake.clear()
            if not self._apply_commands():
                return
            if not self.scheduler.has_unfinished():
                self.num_waiting = self.num_running = 0
                self._wake.wait()
                continue
            try:
                outputs = self.scheduler.step()
            except Exception as e:  # a failed step must not take the server down: fail what it held, start afresh
                log.exception("generation step failed")
                for rid in list(self.scheduler.requests):
                    self._post(self._fail, rid, JobError(f"generation failed ({type(e).__name__}: {e})"))
                self.scheduler = self.scheduler.fresh()
                self._counted = StepCounts(evictions=self._counted.evictions)  # (the new scheduler counts from 0)
                continue
            self.num_waiting, self.num_running = self.scheduler.num_waiting, self.scheduler.num_running
            if self.on_step is not None:
                self.on_step(self._count(outputs))
            if outputs:
                self._post(self._dispatch, outputs)
