"""The sandbox: limits and verdicts in each mode, and hostile programs that must leave the harness alive, get the
right verdict, leave no process behind and write nothing outside their scratch folder.

Modes: bubblewrap and unsandboxed, each as the user running the tests and, when that is root, as an unprivileged
user in a harness subprocess (so a program that kills its harness fails the test instead of ending it). Every
hostile program refuses to run as root (none should ever run as root), so a broken mode cannot hurt the machine.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import pytest

from conftest import require_bwrap
from codegen_lm import sandbox as sandbox_module
from codegen_lm.sandbox import (
    CRASHED, FAILED, LIMIT_HIT, PASSED, TIMED_OUT, Limits, Sandbox, SandboxUnavailableError, SandboxWarning,
    landlock_abi, unsandboxed_problem,
)

LIMITS = Limits(timeout=60.0, memory=512 << 20, file_size=8 << 20, processes=16, output=64 << 10, tmp_size=32 << 20)
ROOT = os.geteuid() == 0
NOBODY = 65534
SRC = Path(__file__).resolve().parents[1] / "src"
SYSTEM_PYTHON = "/usr/bin/python3"
GUARD = ("import os\nif os.geteuid() == 0:\n    raise SystemExit('refusing to run a hostile test program as root')\n"
         "print('scratch', os.getcwd(), flush=True)\n")


def python_for(uid: int) -> str | None:
    """An interpreter that ``uid`` can run the sandbox module with (this one, or the system's)."""
    for python in (sys.executable, SYSTEM_PYTHON):
        if python == SYSTEM_PYTHON and not os.path.exists(python):
            continue
        try:
            check = subprocess.run([python, "-c", "import codegen_lm.sandbox"], user=uid if uid != os.getuid() else None,
                                   env=dict(os.environ, PYTHONPATH=str(SRC)), cwd="/", capture_output=True)
        except PermissionError:  # it cannot even start it
            continue
        if check.returncode == 0:
            return python
    return None


def unsandboxed_python() -> str:
    """The unsandboxed mode as root runs programs as an unprivileged uid, which may not read this interpreter
    (pyenv under /root): take the system's then."""
    for python in (sys.executable, SYSTEM_PYTHON):
        if os.path.exists(python) and unsandboxed_problem(python) is None:
            return python
    pytest.skip(f"the unsandboxed mode does not work here: {unsandboxed_problem()}")


@pytest.fixture(scope="module")
def isolated() -> Sandbox:
    require_bwrap()
    return Sandbox(LIMITS, workers=4, isolate=True)


@pytest.fixture(scope="module")
def unsandboxed() -> Sandbox:
    python = unsandboxed_python()
    with pytest.warns(SandboxWarning, match="WITHOUT a sandbox"):
        return Sandbox(LIMITS, workers=4, isolate=False, python=python)


@pytest.fixture(params=["bwrap", "unsandboxed"])
def sandbox(request) -> Sandbox:
    return request.getfixturevalue("isolated" if request.param == "bwrap" else "unsandboxed")


def processes_with(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(token in part for part in p.info["cmdline"] or ()):
            found.append(p)
    return found


class Release:
    """A clock for Sandbox that the test moves on: ``release()`` makes every running program's deadline pass at
    once (a timeout as an event, not a race); programs started later get their full timeout again."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def release(self) -> None:
        self.offset += 1e6


def wait_for(condition, what: str, seconds: float = 120.0) -> None:
    """Wait until ``condition()`` holds; the bound only catches a hang (it is never the thing tested)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def still_works(sb: Sandbox) -> None:
    assert sb.run("print(6 * 7)").stdout == "42\n"


# -- verdicts and limits, in each mode ------------------------------------------------------------------

def test_passes_and_captures(sandbox):
    r = sandbox.run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (r.status, r.stdout, r.stderr, r.returncode) == (PASSED, "out\n", "err\n", 0)


def test_exception_fails_with_reason(sandbox):
    r = sandbox.run("def f():\n    assert 1 == 2, 'nope'\nf()")
    assert r.status == FAILED and r.reason == "AssertionError: nope"
    assert "line 2, in f" in r.stderr and "<string>" not in r.stderr  # the bootstrap's frame is hidden


def test_syntax_error_fails(sandbox):
    r = sandbox.run("def f(:\n")
    assert r.status == FAILED and r.reason.startswith("SyntaxError")


def test_sleeping_past_the_timeout(sandbox):
    r = sandbox.run("import time\ntime.sleep(10**6)", replace(LIMITS, timeout=0.5))
    assert r.status == TIMED_OUT and "0.5 s" in r.reason and r.seconds >= 0.5
    still_works(sandbox)


def test_cpu_limit(sandbox):
    r = sandbox.run("while True:\n    pass", replace(LIMITS, timeout=600, cpu=1))  # the CPU limit, not the clock, ends it
    assert r.status == LIMIT_HIT and "CPU" in r.reason, r


def test_sleeping_child_is_killed_with_the_group(sandbox):
    """The child announces itself (a token on its command line, which the test finds with its host pid); once the
    program times out, that process no longer exists."""
    token = f"codegen-lm-test-child-{os.getpid()}-{sandbox.mode[:4]}"
    code = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {token!r}])\nwhile True:\n    pass")
    clock = Release()
    timed = _quiet(lambda: Sandbox(LIMITS, workers=1, isolate=sandbox.isolated, python=sandbox.python, clock=clock))
    result = []
    runner = threading.Thread(target=lambda: result.append(timed.run(code)))
    runner.start()
    wait_for(lambda: processes_with(token), "the child to start")
    children = processes_with(token)
    clock.release()
    runner.join()
    assert result[0].status == TIMED_OUT, result[0]
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone, or dead and not yet reaped
            assert child.status() == psutil.STATUS_ZOMBIE, child
    assert processes_with(token) == []


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxWarning)
        return make()


def test_fork_bomb(sandbox):
    r = sandbox.run(GUARD + "while True:\n    os.fork()")
    assert r.status == LIMIT_HIT and "process limit" in r.reason, r
    still_works(sandbox)


def test_allocating_10_gb(sandbox):
    r = sandbox.run("x = bytearray(10 * 2**30)")
    assert r.status == LIMIT_HIT and "memory" in r.reason
    r = sandbox.run("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))")
    assert r.status == LIMIT_HIT and "memory" in r.reason, r


def test_writing_1_gb_to_one_file(sandbox):
    r = sandbox.run("with open('big.bin', 'wb') as f:\n    for _ in range(1024):\n        f.write(bytes(2**20))")
    assert r.status == LIMIT_HIT and "file size" in r.reason, r


def test_disk_space_limit(sandbox):
    """Files each under the file size limit, more than tmp_size in all: the private /tmp fills up (bubblewrap), or
    the disk guard stops the program (unsandboxed)."""
    r = sandbox.run("for i in range(10**4):\n    with open('f%d' % i, 'wb') as f:\n        f.write(bytes(4 << 20))")
    assert r.status == LIMIT_HIT and "disk space" in r.reason, r


def test_the_disk_guard_blames_only_the_working_folder(tmp_path, monkeypatch):
    """Unsandboxed, disk use is watched through the file system's free space, which other writers share: a program
    whose folder is small is not stopped however much the space shrinks, one whose folder is large is."""
    (tmp_path / "small").write_bytes(bytes(1000))
    monkeypatch.setattr(sandbox_module, "_free_bytes", lambda path: 0)  # 10 GB gone since the start
    assert not sandbox_module._over_disk_limit(str(tmp_path), 10 << 30, 1 << 20)
    (tmp_path / "large").write_bytes(bytes(2 << 20))
    assert sandbox_module._over_disk_limit(str(tmp_path), 10 << 30, 1 << 20)
    monkeypatch.setattr(sandbox_module, "_free_bytes", lambda path: 10 << 30)  # nothing gone: not even measured
    monkeypatch.setattr(sandbox_module, "_tree_bytes", lambda path: pytest.fail("measured the folder"))
    assert not sandbox_module._over_disk_limit(str(tmp_path), 10 << 30, 1 << 20)


def test_open_files_limit(sandbox):
    r = sandbox.run("files = [open('/dev/null') for _ in range(1000)]")
    assert r.status == LIMIT_HIT and "open files" in r.reason, r
    assert sandbox.run("files = [open('/dev/null') for _ in range(50)]").passed  # 64 allowed, stdio included


def test_huge_output(sandbox):
    r = sandbox.run("while True:\n    print('x' * 10000)")
    assert r.status == LIMIT_HIT and "output" in r.reason
    assert len(r.stdout) == LIMITS.output


def test_sys_exit_and_os_exit_fail(sandbox):
    for code in ("import sys\nsys.exit(0)", "exit()", "import sys\nsys.exit(3)", "import os\nos._exit(0)"):
        r = sandbox.run(code)
        assert r.status == FAILED and "before the end" in r.reason, (code, r)


@pytest.mark.slow
def test_os_exit_with_every_status(sandbox):
    """Ending early never passes, whatever the status. bubblewrap reports a child killed by signal N as status
    128 + N, so there a status above 128 reads as that signal (and the reason says it may be os._exit)."""
    results = dict(sandbox.run_many([f"import os\nos._exit({n})" for n in range(256)]))
    for n, r in results.items():
        assert r.status != PASSED and f"{n}" in r.reason, (n, r)
        if n <= 128 or not sandbox.isolated:
            assert r.status == FAILED and f"code {n} before the end" in r.reason, (n, r)
        else:
            assert r.status in (CRASHED, LIMIT_HIT) and f"os._exit({n})" in r.reason, (n, r)


def test_recursion_overflow_and_segfault(sandbox):
    r = sandbox.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.status == FAILED and "RecursionError" in r.reason
    r = sandbox.run("import ctypes\nctypes.string_at(0)")
    assert r.status == CRASHED and "SIGSEGV" in r.reason, r
    # Recursing in C past a raised limit overflows the stack (taking the kernel a few seconds here).
    deep = "import sys\nsys.setrecursionlimit(10**8)\nx = []\nfor _ in range(10**5):\n    x = [x]\nrepr(x)"
    r = sandbox.run(deep, replace(LIMITS, timeout=600))
    assert r.status == CRASHED and "SIGSEGV" in r.reason, r
    still_works(sandbox)


def test_each_program_starts_in_a_fresh_private_folder(sandbox):
    r = sandbox.run("import os\nstart = os.getcwd()\nopen('marker', 'w').write('x')\nos.chdir('/')\n"
                    "print(start, os.environ['HOME'], os.environ['TMPDIR'])")
    assert r.status == PASSED
    start, home, tmp = r.stdout.split()
    assert start == home == tmp
    assert not Path(start).exists() or sandbox.isolated  # the unsandboxed working folder is removed afterwards
    r = sandbox.run("import os\nprint(os.path.exists('marker'))")
    assert r.stdout == "False\n"


def test_many_in_parallel_at_most_workers_at_once(sandbox):
    """Eight blocking programs on four workers: four run at once, never five (counted as our child processes),
    and each batch ends when the test moves the clock."""
    clock = Release()
    pool = _quiet(lambda: Sandbox(LIMITS, workers=4, isolate=sandbox.isolated, python=sandbox.python, clock=clock))
    me = psutil.Process()

    def live() -> set[int]:
        pids = set()
        for child in me.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.add(child.pid)
        return pids

    codes = ["import time\ntime.sleep(10**6)"] * 8
    results = {}
    runner = threading.Thread(target=lambda: results.update(pool.run_many(codes)))
    runner.start()
    seen: set[int] = set()
    for batch in range(2):
        wait_for(lambda: len(live() - seen) == 4, f"batch {batch} to run")
        assert len(live()) == 4
        seen |= live()
        clock.release()
        wait_for(lambda: len(results) == 4 * (batch + 1), f"batch {batch} to end")
    runner.join()
    assert sorted(results) == list(range(8)) and all(r.status == TIMED_OUT for r in results.values())


def test_bad_limits():
    with pytest.raises(ValueError, match="timeout must be positive"):
        Limits(timeout=0)


# -- isolation (bubblewrap) --------------------------------------------------------------------------------

@pytest.fixture
def outside() -> Path:
    """A folder with a file in it, outside the sandbox's private /tmp (beside this checkout)."""
    folder = Path(__file__).resolve().parent / f".sandbox-victim-{os.getpid()}"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    yield folder
    shutil.rmtree(folder)


def test_writing_outside_the_temp_dir(isolated, outside):
    for code in (f"open({str(outside / 'new.txt')!r}, 'w').write('x')",
                 f"open({str(outside / 'keep.txt')!r}, 'w').write('overwritten')",
                 "open('/etc/codegen-lm-sandbox-test', 'w')"):
        r = isolated.run(code)
        assert r.status == FAILED and ("Read-only" in r.reason or "Permission" in r.reason or "No such" in r.reason), r
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "precious"
    assert not Path("/etc/codegen-lm-sandbox-test").exists()


def test_deleting_files(isolated, outside):
    for code in (f"import os\nos.remove({str(outside / 'keep.txt')!r})",
                 f"import shutil\nshutil.rmtree({str(outside)!r})",
                 f"import os\nos.rename({str(outside / 'keep.txt')!r}, {str(outside / 'moved.txt')!r})"):
        r = isolated.run(code)
        assert r.status == FAILED, r
    assert (outside / "keep.txt").read_text() == "precious"


def test_home_folders_are_hidden(isolated):
    r = isolated.run("import os\nprint(sorted(os.listdir('/home')), os.path.expanduser('~'))")
    assert r.status == PASSED and r.stdout.split()[-1] == "/tmp"
    homes = {e for e in os.listdir("/home")} if os.path.isdir("/home") else set()
    assert not any(h in r.stdout for h in homes), r.stdout


def test_opening_a_socket(isolated):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = isolated.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert r.status == FAILED and ("refused" in r.reason or "unreachable" in r.reason), r
        r = isolated.run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)")
        assert r.status == FAILED and ("unreachable" in r.reason or "timed out" in r.reason), r
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing got through to the host
    finally:
        server.close()


def test_an_interpreter_under_tmp_stays_visible():
    """A venv under /tmp (hidden by the sandbox's private /tmp unless bound back) still isolates."""
    import tempfile
    import venv

    require_bwrap()
    env_dir = Path(tempfile.mkdtemp(dir="/tmp")) / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)  # as `python -m venv` does
    script = "from codegen_lm.sandbox import Sandbox, bwrap_problem; print(bwrap_problem()); print(Sandbox(workers=1).run('print(6 * 7)').stdout)"
    out = subprocess.run([str(env_dir / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert out.stdout.split("\n")[:2] == ["None", "42"], out.stderr
    shutil.rmtree(env_dir.parent)


# -- safe by default ---------------------------------------------------------------------------------------

def test_refuses_without_bubblewrap_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox_module, "bwrap_problem", lambda python=None: "bwrap is not installed")
    with pytest.raises(SandboxUnavailableError, match=r"refusing to run generated code without a sandbox: bwrap is not "
                       r"installed; install bubblewrap .*; or pass --allow-unsandboxed") as e:
        Sandbox(LIMITS)
    assert "\n" not in str(e.value)
    with pytest.raises(SandboxUnavailableError, match="asked for but is unusable"):
        Sandbox(LIMITS, isolate=True)
    monkeypatch.setattr(sandbox_module, "bwrap_problem", lambda python=None: "bwrap does not work here (bwrap: setting up uid map: Permission denied)")
    with pytest.raises(SandboxUnavailableError, match="needs user namespaces.*--security-opt seccomp=unconfined"):
        Sandbox(LIMITS)
    python = unsandboxed_python()
    with pytest.warns(SandboxWarning, match="WITHOUT a sandbox.*cannot signal or trace processes outside their own group"):
        fallback = Sandbox(LIMITS, workers=1, allow_unsandboxed=True, python=python)
    assert not fallback.isolated and fallback.run("print(1)").passed


def test_the_warning_says_what_is_open():
    python = unsandboxed_python()
    sb = _quiet(lambda: Sandbox(LIMITS, workers=1, isolate=False, python=python))
    text = sb.unsandboxed_warning()
    if landlock_abi():
        assert "write only their working folder" in text and ("TCP is blocked" in text) == (landlock_abi() >= 4)
    else:
        assert "use the network" in text


# -- hostile programs, in every mode, with the harness in a process of its own ---------------------------------

# Runs the programs in a child process (as the user the mode needs) and prints the verdicts as JSON. A witness
# program runs the whole time in a sandbox of its own; it must outlive every hostile program (its timeout comes
# when the harness moves the clock, so TIMED_OUT means it survived).
HARNESS = r'''
import json, os, sys, threading, time, warnings
from dataclasses import replace
warnings.simplefilter("ignore")
from codegen_lm.sandbox import Limits, Sandbox
spec = json.load(sys.stdin)
limits = Limits(**spec["limits"])
hostile = Sandbox(limits, workers=2, isolate=spec["isolate"], python=spec["python"])
offset = [0.0]
witness_box = Sandbox(Limits(timeout=3600), workers=1, isolate=spec["isolate"], python=spec["python"],
                      clock=lambda: time.monotonic() + offset[0])
me = str(os.getpid())

def children():
    found = 0
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % pid) as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        found += ppid == me and state != "Z"
    return found

witness = []
thread = threading.Thread(target=lambda: witness.append(witness_box.run("import time\nprint('up', flush=True)\ntime.sleep(10**6)")))
thread.start()
deadline = time.monotonic() + 120
while not children():
    assert time.monotonic() < deadline, "the witness did not start"
    time.sleep(0.01)
results = {}
for name, (code, timeout) in spec["programs"].items():
    r = hostile.run(code.replace("HARNESS_PID", me), replace(limits, timeout=timeout))
    results[name] = [r.status, r.reason, r.stdout[:1000]]
exits = {n: [r.status, r.reason] for n, r in hostile.run_many(["import os\nos._exit(%d)" % n for n in spec["exit_codes"]])}
offset[0] = 1e6
thread.join()
print(json.dumps({"programs": results, "exits": {spec["exit_codes"][i]: v for i, v in exits.items()},
                  "witness": [witness[0].status, witness[0].stdout]}))
'''


@dataclass(frozen=True)
class Mode:
    isolated: bool
    root: bool  # the harness (so programs run as an unprivileged uid of their own)
    landlock: int  # the unsandboxed mode's Landlock ABI (0: none)

    @property
    def confined_files(self) -> bool:
        """Can a program reach the harness user's files by absolute path? Not under bubblewrap (homes hidden),
        not as another uid (root harness), not under Landlock."""
        return self.isolated or self.root or self.landlock > 0


def hostile_programs(token: str, home: str, port: int) -> dict[str, tuple[str, float, object]]:
    """name: (code, timeout, the verdict expected in a mode: a status, or a function of the Mode)."""
    home_escape = lambda m: FAILED if m.confined_files else PASSED  # noqa: E731 (the unsandboxed residual risk)
    network = lambda m: FAILED if m.isolated or m.landlock >= 4 else PASSED  # noqa: E731
    escape = (
        "import os, sys\nr, w = os.pipe()\n"
        "if os.fork() == 0:\n    try:\n        os.setsid()\n    except PermissionError:\n        pass\n"
        "    if os.fork() == 0:\n        os.set_inheritable(w, True)\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import os, sys, time; os.write(int(sys.argv[1]), b\"x\"); time.sleep(600)', str(w), '{token}-escaped'])\n"
        "    os._exit(0)\nos.read(r, 1)\nprint('done')\n"
    )
    tamper = (
        "import sys, types\nfake = types.ModuleType('traceback')\n"
        "def print_exception(*args, **kwargs):\n    for fd in range(3, 256):\n        try:\n            os.write(fd, b'passed\\t')\n"
        "        except OSError:\n            pass\n    os._exit(0)\n"
        "fake.print_exception = print_exception\nsys.modules['traceback'] = fake\nsys.modules['os']._exit = lambda code: None\n"
        "raise AssertionError('wrong answer')\n"
    )
    fake_status = ("for fd in range(3, 256):\n    try:\n        os.write(fd, b'passed\\t')\n    except OSError:\n        pass\n"
                   "os._exit(0)\n")
    return {
        # kill(1) from inside a pid namespace reaches bwrap's init, which ignores it (non-root) or is root's (EPERM)
        "kill the parent": ("import signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')", 60,
                            lambda m: PASSED if m.isolated and not m.root else FAILED),
        "kill the harness": ("import signal\nos.kill(HARNESS_PID, signal.SIGKILL)\nprint('alive')", 60, FAILED),
        "kill the harness's group": ("import signal\nos.killpg(os.getpgid(HARNESS_PID), signal.SIGKILL)", 60, FAILED),
        "kill(-1, SIGKILL)": ("import signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')", 60, FAILED),
        "fork bomb": ("while True:\n    os.fork()", 60, LIMIT_HIT),
        "memory hog": ("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", 60, LIMIT_HIT),
        "disk filler": (f"for i in range(10**4):\n    open('{token}-%d' % i, 'wb').write(bytes(4 << 20))", 60, LIMIT_HIT),
        "network connect": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)\nprint('connected')",
                            60, network),
        "write to $HOME": (f"p = os.path.expanduser('~/{token}-home')\nopen(p, 'w').write('x')\nprint(p)", 60, PASSED),
        "write to the real home": (f"open('{home}/{token}-abs', 'w').write('x')", 60, home_escape),
        "read ~/.ssh": ("print(open(os.path.expanduser('~/.ssh/id_rsa')).read())", 60, FAILED),
        "read the real ~/.ssh": (f"print(open('{home}/.ssh/id_rsa').read())", 60, home_escape),
        "sleep past the timeout": ("import time\ntime.sleep(10**6)", 1.0, TIMED_OUT),
        "close stdout and stderr": ("os.close(1)\nos.close(2)\nx = sum(range(10))", 60, PASSED),
        "100 MB of output": ("import sys\nsys.stdout.write('x' * 100_000_000)", 60, LIMIT_HIT),
        "setsid and double fork": (escape, 60, PASSED),
        "sys.modules tamper": (tamper, 60, FAILED),
        "fake status line": (fake_status, 60, FAILED),
    }


HOSTILE_MODES = ["bwrap", "unsandboxed", "bwrap as non-root", "unsandboxed as non-root"]


@pytest.mark.slow
@pytest.mark.parametrize("mode_name", HOSTILE_MODES)
def test_hostile_programs(mode_name):
    isolated, non_root = mode_name.startswith("bwrap"), mode_name.endswith("non-root")
    if non_root and not ROOT:
        pytest.skip("the tests already run as a non-root user: the other modes cover it")
    if isolated:
        require_bwrap()
    uid = NOBODY if non_root else os.getuid()
    harness_python = python_for(uid)
    if harness_python is None:
        pytest.skip(f"no Python here that uid {uid} can run the harness with")
    python = harness_python if (isolated or non_root) else unsandboxed_python()
    mode = Mode(isolated, root=ROOT and not non_root, landlock=0 if isolated else landlock_abi())
    token = f"codegen-lm-hostile-{os.getpid()}-{mode_name.replace(' ', '-')}"

    # The harness user's home (outside /tmp, so bubblewrap's private /tmp does not hide it by accident), with a key.
    home = Path(__file__).resolve().parent / f".sandbox-home-{token}"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("SECRET KEY")
    (home / ".ssh" / "id_rsa").chmod(0o600)
    for p in (home, home / ".ssh", home / ".ssh" / "id_rsa"):
        os.chown(p, uid, uid)
    home.chmod(0o700)
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    programs = hostile_programs(token, str(home), server.getsockname()[1])
    spec = json.dumps({
        "isolate": isolated, "python": python, "exit_codes": [0, 1, 2, 3, 42, 127, 128, 129, 137, 139, 255],
        "limits": {"timeout": 60.0, "memory": 512 << 20, "file_size": 8 << 20, "processes": 16, "output": 64 << 10,
                   "tmp_size": 32 << 20},
        "programs": {name: (GUARD + code, timeout) for name, (code, timeout, _) in programs.items()},
    })
    sibling = subprocess.Popen(["sleep", "3600"], user=uid if uid != os.getuid() else None)  # a process beside the harness
    try:
        harness = subprocess.run([harness_python, "-c", HARNESS], input=spec, user=uid if uid != os.getuid() else None,
                                 env=dict(os.environ, PYTHONPATH=str(SRC), HOME=str(home)), cwd="/",
                                 capture_output=True, text=True, timeout=1200)
        assert harness.returncode == 0, f"the harness died ({harness.returncode}): {harness.stderr[-2000:]}"
        report = json.loads(harness.stdout)
        assert sibling.poll() is None, "a process beside the harness was killed"
        assert report["witness"] == [TIMED_OUT, "up\n"], report["witness"]  # it outlived every hostile program
        for name, (code, timeout, expected) in programs.items():
            status, reason, stdout = report["programs"][name]
            want = expected(mode) if callable(expected) else expected
            assert status == want, f"{name}: {status} ({reason}), expected {want} in mode {mode}"
        assert "SECRET" not in json.dumps(report["programs"]["read ~/.ssh"])
        assert report["programs"]["write to $HOME"][2].split("\n")[1] != str(home / f"{token}-home")
        for name, (status, reason, stdout) in report["programs"].items():
            first, scratch = stdout.split("\n")[0].split(" ", 1)
            assert first == "scratch" and (isolated or not os.path.exists(scratch)), (name, stdout[:200])
        for n, (status, reason) in report["exits"].items():
            assert status != PASSED and n in reason, (n, status, reason)
        # nothing left running, nothing written outside the scratch folders
        assert processes_with(token) == []
        connections = 0
        while True:
            try:
                server.accept()[0].close()
                connections += 1
            except BlockingIOError:
                break
        assert connections == (report["programs"]["network connect"][0] == PASSED)
        allowed = [f"{token}-abs"] if report["programs"]["write to the real home"][0] == PASSED else []
        after = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
        assert after == sorted(before + allowed)
        assert (home / ".ssh" / "id_rsa").read_text() == "SECRET KEY"
        assert glob.glob(f"/tmp/*{token}*") == [] and glob.glob(f"/tmp/*/*{token}*") == []
    finally:
        sibling.kill()
        sibling.wait()
        server.close()
        shutil.rmtree(home)
