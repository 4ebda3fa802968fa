"""`.ci/run` runs the README's test command whatever the README's size (rule 1: a green CI proves the README)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_ci(folder: Path, readme: str) -> subprocess.CompletedProcess:
    """``.ci/run`` copied into ``folder`` beside a README.md of ``readme``, run there."""
    (folder / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", folder / ".ci" / "run")
    (folder / "README.md").write_text(readme)
    return subprocess.run(["bash", ".ci/run"], cwd=folder, capture_output=True, text=True, timeout=60)


def test_ci_runs_the_readme_test_command_from_a_long_readme(tmp_path):
    # Bash blocks far past one pipe write (4 KB) once made the extraction die of SIGPIPE (exit 141) before any test.
    filler = "\n".join(f"echo filler line {i} that is not the test command" for i in range(2000))
    done = run_ci(tmp_path, "# project\n\n```bash\npip install -e .\necho pytest-ran > marker\n```\n\n```bash\n"
                            + filler + "\n```\n")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "marker").read_text() == "pytest-ran\n"


def test_ci_fails_clearly_without_a_test_command(tmp_path):
    done = run_ci(tmp_path, "# project\n\n```bash\npip install -e .\n```\n")
    assert done.returncode == 1
    assert "no pytest command" in done.stderr
