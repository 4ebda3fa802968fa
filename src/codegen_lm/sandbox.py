"""Run untrusted (model-generated) Python programs: bubblewrap isolation, resource limits, timeout, a pool.

Each program runs in its own process group, under bubblewrap (``bwrap``) when it works here: a read-only
view of the file system, a private size-limited ``/tmp`` as a fresh working directory (gone when the
program ends), no network, its own pid/ipc/uts namespaces, and death with the harness. Inside, a small
bootstrap sets the rlimits (address space, CPU, file size, open files, processes), drops to an
unprivileged uid when the harness runs as root (root is exempt from the process limit), runs the program
and reports on a private pipe how it ended. Without bwrap only the limits apply, and a warning says so.

The verdict channel guards against accidents (``sys.exit(0)``, ``os._exit``, crashes), not against code
written to deceive this harness: such code could write a fake verdict itself.
"""

from __future__ import annotations

import functools
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

PASSED, FAILED, TIMED_OUT, CRASHED, LIMIT_HIT = "passed", "failed", "timed out", "crashed", "limit hit"
STATUSES = (PASSED, FAILED, TIMED_OUT, CRASHED, LIMIT_HIT)

# Unprivileged uids used when the harness is root, one per concurrent program so that one program's fork
# bomb does not use up another's process limit (RLIMIT_NPROC counts per uid).
ROOT_DROP_UID_BASE = 1_000_000


class SandboxWarning(UserWarning):
    """Programs run with less isolation than asked for."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds; then the whole process group is killed
    memory: int = 2 << 30  # bytes of address space per process (RLIMIT_AS)
    cpu: int | None = None  # CPU seconds (RLIMIT_CPU); None: the timeout rounded up, plus one
    file_size: int = 64 << 20  # bytes per written file (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # processes and threads (RLIMIT_NPROC)
    output: int = 1 << 20  # bytes of stdout (and of stderr) kept; more stops the program
    tmp_size: int = 128 << 20  # bytes in the private /tmp (bubblewrap only)

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        for name in ("memory", "file_size", "open_files", "processes", "output", "tmp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limit {name} must be positive, got {getattr(self, name)}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu if self.cpu is not None else int(self.timeout) + 2


@dataclass(frozen=True)
class Result:
    status: str  # one of STATUSES
    reason: str  # why, in a few words ("" when passed)
    stdout: str
    stderr: str
    returncode: int | None
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == PASSED


# Runs inside the sandbox before the program: argv = code fd, status fd, uid to drop to (-1: stay),
# then AS, CPU, FSIZE, NOFILE, NPROC, and the interpreter's sys.path. Reports "status<TAB>reason" on the status fd once the program ends.
_BOOTSTRAP = r"""
import os, resource, sys
fd_code, fd_status, uid, mem, cpu, fsize, nofile, nproc = map(int, sys.argv[1:9])
sys.path[:] = sys.argv[9].split(os.pathsep)  # what site would have set up (python -S skips it: 4x faster start)
import builtins
builtins.exit = builtins.quit = sys.exit
with os.fdopen(fd_code, "rb") as f:
    source = f.read()
os.set_inheritable(fd_status, False)
R = resource
for what, soft, hard in ((R.RLIMIT_AS, mem, mem), (R.RLIMIT_CPU, cpu, cpu + 1), (R.RLIMIT_FSIZE, fsize, fsize),
                         (R.RLIMIT_NOFILE, nofile, nofile), (R.RLIMIT_NPROC, nproc, nproc), (R.RLIMIT_CORE, 0, 0)):
    R.setrlimit(what, (soft, hard))
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
write, out, err, me = os.write, sys.stdout, sys.stderr, os.getpid()
def report(status, reason=""):
    if os.getpid() != me:  # a forked child that ran to the end: only the program's own process reports
        os._exit(0 if status == "passed" else 1)
    for stream in (out, err):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        write(fd_status, ("%s\t%s" % (status, reason[:300].replace("\n", " "))).encode("utf-8", "replace"))
    except BaseException:
        pass
    os._exit(0 if status == "passed" else 1)
sys.argv = ["<program>"]
try:
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    report("failed", "sys.exit(%r) before the end of the program" % (e.code,))
except BaseException as e:
    try:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    except BaseException:
        pass
    n = getattr(e, "errno", None)
    what = "%s: %s" % (type(e).__name__, e)
    if isinstance(e, MemoryError):
        report("limit hit", "memory limit reached (MemoryError)")
    elif n == 27:
        report("limit hit", "file size limit reached (" + what + ")")
    elif n == 24:
        report("limit hit", "open files limit reached (" + what + ")")
    elif n == 11 and isinstance(e, BlockingIOError):
        report("limit hit", "process limit reached (" + what + ")")
    report("failed", what)
report("passed")
"""

_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

_SIGNAL_LIMITS = {signal.SIGXCPU: "CPU time limit reached", signal.SIGXFSZ: "file size limit reached"}


@functools.cache
def _site_path() -> tuple[str, ...]:
    """sys.path of a fresh ``python -I`` (site-packages and .pth entries included)."""
    out = subprocess.run([sys.executable, "-I", "-c", "import sys; print('\\n'.join(sys.path))"],
                         capture_output=True, text=True, check=True, env=_ENV).stdout
    return tuple(p for p in out.split("\n") if p)


@functools.cache
def _interpreter_paths() -> tuple[str, ...]:
    """Files and folders the sandboxed interpreter reads: itself, its prefixes and its sys.path."""
    paths = {os.path.realpath(sys.executable), os.path.abspath(sys.executable), sys.prefix, sys.base_prefix,
             sys.exec_prefix, *_site_path()}
    return tuple(sorted(p for p in paths if os.path.exists(p)))


@functools.cache
def _reachable_args(paths: tuple[str, ...]) -> tuple[str, ...]:
    """bwrap arguments that let any uid reach ``paths``: each folder on the way that others may not enter
    (like /root) is covered with an empty tmpfs into which only the needed entry is bound (read-only).
    Folders under /tmp are taken from the host too, since the sandbox's /tmp is a fresh tmpfs."""
    args: list[str] = []
    covered: set[str] = set()  # folders replaced by an empty tmpfs
    bound: set[str] = set()  # entries bound from the host (everything below them is visible)
    for path in paths:
        parts = Path(path).parts
        for i in range(1, len(parts)):
            folder, child = str(Path(*parts[:i])), str(Path(*parts[: i + 1]))
            if child in bound or folder in bound:
                break
            hidden = folder == "/tmp" or folder in covered or os.stat(folder).st_mode & 0o005 != 0o005
            if hidden:
                if folder not in covered and folder != "/tmp":
                    args += ["--perms", "0755", "--tmpfs", folder]
                    covered.add(folder)
                args += ["--ro-bind", child, child]
                bound.add(child)
                break
    return tuple(args)


class Sandbox:
    """Runs Python programs (source text) with isolation and limits; ``run`` for one, ``run_many`` for many
    in parallel (a pool of ``workers`` threads, each waiting on one program's process)."""

    def __init__(self, limits: Limits = Limits(), workers: int | None = None, isolate: bool | None = None):
        self.limits = limits
        self.workers = workers or os.cpu_count() or 1
        self._root = os.geteuid() == 0
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.workers):
            self._slots.put(slot)
        problem = bwrap_problem() if isolate is not False else "isolation turned off"
        if problem and isolate:
            raise RuntimeError(f"bubblewrap isolation was asked for but is unusable: {problem}")
        self.isolated = problem is None
        self.problem = problem
        if problem:
            warnings.warn(
                f"sandbox without bubblewrap ({problem}): programs run only with resource limits and a timeout; "
                "they CAN read and write your files, use the network, signal your processes, and a process that "
                "leaves its session can outlive the timeout"
                + (", and as root the process-count limit does not apply" if self._root else "")
                + ". Install bubblewrap (scripts/install-system-deps.sh) to isolate them.",
                SandboxWarning,
                stacklevel=2,
            )

    # -- one program ---------------------------------------------------------------------------------
    def run(self, code: str, limits: Limits | None = None) -> Result:
        slot = self._slots.get()
        try:
            return self._run(code, limits or self.limits, slot)
        finally:
            self._slots.put(slot)

    def run_many(self, codes: Iterable[str], limits: Limits | None = None) -> Iterator[tuple[int, Result]]:
        """Yield ``(index, result)`` for every program as each finishes (not in order)."""
        with ThreadPoolExecutor(self.workers) as pool:
            pending = {pool.submit(self.run, code, limits): i for i, code in enumerate(codes)}
            for future in as_completed(pending):
                yield pending[future], future.result()

    def _command(self, limits: Limits, fd_code: int, fd_status: int, slot: int) -> list[str]:
        uid = ROOT_DROP_UID_BASE + slot if self._root else -1
        if not self.isolated and self._root:
            uid = -1  # the limits-only fallback keeps the harness's uid (it could not read the interpreter otherwise)
        python = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, str(fd_code), str(fd_status), str(uid), str(limits.memory),
                  str(limits.cpu_seconds), str(limits.file_size), str(limits.open_files), str(limits.processes),
                  os.pathsep.join(_site_path())]
        if not self.isolated:
            return python
        cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session",
               "--perms", "1777", "--size", str(limits.tmp_size), "--tmpfs", "/tmp", "--chdir", "/tmp",
               "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"]
        # An interpreter under /tmp (a throwaway venv) would vanish under the private /tmp: bind it back.
        cmd += _reachable_args(tuple(p for p in _interpreter_paths() if p.startswith("/tmp/")))
        if self._root:
            # Root ignores RLIMIT_NPROC: the bootstrap drops to an unprivileged uid, so it needs to reach the
            # interpreter's files (pyenv under /root, say) and the rights to change uid, nothing more.
            cmd += _reachable_args(tuple(p for p in _interpreter_paths() if not p.startswith("/tmp/")))
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            cmd += ["--unshare-user"]
        return cmd + python

    def _run(self, code: str, limits: Limits, slot: int) -> Result:
        start = time.monotonic()
        workdir = None if self.isolated else tempfile.mkdtemp(prefix="codegen-lm-sandbox-")
        env = dict(_ENV, HOME=workdir, TMPDIR=workdir) if workdir else dict(_ENV)
        code_file = tempfile.TemporaryFile()
        code_file.write(code.encode("utf-8", "surrogatepass"))
        code_file.seek(0)
        status_r, status_w = os.pipe()
        fd_code = code_file.fileno()
        try:
            proc = subprocess.Popen(
                self._command(limits, fd_code, status_w, slot),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(fd_code, status_w), cwd=workdir or "/", env=env, start_new_session=True,
            )
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            code_file.close()
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        os.close(status_w)
        code_file.close()
        try:
            stdout, stderr, status, why = _collect(proc, status_r, limits, start)
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            os.close(status_r)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        seconds = time.monotonic() - start
        out, err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
        return Result(*_verdict(proc.returncode, status, why, err, limits), out, err, proc.returncode, seconds)


def _collect(proc: subprocess.Popen, status_fd: int, limits: Limits, start: float) -> tuple[bytes, bytes, bytes, str]:
    """Read stdout, stderr and the status pipe until all close, the deadline passes or output overflows."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    why = ""
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = start + limits.timeout - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk
                if len(buf) > limits.output and key.fd != status_fd:
                    del buf[limits.output :]
                    why = "output"
            if why:
                break
    if not why:
        try:  # pipes closed; the process itself may still be exiting
            proc.wait(max(0.0, start + limits.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            why = "timeout"
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[status_fd]), why


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # the group leader changed uid: kill what we still can
        proc.kill()


def _verdict(returncode: int, status: bytes, why: str, stderr: str, limits: Limits) -> tuple[str, str]:
    if why == "timeout":
        return TIMED_OUT, f"still running after the {limits.timeout:g} s wall-clock limit"
    if why == "output":
        return LIMIT_HIT, f"output over the {limits.output} byte limit"
    if status:
        state, _, reason = status.decode("utf-8", "replace").partition("\t")
        if state in STATUSES:
            return state, reason
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig in _SIGNAL_LIMITS:
            return LIMIT_HIT, f"{_SIGNAL_LIMITS[sig]} ({name})"
        return CRASHED, f"killed by {name}"
    if stderr.startswith("bwrap:"):
        return CRASHED, stderr.strip().splitlines()[0]
    return FAILED, f"process exited with code {returncode} before the end of the program (os._exit?)"


@functools.cache
def bwrap_problem() -> str | None:
    """None when bubblewrap isolates programs here; otherwise why not (probed once per process)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    probe = Sandbox.__new__(Sandbox)
    probe.limits, probe.workers, probe.isolated, probe._root = Limits(timeout=30), 1, True, os.geteuid() == 0
    probe._slots = queue.SimpleQueue()
    probe._slots.put(0)
    check = "import os, socket\nassert os.getpid() < 10, 'no pid namespace'\nprint('ok')"
    try:
        result = probe.run(check)
    except OSError as e:
        return f"bwrap cannot start: {e}"
    if result.passed and result.stdout == "ok\n":
        return None
    return f"bwrap does not work here ({result.status}: {result.reason or result.stderr.strip()[:200]})"
