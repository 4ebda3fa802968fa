"""`codegen-lm complete` end to end on a small saved model, and its error paths (as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from codegen_lm import AutoTokenizer
from codegen_lm.engine import Generator, SamplingParams
from codegen_lm.tokenizer import truncate_before_pattern


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "codegen_lm.cli", "complete", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=300,
    )


def test_complete_greedy_json_stream_and_truncate_agree(tiny_checkpoint):
    model = ["--model", str(tiny_checkpoint), "-n", "40"]
    plain = run("def add(a, b):", *model)
    assert plain.returncode == 0, plain.stderr
    as_json = json.loads(run("def add(a, b):", *model, "--json").stdout)
    assert plain.stdout == "def add(a, b):" + as_json["completion"] + "\n"
    assert as_json["finish_reason"] == "length" and len(as_json["token_ids"]) == 40
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert tokenizer.decode(as_json["token_ids"]) == as_json["completion"]
    streamed = run("def add(a, b):", *model, "--stream")
    assert streamed.stdout == plain.stdout

    truncated = json.loads(run("def add(a, b):", *model, "--json", "--truncate").stdout)
    expected = truncate_before_pattern(as_json["completion"], [r"\n\n^#", "^'''", "\n\n\n"])
    assert truncated["completion"] == expected
    assert tokenizer.decode(truncated["token_ids"]).startswith(expected)


def test_complete_sampling_is_seeded_and_reads_stdin_and_files(tiny_checkpoint, tmp_path):
    """The CLI samples what ``Generator`` samples with the same settings, another seed gives another text, and the
    prompt comes the same from an argument's file or stdin."""
    settings = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    model = ["--model", str(tiny_checkpoint), "-n", "12", "--temperature", "0.8", "--top-p", "0.9"]
    from_stdin = run("-", *model, "--seed", "3", stdin="import os\n")
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_text("import os\n")
    sampled = json.loads(run(f"@{prompt_file}", *model, "--seed", "3", "--json").stdout)
    other = json.loads(run("import os\n", *model, "--seed", "4", "--json").stdout)
    assert from_stdin.returncode == 0 and from_stdin.stdout == "import os\n" + sampled["completion"] + "\n"

    generator = Generator.from_pretrained(str(tiny_checkpoint))
    expected = generator.complete(["import os\n"], SamplingParams(**settings))[0][0]
    greedy = generator.complete(["import os\n"], SamplingParams(max_new_tokens=12))[0][0]
    assert sampled["token_ids"] == expected.token_ids and sampled["completion"] == expected.text
    assert other["token_ids"] != expected.token_ids and expected.token_ids != greedy.token_ids


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "--model", "{ck}"], "the prompt is empty"),
        (["@/no/such/file.py", "--model", "{ck}"], "prompt file /no/such/file.py does not exist"),
        (["x", "--model", "/no/such/folder"], "neither an existing folder nor a valid hub id"),
        (["x", "--model", "Salesforce/codegen-350M-mono"], "not in the hub cache"),
        (["x", "--model", "{ck}", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["x", "--model", "{ck}", "--prefix-cache-mb", "-1"], "--prefix-cache-mb must be a size in MB >= 0 (got -1)"),
        (["x", "--model", "{ck}", "--prefill-chunk", "0"], "--prefill-chunk must be at least 1 token (got 0)"),
        (["x", "--model", "{ck}", "--no-prefix-cache", "--prefix-cache-mb", "64"],
         "--no-prefix-cache and --prefix-cache-mb contradict each other"),
        (["x", "--model", "{ck}", "--top-p", "2"], "top_p must be in"),
        (["x", "--model", "{ck}", "--dtype", "int3"], "unknown dtype"),
        (["x", "--model", "{ck}", "-n", "5000"], "exceeds the model's 2048 positions"),
        (["x", "--model", "{ck}", "--stream", "--json"], "do not go together"),
        (["x", "--model", "{ck}", "--compile", "--quantize", "int4"], "compile needs weights that torch.compile can trace"),
    ],
)
def test_user_mistakes_give_one_line_and_nonzero_exit(args, message, tiny_checkpoint):
    result = run(*[a.replace("{ck}", str(tiny_checkpoint)) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
