"""``codegen-lm chat`` driven as a person would, in a pseudo-terminal (pexpect), and as a script (pipes), with a
tiny random-weight model; the session files it leaves are checked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.engine import Generator, SamplingParams
from codegen_lm.session import Session, Turn, format_turn
from codegen_lm.tokenizer import CodeGenTokenizer

pexpect = pytest.importorskip("pexpect")

EDITOR = textwrap.dedent(
    """
    # A stand-in for $EDITOR: replaces the file with the next text queued in EDITS (texts split by ---).
    import os, sys
    queue = os.environ["EDITS"]
    texts = open(queue).read().split("---\\n")
    open(sys.argv[1], "w").write(texts[0])
    open(queue, "w").write("---\\n".join(texts[1:]))
    """
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    config = CodeGenConfig(vocab_size=50304, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=2048)
    CodeGenForCausalLM(config).save_pretrained(folder)
    CodeGenTokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    (tmp_path / "editor.py").write_text(EDITOR)
    (tmp_path / "edits").write_text("x = 6 * 7\n---\nprint(x)\n")
    return dict(
        os.environ,
        XDG_STATE_HOME=str(tmp_path / "state"),
        EDITOR=f"{sys.executable} {tmp_path / 'editor.py'}",
        EDITS=str(tmp_path / "edits"),
        PROMPT_TOOLKIT_NO_CPR="1",  # pexpect does not answer cursor-position queries
        TERM="xterm-256color",
    )


def chat_args(checkpoint: Path, *args: str) -> list[str]:
    return ["-m", "codegen_lm.cli", "chat", *args, "-m", str(checkpoint), "-t", "0", "-n", "8", "--device", "cpu"]


@pytest.mark.slow
def test_repl_in_a_terminal(checkpoint, env, tmp_path):
    child = pexpect.spawn(sys.executable, chat_args(checkpoint, "s.py"), cwd=tmp_path, env=env, encoding="utf-8",
                          timeout=90, dimensions=(40, 120))
    child.logfile_read = open(tmp_path / "terminal.log", "w")

    def command(line: str, *expected: str, prompt: int) -> None:
        child.sendline(line)
        for text in expected:
            child.expect_exact(text)
        child.expect_exact(f"{prompt}>")

    child.expect_exact("1>")
    command("Assign 42 to x.", prompt=2)
    command("Print x.", prompt=3)
    command("/edit 1", "turn 1", prompt=3)
    command("/edit 2", "turn 2", prompt=3)
    command("/run", "turn 2", "42", "ok (", prompt=3)
    command("/undo", "undone; 2 turns", prompt=3)  # takes back the edit of turn 2
    command("/save out.py", "the session now lives in out.py", prompt=3)
    command("/set max_new_tokens 1500", prompt=3)

    # The model's first words for the next turn, to know when it has started streaming.
    generator = Generator.from_pretrained(str(checkpoint))
    greedy = SamplingParams(max_new_tokens=1500, temperature=0.0)
    reference = iter(Session.load(tmp_path / "out.py", generator=generator, params=greedy).stream("Loop forever."))
    first = [next(reference) for _ in range(4)]
    word = max(re.findall(r"\w+", "".join(first[1:])), key=len)
    child.sendline("Loop forever.")
    child.expect_exact(word)
    child.sendintr()  # Ctrl-C in the middle of a 1500-token generation
    child.expect_exact("stopped: turn 3 keeps the code so far")
    child.expect_exact("4>")
    command("/program", "Assign 42 to x.", "Loop forever.", prompt=4)
    child.sendline("/quit")
    child.expect_exact("session saved in out.py")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    before_save = Session.load(tmp_path / "s.py").turns
    assert [t.spec for t in before_save] == ["Assign 42 to x.", "Print x."]
    assert before_save[0].code == "x = 6 * 7\n" and before_save[1].code != "print(x)\n"
    after = Session.load(tmp_path / "out.py").turns
    assert after[:2] == before_save and after[2].spec == "Loop forever."
    partial = after[2].code
    streamed = "".join(first)
    while len(streamed) < len(partial):
        streamed += next(reference)
    assert partial and streamed.startswith(partial)  # exactly what had streamed when Ctrl-C came
    assert (tmp_path / "state" / "codegen-lm" / "chat_history").read_text().count("Loop forever.") == 1


@pytest.mark.slow
def test_scripted_without_a_terminal(checkpoint, env, tmp_path):
    lines = ["Assign 42 to x.", "Print x.", "/edit 1", "/edit 2", "/run", "/retry 2", "1", "/undo", "/load missing.py", ""]
    done = subprocess.run([sys.executable, *chat_args(checkpoint, "s.py")], cwd=tmp_path, env=env, text=True,
                          input="\n".join(lines), capture_output=True, timeout=120)
    assert done.returncode == 1, done.stderr  # one line failed: the /load of a missing file
    assert "error: missing.py is not a file" in done.stderr
    turns = Session.load(tmp_path / "s.py").turns
    assert turns == (Turn("Assign 42 to x.", "x = 6 * 7\n"), Turn("Print x.", "print(x)\n"))
    # stdout: each turn as "# spec" + code + a blank line, then what the commands print.
    out = done.stdout
    assert out.startswith("# Assign 42 to x.\n") and "\n\n# Print x.\n" in out
    assert re.search(r"turn 2 ─+\n42\nok \(", out)
    assert "alternative 1" in out and "alternative 2" in out
    generated = out[: out.index("─")]  # the two generated turns, before /edit printed anything
    first_code = generated[len("# Assign 42 to x.\n") : generated.index("\n\n# Print x.\n")]
    assert generated.startswith(format_turn("Assign 42 to x.", first_code))


@pytest.mark.slow
def test_bad_session_file_fails_before_loading_the_model(env, tmp_path):
    (tmp_path / "bad.py").write_bytes(b"# %% prelude\n# %% turn 1\nx = 1\n")
    done = subprocess.run([sys.executable, "-m", "codegen_lm.cli", "chat", "bad.py", "-m", "no/such-model"],
                          cwd=tmp_path, env=env, text=True, input="", capture_output=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: bad.py, line 3:")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_killed_chat_loses_no_turn(checkpoint, env, tmp_path):
    chat = subprocess.Popen([sys.executable, *chat_args(checkpoint, "s.py")], cwd=tmp_path, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    chat.stdin.write("Assign 42 to x.\n/program\n")
    chat.stdin.flush()
    program = ""
    while "# Assign 42 to x.\n" not in program[program.find("import numpy") :]:  # /program has run
        line = chat.stdout.readline()
        assert line, "chat ended before /program ran"
        program += line
    chat.send_signal(signal.SIGKILL)
    chat.wait()
    turns = Session.load(tmp_path / "s.py").turns
    assert [t.spec for t in turns] == ["Assign 42 to x."] and turns[0].code in program
