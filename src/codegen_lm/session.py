"""Conversational program synthesis: a program written step by step, each step (a *turn*) a one-line spec in
natural language that the model answers with code, everything before it serving as context.

The format is that of CodeGen's multi-turn programming benchmark (MTPB, DESIGN §4)::

    prelude + "# {spec 1}\\n" + code 1 + "\\n\\n" + ... + "# {spec k}\\n"      -> the model writes code k

A turn's code is the sampled completion cut by MTPB's truncation (:func:`truncate_code`): before a line that
starts with ``#`` (the next step's comment), ``'''`` or ``\"\"\"``, before three newlines, before a second
top-level ``def`` or ``print``, or at EOS. These cuts are the turn's stop sequences: the text is checked as it
streams and generation ends as soon as a cut is certain, so the code is exactly what MTPB would keep.

A session saves to a plain ``.py`` file: the program itself, with ``# %% prelude`` and ``# %% turn N``
marker comments (the "percent" cell format editors understand) saying where each part begins. Deleting the
marker lines gives :meth:`Session.program` exactly; see :func:`dumps` and :func:`loads`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from .engine import GenerationError, Generator, SamplingParams
from .hub import atomic_write_text
from .tokenizer import truncate_before_pattern

MTPB_PRELUDE = "# Import libraries.\n\nimport numpy as np\n\n"
MTPB_PATTERNS = ("^#", re.escape("<|endoftext|>"), "^'''", '^"""', "\n\n\n")
# Line starts MTPB cuts at (once complete, the 2nd print/def); while the last line could still grow into
# one, it is held back from the stream.
_CUT_LINE_STARTS = ("print", "def", "'''", '"""')
# MTPB's sampling: temperature 0.2, top-p 0.95, 128 new tokens (its usual max_gen_length).
DEFAULT_PARAMS = SamplingParams(max_new_tokens=128, temperature=0.2, top_p=0.95)

PRELUDE_MARK = "# %% prelude"
TURN_MARK = "# %% turn {}"
_MARK = re.compile(r"^# %% (prelude|turn \d+)[ \t]*$", re.MULTILINE)


class Turn(NamedTuple):
    spec: str  # one line of natural language (written as a "# " comment)
    code: str  # the model's (or a person's) code for it


# -- the MTPB format -------------------------------------------------------------------------------------


def check_spec(spec: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("a turn's spec is empty; say in words what the next step of the program should do")
    if "\n" in spec or "\r" in spec:
        raise ValueError(f"a turn's spec is one line (it becomes a '# ' comment); got {spec!r}")
    return spec


def format_turn(spec: str, code: str) -> str:
    return f"# {spec}\n{code}\n\n"


def program_text(prelude: str, turns: Sequence[tuple[str, str]]) -> str:
    return prelude + "".join(format_turn(spec, code) for spec, code in turns)


def truncate_code(completion: str) -> str:
    """MTPB's cut of a sampled completion (its ``truncate``)."""
    return truncate_before_pattern(completion, MTPB_PATTERNS)


def build_prompt(
    prelude: str,
    turns: Sequence[tuple[str, str]],
    new_spec: str,
    tokenizer: Any,
    max_positions: int = 2048,
    max_new_tokens: int = 128,
) -> tuple[str, int]:
    """The MTPB prompt for ``new_spec`` after ``turns`` (``(spec, code)`` pairs), and how many of the oldest
    turns were left out so that the prompt plus ``max_new_tokens`` fits ``max_positions`` tokens. The prelude
    and the new spec always stay; a ValueError says when even they do not fit."""
    budget = max_positions - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {max_positions} positions")
    head, tail = prelude, f"# {check_spec(new_spec)}\n"
    blocks = [format_turn(spec, code) for spec, code in turns]

    def size(k: int) -> int:
        return len(tokenizer.encode(head + "".join(blocks[k:]) + tail))

    # Start from the sum of separately encoded parts (BPE merges across part boundaries make it off by a
    # token or so per boundary), then settle on the exact count.
    sizes = [len(tokenizer.encode(b)) for b in blocks]
    total, k = len(tokenizer.encode(head + tail)) + sum(sizes), 0
    while k < len(blocks) and total > budget:
        total -= sizes[k]
        k += 1
    while k > 0 and size(k - 1) <= budget:
        k -= 1
    while (n := size(k)) > budget:
        if k == len(blocks):
            raise ValueError(
                f"the prelude and this spec alone take {n} tokens; with max_new_tokens {max_new_tokens} that exceeds "
                f"the model's {max_positions} positions; shorten the prelude or the spec, or lower max_new_tokens"
            )
        k += 1
    return head + "".join(blocks[k:]) + tail, k


class CodeCutter:
    """MTPB's truncation applied while a completion streams in. ``add`` returns the new text that is sure to
    be part of the code; ``done`` turns true once the cut is certain (or ``finish`` was called), and ``code``
    is the truncated text so far."""

    def __init__(self) -> None:
        self.text = ""  # the raw completion
        self.shown = 0  # characters of code handed out
        self.done = False
        self.reason: str | None = None  # "stop" (cut or EOS), "length", "abort"

    @property
    def code(self) -> str:
        return truncate_code(self.text)

    def add(self, piece: str) -> str:
        self.text += piece
        code = self.code
        if len(code) < len(self.text):  # a cut: text only grows, so it can never move
            self.done, self.reason = True, "stop"
            return self._emit(code, len(code))
        last = code[code.rfind("\n") + 1 :]
        if last:  # a line that could still become a 2nd print/def or a docstring quote
            held = len(last) if any(s.startswith(last) and s != last for s in _CUT_LINE_STARTS) else 0
        else:  # trailing newlines: "#" or more newlines may follow and cut before them
            held = len(code) - len(code.rstrip("\n"))
        return self._emit(code, len(code) - held)

    def finish(self, reason: str) -> str:
        """Generation ended (EOS, length limit, stopped): everything held back is code."""
        self.done, self.reason = True, reason
        code = self.code
        return self._emit(code, len(code))

    def _emit(self, code: str, upto: int) -> str:
        piece = code[self.shown : upto]
        self.shown = max(self.shown, upto)
        return piece


def sample_codes(generator: Generator, prompt: str, params: SamplingParams, cutters: Sequence[CodeCutter],
                 stop: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
    """Sample ``params.n`` turn codes for ``prompt`` into ``cutters`` (one each); yields ``(index, new code)``
    as code becomes certain, and ends the request once every sample is cut. ``stop()`` is asked before each
    scheduler step (the first prefills the prompt, each later one decodes a token): once it is true the request
    ends there, leaving the cutters that are not done unfinished."""
    scheduler = generator.scheduler()
    request = scheduler.add_request(prompt, params)
    while scheduler.has_unfinished():
        if stop is not None and stop():
            scheduler.abort(request)
            return
        for out in scheduler.step():
            if out.error is not None:
                raise GenerationError(f"generation failed: {out.error}")
            cutter = cutters[out.index]
            if cutter.done:
                continue
            piece = cutter.add(out.text)
            if out.finished and not cutter.done:
                piece += cutter.finish(out.finish_reason)
            if piece:
                yield out.index, piece
        if all(c.done for c in cutters):
            scheduler.abort(request)


# -- saving ----------------------------------------------------------------------------------------------


def _check_no_marks(text: str, what: str) -> str:
    if m := _MARK.search(text):
        raise ValueError(
            f"{what} contains the line {m.group(0).strip()!r}, which session files use as a marker; indent or reword it"
        )
    return text


def check_prelude(prelude: str) -> str:
    """A prelude ends with a newline (so the first spec starts a line) and has no marker lines."""
    if prelude and not prelude.endswith("\n"):
        prelude += "\n"
    return _check_no_marks(prelude, "the prelude")


def dumps(prelude: str, turns: Sequence[tuple[str, str]]) -> str:
    """A session as a runnable ``.py`` file: the program, with a marker line before the prelude and each turn."""
    parts = [PRELUDE_MARK, "\n", check_prelude(prelude)]
    for number, (spec, code) in enumerate(turns, 1):
        parts += [TURN_MARK.format(number), "\n", format_turn(check_spec(spec), _check_no_marks(code, f"turn {number}"))]
    return "".join(parts)


def loads(text: str, source: str = "the session file") -> tuple[str, list[Turn]]:
    """Read what :func:`dumps` wrote, exactly. Hand-written files: without markers the whole file is the
    prelude; a turn's code may lack its two closing newlines; numbers in turn markers are not checked. Anything
    that would have to be dropped or guessed (a turn without its spec line, a misplaced prelude marker) is a
    ValueError naming the line. A file with Windows line endings throughout is read with Unix ones."""
    if not text.strip():
        raise ValueError(f"{source} is empty; a session file is a .py file written by /save or Session.save")
    if text.count("\r\n") == text.count("\n"):  # a file with Windows line endings throughout
        text = text.replace("\r\n", "\n")
    marks = list(_MARK.finditer(text))
    if not marks:
        return check_prelude(text), []

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def body(i: int) -> str:  # the text after marker i's line, up to the next marker
        start = min(marks[i].end() + 1, len(text))
        return text[start : marks[i + 1].start() if i + 1 < len(marks) else len(text)]

    first = 0
    prelude = text[: marks[0].start()]
    if marks[0].group(1) == "prelude":
        prelude += body(0)
        first = 1
    turns = []
    for i in range(first, len(marks)):
        mark = marks[i]
        if mark.group(1) == "prelude":
            raise ValueError(
                f"{source}, line {line_of(mark.start())}: a second '{PRELUDE_MARK}' marker; a session file has one, "
                "at the top (rename this one if it is part of your code)"
            )
        spec, _, rest = body(i).partition("\n")
        if not spec.startswith("#") or not spec[1:].strip():
            raise ValueError(
                f"{source}, line {line_of(mark.start()) + 1}: '{mark.group(0).strip()}' must be followed by the "
                "turn's spec as a comment line ('# what this step does')"
            )
        spec = spec[2:] if spec.startswith("# ") else spec[1:]
        # dumps ends every turn with "\n\n"; a hand-edited turn may have fewer closing newlines.
        code = rest[:-2] if rest.endswith("\n\n") else rest.removesuffix("\n")
        turns.append(Turn(spec, code))
    return check_prelude(prelude), turns


def read_session_file(path: str | Path) -> tuple[str, list[Turn]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file; give the path of a session (.py) file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); a session file is a .py file") from None
    return loads(text, str(path))


# -- running ---------------------------------------------------------------------------------------------

# Each part runs in one shared namespace, compiled under its own name ("<turn 2>") so tracebacks point into
# the turn (its lines registered with linecache so they are shown). A marker with a per-run nonce goes to
# stdout and stderr before each part: output is attributed to the part that printed it.
_RUNNER = """\
import linecache, sys, traceback
_nonce = {nonce!r}
_namespace = {{"__name__": "__main__"}}
for _i, (_name, _source) in enumerate({parts!r}):
    linecache.cache[_name] = (len(_source), None, _source.splitlines(True), _name)
    for _stream in (sys.stdout, sys.stderr):
        _stream.write("<<<%s %d>>>\\n" % (_nonce, _i))
        _stream.flush()
    try:
        exec(compile(_source, _name, "exec"), _namespace)
    except SystemExit:
        raise
    except BaseException as _e:
        traceback.print_exception(type(_e), _e, _e.__traceback__.tb_next)
        sys.stderr.flush()
        sys.exit(_nonce)
"""


@dataclass(frozen=True)
class PartOutput:
    stdout: str
    stderr: str


@dataclass(frozen=True)
class RunResult:
    """How a session's program ran. ``outputs[0]`` is the prelude's output, ``outputs[i]`` turn i's (counting
    from 1, as the file markers do); None for parts that never started."""

    status: str  # a sandbox status: "passed", "failed", "timed out", "crashed", "limit hit"
    reason: str  # "" when passed; else the exception ("NameError: ...") or the limit
    outputs: list[PartOutput | None]
    stopped_in: int | None  # the part that raised or was running when the program was stopped
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _split(stream: str, nonce: str, parts: int) -> list[str | None]:
    pieces = re.split(rf"<<<{nonce} (\d+)>>>\n", stream)
    out: list[str | None] = [None] * parts
    for index, text in zip(pieces[1::2], pieces[2::2]):
        out[int(index)] = text
    return out


def run_program(prelude: str, turns: Sequence[tuple[str, str]], sandbox: Any, limits: Any = None) -> RunResult:
    """Run a session's program in ``sandbox`` (a :class:`codegen_lm.sandbox.Sandbox`), output split by part."""
    nonce = secrets.token_hex(8)
    parts = [("<prelude>", prelude)] + [(f"<turn {i}>", code) for i, (_, code) in enumerate(turns, 1)]
    result = sandbox.run(_RUNNER.format(nonce=nonce, parts=parts), limits)
    stdout, stderr = _split(result.stdout, nonce, len(parts)), _split(result.stderr, nonce, len(parts))
    outputs = [None if o is None and e is None else PartOutput(o or "", e or "") for o, e in zip(stdout, stderr)]
    started = [i for i, o in enumerate(outputs) if o is not None]
    stopped_in = None if result.passed or not started else started[-1]
    reason = result.reason
    if nonce in reason and stopped_in is not None:  # an exception in a part: its traceback's last line says what
        lines = outputs[stopped_in].stderr.strip().splitlines()
        reason = lines[-1] if lines else "an exception"
    return RunResult(result.status, reason, outputs, stopped_in, result.seconds)


# -- the session -----------------------------------------------------------------------------------------


class TurnStream:
    """The code of one turn while it is generated. Iterating yields pieces of code as they become certain;
    when the iteration ends the turn is in the session (``turn``). Generation stops early, keeping the code so
    far as the turn (``finish_reason`` "abort"), when ``stop()`` (asked before every decode step) turns true, or
    when ``stop()`` the method is called on an abandoned iteration; a stream abandoned unfinished changes nothing."""

    def __init__(self, session: "Session", spec: str, replace_last: bool, stop: Callable[[], bool] | None = None):
        self.session, self.spec, self.replace_last, self._should_stop = session, check_spec(spec), replace_last, stop
        history = session.turns[:-1] if replace_last else session.turns
        self.prompt, self.dropped = session.prompt_for(spec, history)
        self.params = session._next_params(1)
        self.cutter = CodeCutter()
        self.turn: Turn | None = None
        self._based_on = session.version
        self._started = False

    @property
    def finish_reason(self) -> str | None:
        return self.cutter.reason

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise ValueError("a TurnStream runs once; ask the session for a new one")
        self._started = True
        for _, piece in sample_codes(self.session.generator, self.prompt, self.params, [self.cutter], self._should_stop):
            yield piece
        if self.cutter.done:
            self._commit()
            return
        tail = self.cutter.finish("abort")  # asked to stop: the text held back so far is code too
        if tail:
            yield tail
        self.stop()

    def stop(self) -> Turn | None:
        """End generation here and keep the code so far as the turn (nothing is added if there is none)."""
        if self.turn is None and not self.cutter.done:
            self.cutter.finish("abort")
        if self.turn is None and self.cutter.code:
            self._commit()
        return self.turn

    def _commit(self) -> None:
        if self.turn is not None:
            return
        session = self.session
        if session.version != self._based_on:
            raise ValueError("the session changed while this turn was being generated; generate it again")
        turn = Turn(self.spec, self.cutter.code)
        kept = session.turns[:-1] if self.replace_last else session.turns
        session._apply(kept + (turn,))
        self.turn = turn


class Session:
    """A multi-turn program: ``prelude`` and ``turns``; ``say`` adds a turn, ``retry``/``alternatives`` resample
    the last one, ``edit`` rewrites one by hand, ``undo``/``redo`` step through changes, ``program`` and
    ``run`` give and execute the whole program, ``save``/``load`` keep it in a ``.py`` file.

    ``generator`` may be None for a session that is only read, edited, run or saved. Each generation draws
    seeds ``params.seed + k`` (k counting the samples drawn so far) when ``params.seed`` is set.
    """

    def __init__(
        self,
        generator: Generator | None = None,
        prelude: str = MTPB_PRELUDE,
        turns: Sequence[tuple[str, str]] = (),
        params: SamplingParams = DEFAULT_PARAMS,
        sandbox: Any = None,
    ):
        self.generator = generator
        self.prelude = check_prelude(prelude)
        self._turns = tuple(Turn(check_spec(s), _check_no_marks(c, f"turn {i}")) for i, (s, c) in enumerate(turns, 1))
        self.params = params
        self.sandbox = sandbox
        self.dropped = 0  # turns left out of the latest prompt (they did not fit the model's positions)
        self._undo: list[tuple[Turn, ...]] = []
        self._redo: list[tuple[Turn, ...]] = []
        self._draws = 0
        self.version = 0  # counts changes (autosave when it moves)

    @property
    def turns(self) -> tuple[Turn, ...]:
        return self._turns

    # -- generation -----------------------------------------------------------------------------------

    def prompt_for(self, spec: str, history: Sequence[tuple[str, str]] | None = None) -> tuple[str, int]:
        """The prompt for ``spec`` after ``history`` (default: all turns) and how many old turns it leaves out."""
        generator = self._generator()
        prompt, dropped = build_prompt(
            self.prelude,
            self._turns if history is None else history,
            spec,
            generator.tokenizer,
            generator.model.config.n_positions,
            self.params.max_new_tokens,
        )
        self.dropped = dropped
        return prompt, dropped

    def stream(self, spec: str, stop: Callable[[], bool] | None = None) -> TurnStream:
        """A new turn for ``spec``, streamed; see :class:`TurnStream` (and ``stop``)."""
        return TurnStream(self, spec, replace_last=False, stop=stop)

    def stream_retry(self, stop: Callable[[], bool] | None = None) -> TurnStream:
        """Another sample of the last turn's code, streamed; it replaces the current code when done."""
        return TurnStream(self, self._last().spec, replace_last=True, stop=stop)

    def say(self, spec: str, on_text: Callable[[str], Any] | None = None) -> Turn:
        """Generate the code for a new turn; ``on_text`` sees each piece as it comes."""
        return self._consume(self.stream(spec), on_text)

    def retry(self, on_text: Callable[[str], Any] | None = None) -> Turn:
        """Replace the last turn's code with another sample (undo brings the old one back)."""
        return self._consume(self.stream_retry(), on_text)

    def alternatives(self, n: int, stop: Callable[[], bool] | None = None) -> list[str] | None:
        """``n`` fresh samples of the last turn's code (one shared prefill), the session unchanged; keep one
        with ``edit(-1, code)``. None when ``stop()`` (asked before every decode step) turned true first."""
        last = self._last()
        prompt, _ = self.prompt_for(last.spec, self._turns[:-1])
        cutters = [CodeCutter() for _ in range(n)]
        for _ in sample_codes(self._generator(), prompt, self._next_params(n), cutters, stop):
            pass
        return [c.code for c in cutters] if all(c.done for c in cutters) else None

    @staticmethod
    def _consume(stream: TurnStream, on_text: Callable[[str], Any] | None) -> Turn:
        for piece in stream:
            if on_text is not None:
                on_text(piece)
        assert stream.turn is not None
        return stream.turn

    def _next_params(self, n: int) -> SamplingParams:
        seed = None if self.params.seed is None else self.params.seed + self._draws
        self._draws += n
        return replace(self.params, n=n, seed=seed)

    def _generator(self) -> Generator:
        if self.generator is None:
            raise ValueError("this session has no model to generate with; create it with a Generator")
        return self.generator

    def _last(self) -> Turn:
        if not self._turns:
            raise ValueError("the session has no turns yet; say what the first step should do")
        return self._turns[-1]

    # -- editing --------------------------------------------------------------------------------------

    def edit(self, index: int, code: str) -> None:
        """Replace turn ``index``'s code (0-based; negative counts from the end)."""
        n = len(self._turns)
        if not -n <= index < n:
            raise ValueError(f"turn index {index} is out of range: the session has {n} turns")
        index %= n
        turns = list(self._turns)
        turns[index] = Turn(turns[index].spec, _check_no_marks(code, f"turn {index + 1}"))
        self._apply(tuple(turns))

    def _apply(self, turns: tuple[Turn, ...]) -> None:
        self._undo.append(self._turns)
        self._redo.clear()
        self._turns = turns
        self.version += 1

    def undo(self) -> bool:
        """Go back one change (a turn said, retried or edited); False when there is nothing to undo."""
        if not self._undo:
            return False
        self._redo.append(self._turns)
        self._turns = self._undo.pop()
        self.version += 1
        return True

    def redo(self) -> bool:
        if not self._redo:
            return False
        self._undo.append(self._turns)
        self._turns = self._redo.pop()
        self.version += 1
        return True

    # -- the program ----------------------------------------------------------------------------------

    def program(self) -> str:
        """The whole program: the prelude and every turn in the MTPB format."""
        return program_text(self.prelude, self._turns)

    def run(self, limits: Any = None) -> RunResult:
        """Run the program in the sandbox (default limits: the sandbox's); output and errors by turn."""
        if self.sandbox is None:
            from .sandbox import Sandbox

            self.sandbox = Sandbox(workers=1, allow_unsandboxed=True)  # code the person has seen: a warning is enough
        return run_program(self.prelude, self._turns, self.sandbox, limits)

    def dumps(self) -> str:
        return dumps(self.prelude, self._turns)

    def save(self, path: str | Path) -> None:
        """Write the session as a runnable ``.py`` file (atomically)."""
        atomic_write_text(path, self.dumps())

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> "Session":
        """A session from a file written by :meth:`save` (or a hand-written one; see :func:`loads`)."""
        prelude, turns = read_session_file(path)
        return cls(prelude=prelude, turns=turns, **kwargs)
