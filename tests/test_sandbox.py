"""Hostile programs, each contained and reported; the harness survives and nothing outside changes."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from codegen_lm.sandbox import CRASHED, FAILED, LIMIT_HIT, PASSED, TIMED_OUT, Limits, Sandbox, SandboxWarning, bwrap_problem

LIMITS = Limits(timeout=2.0, memory=512 << 20, file_size=8 << 20, processes=16, output=64 << 10, tmp_size=32 << 20)
ROOT = os.geteuid() == 0

needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"bubblewrap unusable: {bwrap_problem()}")


@pytest.fixture(scope="module")
def isolated() -> Sandbox:
    if bwrap_problem() is not None:
        pytest.skip(f"bubblewrap unusable: {bwrap_problem()}")
    return Sandbox(LIMITS, workers=4, isolate=True)


@pytest.fixture(scope="module")
def limits_only() -> Sandbox:
    with pytest.warns(SandboxWarning, match="CAN read and write your files"):
        return Sandbox(LIMITS, workers=4, isolate=False)


@pytest.fixture(params=["bwrap", "limits-only"])
def sandbox(request) -> Sandbox:
    return request.getfixturevalue("isolated" if request.param == "bwrap" else "limits_only")


@pytest.fixture
def outside() -> Path:
    """A folder with a file in it, outside the sandbox's private /tmp (beside this checkout)."""
    folder = Path(__file__).resolve().parent / f".sandbox-victim-{os.getpid()}"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    yield folder
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def still_works(sb: Sandbox) -> None:
    assert sb.run("print(6 * 7)").stdout == "42\n"


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


def test_infinite_loop_times_out(sandbox):
    t = time.monotonic()
    r = sandbox.run("while True:\n    pass")
    assert r.status == TIMED_OUT and "2 s" in r.reason
    assert time.monotonic() - t < LIMITS.timeout + 1.5
    still_works(sandbox)


def test_cpu_limit(sandbox):
    r = sandbox.run("while True:\n    pass", Limits(timeout=10, cpu=1))
    assert r.status == LIMIT_HIT and "CPU" in r.reason and r.seconds < 5


def test_sleeping_child_is_killed_with_the_group(sandbox):
    r = sandbox.run("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                    "while True:\n    pass", Limits(timeout=1.0))
    assert r.status == TIMED_OUT


def test_fork_bomb(sandbox):
    if ROOT and not sandbox.isolated:
        pytest.skip("root ignores RLIMIT_NPROC and the limits-only fallback keeps the harness's uid (its warning says so)")
    r = sandbox.run("import os\nwhile True:\n    os.fork()")
    assert r.status == LIMIT_HIT and "process limit" in r.reason, r
    still_works(sandbox)


def test_allocating_10_gb(sandbox):
    r = sandbox.run("x = bytearray(10 * 2**30)")
    assert r.status == LIMIT_HIT and "memory" in r.reason
    r = sandbox.run("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))")
    assert r.status == LIMIT_HIT and "memory" in r.reason


def test_writing_1_gb_to_disk(sandbox):
    r = sandbox.run("with open('big.bin', 'wb') as f:\n    for _ in range(1024):\n        f.write(bytes(2**20))")
    assert r.status == LIMIT_HIT and "file size" in r.reason, r


def test_huge_output(sandbox):
    r = sandbox.run("while True:\n    print('x' * 10000)")
    assert r.status == LIMIT_HIT and "output" in r.reason
    assert len(r.stdout) == LIMITS.output


def test_sys_exit_and_os_exit_fail(sandbox):
    for code in ("import sys\nsys.exit(0)", "exit()", "import sys\nsys.exit(3)", "import os\nos._exit(0)"):
        r = sandbox.run(code)
        assert r.status == FAILED and "before the end" in r.reason, (code, r)


def test_recursion_overflow(sandbox):
    r = sandbox.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.status == FAILED and "RecursionError" in r.reason
    # Recursing in C past a raised limit overflows the stack (taking the kernel a few seconds here).
    deep = "import sys\nsys.setrecursionlimit(10**8)\nx = []\nfor _ in range(10**5):\n    x = [x]\nrepr(x)"
    r = sandbox.run(deep, Limits(timeout=10))
    assert r.status == CRASHED and "SIGSEGV" in r.reason
    still_works(sandbox)


def test_changing_directory_stays_inside(sandbox):
    r = sandbox.run("import os\nstart = os.getcwd()\nopen('marker', 'w').write('x')\nos.chdir('/')\nprint(start)")
    assert r.status == PASSED
    start = r.stdout.strip()
    assert not Path(start).exists() or sandbox.isolated  # the fallback's working folder is removed afterwards
    r = sandbox.run("import os\nprint(os.path.exists('marker'), os.getcwd() == %r)" % start)
    assert r.stdout.split()[0] == "False"  # every program starts in a fresh working folder


@needs_bwrap
def test_writing_outside_the_temp_dir(isolated, outside):
    for code in (f"open({str(outside / 'new.txt')!r}, 'w').write('x')",
                 f"open({str(outside / 'keep.txt')!r}, 'w').write('overwritten')",
                 "open('/etc/codegen-lm-sandbox-test', 'w')"):
        r = isolated.run(code)
        assert r.status == FAILED and ("Read-only" in r.reason or "Permission" in r.reason or "No such" in r.reason), r
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "precious"
    assert not Path("/etc/codegen-lm-sandbox-test").exists()


@needs_bwrap
def test_deleting_files(isolated, outside):
    for code in (f"import os\nos.remove({str(outside / 'keep.txt')!r})",
                 f"import shutil\nshutil.rmtree({str(outside)!r})",
                 f"import os\nos.rename({str(outside / 'keep.txt')!r}, {str(outside / 'moved.txt')!r})"):
        r = isolated.run(code)
        assert r.status == FAILED, r
    assert (outside / "keep.txt").read_text() == "precious"


@needs_bwrap
def test_opening_a_socket(isolated):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        r = isolated.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert r.status == FAILED and ("refused" in r.reason or "unreachable" in r.reason), r
        r = isolated.run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)")
        assert r.status == FAILED and ("unreachable" in r.reason or "timed out" in r.reason), r
        with pytest.raises(TimeoutError):
            server.accept()  # nothing got through to the host
    finally:
        server.close()


@needs_bwrap
def test_killing_the_parent(isolated):
    me = os.getpid()
    for code in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')",
                 f"import os, signal\nos.kill({me}, signal.SIGKILL)",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)\nimport time\ntime.sleep(5)"):
        r = isolated.run(code)
        assert r.status in (FAILED, CRASHED, PASSED), r
    assert os.getpid() == me  # still here
    still_works(isolated)


def test_many_in_parallel(sandbox):
    codes = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(8)]
    t = time.monotonic()
    results = dict(sandbox.run_many(codes))
    assert time.monotonic() - t < 3.5  # 4 workers: two rounds of 0.5 s plus start-up, not 8 rounds
    assert [results[i].stdout for i in range(8)] == [f"{i}\n" for i in range(8)]


def test_bad_limits():
    with pytest.raises(ValueError, match="timeout must be positive"):
        Limits(timeout=0)


@needs_bwrap
def test_an_interpreter_under_tmp_stays_visible():
    """A venv under /tmp (hidden by the sandbox's private /tmp unless bound back) still isolates."""
    import subprocess
    import tempfile
    import venv

    env_dir = Path(tempfile.mkdtemp(dir="/tmp")) / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)  # as `python -m venv` does
    script = "from codegen_lm.sandbox import Sandbox, bwrap_problem; print(bwrap_problem()); print(Sandbox(workers=1).run('print(6 * 7)').stdout)"
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([str(env_dir / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(src)))
    assert out.stdout.split("\n")[:2] == ["None", "42"], out.stderr
    shutil.rmtree(env_dir.parent)
