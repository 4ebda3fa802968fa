"""``codegen-lm chat``: write a program turn by turn at the terminal (a REPL over :class:`Session`).

Each line typed is the spec of a new turn; its code streams in, syntax-highlighted. Lines starting with
``/`` are commands (``/help``). The session lives in a ``.py`` file that is rewritten (atomically) after
every change, so a crash loses nothing: the file given on the command line, the one last ``/save``d or
``/load``ed, or a fresh one under ``$XDG_STATE_HOME/codegen-lm/sessions/``.

When stdin or stdout is not a terminal it reads one spec (or command) per line and prints each turn as
``# spec`` + code + a blank line, so that the prelude followed by the output is the program; notes go to
stderr and the exit status is 1 if any line failed.

Ctrl-C. A KeyboardInterrupt raised wherever the main thread happens to be can land inside rich's Live setup
(leaving the cursor hidden and output redirected), inside the commit of a stopped turn, or in the session save,
and one typed just after Enter reaches prompt_toolkit while the terminal is still raw, as a key for the *next*
prompt, while the generation it meant to stop runs to its end. So while the REPL runs, SIGINT only sets
``Chat.stopping``, which generation checks before every decode step; it raises KeyboardInterrupt only in the
blocks that wait on something else (reading a line, ``/run``'s program), and a Ctrl-C that prompt_toolkit read
after Enter counts as pressed after Enter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from .engine import GenerationError, Generator, SamplingParams
from .sandbox import PASSED
from .session import MTPB_PRELUDE, Session, TurnStream, format_turn, read_session_file

COMMANDS = {
    "/run": "run the program in the sandbox; output and errors by turn",
    "/retry [N]": "another sample of the last turn; with N, pick one of N alternatives",
    "/undo": "undo the last change (a turn, a retry, an edit)",
    "/redo": "redo what /undo undid",
    "/edit [N]": "edit turn N's code (default: the last) in $EDITOR",
    "/program": "show the whole program",
    "/save FILE": "save the session to FILE and keep autosaving there",
    "/load FILE": "continue the session in FILE (the current one stays in its file)",
    "/set [KEY VALUE]": "show or change sampling: max_new_tokens, temperature, top_p, top_k, seed",
    "/help": "this list",
    "/quit": "leave (Ctrl-D too); the session is already saved",
}
SETTINGS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}
THEME = "monokai"


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "codegen-lm"


def new_session_path() -> Path:
    folder = state_dir() / "sessions"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = folder / f"session-{stamp}.py", 1
    while path.exists():
        path, k = folder / f"session-{stamp}-{k}.py", k + 1
    return path


class Chat:
    """The REPL: reads lines, runs commands, keeps ``path`` up to date with the session. ``read`` (default: a
    prompt_toolkit prompt, or stdin's lines when not interactive) and the consoles can be given (tests)."""

    def __init__(self, session: Session, path: Path, interactive: bool, read: Callable[[str], str] | None = None,
                 out: Console | None = None, err: Console | None = None):
        self.session, self.path, self.interactive = session, path, interactive
        # Scripted output must not be wrapped at 80 columns: it is code and program output.
        self.out = out or Console(highlight=False, soft_wrap=not interactive)
        self.err = err or Console(stderr=True, highlight=False, soft_wrap=not interactive)
        self.failed = False
        self.stopping = threading.Event()  # Ctrl-C was pressed since the current line was entered
        self._terminal_input = None  # prompt_toolkit's input, to find a Ctrl-C it read after Enter
        self._read: Callable[[str], str] = read or (self._prompt_reader() if interactive else _line_reader())

    # -- the loop -------------------------------------------------------------------------------------

    def loop(self) -> int:
        with self._ctrl_c_sets_stopping():
            if not self.path.exists():
                self.session.save(self.path)
            if self.interactive:
                self.note(f"session file: {self.path} (saved after every change) · /help for commands")
            while True:
                self.stopping.clear()
                try:
                    with self._ctrl_c_raises():
                        line = self._read(f"{len(self.session.turns) + 1}> ")
                except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                    continue
                except EOFError:
                    break
                self._take_ctrl_c_typed_after_enter()
                if not self.handle(line.strip()):
                    break
            self.note(f"session saved in {self.path}")
        return 1 if self.failed and not self.interactive else 0

    @contextlib.contextmanager
    def _ctrl_c_sets_stopping(self) -> Iterator[None]:
        """Within the block Ctrl-C only sets ``stopping`` (see the module's docstring)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread; no Ctrl-C reaches this one
            return
        previous = signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def _ctrl_c_raises(self) -> Iterator[None]:
        """Within the block Ctrl-C raises KeyboardInterrupt (at once, if it was pressed after Enter)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            if self.stopping.is_set():
                raise KeyboardInterrupt
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _take_ctrl_c_typed_after_enter(self) -> None:
        """A Ctrl-C typed right after Enter, while prompt_toolkit still held the terminal in raw mode, is a key
        it keeps for the next prompt (or a byte still queued): take it as pressed after Enter, and drop what was
        typed before it, as the terminal itself flushes its input on Ctrl-C."""
        if self._terminal_input is None:
            return
        from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
        from prompt_toolkit.keys import Keys

        terminal = self._terminal_input
        keys = get_typeahead(terminal) + terminal.read_keys() + terminal.flush_keys()
        ctrl_c = [i for i, key in enumerate(keys) if key.key == Keys.ControlC]
        if ctrl_c:
            self.stopping.set()
            keys = keys[ctrl_c[-1] + 1 :]
        store_typeahead(terminal, keys)

    def handle(self, line: str) -> bool:
        """Run one input line; False to quit. Errors are shown, never fatal; changes are saved at once."""
        before, session = self.session.version, self.session
        try:
            if line.startswith("/"):
                name, _, arg = line.partition(" ")
                if name in ("/quit", "/exit"):
                    return False
                command = getattr(self, "cmd_" + name[1:], None)
                if command is None:
                    raise ValueError(f"unknown command {name}; /help lists the commands")
                command(arg.strip())
            elif line:
                self.say(line)
        except KeyboardInterrupt:
            self.note("stopped")
        except (ValueError, OSError, GenerationError) as e:  # (a failed generation adds no turn)
            self.error(str(e))
        if self.session is session and self.session.version != before:
            try:
                self.session.save(self.path)
            except OSError as e:
                self.error(f"could not save the session to {self.path} ({e}); /save it elsewhere")
        return True

    # -- output ---------------------------------------------------------------------------------------

    def note(self, message: str) -> None:
        (self.out if self.interactive else self.err).print(Text(message, style="dim"))

    def error(self, message: str) -> None:
        self.failed = True
        self.err.print(Text(f"error: {message}", style="bold red"))

    def show_code(self, code: str, start_line: int | None = None) -> Syntax:
        """Code, syntax-highlighted (with line numbers from ``start_line`` when given)."""
        text = code.rstrip("\n") or "# (no code)"
        return Syntax(text, "python", theme=THEME, background_color="default", word_wrap=True,
                      line_numbers=start_line is not None, start_line=start_line or 1)

    # -- turns ----------------------------------------------------------------------------------------

    def say(self, spec: str) -> None:
        self._generate(self.session.stream(spec, stop=self.stopping.is_set))

    def _generate(self, stream: TurnStream) -> None:
        if stream.dropped:
            self.note(
                f"turns 1-{stream.dropped} no longer fit in the model's context with max_new_tokens "
                f"{self.session.params.max_new_tokens}: left out of the prompt (still in the session)"
            )
        number = len(self.session.turns) + (0 if stream.replace_last else 1)
        if self.interactive:
            code = ""
            # Refreshed after each piece, not by a thread of its own.
            with Live(self.show_code(""), console=self.out, auto_refresh=False, vertical_overflow="visible") as live:
                for piece in stream:
                    code += piece
                    live.update(self.show_code(code), refresh=True)
        else:
            for _ in stream:
                pass
            if stream.turn is not None:
                self.out.out(format_turn(stream.spec, stream.turn.code), end="")
                self.out.file.flush()
        stopped = stream.finish_reason == "abort"
        if stopped and stream.turn is None:
            self.note("stopped before any code; nothing added")
        elif stopped:
            self.note(f"stopped: turn {number} keeps the code so far (/retry for another, /undo to drop it)")
        elif stream.finish_reason == "length":
            self.note(f"(cut at max_new_tokens {self.session.params.max_new_tokens}: /retry, or /set max_new_tokens N)")

    def cmd_retry(self, arg: str) -> None:
        n = _int(arg or "1", "/retry N: N")
        if n < 1:
            raise ValueError("/retry N needs N >= 1")
        if n == 1:
            self._generate(self.session.stream_retry(stop=self.stopping.is_set))
            return
        with self.out.status(f"sampling {n} alternatives…") if self.interactive else contextlib.nullcontext():
            options = self.session.alternatives(n, stop=self.stopping.is_set)
        if options is None:
            self.note("stopped; the turn is unchanged")
            return
        for k, code in enumerate(options, 1):
            self.out.rule(f"alternative {k}")
            self._print_code(code)
        with self._ctrl_c_raises():
            choice = self._read(f"keep which (1-{n}, Enter keeps the current code)? ").strip()
        if choice:
            k = _int(choice, "the choice")
            if not 1 <= k <= n:
                raise ValueError(f"choose a number from 1 to {n}")
            self.session.edit(-1, options[k - 1])

    def cmd_undo(self, arg: str) -> None:
        self.note(f"undone; {_turns(self.session)}" if self.session.undo() else "nothing to undo")

    def cmd_redo(self, arg: str) -> None:
        self.note(f"redone; {_turns(self.session)}" if self.session.redo() else "nothing to redo")

    def cmd_edit(self, arg: str) -> None:
        turns = self.session.turns
        if not turns:
            raise ValueError("no turns to edit yet")
        number = _int(arg, "/edit N: N") if arg else len(turns)
        if not 1 <= number <= len(turns):
            raise ValueError(f"no turn {number}; turns are numbered 1 to {len(turns)}")
        code = edit_in_editor(turns[number - 1].code)
        if code == turns[number - 1].code:
            self.note("no change")
            return
        self.session.edit(number - 1, code)
        self.out.rule(f"turn {number}")
        self._print_code(code)

    # -- the program ----------------------------------------------------------------------------------

    def cmd_program(self, arg: str) -> None:
        program = self.session.program()
        if self.interactive:
            self.out.print(self.show_code(program, start_line=1))
        else:
            self.out.out(program, end="", highlight=False)

    def cmd_run(self, arg: str) -> None:
        with self.out.status("running…") if self.interactive else contextlib.nullcontext(), self._ctrl_c_raises():
            result = self.session.run()
        for i, output in enumerate(result.outputs):
            if output is None or not (output.stdout or output.stderr):
                continue
            self.out.rule("prelude" if i == 0 else f"turn {i}", style="dim")
            if output.stdout:
                self.out.print(Text(output.stdout.rstrip("\n")))
            if output.stderr:
                self.out.print(Text(output.stderr.rstrip("\n"), style="red"))
        where = "" if result.stopped_in is None else " in the prelude" if result.stopped_in == 0 else f" in turn {result.stopped_in}"
        if result.status == PASSED:
            self.out.print(Text(f"ok ({result.seconds:.2f} s)", style="green"))
        else:
            self.out.print(Text(f"{result.status}{where}: {result.reason}", style="bold red"))

    # -- files and settings ---------------------------------------------------------------------------

    def cmd_save(self, arg: str) -> None:
        path = _path(arg, "/save FILE")
        self.session.save(path)
        self.path = path
        self.note(f"saved; the session now lives in {path}")

    def cmd_load(self, arg: str) -> None:
        path = _path(arg, "/load FILE")
        old = self.session
        self.session = Session.load(path, generator=old.generator, params=old.params, sandbox=old.sandbox)
        self.path = path
        self.note(f"loaded {path}: {_turns(self.session)} (the previous session stays in its file)")

    def cmd_set(self, arg: str) -> None:
        if not arg:
            params = self.session.params
            self.out.print(Text("  ".join(f"{key} {getattr(params, key)}" for key in SETTINGS)))
            return
        key, _, value = arg.partition(" ")
        if key not in SETTINGS or not value.strip():
            raise ValueError(f"/set KEY VALUE, with KEY one of {', '.join(SETTINGS)}")
        parsed = None if key == "seed" and value.strip() == "none" else _number(value.strip(), SETTINGS[key], key)
        self.session.params = replace(self.session.params, **{key: parsed})

    def cmd_help(self, arg: str) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for command, what in COMMANDS.items():
            table.add_row(command, what)
        self.out.print(Text("Type what the next step of the program should do; its code is generated."))
        self.out.print(table)
        self.out.print(Text(f"Ctrl-C stops a generation (or /run) and, at the prompt, clears the line. The session is "
                            f"saved in {self.path}.", style="dim"))

    def _print_code(self, code: str) -> None:
        if self.interactive:
            self.out.print(self.show_code(code))
        else:
            self.out.out(code.rstrip("\n") + "\n", highlight=False)

    # -- input ----------------------------------------------------------------------------------------

    def _prompt_reader(self) -> Callable[[str], str]:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory

        history = state_dir() / "chat_history"
        history.parent.mkdir(parents=True, exist_ok=True)
        commands = [c.split()[0] for c in COMMANDS] + ["/exit"]
        prompt = PromptSession(
            history=FileHistory(str(history)),
            auto_suggest=AutoSuggestFromHistory(),
            completer=WordCompleter(commands, sentence=True),
            complete_while_typing=False,
        )
        self._terminal_input = prompt.input
        return prompt.prompt


def _turns(session: Session) -> str:
    n = len(session.turns)
    return f"{n} turn" if n == 1 else f"{n} turns"


def _line_reader() -> Callable[[str], str]:
    def read(_: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read


def _int(text: str, what: str) -> int:
    return _number(text, int, what)


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} must be {'an integer' if kind is int else 'a number'}, not {text!r}") from None


def _path(arg: str, usage: str) -> Path:
    if not arg:
        raise ValueError(f"usage: {usage}")
    return Path(os.path.expanduser(arg))


def edit_in_editor(code: str) -> str:
    """``code`` after a person edited it in $VISUAL / $EDITOR (default vi)."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    fd, name = tempfile.mkstemp(prefix="codegen-lm-turn-", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(code)
        try:
            done = subprocess.run([*shlex.split(editor), name])
        except FileNotFoundError:
            raise ValueError(f"editor {editor!r} not found; set $EDITOR to your editor's command") from None
        if done.returncode != 0:
            raise ValueError(f"the editor exited with status {done.returncode}; the turn is unchanged")
        return Path(name).read_bytes().decode("utf-8")
    finally:
        os.unlink(name)


def run(file: str | None, prelude_file: str | None, params: SamplingParams, load: Callable[[], Generator]) -> int:
    """The ``chat`` command: open (or start) the session file, then load the model with ``load`` and run the
    REPL; returns the exit status."""
    path = Path(file) if file else None
    if path is not None and path.exists():
        if prelude_file is not None:
            raise ValueError(f"{path} already has its prelude; --prelude is for a new session")
        prelude, turns = read_session_file(path)  # fail fast, before loading the model
    else:
        prelude = Path(prelude_file).read_text(encoding="utf-8") if prelude_file is not None else MTPB_PRELUDE
        turns = []
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive and importlib.util.find_spec("prompt_toolkit") is None:
        raise ValueError("the interactive chat needs prompt_toolkit: pip install 'codegen-lm[chat]'")
    session = Session(load(), prelude, turns, params)
    return Chat(session, path or new_session_path(), interactive).loop()
