"""Tokenizer: ids, offsets, text and files identical to transformers' CodeGen tokenizers, built from the same files."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers

from codegen_lm import AutoTokenizer, CodeGenTokenizer, CodeGenTokenizerFast
from codegen_lm.tokenizer import DATA, WHITESPACE_TOKENS, PatternTimeoutError, truncate_before_pattern


NAMES = ("CodeGenTokenizer", "CodeGenTokenizerFast")
OURS = {"CodeGenTokenizer": CodeGenTokenizer, "CodeGenTokenizerFast": CodeGenTokenizerFast}
TRICKY = [
    "Hello world",
    " Hello world",
    "def f(x):\n    return x\n\t\tpass\n",
    "héllo wörld ñ 中文字符 Ελληνικά русский",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷!",
    "ctrl \x00\x01\x07\x1b[31m\x7f\u200b\ufeff end",
    "crlf\r\nline2\r\n\r\n  x\r\n",
    " " * 31 + "a" + " " * 32 + "b" + " " * 100 + "c",
    "\t" * 9 + "a" + "\t" * 10 + "b" + "\t" * 25,
    " \t  \t\t   \t\t\t    x\n\t    \t y",
    "<|endoftext|>def g():<|endoftext|>  <|endoftext|>",
    "   leading and trailing   ",
    "",
    "a",
    "ÿ\x80 \udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
]
COMPLETIONS = [
    "    return x\n\nprint(f(1))\nprint(f(2))\n",
    "    return x\n\n\ndef g():\n    pass\n",
    "    return 1\n\ndef g():\n    return 2\n\ndef h():\n    return 3\n",
    "    x = 1\n\n# comment\nprint(x)\n",
    "    '''doc'''\n    return 0\n'''\nmore\n'''\n",
    "    return y<|endoftext|>junk",
    'x = 1\n"""tail"""\n',
    "printer = 1\nprint(2)\nprinter(3)\n",
    "default = 1\ndef a():\n    pass\ndefault = 2\n",
    "no match here at all",
    "",
    "\n\n\n",
]
PATTERNS = [
    [r"\n\n^#", "^'''", "\n\n\n"],
    ["^#", r"<\|endoftext\|>", "^'''", '^"""', "\n\n\n"],
    ["^print"],
    [r"\bx\b", "zzz"],
]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, folder / name)
    return folder


_REFS: dict = {}


def reference(bpe_folder: Path, name: str = "CodeGenTokenizerFast", **kwargs):
    """transformers' tokenizer from the same files, with CodeGen's whitespace tokens (DESIGN §6)."""
    key = (getattr(transformers, name), tuple(sorted(kwargs.items())))
    if key not in _REFS:
        ref = getattr(transformers, name).from_pretrained(str(bpe_folder), **kwargs)
        ref.add_tokens(list(WHITESPACE_TOKENS))
        assert len(ref) == 50295
        _REFS[key] = ref
    return _REFS[key]


@pytest.fixture(scope="module")
def ours() -> CodeGenTokenizerFast:
    return CodeGenTokenizerFast()


@pytest.fixture(scope="module")
def stdlib_sources() -> list[str]:
    """About 3 MB of real Python: every stdlib .py file in turn until the budget is spent, spread over the tree."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(0).shuffle(files)
    texts, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text.encode())
        if size > 3_000_000:
            break
    assert size > 2_000_000, "expected several MB of standard library sources"
    return texts


_ENCODED: dict = {}


def _reference_encoding(ref, texts: list[str]) -> dict:
    """ref's ids and offsets of the corpus, computed once per reference (transformers 5's two names are one class)."""
    if id(ref) not in _ENCODED:
        out = ref(texts, return_offsets_mapping=True)
        _ENCODED[id(ref)] = {"input_ids": out["input_ids"], "offset_mapping": _offsets(out["offset_mapping"])}
    return _ENCODED[id(ref)]


def _offsets(rows) -> list[list[tuple[int, int]]]:
    return [[tuple(o) for o in row] for row in rows]


# ---- documented examples -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CodeGenTokenizer, CodeGenTokenizerFast])
def test_documented_examples(cls):
    tok = cls()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" Hello world")["input_ids"] == [18435, 995]
    assert cls(add_prefix_space=True)("Hello world")["input_ids"] == [18435, 995]
    assert tok("    ")["input_ids"] == [50284]
    assert tok("\t\t")["input_ids"] == [50294]
    assert tok("<|endoftext|>")["input_ids"] == [50256]
    assert tok.convert_tokens_to_ids(list(WHITESPACE_TOKENS)) == list(range(50257, 50295))
    assert len(tok) == 50295 and tok.vocab_size == 50257
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 50256
    assert tok.padding_side == "left"
    assert cls(add_bos_token=True)("Hello world")["input_ids"] == [50256, 15496, 995]
    assert tok("Hello world")["attention_mask"] == [1, 1] and "token_type_ids" not in tok("Hello world")


def test_shipped_files_are_gpt2_bpe():
    """OpenAI's GPT-2 BPE files as published (those in ../shared/data/gpt2-bpe have these digests too), checked
    without needing that folder, which a clone of this repository does not have."""
    digests = {"vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
               "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
    for name, digest in digests.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


# ---- parity with transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("options", [{}, {"add_prefix_space": True}, {"add_bos_token": True}])
def test_tricky_text_matches_transformers(bpe_folder, name, options):
    ref, tok = reference(bpe_folder, name, **options), OURS[name](**options)
    got = tok(TRICKY, return_offsets_mapping=True)
    want_ids = [ref(t)["input_ids"] for t in TRICKY]
    assert got["input_ids"] == want_ids
    if ref.is_fast:
        assert got["offset_mapping"] == _offsets(ref(TRICKY, return_offsets_mapping=True)["offset_mapping"])
    for text, ids in zip(TRICKY, want_ids):
        assert tok.encode(text) == ids
        assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert tok.tokenize(text) == ref.tokenize(text)
    assert tok.convert_tokens_to_ids(["no-such-token", "Ġworld"]) == ref.convert_tokens_to_ids(["no-such-token", "Ġworld"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_stdlib_sources_match_transformers(bpe_folder, stdlib_sources, name):
    ref, tok = reference(bpe_folder, name), OURS[name]()
    got = tok(stdlib_sources, return_offsets_mapping=True)
    if ref.is_fast:
        want = _reference_encoding(ref, stdlib_sources)
        assert got["offset_mapping"] == want["offset_mapping"]
    else:  # a pure-Python reference (transformers 4): ids only, on a part of the corpus to keep it quick
        want = {"input_ids": [ref(t)["input_ids"] for t in stdlib_sources[:20]]}
        got["input_ids"] = got["input_ids"][:20]
    assert got["input_ids"] == want["input_ids"]
    assert sum(map(len, got["input_ids"])) > 100_000


@pytest.mark.parametrize("options", [{}, {"add_prefix_space": True}])
def test_split_into_words_matches_transformers(bpe_folder, options):
    ref, tok = reference(bpe_folder, **options), CodeGenTokenizerFast(**options)
    words = [["def", "f", "(", "x", "):"], ["  a", "b\t\t", "héllo", "😀"]]
    want = ref(words, is_split_into_words=True, return_offsets_mapping=True)
    got = tok(words, is_split_into_words=True, return_offsets_mapping=True)
    assert got["input_ids"] == want["input_ids"]
    assert got["offset_mapping"] == _offsets(want["offset_mapping"])
    assert tok(words[0], is_split_into_words=True)["input_ids"] == want["input_ids"][0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=True, padding_side="left"),
        dict(padding="longest", padding_side="right"),
        dict(padding="max_length", max_length=16, padding_side="left"),
        dict(truncation=True, max_length=3),
        dict(max_length=4),  # transformers truncates when max_length is given without padding
        dict(padding=True, pad_to_multiple_of=8, padding_side="left", return_token_type_ids=True),
        dict(padding=True, truncation=True, max_length=5, padding_side="right", return_tensors="pt"),
    ],
)
def test_padding_and_truncation_match_transformers(bpe_folder, kwargs):
    ref, tok = reference(bpe_folder, pad_token="<|endoftext|>"), CodeGenTokenizerFast()
    texts = ["def f(x):\n    return x  # long enough", "a", "  b\t\tc"]
    got, want = tok(texts, **kwargs), ref(texts, **kwargs)
    assert set(got) == set(want)
    for key in want:
        if kwargs.get("return_tensors") == "pt":
            assert torch.equal(got[key], want[key]), key
        else:
            assert got[key] == want[key], key


def test_bos_and_left_truncation_match_transformers(bpe_folder):
    ref = reference(bpe_folder, add_bos_token=True, truncation_side="left")
    tok = CodeGenTokenizerFast(add_bos_token=True, truncation_side="left")
    texts = ["def f(x):\n    return x", "a b c d e f g"]
    for kwargs in (dict(truncation=True, max_length=4), dict(truncation=True, max_length=1), dict()):
        assert tok(texts, **kwargs)["input_ids"] == ref(texts, **kwargs)["input_ids"]
    assert tok(texts, add_special_tokens=False)["input_ids"] == ref(texts, add_special_tokens=False)["input_ids"]


def test_tensors_and_attribute_access(ours):
    batch = ours(["def f():", "x"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, 3)
    assert batch.input_ids.tolist() == [[4299, 277, 33529], [50256, 50256, 87]]  # left padding with eos
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.to("cpu").input_ids.dtype == torch.long
    single = ours("Hello world", return_tensors="np")
    assert single["input_ids"].tolist() == [[15496, 995]]
    assert ours.encode("Hello world", return_tensors="pt").tolist() == [[15496, 995]]
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a b c", "a"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding"):
        ours("a", padding="everything")


def test_token_type_ids(ours):
    assert ours.create_token_type_ids_from_sequences([1, 2]) == [0, 0]
    assert ours.create_token_type_ids_from_sequences([1, 2], [3]) == [0, 0, 1]
    assert ours("a b", return_token_type_ids=True)["token_type_ids"] == [0, 0]
    assert CodeGenTokenizer(return_token_type_ids=True)(["a b", "c"])["token_type_ids"] == [[0, 0], [0]]


# ---- decoding ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_round_trips(bpe_folder, ours, stdlib_sources):
    ref = reference(bpe_folder)
    ids = ours(stdlib_sources + TRICKY)["input_ids"]
    assert ours.batch_decode(ids) == stdlib_sources + TRICKY
    assert [ours.decode(torch.tensor(row)) for row in ids[-len(TRICKY):]] == TRICKY
    for row in ids[-len(TRICKY):]:
        assert ours.decode(row, skip_special_tokens=True) == ref.decode(row, skip_special_tokens=True)


def test_decode_of_arbitrary_ids_matches_transformers(bpe_folder, ours):
    """Random ids cut UTF-8 sequences in half: the replacement characters must match too."""
    ref, rng = reference(bpe_folder), random.Random(0)
    seqs = [[rng.randrange(len(ours)) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    assert ours.batch_decode(seqs) == [ref.decode(s) for s in seqs]
    assert ours.batch_decode(seqs, skip_special_tokens=True) == [ref.decode(s, skip_special_tokens=True) for s in seqs]
    # The byte-level path used for errors != "replace" agrees with the Rust decoder when replacing.
    assert [ours._decode_bytes(s, False) for s in seqs] == ours.batch_decode(seqs)


def test_decode_errors_modes():
    broken = [447, 50284, 68]  # "\xe2\x80" (a cut UTF-8 sequence), four spaces, "e"
    assert CodeGenTokenizer().decode(broken) == "\ufffd    e"
    assert CodeGenTokenizer(errors="ignore").decode(broken) == "    e"
    with pytest.raises(UnicodeDecodeError):
        CodeGenTokenizer(errors="strict").decode(broken)
    with pytest.raises(ValueError, match="error handler"):
        CodeGenTokenizer(errors="bogus")


def test_clean_up_tokenization_spaces(ours):
    ids = ours("x = a . b , c ! 'm")["input_ids"]
    assert ours.decode(ids) == "x = a . b , c ! 'm"
    assert ours.decode(ids, clean_up_tokenization_spaces=True) == "x = a. b, c!'m"
    assert CodeGenTokenizer(clean_up_tokenization_spaces=True).decode(ids) == "x = a. b, c!'m"


def test_decode_rejects_ids_out_of_range(ours):
    for bad in ([15496, 50295], [-1], [10**9]):
        with pytest.raises(ValueError, match="out of range.*50295 tokens"):
            ours.decode(bad)
    for batch in ([[1], [70000]], [[1], [2, -5]]):
        with pytest.raises(ValueError, match="out of range"):
            ours.batch_decode(batch)
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        CodeGenTokenizer(errors="strict").decode([5, -1])
    with pytest.raises(ValueError, match="out of range"):
        ours.convert_ids_to_tokens(50295)
    with pytest.raises(ValueError, match="batch_decode"):
        ours.decode([[1, 2]])


# ---- truncate_before_pattern -------------------------------------------------------------------------------


@pytest.mark.parametrize("patterns", PATTERNS)
def test_truncate_before_pattern_matches_transformers(bpe_folder, ours, patterns):
    ref = reference(bpe_folder)
    for completion in COMPLETIONS:
        ids = ours(completion)["input_ids"]
        assert ours.decode(ids, truncate_before_pattern=patterns) == ref.decode(ids, truncate_before_pattern=patterns)
    batch = [ours(c)["input_ids"] for c in COMPLETIONS]
    assert ours.batch_decode(batch, truncate_before_pattern=patterns) == [
        ref.decode(ids, truncate_before_pattern=patterns) for ids in batch
    ]


def test_truncate_before_pattern_semantics():
    seed = [r"\n\n^#", "^'''", "\n\n\n"]
    assert truncate_before_pattern("    return 1\n\n# test\nx", seed) == "    return 1"
    assert truncate_before_pattern("print(1)\nprint(2)\n", seed) == "print(1)\n"
    assert truncate_before_pattern("printer\nprint(2)\n", seed) == "printer\n"  # the original's ^print quirk
    assert truncate_before_pattern("x\ndef a(): pass\ndefault = 1\n", seed) == "x\ndef a(): pass\n"
    assert CodeGenTokenizerFast().decode([64, 628], truncate_before_pattern=[]) == "a\n\n"  # empty list: no cut


def test_truncate_before_pattern_bounds_catastrophic_regex(monkeypatch):
    """On 60 a's then b, (a|aa)+$ backtracks through ~fib(61) = 2.5e12 ways to split the a's: no machine ends that
    search by itself within the bound, so only the timeout can end it (with 40 a's, 1.7e8 ways, a fast one might)."""
    text = "a" * 60 + "b"
    with pytest.raises(PatternTimeoutError, match="catastrophic"):
        truncate_before_pattern(text, ["(a|aa)+$"], timeout=0.2)
    monkeypatch.setattr("codegen_lm.tokenizer.PATTERN_TIMEOUT_S", 0.2)
    with pytest.raises(PatternTimeoutError):
        CodeGenTokenizerFast().decode([64] * 60 + [65], truncate_before_pattern=["(a|aa)+$"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        truncate_before_pattern("x", ["(unclosed"])
    with pytest.raises(ValueError, match="list"):
        truncate_before_pattern("x", "^#")


# ---- files: save, load, errors -----------------------------------------------------------------------------


def _same_behaviour(a, b) -> None:
    assert len(a) == len(b) == 50295
    assert a(TRICKY)["input_ids"] == b(TRICKY)["input_ids"]
    ids = a(TRICKY)["input_ids"]
    assert [a.decode(x) for x in ids] == [b.decode(x) for x in ids]


@pytest.mark.parametrize("options", [{}, {"add_prefix_space": True}])
def test_saved_by_us_loads_in_transformers_and_ours(tmp_path, options):
    tok = CodeGenTokenizerFast(**options)
    files = tok.save_pretrained(tmp_path)
    assert {Path(f).name for f in files} == {
        "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json",
    }
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(theirs).__name__.startswith("CodeGenTokenizer")
    assert theirs.padding_side == "left" and theirs.pad_token_id == 50256
    _same_behaviour(tok, theirs)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again) is CodeGenTokenizerFast and again.add_prefix_space == tok.add_prefix_space
    _same_behaviour(tok, again)
    assert type(AutoTokenizer.from_pretrained(tmp_path, use_fast=False)) is CodeGenTokenizer
    # The BPE files alone (what slow tokenizers read) give the same tokenizer too.
    bpe_only = tmp_path / "bpe"
    bpe_only.mkdir()
    tok.save_vocabulary(bpe_only)
    shutil.copy(tmp_path / "added_tokens.json", bpe_only)
    _same_behaviour(tok, CodeGenTokenizer.from_pretrained(bpe_only, **options))


def test_saved_by_transformers_loads_in_ours(bpe_folder, tmp_path):
    ref = reference(bpe_folder, add_prefix_space=True)
    ref.save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.add_prefix_space is True
    _same_behaviour(ref, tok)
    assert tok(TRICKY, return_offsets_mapping=True)["offset_mapping"] == _offsets(
        ref(TRICKY, return_offsets_mapping=True)["offset_mapping"]
    )


def test_reads_a_hub_style_checkpoint_folder(tmp_path):
    """The files of Salesforce/codegen-*: BPE files, added_tokens.json, special tokens as AddedToken dicts."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "added_tokens.json").write_text(json.dumps({t: 50257 + i for i, t in enumerate(WHITESPACE_TOKENS)}))
    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": eos, "eos_token": eos, "unk_token": eos}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": eos, "eos_token": eos, "unk_token": eos, "model_max_length": 2048,
        "name_or_path": "Salesforce/codegen-350M-mono", "special_tokens_map_file": None, "tokenizer_class": "CodeGenTokenizer",
    }))
    tok = CodeGenTokenizerFast.from_pretrained(tmp_path, padding_side="right")
    _same_behaviour(tok, CodeGenTokenizerFast())
    assert tok.model_max_length == 2048 and tok.padding_side == "right" and tok.eos_token == "<|endoftext|>"
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok(TRICKY)["input_ids"] == theirs(TRICKY)["input_ids"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        CodeGenTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a": 0, ')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="corrupt"):
        CodeGenTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="corrupt"):
        CodeGenTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="both"):
        CodeGenTokenizer(vocab_file=DATA / "vocab.json")
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        CodeGenTokenizerFast.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no network|not a folder|hub"):
        AutoTokenizer.from_pretrained("Salesforce/codegen-no-such-model-xyz")
    gap = tmp_path / "gap"
    gap.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, gap / name)
    (gap / "added_tokens.json").write_text(json.dumps({"   ": 50300}))
    with pytest.raises(ValueError, match="disagree"):
        CodeGenTokenizer.from_pretrained(gap)
    (gap / "added_tokens.json").unlink()
    (gap / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match="LlamaTokenizer"):
        AutoTokenizer.from_pretrained(gap)


def test_folder_without_tokenizer_files_uses_builtin(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _same_behaviour(CodeGenTokenizer.from_pretrained(tmp_path), CodeGenTokenizerFast())
