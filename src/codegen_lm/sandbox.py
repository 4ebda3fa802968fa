"""Run untrusted (model-generated) Python programs: isolation, resource limits, timeout, a pool.

Two modes:

* **bubblewrap** (``bwrap``; required unless asked otherwise): a read-only view of the file system with the
  home folders (/home, /root, $HOME) hidden, a private size-limited ``/tmp`` as a fresh working directory
  (gone when the program ends), no network, its own pid/ipc/uts namespaces (everything the program started
  dies with it), and death with the harness.
* **unsandboxed** (only with ``allow_unsandboxed=True`` or ``isolate=False``): a seccomp filter that keeps the
  program from signalling or tracing any process outside its own process group and from leaving that group
  (``setsid``, ``setpgid``, ``CLONE_PARENT``), Landlock where the kernel has it (5.13+: reads limited to the
  system's and the interpreter's folders, writes to the working folder; 6.7+: no TCP; 6.12+: no signals out),
  a fresh working folder that is also its ``$HOME`` and ``$TMPDIR``, and a guard on the disk space that folder
  takes.
  As root, each program runs as an unprivileged uid of its own, and everything left under that uid is killed
  afterwards. What stays open is said by :meth:`Sandbox.unsandboxed_warning` and the README.

In both, a small bootstrap sets the rlimits (address space, CPU, file size, open files, processes), drops to
an unprivileged uid when the harness runs as root (root is exempt from the process limit), runs the program
and reports how it ended on a pipe, tagged with a nonce that the program never sees in its source or
arguments; anything else written to that pipe makes the verdict "failed". After the program, everything it
started is killed, and ``run`` returns once it is gone.

The verdict guards against accidents and against programs that tamper with the harness's channel (``sys.exit``,
``os._exit``, a faked status line, replaced modules), not against code written to read this harness's memory
or to rewrite its own tests (``sys.settrace``): no harness that runs a program can prove it honest.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pwd
import random
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

PASSED, FAILED, TIMED_OUT, CRASHED, LIMIT_HIT = "passed", "failed", "timed out", "crashed", "limit hit"
STATUSES = (PASSED, FAILED, TIMED_OUT, CRASHED, LIMIT_HIT)

# Unprivileged uids that programs run as when the harness is root: each program leases one of its own (a lock
# file), so that one program's fork bomb does not use up another's process limit (RLIMIT_NPROC counts per
# uid) and killing "everything of that uid" touches nothing else, even with several harnesses running.
ROOT_DROP_UID_BASE, ROOT_DROP_UIDS = 1_000_000, 65_536
# How often the unsandboxed mode checks disk use (and, without pidfds, whether the program has exited), and how
# often any wait looks at the clock again (an injected clock may jump).
POLL_SECONDS, CLOCK_SECONDS = 0.05, 0.5

INSTALL_BWRAP = ("install bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap; Fedora: sudo dnf install bubblewrap; "
                 "or bash scripts/install-system-deps.sh)")
FIX_BWRAP = ("bubblewrap needs user namespaces: on a host allow them (sysctl kernel.unprivileged_userns_clone=1; Ubuntu "
             "23.10+: sysctl kernel.apparmor_restrict_unprivileged_userns=0), in Docker or Podman start the container with "
             "--security-opt seccomp=unconfined --security-opt apparmor=unconfined (or run the evaluation as root there "
             "with --cap-add SYS_ADMIN)")


class SandboxWarning(UserWarning):
    """Programs run with less isolation than bubblewrap gives."""


class SandboxUnavailableError(OSError):
    """Generated code cannot run here as asked: without isolation when that was not allowed, or not at all.
    An OSError, as the machine (not the program) is what is missing something."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds; then the whole process group is killed
    memory: int = 2 << 30  # bytes of address space per process (RLIMIT_AS)
    cpu: int | None = None  # CPU seconds (RLIMIT_CPU); None: the timeout rounded up, plus one
    file_size: int = 64 << 20  # bytes per written file (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # processes and threads (RLIMIT_NPROC)
    output: int = 1 << 20  # bytes of stdout (and of stderr) kept; more stops the program
    tmp_size: int = 128 << 20  # bytes of disk: the private /tmp's size (bubblewrap), or disk use allowed (unsandboxed)

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


# The unsandboxed mode's confinement, prepended to the bootstrap there only (compiling it costs every program).
_CONFINE = r"""
def confine(me):
    # seccomp: no signals, ptrace or process_vm_* beyond the program's own process group, and no way out of
    # it (setsid, setpgid, CLONE_PARENT, F_SETOWN/FIOSETOWN signal delivery). Denied calls fail with EPERM.
    import ctypes, struct
    arch, nr = {
        "x86_64": (0xC000003E, dict(kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297,
                   ptrace=101, process_vm_readv=310, process_vm_writev=311, setsid=112, setpgid=109, fcntl=72,
                   ioctl=16, clone=56)),
        "aarch64": (0xC00000B7, dict(kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
                    ptrace=117, process_vm_readv=270, process_vm_writev=271, setsid=157, setpgid=154, fcntl=25,
                    ioctl=29, clone=220)),
    }[os.uname().machine]
    nr.update(pidfd_send_signal=424, pidfd_getfd=438, clone3=435)
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x50001, 0x50026, 0x80000000
    prog, labels = [], {}
    def op(code, k, jt=0, jf=0):
        prog.append([code, jt, jf, k])
    def rule(name, *body):  # arguments: offset 16 + 8 * i holds the low 32 bits of argument i
        labels[name] = len(prog)
        for b in body:
            op(*b)
    op(LD, 4); op(JEQ, arch, 1, 0); op(RET, KILL)  # another ABI (int 0x80): no
    op(LD, 0)
    if arch == 0xC000003E:
        op(JGE, 0x40000000, "eperm", 0)  # x32 numbers
    calls = ["kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "fcntl", "ioctl", "clone", "clone3",
             "tkill", "pidfd_send_signal", "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev",
             "setsid", "setpgid"]
    for name in calls:
        op(JEQ, nr[name], name, 0)
    op(RET, ALLOW)
    # kill: signal 0 (does it exist?), the own process group (0 or -me) and the own process only
    rule("kill", (LD, 24), (JEQ, 0, "allow", 0), (LD, 16), (JEQ, 0, "allow", 0), (JEQ, me, "allow", 0),
         (JEQ, -me & 0xFFFFFFFF, "allow", "eperm"))
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        rule(name, (LD, 16), (JEQ, me, "allow", "eperm"))
    rule("fcntl", (LD, 24), (JEQ, 8, "eperm", 0), (JEQ, 10, "eperm", 0), (JEQ, 15, "eperm", "allow"))  # F_SETOWN, F_SETSIG, F_SETOWN_EX
    rule("ioctl", (LD, 24), (JEQ, 0x8901, "eperm", 0), (JEQ, 0x8902, "eperm", "allow"))  # FIOSETOWN, SIOCSPGRP
    rule("clone", (LD, 16), (JSET, 0x8000, "eperm", "allow"))  # CLONE_PARENT
    rule("clone3", (RET, ENOSYS))  # its flags sit in memory a filter cannot read; libc falls back to clone
    for name in calls[8:]:
        labels[name] = len(prog)
    rule("eperm", (RET, EPERM))
    rule("allow", (RET, ALLOW))
    for i, ins in enumerate(prog):
        for j in (1, 2):
            if isinstance(ins[j], str):
                ins[j] = labels[ins[j]] - i - 1
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code)
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Prog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):  # NO_NEW_PRIVS, SECCOMP filter
        raise OSError(ctypes.get_errno(), "seccomp: " + os.strerror(ctypes.get_errno()))

def landlock(abi):
    # Landlock (kernel 5.13+): read only the system folders and the interpreter's, write only the working folder,
    # no TCP (ABI 4+), no signals or abstract sockets beyond this domain (ABI 6+).
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    def check(r):
        if r < 0:
            raise OSError(ctypes.get_errno(), "landlock: " + os.strerror(ctypes.get_errno()))
        return r
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    attr = struct.pack("QQQ", fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = check(libc.syscall(444, attr, len(attr), 0))
    read, file_rights = 1 | 4 | 8, 1 | 2 | 4 | (1 << 14) | (1 << 15)  # EXECUTE|READ_FILE|READ_DIR; what a file may have
    rules = [(p, read) for p in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/opt", "/proc", "/sys",
                                  "/dev", sys.prefix, sys.base_prefix, sys.exec_prefix,
                                  os.path.dirname(os.path.realpath(sys.executable)), *sys.path)]
    rules += [("/dev/null", 2 | 4 | (1 << 14)), (os.getcwd(), fs)]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= file_rights
        check(libc.syscall(445, ruleset, 1, struct.pack("=Qi", rights & fs, fd), 0))
        os.close(fd)
    if libc.prctl(38, 1, 0, 0, 0):
        check(-1)
    check(libc.syscall(446, ruleset, 0))
    os.close(ruleset)

"""

# Runs before the program: argv = code fd, status fd, uid to drop to (-1: stay), confine (-1: nothing; 0: the
# seccomp filter; N > 0: also Landlock with ABI version N), AS, CPU, FSIZE, NOFILE, NPROC, and the interpreter's
# sys.path. The code file starts with a nonce line; the one status line, "nonce<TAB>status<TAB>reason", goes to the
# status fd once the program ends. What it needs to report is bound before the program runs; whatever else the
# program replaces, it cannot write a line with the nonce.
_BOOTSTRAP = r"""
def main():
    import builtins, resource
    fd_code, fd_status, uid, confined, mem, cpu, fsize, nofile, nproc = map(int, sys.argv[1:10])
    sys.path[:] = sys.argv[10].split(os.pathsep)  # what site would have set up (python -S skips it: 4x faster start)
    builtins.exit = builtins.quit = sys.exit
    with os.fdopen(fd_code, "rb") as f:
        nonce = f.readline().rstrip(b"\n")
        source = f.read()
    os.set_inheritable(fd_status, False)
    write, _exit, getpid, me = os.write, os._exit, os.getpid, os.getpid()
    out, err = sys.stdout, sys.stderr

    def report(status, reason=""):
        if getpid() != me:  # a forked child that ran to the end: only the program's own process reports
            _exit(0 if status == "passed" else 1)
        for stream in (out, err):
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            write(fd_status, nonce + ("\t%s\t%s" % (status, reason[:300].replace("\n", " "))).encode("utf-8", "replace"))
        except BaseException:
            pass
        _exit(0 if status == "passed" else 1)

    try:
        R = resource
        for what, soft, hard in ((R.RLIMIT_AS, mem, mem), (R.RLIMIT_CPU, cpu, cpu + 1), (R.RLIMIT_FSIZE, fsize, fsize),
                                 (R.RLIMIT_NOFILE, nofile, nofile), (R.RLIMIT_NPROC, nproc, nproc), (R.RLIMIT_CORE, 0, 0)):
            R.setrlimit(what, (soft, hard))
        if uid >= 0:
            os.setgroups([]); os.setgid(uid); os.setuid(uid)
        if confined > 0:
            landlock(confined)
        if confined >= 0:
            confine(me)
    except BaseException as e:
        report("crashed", "the sandbox could not be set up: %s: %s" % (type(e).__name__, e))
    sys.argv = ["<program>"]
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        try:
            reason = "sys.exit(%.80r) before the end of the program" % (e.code,)
        except BaseException:
            reason = "sys.exit() before the end of the program"
        report("failed", reason)
    except MemoryError:
        report("limit hit", "memory limit reached (MemoryError)")
    except BaseException as e:
        verdict = ("failed", "an exception")
        try:
            n = getattr(e, "errno", None) if isinstance(e, OSError) else None
            what = "%s: %s" % (type(e).__name__, e)
            verdict = {27: ("limit hit", "file size limit reached (" + what + ")"),
                       24: ("limit hit", "open files limit reached (" + what + ")"),
                       28: ("limit hit", "disk space limit reached (" + what + ")"),
                       11: ("limit hit", "process limit reached (" + what + ")") if isinstance(e, BlockingIOError) else None,
                       }.get(n) or ("failed", what)
            import traceback  # here, not up front (it doubles the start-up); a replaced one cannot forge the nonce
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
        report(*verdict)
    report("passed")

import os, sys
main()
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
def _site_path(python: str) -> tuple[str, ...]:
    """sys.path of a fresh ``python -I`` (site-packages and .pth entries included)."""
    out = subprocess.run([python, "-I", "-c", "import sys; print('\\n'.join(sys.path))"],
                         capture_output=True, text=True, check=True, env=_ENV).stdout
    return tuple(p for p in out.split("\n") if p)


@functools.cache
def _interpreter_paths(python: str) -> tuple[str, ...]:
    """Files and folders the sandboxed interpreter reads: itself, its prefixes and its sys.path."""
    prefixes = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix, sys.base_prefix, sys.exec_prefix, sep='\\n')"],
                              capture_output=True, text=True, check=True, env=_ENV).stdout.split("\n")
    paths = {os.path.realpath(python), os.path.abspath(python), *prefixes, *_site_path(python)}
    return tuple(sorted(p for p in paths if p and os.path.exists(p)))


@functools.cache
def _private_folders() -> tuple[str, ...]:
    """What bubblewrap hides behind an empty tmpfs: the home folders, where keys and personal files live."""
    homes = {"/home", "/root", os.path.expanduser("~"), pwd.getpwuid(os.getuid()).pw_dir}
    homes = {os.path.realpath(h) for h in homes if h and os.path.isdir(h)} - {"/"}
    return tuple(sorted(h for h in homes if not h.startswith("/tmp/") and not any(h.startswith(o + "/") for o in homes)))


@functools.cache
def _reachable_args(paths: tuple[str, ...], hidden: tuple[str, ...], root: bool) -> tuple[str, ...]:
    """bwrap arguments that cover each of ``hidden`` with an empty read-only tmpfs and bind ``paths`` back where
    they lie under one of those, under /tmp (the sandbox's /tmp is a fresh tmpfs), or, for a ``root`` harness whose
    programs run as another uid, under a folder others may not enter (that folder is covered too)."""
    args: list[str] = []
    covered: set[str] = set()  # folders replaced by an empty tmpfs
    for folder in hidden:
        args += ["--perms", "0755", "--tmpfs", folder]
        covered.add(folder)
    bound: set[str] = set()  # entries bound from the host (everything below them is visible)
    for path in paths:
        parts = Path(path).parts
        for i in range(1, len(parts)):
            folder, child = str(Path(*parts[:i])), str(Path(*parts[: i + 1]))
            if child in bound or folder in bound:
                break
            if folder == "/tmp" or folder in covered or (root and os.stat(folder).st_mode & 0o005 != 0o005):
                if folder not in covered and folder != "/tmp":
                    args += ["--perms", "0755", "--tmpfs", folder]
                    covered.add(folder)
                args += ["--ro-bind", child, child]
                bound.add(child)
                break
    for folder in sorted(covered):  # read-only once the binds are in place: nothing is written there
        args += ["--remount-ro", folder]
    return tuple(args)


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none), which the unsandboxed mode uses to confine programs further."""
    import ctypes

    try:
        return max(0, ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1))  # landlock_create_ruleset(VERSION)
    except (OSError, AttributeError):
        return 0


class Sandbox:
    """Runs Python programs (source text) with isolation and limits; ``run`` for one, ``run_many`` for many
    in parallel (a pool of ``workers`` threads, each waiting on one program's process).

    ``isolate``: True requires bubblewrap, False runs unsandboxed (with a warning), None (default) uses
    bubblewrap and refuses (:class:`SandboxUnavailableError`) when it is missing or does not work, unless
    ``allow_unsandboxed``, which falls back to the unsandboxed mode with a warning. ``python`` is the
    interpreter that runs the programs (default: this one); ``clock`` measures the timeout."""

    def __init__(self, limits: Limits = Limits(), workers: int | None = None, isolate: bool | None = None,
                 allow_unsandboxed: bool = False, python: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.workers = workers or os.cpu_count() or 1
        self.python = python or sys.executable
        self.clock = clock
        self._root = os.geteuid() == 0
        self._running = threading.BoundedSemaphore(self.workers)
        problem = bwrap_problem(self.python) if isolate is not False else "isolation turned off"
        if problem and isolate:
            raise SandboxUnavailableError(f"bubblewrap isolation was asked for but is unusable: {problem}")
        if problem and isolate is None and not allow_unsandboxed:
            raise SandboxUnavailableError(
                f"refusing to run generated code without a sandbox: {problem}; "
                f"{INSTALL_BWRAP if 'not installed' in problem else FIX_BWRAP}; or pass --allow-unsandboxed "
                "(allow_unsandboxed=True) to run it with resource limits only (README: residual risks)"
            )
        self.isolated = problem is None
        self.problem = problem
        if not self.isolated:
            trouble = unsandboxed_problem(self.python)
            if trouble:
                raise SandboxUnavailableError(f"cannot run generated code here: bubblewrap is unusable ({problem}) and "
                                              f"the unsandboxed mode does not work either ({trouble}); {INSTALL_BWRAP}")
            warnings.warn(self.unsandboxed_warning(), SandboxWarning, stacklevel=2)

    @property
    def mode(self) -> str:
        return "bubblewrap" if self.isolated else "unsandboxed, as an unprivileged uid" if self._root else "unsandboxed"

    def unsandboxed_warning(self) -> str:
        """What the unsandboxed mode leaves open, here (this kernel, this user), in one paragraph."""
        abi = landlock_abi()
        if abi:
            can = "read the system's folders (/usr, /etc, /proc, ...) and the interpreter's, write only their working folder"
            can += ", and use UDP and unix sockets (TCP is blocked)" if abi >= 4 else ", and use the network"
        elif self._root:
            can = "read every file that any user may read, write wherever any user may (/tmp, say), and use the network"
        else:
            can = "read and write all your files, and use the network"
        return (f"running generated code WITHOUT a sandbox ({self.problem}): programs can {can}; they get resource limits, "
                f"a timeout, a fresh working folder as $HOME, and cannot signal or trace processes outside their own group"
                f"{' (they run as an unprivileged uid)' if self._root else ''}. To isolate them, {INSTALL_BWRAP}.")

    # -- one program ---------------------------------------------------------------------------------
    def run(self, code: str, limits: Limits | None = None) -> Result:
        with self._running, _leased_uid() if self._root else contextlib.nullcontext(-1) as uid:
            return self._run(code, limits or self.limits, uid)

    def run_many(self, codes: Iterable[str], limits: Limits | None = None) -> Iterator[tuple[int, Result]]:
        """Yield ``(index, result)`` for every program as each finishes (not in order)."""
        with ThreadPoolExecutor(self.workers) as pool:
            pending = {pool.submit(self.run, code, limits): i for i, code in enumerate(codes)}
            for future in as_completed(pending):
                yield pending[future], future.result()

    def _command(self, limits: Limits, fd_code: int, fd_status: int, uid: int) -> list[str]:
        bootstrap = _BOOTSTRAP if self.isolated else _CONFINE + _BOOTSTRAP
        python = [self.python, "-I", "-S", "-c", bootstrap, str(fd_code), str(fd_status), str(uid),
                  str(-1 if self.isolated else landlock_abi()), str(limits.memory), str(limits.cpu_seconds), str(limits.file_size),
                  str(limits.open_files), str(self._nproc(limits, uid)), os.pathsep.join(_site_path(self.python))]
        if not self.isolated:
            return python
        cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session",
               "--perms", "1777", "--size", str(limits.tmp_size), "--tmpfs", "/tmp", "--chdir", "/tmp",
               "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"]
        # Home folders are hidden; an interpreter in one of them (pyenv, a venv) or under /tmp is bound back. Root
        # ignores RLIMIT_NPROC, so as root the bootstrap drops to an unprivileged uid, which needs to reach the
        # interpreter's files through folders others may not enter, and the rights to change uid, nothing more.
        cmd += _reachable_args(_interpreter_paths(self.python), _private_folders(), self._root)
        if self._root:
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            cmd += ["--unshare-user"]
        return cmd + python

    def _nproc(self, limits: Limits, uid: int) -> int:
        """RLIMIT_NPROC counts every process of the real uid: unsandboxed and not root, that is the user's own
        processes too, so the program gets ``limits.processes`` on top of those."""
        if self.isolated or uid >= 0:
            return limits.processes
        return limits.processes + _process_count(os.getuid())

    def _run(self, code: str, limits: Limits, uid: int) -> Result:
        start = self.clock()
        workdir = None if self.isolated else tempfile.mkdtemp(prefix="codegen-lm-sandbox-")
        if workdir and uid >= 0:
            os.chown(workdir, uid, uid)
        env = dict(_ENV, HOME=workdir, TMPDIR=workdir) if workdir else dict(_ENV)
        nonce = secrets.token_hex(16).encode()
        code_file = tempfile.TemporaryFile()
        code_file.write(nonce + b"\n" + code.encode("utf-8", "surrogatepass"))
        code_file.seek(0)
        status_r, status_w = os.pipe()
        fd_code = code_file.fileno()
        try:
            proc = subprocess.Popen(
                self._command(limits, fd_code, status_w, uid),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(fd_code, status_w), cwd=workdir or "/", env=env, start_new_session=True,
            )
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            code_file.close()
            if workdir:
                _remove_tree(workdir)
            raise
        os.close(status_w)
        code_file.close()
        try:
            stdout, stderr, status, why = _collect(proc, status_r, limits, start + limits.timeout, self.clock,
                                                   disk=workdir)
        finally:
            _stop(proc, self.isolated, uid)
            proc.stdout.close()
            proc.stderr.close()
            os.close(status_r)
            if workdir:
                _remove_tree(workdir)
        seconds = self.clock() - start
        out, err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
        verdict = _verdict(proc.returncode, _status(status, nonce), why, err, limits, self.isolated)
        return Result(*verdict, out, err, proc.returncode, seconds)


def _collect(proc: subprocess.Popen, status_fd: int, limits: Limits, deadline: float, clock: Callable[[], float],
             disk: str | None) -> tuple[bytes, bytes, bytes, str]:
    """Read stdout, stderr and the status pipe until they close or the program's own process has exited, the
    deadline passes, output overflows, or (``disk``: the unsandboxed working folder) that folder holds more than
    ``limits.tmp_size`` bytes."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    why = ""
    free_at_start = _free_bytes(disk) if disk else 0
    pidfd = _pidfd(proc.pid)
    poll = POLL_SECONDS if disk or pidfd is None else CLOCK_SECONDS
    exited = False

    def read(fd: int) -> None:
        nonlocal why
        chunk = os.read(fd, 65536)
        if not chunk:
            sel.unregister(fd)
            return
        buf = bufs[fd]
        buf += chunk
        if len(buf) > limits.output and fd != status_fd:
            del buf[limits.output :]
            why = "output"

    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        try:
            while any(fd in sel.get_map() for fd in bufs):
                left = deadline - clock()
                if left <= 0:
                    why = "timeout"
                    break
                for key, _ in sel.select(min(left, poll)):
                    if key.fd == pidfd:
                        exited = True
                        sel.unregister(pidfd)
                    else:
                        read(key.fd)
                if why:
                    break
                if disk and _over_disk_limit(disk, free_at_start, limits.tmp_size):
                    why = "disk"
                    break
                if exited or (pidfd is None and proc.poll() is not None):
                    # Its own process is gone (children it left may hold the pipes): take what is there, stop.
                    for _ in range(64):
                        ready = [key.fd for key, _ in sel.select(0) if key.fd in bufs]
                        if not ready or why:
                            break
                        for fd in ready:
                            read(fd)
                    break
        finally:
            if pidfd is not None:
                os.close(pidfd)
    if not why:
        try:  # pipes closed; the process itself may still be exiting
            proc.wait(max(0.0, deadline - clock()))
        except subprocess.TimeoutExpired:
            why = "timeout"
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[status_fd]), why


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3
        return None


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class _Proc:
    pid: int
    uid: int
    ppid: int
    pgrp: int


def _processes() -> Iterator[_Proc]:
    """The live (not zombie) processes, from /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state, ppid, pgrp = f.read().rsplit(b")", 1)[1].split()[:3]
            uid = entry.stat().st_uid
        except (OSError, ValueError):
            continue
        if state != b"Z":
            yield _Proc(int(entry.name), uid, int(ppid), int(pgrp))


def _over_disk_limit(folder: str, free_at_start: int, limit: int) -> bool:
    """Does ``folder`` hold more than ``limit`` bytes? Its file system's free space is cheap to read but shared:
    only once that has fallen by more than the limit is the folder itself measured, so that other writers (other
    programs, other jobs) are never blamed."""
    return free_at_start - _free_bytes(folder) > limit and _tree_bytes(folder) > limit


def _tree_bytes(folder: str) -> int:
    """Disk space the files under ``folder`` take."""
    total = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _process_count(uid: int) -> int:
    """Processes and threads running as ``uid`` (what RLIMIT_NPROC counts)."""
    count = 0
    for p in _processes():
        if p.uid == uid:
            with contextlib.suppress(OSError):
                count += len(os.listdir(f"/proc/{p.pid}/task"))
    return count


def _stop(proc: subprocess.Popen, isolated: bool, uid: int) -> None:
    """Kill everything the program started, and return once it is gone (SIGKILL takes effect asynchronously)."""
    if isolated:
        # bwrap's init in the pid namespace: when it dies the kernel kills the namespace, and bwrap (our child)
        # exits once it has reaped that init, by which time the namespace is empty.
        for pid in _children(proc.pid) if proc.poll() is None else ():  # once bwrap is gone, so is its init
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        _kill_group(proc)
        proc.wait()
        return
    _kill_group(proc)
    proc.wait()
    if uid >= 0:
        _kill_uid(uid)  # the leased uid: whatever it still runs, wherever
    deadline = time.monotonic() + 10

    def left() -> bool:  # the seccomp filter keeps every process in the group; as root, the uid says it too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return uid >= 0 and any(p.uid == uid for p in _processes())
        return True

    while left() and time.monotonic() < deadline:
        time.sleep(0.002)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return []
        return [p.pid for p in _processes() if p.ppid == pid]  # a kernel without CONFIG_PROC_CHILDREN


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # the group leader changed uid: kill what we still can
        proc.kill()


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as ``uid`` (the harness is root): a shell that has become ``uid`` sends
    kill(-1), which reaches every process that uid may signal and no other. It checks its own uid first."""
    subprocess.run(["/bin/sh", "-c", '[ "$(id -u)" != 0 ] && kill -9 -1'], user=uid, group=uid, extra_groups=[],
                   env=_ENV, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def _leased_uid() -> Iterator[int]:
    """An unprivileged uid no other program (of this or another harness) is using, held by a lock file in a
    folder only root may write."""
    folder = _lease_folder()
    first = random.randrange(ROOT_DROP_UIDS)
    for i in range(ROOT_DROP_UIDS):
        uid = ROOT_DROP_UID_BASE + (first + i) % ROOT_DROP_UIDS
        fd = os.open(os.path.join(folder, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)
        return
    raise RuntimeError(f"all {ROOT_DROP_UIDS} sandbox uids are in use")


@functools.cache
def _lease_folder() -> str:
    folder = os.path.join("/run" if os.access("/run", os.W_OK) else tempfile.gettempdir(), "codegen-lm-sandbox-uids")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise SandboxUnavailableError(f"{folder} must be a folder that only root may write; remove it and try again")
    return folder


def _remove_tree(path: str) -> None:
    """Remove a working folder, even one whose program took away its own rights to it (its processes are gone)."""
    if os.geteuid() != 0:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for folder, subfolders, _ in os.walk(path):
            for p in (os.path.join(folder, d) for d in subfolders):
                if not os.path.islink(p):  # chmod follows links
                    with contextlib.suppress(OSError):
                        os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _status(raw: bytes, nonce: bytes) -> tuple[str, str] | str | None:
    """The bootstrap's one status line: ``(status, reason)``; None if there is none; "tampered" if anything else
    was written to the channel."""
    if not raw:
        return None
    head, _, rest = raw.partition(b"\t")
    state, _, reason = rest.decode("utf-8", "replace").partition("\t")
    if head != nonce or nonce in rest or state not in STATUSES:
        return "tampered"
    return state, reason


def _verdict(returncode: int, status: tuple[str, str] | str | None, why: str, stderr: str, limits: Limits,
             isolated: bool) -> tuple[str, str]:
    if why == "timeout":
        return TIMED_OUT, f"still running after the {limits.timeout:g} s wall-clock limit"
    if why == "output":
        return LIMIT_HIT, f"output over the {limits.output} byte limit"
    if why == "disk":
        return LIMIT_HIT, f"disk space limit reached (more than {limits.tmp_size} bytes used)"
    if status == "tampered":
        return FAILED, "the program wrote to the sandbox's status channel"
    if status:
        return status
    # bubblewrap reports a child killed by signal N as exit status 128 + N, as os._exit(128 + N) would be.
    sig = -returncode if returncode < 0 else returncode - 128 if isolated and returncode > 128 else 0
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        also = f" (or os._exit({returncode}))" if returncode > 0 else ""
        if sig in _SIGNAL_LIMITS:
            return LIMIT_HIT, f"{_SIGNAL_LIMITS[sig]} ({name}{also})"
        return CRASHED, f"killed by {name}{also}"
    if stderr.startswith("bwrap:"):
        return CRASHED, stderr.strip().splitlines()[0]
    return FAILED, f"process exited with code {returncode} before the end of the program (os._exit?)"


def _probe(sandbox: Sandbox, check: str, expected: str) -> str | None:
    try:
        result = sandbox.run(check)
    except OSError as e:
        return f"cannot start: {e}"
    if result.passed and result.stdout == expected:
        return None
    return f"{result.status}: {(result.reason or result.stderr.strip())[:200]}"


def _bare(python: str, isolated: bool) -> Sandbox:
    sandbox = Sandbox.__new__(Sandbox)
    sandbox.limits, sandbox.workers, sandbox.python, sandbox.clock = Limits(timeout=30), 1, python, time.monotonic
    sandbox.isolated, sandbox._root, sandbox._running = isolated, os.geteuid() == 0, threading.BoundedSemaphore(1)
    return sandbox


@functools.cache
def bwrap_problem(python: str | None = None) -> str | None:
    """None when bubblewrap isolates programs here; otherwise why not (probed once per process)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    problem = _probe(_bare(python or sys.executable, True), "import os\nassert os.getpid() < 10, 'no pid namespace'\nprint('ok')",
                     "ok\n")
    return problem and f"bwrap does not work here ({problem})"


@functools.cache
def unsandboxed_problem(python: str | None = None) -> str | None:
    """None when the unsandboxed mode works here (the interpreter starts as the uid programs run as, and the
    seccomp filter holds); otherwise why not."""
    check = "import os, json\ntry:\n    os.setpgid(0, 0)\nexcept PermissionError:\n    print('ok')"
    problem = _probe(_bare(python or sys.executable, False), check, "ok\n")
    if problem and os.geteuid() == 0:
        return f"{problem}; as root, programs run as an unprivileged uid, which must be able to read {python or sys.executable} and its libraries"
    return problem
