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

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from ..sandbox import Limits, Sandbox
from ..session import MTPB_PRELUDE, format_turn, truncate_code
from .report import progress, status_rows, table
from .runs import JsonlWriter, read_jsonl, start_run

TIMEOUT = 20.0
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
    model: str
    n: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    seed: int = 0
    timeout: float = TIMEOUT
    limit: int | None = None  # only the first this many problems


def _have(path: Path) -> set[tuple[str, int, int]]:
    return {(s["id"], s["case"], s["sample"]) for s in read_jsonl(path)}


def pending(problems: Sequence[dict[str, Any]], path: Path, n: int) -> list[dict[str, Any]]:
    """The problems some of whose samples are not in ``path`` yet."""
    have = _have(path)
    return [p for p in problems if any((p["id"], case, j) not in have for case in range(len(p["inputs"])) for j in range(n))]


def generate_samples(generator: Any, problems: Sequence[dict[str, Any]], settings: Settings, path: Path,
                     progress_bar: Any = None) -> None:
    """Append, for every problem not done yet, ``n`` multi-turn samples of each test case to ``path``.

    One record per (problem, case, sample): the turns' truncated completions and the final program. All
    5 x n histories of a problem advance together, one ``Generator.complete`` call per turn."""
    from ..engine import SamplingParams

    have = _have(path)
    todo = pending(problems, path, settings.n)
    done = {p["id"] for p in problems} - {p["id"] for p in todo}
    task = progress_bar.add_task("generating turns", total=sum(len(p["prompts"]) for p in problems),
                                 completed=sum(len(p["prompts"]) for p in problems if p["id"] in done)) if progress_bar else None
    limit = generator.model.config.n_positions
    with JsonlWriter(path) as out:
        for problem in todo:
            cases = [(case, values) for case, values in enumerate(problem["inputs"]) for _ in range(settings.n)]
            histories = [MTPB_PRELUDE] * len(cases)
            turns: list[list[str]] = [[] for _ in cases]
            for prompt in problem["prompts"]:
                specs = [fill(prompt, values) for _, values in cases]
                prefixes = [turn_prefix(h, spec) for h, spec in zip(histories, specs)]
                # Each history has its own room left in the context; sample j of every case draws with seed + j.
                rooms = [min(problem.get("max_gen_length", MAX_GEN_LENGTH), limit - len(generator.tokenizer.encode(p))) for p in prefixes]
                seeds = [settings.seed + i % settings.n for i in range(len(cases))]
                texts = _sample(generator, prefixes, rooms, seeds, settings, SamplingParams)
                for i, text in enumerate(texts):
                    turns[i].append(truncate_code(text))
                    histories[i] += format_turn(specs[i], turns[i][-1])
                if progress_bar:
                    progress_bar.advance(task)
            for i, (case, _) in enumerate(cases):
                if (problem["id"], case, i % settings.n) in have:  # written before an interruption
                    continue
                out.write({"id": problem["id"], "case": case, "sample": i % settings.n, "turns": turns[i],
                           "program": histories[i], "expected": problem["outputs"][case]})


def _sample(generator: Any, prefixes: list[str], rooms: list[int], seeds: list[int], settings: Settings,
            sampling_params: Any) -> list[str]:
    """One completion per prefix; one ``complete`` call per (room, seed) group. No room left: an empty turn."""
    texts = [""] * len(prefixes)
    for room, seed in sorted(set(zip(rooms, seeds))):
        rows = [i for i in range(len(prefixes)) if (rooms[i], seeds[i]) == (room, seed)]
        if room <= 0:
            continue
        params = sampling_params(max_new_tokens=room, temperature=settings.temperature, top_p=settings.top_p, n=1, seed=seed)
        for i, (completion,) in zip(rows, generator.complete([prefixes[i] for i in rows], params)):
            texts[i] = completion.text
    return texts


def execute(samples: Sequence[dict[str, Any]], sandbox: Sandbox, path: Path, progress_bar: Any = None) -> list[dict[str, Any]]:
    """Run every sample's program (those without a verdict in ``path`` yet), appending verdicts; return all."""
    key = lambda r: (r["id"], r["case"], r["sample"])  # noqa: E731
    done = {key(r): r for r in read_jsonl(path)}
    todo = [s for s in samples if key(s) not in done]
    task = progress_bar.add_task("running programs", total=len(samples), completed=len(samples) - len(todo)) if progress_bar else None
    with JsonlWriter(path) as out:
        for i, result in sandbox.run_many(check_program(s["program"], s["expected"]) for s in todo):
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


def evaluate(out: Path, settings: Settings, problems: Sequence[dict[str, Any]], generator_factory: Callable[[], Any],
             workers: int | None = None, console: Console | None = None) -> dict[str, Any]:
    """The whole run: generate turns, execute programs, summarize into ``out`` (summary.json, pass_rate.png)."""
    console = console or Console(stderr=True)
    start_run(out, asdict(settings))
    sandbox = Sandbox(Limits(timeout=settings.timeout), workers=workers)
    samples_path = out / "samples.jsonl"
    with progress(console) as bar:
        if pending(problems, samples_path, settings.n):
            generate_samples(generator_factory(), problems, settings, samples_path, bar)
        order = {p["id"]: i for i, p in enumerate(problems)}
        samples = sorted(read_jsonl(samples_path), key=lambda s: (order[s["id"]], s["case"], s["sample"]))
        results = execute(samples, sandbox, out / "results.jsonl", bar)
    summary = summarize(problems, results)
    summary["isolated"] = sandbox.isolated
    from ..hub import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _plot(summary, out / "pass_rate.png", f"MTPB: {settings.model}")
    rows = [("pass rate", f"{100 * summary['pass_rate']:.2f}%")]
    rows += [(f"  {c}", f"{100 * v:.2f}%") for c, v in summary["per_category"].items()]
    rows += [("test cases passed", f"{100 * summary['test_case_pass_rate']:.2f}%"),
             ("problems", str(summary["problems"])), ("programs", str(summary["programs"]))]
    console.print(table(f"MTPB: {settings.model}", rows + status_rows(Counter(summary["statuses"]))))
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
