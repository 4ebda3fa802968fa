"""The Multi-Turn Programming Benchmark (Nijkamp et al., 2022): 115 problems, each a few natural-language
turns; the model writes the code of one turn at a time, seeing the program so far (DESIGN §4).

For each of a problem's 5 test cases, ``{var}`` in the prompts becomes ``str(value)`` (``{{``/``}}`` become
braces: ``str.format``, as in the original sampler); the history starts
as ``# Import libraries.\\n\\nimport numpy as np\\n\\n``; each turn appends ``# {prompt}\\n``, samples a
completion (at most the problem's ``max_gen_length`` tokens), truncates it and appends it plus ``\\n\\n``.
The program runs in the sandbox (20 s); what its last ``print`` printed (its last expression is printed
when it does not end with a print, as in the original harness) must equal the expected output, after the
original's conversions (numpy and pandas values to Python ones, a different type cast to the expected one;
floats within 1e-6). Unlike the original, dict and None outputs are compared rather than always failing,
and a program that raises fails even if it printed a matching value before. A problem passes for a sample
when all 5 cases pass. The run folder is laid out and resumed as for HumanEval.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from ..sandbox import Limits, Sandbox
from ..session import MTPB_PRELUDE, format_turn, truncate_code
from .report import progress, status_rows, table
from .runs import JsonlWriter, read_jsonl, start_run

TIMEOUT = 20.0
# MTPB's truncation always cuts before three newlines, and cutting the text there first never changes where it
# cuts: so generation may stop there, in-process and at an endpoint alike.
STOP = ("\n\n\n",)
MAX_GEN_LENGTH = 256  # tokens per turn for the problems (39-45) that do not set max_gen_length; the original's default


def load_problems(path: str | Path | None = None) -> list[dict[str, Any]]:
    """MTPB problems, from ``path`` or the copy shipped with the package."""
    if path is None:
        text = resources.files("codegen_lm").joinpath("data/mtpb.jsonl").read_text(encoding="utf-8")
        source = "the shipped mtpb.jsonl"
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"MTPB problem file {path} does not exist")
        text, source = Path(path).read_text(encoding="utf-8"), str(path)
    problems = [json.loads(line) for line in text.splitlines() if line.strip()]
    for p in problems:
        missing = {"id", "prompts", "inputs", "outputs", "category"} - set(p)
        # Problem 57 lists one output more than it has inputs; pairing them in order (zip) is what the original does.
        if missing or len(p.get("inputs", [])) > len(p.get("outputs", [])):
            raise ValueError(f"{source}: problem {p.get('id')!r} lacks {sorted(missing) or 'an output for every input'}")
    return problems


def problems_sha256(path: str | Path | None = None) -> str:
    """Identifies the problem set in a run's settings."""
    data = resources.files("codegen_lm").joinpath("data/mtpb.jsonl").read_bytes() if path is None else Path(path).read_bytes()
    return hashlib.sha256(data).hexdigest()


def fill(prompt: str, values: dict[str, Any]) -> str:
    """The prompt of one test case: each ``{var}`` replaced by ``str(value)``, and ``{{``/``}}`` (the data's
    escapes for literal braces, in problems 9, 11, 12, 46 and 50) turned into braces: ``str.format``, as the
    original sampler does."""
    try:
        return prompt.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"MTPB prompt {prompt[:60]!r} cannot be filled with {sorted(values)}: {e}") from None


def turn_prefix(history: str, prompt: str) -> str:
    """What the model sees before writing a turn's code."""
    return f"{history}# {prompt}\n"


# Runs in the sandbox: executes the history with print() recorded, then compares what the last print call
# printed (its first argument) with the expected output, the way the original harness does.
_CHECK = r'''
import ast, builtins, json
HISTORY = json.loads(%(history)s)
EXPECTED = json.loads(%(expected)s)

def with_print(code):
    """Print the last statement's value unless the program ends with a print call (the original rewrite)."""
    tree = ast.parse(code)
    last = tree.body[-1] if tree.body else None
    value = getattr(last, "value", None)
    ends_with_print = isinstance(value, ast.Call) and getattr(value.func, "id", "").startswith("print")
    if isinstance(value, ast.expr) and not ends_with_print:
        last.value = ast.Call(func=ast.Name(id="print", ctx=ast.Load()), args=[value], keywords=[])
        ast.fix_missing_locations(tree)
    return tree

def equivalent(got, want):
    kind = str(type(got))
    if kind == "<class 'pandas.core.series.Series'>":
        got = got.to_list()
    elif isinstance(got, list) and got and isinstance(got[0], tuple):
        got = [list(t) for t in got]
    elif type(got).__module__ == "numpy":
        got = got.tolist() if hasattr(got, "tolist") else got
    if type(got) != type(want):
        if type(want) == bool or want is None:  # bool("False") is True: compare as text
            got, want = str(got), str(want)
        else:
            got = type(want)(got)
    if type(want) == float:
        return abs(got - want) < 1e-6
    return got == want

printed = []
def print(*args, **kwargs):
    printed.append(args)
    builtins.print(*args, **kwargs)

try:
    program = compile(with_print(HISTORY), "<program>", "exec")
except SyntaxError:
    program = compile(HISTORY, "<program>", "exec")  # reports the syntax error
exec(program, {"__name__": "__main__", "print": print})
assert printed and printed[-1], "the program printed nothing"
got = printed[-1][0]
assert equivalent(got, EXPECTED), "printed %%.200r, expected %%.200r" %% (got, EXPECTED)
'''


def check_program(history: str, expected: Any) -> str:
    """A program that runs ``history`` and fails unless its printed result matches ``expected``."""
    return _CHECK % {"history": repr(json.dumps(history)), "expected": repr(json.dumps(expected))}


@dataclass
class Settings:
    """What an MTPB run depends on; a resumed run must have the same."""

    problems: str  # sha256 of the problem file
    model: str | None = None  # the checkpoint generating in-process
    n: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    seed: int = 0
    timeout: float = TIMEOUT
    limit: int | None = None  # only the first this many problems
    served_model: str | None = None  # the model's name at the endpoints generating the turns


def _have(path: Path) -> set[tuple[str, int, int]]:
    return {(s["id"], s["case"], s["sample"]) for s in read_jsonl(path)}


def pending(problems: Sequence[dict[str, Any]], path: Path, n: int) -> list[dict[str, Any]]:
    """The problems some of whose samples are not in ``path`` yet."""
    have = _have(path)
    return [p for p in problems if _missing(p, n, have)]


def _missing(problem: dict[str, Any], n: int, have: set[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """The (case, sample) pairs of ``problem`` still to generate."""
    return [(case, j) for case in range(len(problem["inputs"])) for j in range(n) if (problem["id"], case, j) not in have]


def turn_room(prefix: str, problem: dict[str, Any], tokenizer: Any, n_positions: int) -> int:
    """Tokens a turn may take: the problem's ``max_gen_length``, or what is left of the model's positions."""
    return min(problem.get("max_gen_length", MAX_GEN_LENGTH), n_positions - len(tokenizer.encode(prefix)))


def _record(problem: dict[str, Any], case: int, sample: int, turns: list[str], history: str) -> dict[str, Any]:
    return {"id": problem["id"], "case": case, "sample": sample, "turns": turns, "program": history,
            "expected": problem["outputs"][case]}


def _progress_task(progress_bar: Any, problems: Sequence[dict[str, Any]], n: int, have: set[tuple[str, int, int]]) -> Any:
    """A bar counting turns, one per (problem, case, sample, prompt)."""
    if progress_bar is None:
        return None
    total = sum(len(p["prompts"]) * len(p["inputs"]) * n for p in problems)
    done = sum(len(p["prompts"]) for p in problems for case in range(len(p["inputs"])) for j in range(n)
               if (p["id"], case, j) in have)
    return progress_bar.add_task("generating turns", total=total, completed=done)


def generate_samples(generator: Any, problems: Sequence[dict[str, Any]], settings: Settings, path: Path,
                     progress_bar: Any = None) -> None:
    """Append, in-process, the multi-turn samples (``n`` per test case) that ``path`` does not have yet.

    One record per (problem, case, sample): the turns' truncated completions and the final program. A
    problem's missing histories advance together, one ``Generator.complete`` call per turn (and seed)."""
    from ..engine import SamplingParams

    have = _have(path)
    task = _progress_task(progress_bar, problems, settings.n, have)
    limit = generator.model.config.n_positions
    with JsonlWriter(path) as out:
        for problem in problems:
            rows = _missing(problem, settings.n, have)
            histories = [MTPB_PRELUDE] * len(rows)
            turns: list[list[str]] = [[] for _ in rows]
            for prompt in problem["prompts"] if rows else ():
                specs = [fill(prompt, problem["inputs"][case]) for case, _ in rows]
                prefixes = [turn_prefix(h, spec) for h, spec in zip(histories, specs)]
                # Each history has its own room left in the context; sample j of every case draws with seed + j.
                rooms = [turn_room(p, problem, generator.tokenizer, limit) for p in prefixes]
                seeds = [settings.seed + j for _, j in rows]
                texts = [""] * len(rows)  # no room left: an empty turn
                for room, seed in sorted({(r, s) for r, s in zip(rooms, seeds) if r > 0}):
                    group = [i for i in range(len(rows)) if (rooms[i], seeds[i]) == (room, seed)]
                    params = SamplingParams(max_new_tokens=room, temperature=settings.temperature, top_p=settings.top_p,
                                            n=1, seed=seed, stop=list(STOP))
                    for i, (completion,) in zip(group, generator.complete([prefixes[i] for i in group], params)):
                        texts[i] = completion.text
                for i, text in enumerate(texts):
                    turns[i].append(truncate_code(text))
                    histories[i] += format_turn(specs[i], turns[i][-1])
                if progress_bar:
                    progress_bar.advance(task, len(rows))
            for i, (case, j) in enumerate(rows):
                out.write(_record(problem, case, j, turns[i], histories[i]))


def generate_samples_from_endpoints(endpoints: Any, problems: Sequence[dict[str, Any]], settings: Settings, path: Path,
                                    progress_bar: Any = None) -> None:
    """The same through OpenAI-compatible endpoints (``evaluate.endpoint.Endpoints``, its model resolved): each
    history goes turn by turn, one request per turn, its prompt built here exactly as in-process (the model's
    context length from ``/v1/models``, else CodeGen's 2048); histories run concurrently."""
    from ..tokenizer import CodeGenTokenizer
    from .endpoint import Sampling, show_notes

    have = _have(path)
    task = _progress_task(progress_bar, problems, settings.n, have)
    tokenizer, limit = CodeGenTokenizer(), endpoints.max_model_len or 2048

    async def history(problem: dict[str, Any], case: int, j: int, out: JsonlWriter) -> None:
        turns: list[str] = []
        program = MTPB_PRELUDE
        for prompt in problem["prompts"]:
            spec = fill(prompt, problem["inputs"][case])
            prefix = turn_prefix(program, spec)
            room = turn_room(prefix, problem, tokenizer, limit)
            text = ""
            if room > 0:
                sampling = Sampling(room, settings.temperature, settings.top_p, settings.seed, STOP)
                async for _, text in endpoints.samples(prefix, [j], sampling):
                    pass
            turns.append(truncate_code(text))
            program += format_turn(spec, turns[-1])
            if progress_bar:
                progress_bar.advance(task)
        out.write(_record(problem, case, j, turns, program))

    async def run(out: JsonlWriter) -> None:
        async with endpoints:
            await asyncio.gather(*(history(p, case, j, out) for p in problems for case, j in _missing(p, settings.n, have)))

    try:
        with JsonlWriter(path) as out:
            asyncio.run(run(out))
    finally:
        show_notes(endpoints, progress_bar)


def execute(samples: Sequence[dict[str, Any]], sandbox: Sandbox, path: Path, progress_bar: Any = None,
            limits: Limits | None = None) -> list[dict[str, Any]]:
    """Run every sample's program (those without a verdict in ``path`` yet), appending verdicts; return all."""
    key = lambda r: (r["id"], r["case"], r["sample"])  # noqa: E731
    done = {key(r): r for r in read_jsonl(path)}
    todo = [s for s in samples if key(s) not in done]
    task = progress_bar.add_task("running programs", total=len(samples), completed=len(samples) - len(todo)) if progress_bar else None
    with JsonlWriter(path) as out:
        for i, result in sandbox.run_many((check_program(s["program"], s["expected"]) for s in todo), limits):
            record = {"id": todo[i]["id"], "case": todo[i]["case"], "sample": todo[i]["sample"], "passed": result.passed,
                      "status": result.status, "reason": result.reason, "seconds": round(result.seconds, 3)}
            out.write(record)
            done[key(record)] = record
            if progress_bar:
                progress_bar.advance(task)
    return [done[key(s)] for s in samples]


def summarize(problems: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pass rate: the share of (problem, sample) pairs whose every test case passed; overall and per category."""
    cases: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for r in results:
        cases[(r["id"], r["sample"])].append(bool(r["passed"]))
    category = {p["id"]: p["category"] for p in problems}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for (pid, _), passed in cases.items():
        by_category[category[pid]].append(all(passed))
    everything = [ok for oks in by_category.values() for ok in oks]
    return {
        "pass_rate": sum(everything) / len(everything),
        "per_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
        "test_case_pass_rate": sum(bool(r["passed"]) for r in results) / len(results),
        "problems": len({pid for pid, _ in cases}),
        "programs": len(results),
        "statuses": dict(Counter(r["status"] for r in results)),
    }


def evaluate(out: Path, settings: Settings, problems: Sequence[dict[str, Any]], generate: Callable[[Path, Any], None],
             sandbox: Sandbox | None = None, workers: int | None = None, console: Console | None = None) -> dict[str, Any]:
    """The whole run: generate turns, execute programs, summarize into ``out`` (summary.json, pass_rate.png).

    ``generate(path, progress_bar)`` appends the missing samples (``generate_samples`` or
    ``generate_samples_from_endpoints`` with their arguments bound). ``sandbox`` defaults to one with the
    settings' timeout, which refuses to run without bubblewrap; it is made before any generation starts."""
    console = console or Console(stderr=True)
    sandbox = sandbox or Sandbox(Limits(timeout=settings.timeout), workers=workers)
    start_run(out, asdict(settings))
    samples_path = out / "samples.jsonl"
    with progress(console) as bar:
        if pending(problems, samples_path, settings.n):
            generate(samples_path, bar)
        order = {p["id"]: i for i, p in enumerate(problems)}
        samples = sorted(read_jsonl(samples_path), key=lambda s: (order[s["id"]], s["case"], s["sample"]))
        results = execute(samples, sandbox, out / "results.jsonl", bar, replace(sandbox.limits, timeout=settings.timeout))
    summary = summarize(problems, results)
    summary["isolated"], summary["sandbox"] = sandbox.isolated, sandbox.mode
    from ..hub import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    name = settings.model or settings.served_model
    _plot(summary, out / "pass_rate.png", f"MTPB: {name}")
    rows = [("pass rate", f"{100 * summary['pass_rate']:.2f}%")]
    rows += [(f"  {c}", f"{100 * v:.2f}%") for c, v in summary["per_category"].items()]
    rows += [("test cases passed", f"{100 * summary['test_case_pass_rate']:.2f}%"),
             ("problems", str(summary["problems"])), ("programs", str(summary["programs"]))]
    console.print(table(f"MTPB: {name}", rows + status_rows(Counter(summary["statuses"]))))
    console.print(f"results in {out} (samples.jsonl, results.jsonl, summary.json, pass_rate.png)")
    return summary


def _plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..hub import atomic_write_bytes

    names = ["all"] + list(summary["per_category"])
    values = [100 * summary["pass_rate"]] + [100 * v for v in summary["per_category"].values()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.bar(names, values, color=["tab:red"] + ["tab:blue"] * (len(names) - 1))
    ax.set_ylabel("pass rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
