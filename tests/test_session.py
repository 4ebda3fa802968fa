"""Multi-turn sessions: the MTPB prompt format, truncation while streaming, context overflow, undo/redo,
running by turn in the sandbox, and the session file (lossless round trip, hand-written and damaged files)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.engine import Generator, SamplingParams
from codegen_lm.session import (
    MTPB_PRELUDE,
    CodeCutter,
    Session,
    Turn,
    build_prompt,
    dumps,
    loads,
    read_session_file,
    truncate_code,
)
from codegen_lm.tokenizer import CodeGenTokenizer

DATA = Path(__file__).resolve().parents[1] / "src" / "codegen_lm" / "data"
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return CodeGenTokenizer()


@pytest.fixture(scope="module")
def generator(tokenizer):
    torch.manual_seed(0)
    config = CodeGenConfig(vocab_size=50304, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=2048)
    return Generator(CodeGenForCausalLM(config).eval(), tokenizer)


# -- the MTPB format --------------------------------------------------------------------------------------


def mtpb_problem(problem_id: str) -> dict:
    for line in (DATA / "mtpb.jsonl").read_text().splitlines():
        problem = json.loads(line)
        if problem["id"] == problem_id:
            return problem
    raise KeyError(problem_id)


def test_prompt_is_the_mtpb_history(tokenizer):
    problem = mtpb_problem("1")
    specs = [p.format(**problem["inputs"][0]) for p in problem["prompts"]]
    codes = ['my_string = "abcde"\n', "my_string = my_string.lower()\n\n"]
    prompt, dropped = build_prompt(MTPB_PRELUDE, list(zip(specs, codes)), specs[2], tokenizer)
    assert dropped == 0
    assert prompt == (
        "# Import libraries.\n\nimport numpy as np\n\n"
        '# Assign the string "abcde" to a variable named "my_string".\n'
        'my_string = "abcde"\n\n\n'
        '# Lowercase the given string "my_string".\n'
        "my_string = my_string.lower()\n\n\n\n"
        '# Assign the distinct characters of the string to a variable named "chars".\n'
    )
    session = Session(turns=list(zip(specs, codes)))
    assert session.program() == prompt[: prompt.rindex("# Assign the distinct")]


def test_truncate_code_is_mtpbs():
    # MTPB's own test case, then each rule.
    assert truncate_code("\nif len_a > len_b:\n    result = a\nelse:\n    result = b\n\n\n\n#") == (
        "\nif len_a > len_b:\n    result = a\nelse:\n    result = b"
    )
    assert truncate_code("x = 1\n\n# Print x.\nprint(x)") == "x = 1\n\n"
    assert truncate_code("print(1)\nprint(2)\n") == "print(1)\n"
    assert truncate_code("def f():\n    # fine\n    return 1\ndef g():\n    pass") == "def f():\n    # fine\n    return 1\n"
    assert truncate_code("# a comment first") == ""
    assert truncate_code('x = 1\n"""doc"""') == "x = 1\n"
    assert truncate_code("x = 1<|endoftext|>junk") == "x = 1"


COMPLETIONS = [
    "x = 1\n\n# Print x.\nprint(x)\n",
    "print(1)\nprint(2)\n",
    "def f():\n    return 1\n\ndef g():\n    return 2\n",
    "x = [i for i in range(3)]\nprinter = 2\nprint(x)\n",
    "y = 2\n\n\n\nz = 3",
    "# leading comment\nx = 1",
    "z = '''\nabc'''\n'''doc'''",
    "a = 1\n\n",
    "é = 'ü'\nprint(é)",
]


@pytest.mark.parametrize("completion", COMPLETIONS)
def test_cutter_streams_exactly_the_truncated_code(completion):
    rng = random.Random(completion)
    for trial in range(20):
        cutter, shown, i = CodeCutter(), "", 0
        while i < len(completion) and not cutter.done:
            step = 1 if trial == 0 else rng.randint(1, 4)
            shown += cutter.add(completion[i : i + step])
            i += step
            assert truncate_code(completion).startswith(shown)  # nothing shown is ever taken back
        if not cutter.done:
            shown += cutter.finish("length")
        assert shown == cutter.code == truncate_code(completion)


@pytest.mark.parametrize(
    "completion, read",
    [("x = 1\n\n# Print x.", "x = 1\n\n#"), ("print(1)\nprint(2)", "print(1)\nprint"), ("y = 2\n\n\nz", "y = 2\n\n\n"),
     ("def f(): pass\ndefault = 1", "def f(): pass\ndef")],
)
def test_cutter_is_done_as_soon_as_the_cut_is_certain(completion, read):
    cutter = CodeCutter()
    for char in completion:
        cutter.add(char)
        if cutter.done:
            break
    assert cutter.text == read and cutter.reason == "stop"


def test_prompt_drops_oldest_turns_exactly_at_the_boundary(tokenizer):
    turns = [(f"Step {i}: assign {i} squared to v{i}.", f"v{i} = {i} ** 2\n" * (i + 1)) for i in range(6)]
    spec, new = "Print the sum of all of them.", 16

    def size(k: int) -> int:
        return len(tokenizer.encode(MTPB_PRELUDE + "".join(f"# {s}\n{c}\n\n" for s, c in turns[k:]) + f"# {spec}\n"))

    full, least = size(0), size(len(turns))
    for budget in range(full, least - 1, -1):
        prompt, dropped = build_prompt(MTPB_PRELUDE, turns, spec, tokenizer, budget + new, new)
        assert size(dropped) <= budget and len(tokenizer.encode(prompt)) == size(dropped)
        assert dropped == 0 or size(dropped - 1) > budget  # the fewest turns dropped that make it fit
        assert prompt.startswith(MTPB_PRELUDE) and prompt.endswith(f"# {spec}\n")
    assert build_prompt(MTPB_PRELUDE, turns, spec, tokenizer, full + new, new)[1] == 0
    assert build_prompt(MTPB_PRELUDE, turns, spec, tokenizer, full + new - 1, new)[1] == 1
    with pytest.raises(ValueError, match="the prelude and this spec alone"):
        build_prompt(MTPB_PRELUDE, turns, spec, tokenizer, least + new - 1, new)
    with pytest.raises(ValueError, match="one line"):
        build_prompt(MTPB_PRELUDE, turns, "two\nlines", tokenizer)


# -- generating -------------------------------------------------------------------------------------------


def test_say_streams_the_mtpb_truncated_completion(generator):
    session = Session(generator, params=GREEDY)
    pieces = []
    turn = session.say("Assign 42 to a variable named x.", on_text=pieces.append)
    assert session.turns == (turn,) and "".join(pieces) == turn.code
    prompt = MTPB_PRELUDE + "# Assign 42 to a variable named x.\n"
    raw = generator.complete([prompt], GREEDY)[0][0].text
    assert turn.code == truncate_code(raw)
    stream = session.stream("Print x.")
    assert stream.prompt == session.program() + "# Print x.\n" and stream.dropped == 0
    list(stream)
    assert session.turns[-1] == stream.turn and len(session.turns) == 2


@pytest.mark.slow
def test_retry_alternatives_undo_redo(generator):
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=7)
    session = Session(generator, params=params)
    first = session.say("Make a list of three numbers.").code
    second = session.retry().code
    assert len(session.turns) == 1 and session.turns[0].code == second != first
    options = session.alternatives(3)
    assert len(options) == 3 and len(set(options)) == 3 and session.turns[0].code == second
    session.edit(-1, options[1])
    assert session.turns[0].code == options[1]
    assert session.undo() and session.turns[0].code == second
    assert session.undo() and session.turns[0].code == first
    assert session.undo() and session.turns == ()
    assert not session.undo()
    assert session.redo() and session.redo() and session.turns[0].code == second
    session.edit(0, "x = 1\n")  # a new change forgets what could be redone
    assert not session.redo()
    # Seeds advance per sample drawn, so a session replays exactly.
    again = Session(generator, params=params)
    assert again.say("Make a list of three numbers.").code == first and again.retry().code == second
    assert again.alternatives(3) == options


def test_stopped_stream_keeps_partial_code_and_abandoned_one_changes_nothing(generator):
    session = Session(generator, params=SamplingParams(max_new_tokens=40, temperature=0.0))
    stream = session.stream("Write a long function.")
    pieces = iter(stream)
    shown = next(pieces) + next(pieces) + next(pieces)
    turn = stream.stop()
    assert turn is not None and turn.code.startswith(shown) and session.turns == (turn,)
    assert stream.finish_reason == "abort"
    assert list(pieces) == []  # nothing more comes, and nothing is committed twice
    assert len(session.turns) == 1
    abandoned = session.stream("Another step.")
    next(iter(abandoned))
    del abandoned
    assert session.turns == (turn,)
    empty = session.stream("Stopped at once.")
    assert empty.stop() is None and session.turns == (turn,)


def test_context_overflow_leaves_old_turns_out_of_the_prompt_only(generator, tokenizer):
    long_code = "values = [" + ", ".join(str(i) for i in range(150)) + "]\n"
    turns = [(f"Assign list number {i}.", long_code) for i in range(8)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    session = Session(generator, turns=turns, params=params)
    assert len(tokenizer.encode(session.program())) > 2048
    stream = session.stream("Print the last list.")
    assert stream.dropped > 0 and session.dropped == stream.dropped
    assert len(tokenizer.encode(stream.prompt)) + 8 <= 2048
    kept = turns[stream.dropped :]
    assert stream.prompt == MTPB_PRELUDE + "".join(f"# {s}\n{c}\n\n" for s, c in kept) + "# Print the last list.\n"
    list(stream)
    assert len(session.turns) == 9 and session.turns[:8] == tuple(Turn(*t) for t in turns)


def test_errors_are_clear(generator):
    with pytest.raises(ValueError, match="no model"):
        Session().say("x")
    with pytest.raises(ValueError, match="no turns yet"):
        Session(generator).retry()
    with pytest.raises(ValueError, match="spec is empty"):
        Session(generator).say("   ")
    with pytest.raises(ValueError, match="out of range"):
        Session(turns=[("a", "b")]).edit(1, "c")
    with pytest.raises(ValueError, match="marker"):
        Session(turns=[("a", "b")]).edit(0, "x = 1\n# %% turn 2\n")


# -- running ----------------------------------------------------------------------------------------------


def test_run_attributes_output_and_errors_to_turns():
    turns = [
        ("Print one.", "print(1)"),
        ("Print to both streams.", "import sys\nprint(2, file=sys.stderr)\nprint('<<<0123 0>>>', end='')"),
        ("Define f.", "def f(x):\n    return 1 / x\n"),
        ("Call f with 0.", "y = 3\nf(0)"),
        ("Never runs.", "print('never')"),
    ]
    result = Session(prelude="import sys\n", turns=turns).run()
    assert result.status == "failed" and result.stopped_in == 4
    assert result.reason == "ZeroDivisionError: division by zero"
    prelude, one, two, three, four, five = result.outputs
    assert (prelude.stdout, one.stdout, two.stdout, two.stderr) == ("", "1\n", "<<<0123 0>>>", "2\n")
    assert three.stdout == three.stderr == "" and four.stdout == "" and five is None
    assert 'File "<turn 4>", line 2' in four.stderr and "f(0)" in four.stderr
    assert 'File "<turn 3>", line 2, in f' in four.stderr and "return 1 / x" in four.stderr

    ok = Session(turns=[("Print the answer.", "print(np.int64(6) * 7)")]).run()
    assert ok.passed and ok.reason == "" and ok.stopped_in is None and ok.outputs[1].stdout == "42\n"

    exited = Session(turns=[("Exit.", "import sys\nsys.exit(3)"), ("Not reached.", "")]).run()
    assert exited.status == "failed" and exited.stopped_in == 1 and "sys.exit(3)" in exited.reason
    assert exited.outputs[2] is None

    syntax = Session(turns=[("Broken.", "x = (")]).run()
    assert syntax.stopped_in == 1 and syntax.reason.startswith("SyntaxError")


# -- the session file -------------------------------------------------------------------------------------

TRICKY = [
    ("Empty code.", ""),
    ("Trailing blank lines.", "x = 1\n\n\n"),
    ("No final newline.", "y = 2"),
    ("Leading newline.", "\nz = 3\n"),
    ("  Spec with # and spaces  ", "s = 'ünïcödé ✓'\n"),
    ("Comments inside.", "def f():\n    # %% turn 9\n    return 1\n# top-level comment\n"),
    ("CRLF inside.", "a = 1\r\nb = 2\r\n"),
]


@pytest.mark.parametrize("prelude", [MTPB_PRELUDE, "", "import os\n\n\n", "# just a comment\n"])
def test_save_load_save_is_byte_identical(tmp_path, prelude):
    session = Session(prelude=prelude, turns=TRICKY)
    path = tmp_path / "s.py"
    session.save(path)
    loaded = Session.load(path)
    assert loaded.prelude == prelude and loaded.turns == tuple(Turn(*t) for t in TRICKY)
    loaded.save(tmp_path / "again.py")
    assert (tmp_path / "again.py").read_bytes() == path.read_bytes()
    # The file is the program plus marker lines.
    assert re.sub(r"^# %% .*\n", "", path.read_bytes().decode(), flags=re.MULTILINE) == session.program()


def test_saved_session_is_a_runnable_program(tmp_path):
    session = Session(turns=[("Assign 6 times 7 to x.", "x = 6 * 7\n"), ("Print x.", "print(x)")])
    session.save(tmp_path / "s.py")
    done = subprocess.run([sys.executable, str(tmp_path / "s.py")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "42\n"


def content_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("# %% ")]


HAND_WRITTEN = {
    "plain program, no markers": ("import math\n\nprint(math.pi)\n", "import math\n\nprint(math.pi)\n", []),
    "no closing newlines": (
        "# %% prelude\nimport os\n# %% turn 1\n# List files.\nfiles = os.listdir('.')",
        "import os\n",
        [("List files.", "files = os.listdir('.')")],
    ),
    "numbers out of order, no space after #": (
        "# %% turn 7\n#Assign.\nx = 1\n\n# %% turn 3\n# Print.\nprint(x)\n",
        "",
        [("Assign.", "x = 1"), ("Print.", "print(x)")],
    ),
    "text above the prelude marker": (
        "#!/usr/bin/env python\n# %% prelude\nimport sys\n\n",
        "#!/usr/bin/env python\nimport sys\n\n",
        [],
    ),
    "CRLF line endings": (
        "# %% prelude\r\nimport os\r\n# %% turn 1\r\n# Spec.\r\nx = 1\r\n\r\n",
        "import os\n",
        [("Spec.", "x = 1")],
    ),
}


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_files_parse_sensibly_and_lose_nothing(name):
    text, prelude, turns = HAND_WRITTEN[name]
    got_prelude, got_turns = loads(text)
    assert got_prelude == prelude and got_turns == [Turn(*t) for t in turns]
    again = dumps(got_prelude, got_turns)
    assert content_lines(again) == content_lines(text.replace("#Assign", "# Assign"))
    assert loads(again) == (got_prelude, got_turns)


DAMAGED = {
    "empty": (b"", "is empty"),
    "only blank lines": (b"\n\n  \n", "is empty"),
    "not UTF-8": (b"# %% prelude\nx = '\xff\xfe'\n", "not UTF-8"),
    "turn without its spec": (b"# %% prelude\n# %% turn 1\nx = 1\n", "line 3: '# %% turn 1' must be followed by"),
    "turn marker at the end": (b"# %% prelude\nimport os\n# %% turn 1", "line 4"),
    "empty spec": (b"# %% turn 1\n#\nx = 1\n", "line 2"),
    "second prelude": (b"# %% prelude\n# %% turn 1\n# a\nx\n\n# %% prelude\n", "line 6: a second '# %% prelude'"),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_files_give_a_clear_error(tmp_path, name):
    data, message = DAMAGED[name]
    path = tmp_path / "damaged.py"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        Session.load(path)
    assert str(path) in str(error.value)


def test_missing_file_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file"):
        read_session_file(tmp_path / "missing.py")
    with pytest.raises(FileNotFoundError, match="not a file"):
        read_session_file(tmp_path)


def test_save_refuses_what_it_could_not_load_back(tmp_path):
    with pytest.raises(ValueError, match="one line"):
        dumps("", [("two\nlines", "x")])
    with pytest.raises(ValueError, match="marker"):
        Session(prelude="# %% turn 1\n")
    assert Session(prelude="import os").prelude == "import os\n"  # the first spec must start a line


@pytest.mark.parametrize("failing", ["write", "rename"])
def test_a_failed_save_leaves_the_previous_file_whole(tmp_path, monkeypatch, failing):
    """Saving writes a temporary file beside the session file and renames it over it: a disk that fills up during the
    write, or a rename that fails, leaves the previous file as it was, and no temporary file behind."""
    path = tmp_path / "s.py"
    session = Session(turns=[("Assign 42 to x.", "x = 42\n")])
    session.save(path)
    before = path.read_bytes()
    session.edit(0, "x = 43\n" * 10_000)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync" if failing == "write" else "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        session.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and Session.load(path).turns == (Turn("Assign 42 to x.", "x = 42\n"),)
    assert [p.name for p in tmp_path.iterdir()] == ["s.py"]
