"""``codegen-lm chat`` driven as a person would, in a pseudo-terminal (pexpect), and as a script (pipes), with a
tiny random-weight model; the session files it leaves are checked. Ctrl-C is delivered at chosen moments of a
generation (in-process, by a hook) and at the terminal, to a generation that cannot end on its own first."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_model
from rich.console import Console
from rich.syntax import Syntax

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.chat import Chat
from codegen_lm.engine import Generator, SamplingParams
from codegen_lm.session import Session, Turn, format_turn
from codegen_lm.tokenizer import CodeGenTokenizer

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
X = 87  # "x": the only token the endless models write, so their code is "xxx…" (never cut, never EOS)


def endless(model: CodeGenForCausalLM) -> CodeGenForCausalLM:
    with torch.no_grad():
        model.lm_head.bias[X] = 100.0
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    config = CodeGenConfig(vocab_size=50304, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=2048)
    CodeGenForCausalLM(config).save_pretrained(folder)
    CodeGenTokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("endless-chat")
    endless(build_model(vocab_size=50304, n_positions=2048)).save_pretrained(folder)
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


# -- Ctrl-C at chosen moments of a generation (in-process) -------------------------------------------------


class Screen(io.StringIO):
    """What rich wrote to the terminal (``on_write`` sees each write first)."""

    def on_write(self, text: str) -> None:
        pass

    def write(self, text: str) -> int:
        self.on_write(text)
        return super().write(text)


class Steps:
    """Counts the model's forward calls (the first prefills and gives the first token, each later one decodes the
    next) and sends SIGINT to this process from inside one chosen call: of the model, the tokenizer, the syntax
    highlighter or a write to the terminal. The Chat's loop runs in this thread, the main one, so the signal reaches
    its handler exactly as a Ctrl-C reaches ``codegen-lm chat``."""

    def __init__(self, generator: Generator, screen: Screen, monkeypatch: pytest.MonkeyPatch):
        self.calls, self.at_ctrl_c, self.point, self.when, self.screen = 0, [], None, None, screen
        forward, encode, highlight = generator.model.logits_packed, generator.tokenizer.encode, Syntax.highlight

        def counted(*args, **kwargs):
            self.calls += 1
            self.maybe("forward")
            return forward(*args, **kwargs)

        monkeypatch.setattr(generator.model, "logits_packed", counted, raising=False)
        monkeypatch.setattr(generator.tokenizer, "encode", lambda *a, **k: (self.maybe("encode"), encode(*a, **k))[1])
        monkeypatch.setattr(Syntax, "highlight", lambda *a, **k: (self.maybe("highlight"), highlight(*a, **k))[1])
        screen.on_write = lambda text: self.maybe("write")

    def ctrl_c(self, point: str, when: Callable[["Steps"], bool]) -> None:
        """Ctrl-C in the first call at ``point`` for which ``when(self)`` holds."""
        self.point, self.when = point, when

    def maybe(self, point: str) -> None:
        if point == self.point and not self.at_ctrl_c and self.when(self):
            self.at_ctrl_c.append(self.calls)
            signal.raise_signal(signal.SIGINT)


@pytest.fixture
def endless_generator() -> Generator:
    return Generator(endless(build_model(vocab_size=51200, n_positions=2048)), CodeGenTokenizer())


def chat_in_process(generator: Generator, tmp_path: Path, lines: list[str], max_new_tokens: int = 400) -> tuple[Chat, Screen]:
    """An interactive Chat (rich writing to a ``Screen`` as to a terminal) that reads ``lines``."""
    screen = Screen()
    console = Console(file=screen, force_terminal=True, width=100, highlight=False, soft_wrap=True)  # notes unwrapped
    session = Session(generator, params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    queue = iter(lines)

    def read(prompt: str) -> str:
        line = next(queue, None)
        if line is None:
            raise EOFError
        return line

    return Chat(session, tmp_path / "s.py", interactive=True, read=read, out=console, err=console), screen


def cursor_shown(screen: Screen) -> bool:
    text = screen.getvalue()
    return text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l")  # rich's Live hides the cursor while it runs


MOMENTS = {  # where Ctrl-C comes: (hooked call, when, most forward calls that may follow)
    "preparing the prompt": ("encode", lambda steps: True, 0),
    "prefill": ("forward", lambda steps: steps.calls == 1, 1),  # (the step under way completes)
    "between tokens": ("forward", lambda steps: steps.calls == 6, 0),
    "highlighting": ("highlight", lambda steps: steps.calls == 3, 0),
    # rich's Live hides the cursor, then draws: Ctrl-C in its first drawing
    "starting the display": ("write", lambda steps: "\x1b[?25l" in steps.screen.getvalue(), 0),
    "writing to the terminal": ("write", lambda steps: steps.calls == 4, 0),
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_ctrl_c_stops_the_generation_within_a_step(moment, endless_generator, tmp_path, monkeypatch):
    """The model writes "x" until max_new_tokens (400): only the Ctrl-C can end the turn early."""
    chat, screen = chat_in_process(endless_generator, tmp_path, ["Loop forever."])
    steps = Steps(endless_generator, screen, monkeypatch)
    steps.ctrl_c(*MOMENTS[moment][:2])

    assert chat.loop() == 0
    assert len(steps.at_ctrl_c) == 1 and steps.calls - steps.at_ctrl_c[0] <= MOMENTS[moment][2]
    text = screen.getvalue()
    if steps.calls == 0:
        assert "stopped before any code; nothing added" in text and chat.session.turns == ()
    else:  # each forward call gave one token: the code so far is the turn, as it was shown
        assert "stopped: turn 1 keeps the code so far" in text
        assert chat.session.turns == (Turn("Loop forever.", "x" * steps.calls),) and "x" * steps.calls in text
    assert Session.load(tmp_path / "s.py").turns == chat.session.turns
    assert cursor_shown(screen)


def test_a_second_ctrl_c_while_the_stopped_turn_is_saved_changes_nothing(endless_generator, tmp_path, monkeypatch):
    chat, screen = chat_in_process(endless_generator, tmp_path, ["Loop forever.", "/undo", "/redo"])
    steps = Steps(endless_generator, screen, monkeypatch)
    steps.ctrl_c("forward", lambda steps: steps.calls == 3)
    saves = []

    def save(path, save=chat.session.save):
        saves.append(len(chat.session.turns))
        if len(saves) == 2:  # the save of the stopped turn: a second Ctrl-C lands in it
            signal.raise_signal(signal.SIGINT)
        save(path)

    monkeypatch.setattr(chat.session, "save", save)
    assert chat.loop() == 0  # the chat went on to /undo and /redo
    text = screen.getvalue()
    assert "stopped: turn 1 keeps the code so far" in text and "undone; 0 turns" in text and "redone; 1 turn" in text
    assert saves == [0, 1, 0, 1] and chat.session.turns == (Turn("Loop forever.", "xxx"),)
    assert Session.load(tmp_path / "s.py").turns == chat.session.turns


def test_ctrl_c_stops_run_and_retry_alternatives(endless_generator, tmp_path, monkeypatch):
    chat, screen = chat_in_process(endless_generator, tmp_path, ["/run", "/retry 3"], max_new_tokens=50)
    chat.session = Session(endless_generator, turns=[("Loop forever.", "x = 1\n")], params=chat.session.params)

    def run(limits=None):
        signal.raise_signal(signal.SIGINT)  # the program "runs" until Ctrl-C
        raise AssertionError("Ctrl-C did not interrupt /run")

    monkeypatch.setattr(chat.session, "run", run)
    steps = Steps(endless_generator, screen, monkeypatch)
    steps.ctrl_c("forward", lambda steps: steps.calls == 2)
    assert chat.loop() == 0
    text = screen.getvalue()
    assert "\x1b[2mstopped\x1b[0m" in text and "stopped; the turn is unchanged" in text
    assert steps.calls == 2 and chat.session.turns == (Turn("Loop forever.", "x = 1\n"),)
    assert "alternative 1" not in text and cursor_shown(screen)


def test_ctrl_c_in_the_editor_is_the_editor_s(endless_generator, tmp_path, monkeypatch):
    """The terminal sends Ctrl-C to the chat too while $EDITOR runs in the foreground (vi uses it); the editor must
    not be killed for it, nor the edit lost."""
    editor = tmp_path / "editor.py"
    editor.write_text("import os, signal, sys, time\n"
                      "signal.signal(signal.SIGINT, signal.SIG_IGN)  # an editor handles Ctrl-C itself\n"
                      "os.kill(os.getppid(), signal.SIGINT)\n"
                      "time.sleep(0.5)  # longer than subprocess waits before it kills a child on KeyboardInterrupt\n"
                      "open(sys.argv[1], 'w').write('x = 42\\n')\n")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    chat, screen = chat_in_process(endless_generator, tmp_path, ["/edit"])
    chat.session = Session(endless_generator, turns=[("Assign 42 to x.", "x = 1\n")])
    assert chat.loop() == 0
    assert chat.session.turns == (Turn("Assign 42 to x.", "x = 42\n"),) and "stopped" not in screen.getvalue()


def test_a_failed_autosave_is_reported_and_the_file_stays_whole(endless_generator, tmp_path, monkeypatch):
    chat, screen = chat_in_process(endless_generator, tmp_path, ["Loop forever.", "/undo", "/redo"], max_new_tokens=3)
    failures = iter([False, False, True])  # the first save, the turn's, then /undo's fails

    def replace(src, dst, replace=os.replace):
        if Path(dst).name == "s.py" and next(failures, False):
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert chat.loop() == 0
    text = screen.getvalue()
    assert "error: could not save the session to" in text and "No space left on device" in text
    assert Session.load(tmp_path / "s.py").turns == (Turn("Loop forever.", "xxx"),) == chat.session.turns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.py"]


def test_ctrl_c_typed_right_after_enter_stops_what_the_line_started(endless_generator, tmp_path, monkeypatch):
    """A Ctrl-C typed after Enter while prompt_toolkit still holds the terminal raw is a key it keeps for the next
    prompt (or a byte left queued), not a signal: it must stop that line's generation, not clear the next line."""
    pytest.importorskip("prompt_toolkit")
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    typed = iter([
        "Loop forever.\r\x03",  # Enter and Ctrl-C in one read: the Ctrl-C is left over as typeahead
        "Loop again.\r",  # ... and here it comes as a byte after prompt_toolkit's last read (below)
        "half typed\x03",  # a Ctrl-C at the prompt clears the line: no turn, no history entry
        "/quit\r",
    ])
    with create_pipe_input() as keyboard, create_app_session(input=keyboard, output=DummyOutput()):
        chat, screen = chat_in_process(endless_generator, tmp_path, [])
        prompt = chat._prompt_reader()
        steps = Steps(endless_generator, screen, monkeypatch)

        def read(message: str) -> str:
            keyboard.send_text(next(typed))
            line = prompt(message)
            if line == "Loop again.":
                keyboard.send_text("\x03")
            return line

        chat._read = read
        assert chat.loop() == 0
    text = screen.getvalue()
    assert text.count("stopped before any code; nothing added") == 2
    assert steps.calls == 0 and chat.session.turns == () and next(typed, None) is None
    history = (tmp_path / "state" / "codegen-lm" / "chat_history").read_text()
    assert "Loop again." in history and "half typed" not in history


# -- the command in a terminal and as a script ------------------------------------------------------------


@pytest.mark.slow
def test_repl_in_a_terminal(endless_checkpoint, env, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, chat_args(endless_checkpoint, "s.py"), cwd=tmp_path, env=env, encoding="utf-8",
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

    # The model writes "x" until max_new_tokens. Once 30 have streamed the test reads nothing more until it has sent
    # Ctrl-C: the chat soon blocks writing to the full terminal, so it cannot finish the 1500 tokens on its own.
    child.sendline("Loop forever.")
    child.expect_exact("x" * 30)
    child.sendintr()
    child.expect_exact("stopped: turn 3 keeps the code so far")
    child.expect_exact("4>")  # a fresh prompt: prompt_toolkit holds the terminal (raw mode) from here on
    child.send("half typed")
    child.expect_exact("half typed")
    child.sendintr()  # a second Ctrl-C, at the prompt: clears the line (a spec "half typed/set" would generate)
    child.sendline("/set")
    child.expect_exact("max_new_tokens 1500")
    child.expect_exact("4>")
    child.send("Loop again.\r\x03")  # Enter and Ctrl-C together: the Ctrl-C reaches prompt_toolkit, not as a signal
    child.expect_exact("stopped before any code; nothing added")
    command("/undo", "undone; 2 turns", prompt=3)  # drops the stopped turn ...
    command("/redo", "redone; 3 turns", prompt=4)  # ... and brings it back
    command("/program", "Assign 42 to x.", "Loop forever.", prompt=4)
    child.sendline("/quit")
    child.expect_exact("session saved in out.py")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    before_save = Session.load(tmp_path / "s.py").turns
    assert [t.spec for t in before_save] == ["Assign 42 to x.", "Print x."]
    assert before_save[0].code == "x = 6 * 7\n" and before_save[1].code == "x" * 8
    after = Session.load(tmp_path / "out.py").turns
    assert after[:2] == before_save and after[2].spec == "Loop forever." and len(after) == 3
    assert 30 <= len(after[2].code) < 1500 and after[2].code == "x" * len(after[2].code)
    history = (tmp_path / "state" / "codegen-lm" / "chat_history").read_text()
    assert history.count("Loop forever.") == 1 and "Loop again." in history and "half typed" not in history


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
