"""Training data: reading, dedup, tokenizing into the cache, packing, block order, bad input."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from codegen_lm.tokenizer import CodeGenTokenizerFast
from codegen_lm.train.data import BlockOrder, DataError, DataSpec, PackedBlocks, backend_tokenizer, iter_documents, prepare

EOS = 50256
DOCS = {
    "a.py": "def add(a, b):\n    return a + b\n",
    "pkg/b.py": "import os\n\n\nclass A:\n\tpass\n",
    "pkg/c.py": "# mentions <|endoftext|> as text\nx = '<|endoftext|>'\n",
    "pkg/deep/d.py": "print('héllo ✓')\n" * 5,
    "pkg/e.py": "def add(a, b):\n    return a + b\n",  # exact duplicate of a.py
    "notes.txt": "not python\n",
    "pkg/__pycache__/x.py": "cached = 1\n",
    ".hidden/h.py": "hidden = 1\n",
}


@pytest.fixture(scope="module")
def tokenizer():
    return CodeGenTokenizerFast()


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "src"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def unique_docs() -> list[str]:
    """The documents a folder read should yield: .py only, no hidden or cache folders, duplicates once."""
    keep = [t for n, t in DOCS.items() if n.endswith(".py") and "__pycache__" not in n and not n.startswith(".")]
    return list(dict.fromkeys(keep))


def split_docs(stream: np.ndarray) -> list[list[int]]:
    assert len(stream) == 0 or stream[-1] == EOS, "every document ends with EOS"
    docs, cur = [], []
    for t in stream.tolist():
        if t == EOS:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def test_folder_selection_and_order(corpus):
    labels = [label for label, _ in iter_documents(DataSpec((str(corpus),)))]
    names = [os.path.relpath(label, corpus) for label in labels]
    assert names == ["a.py", "pkg/b.py", "pkg/c.py", "pkg/e.py", "pkg/deep/d.py"]  # sorted walk, filters applied
    txt = [os.path.relpath(label, corpus) for label, _ in iter_documents(DataSpec((str(corpus),), extensions=("txt",)))]
    assert txt == ["notes.txt"]


def test_packing_keeps_every_document_once(corpus, tokenizer, tmp_path):
    data = prepare(DataSpec((str(corpus),), val_fraction=0.3), tokenizer, tmp_path / "cache", progress=False)
    docs = split_docs(np.asarray(data.train)) + split_docs(np.asarray(data.val))
    expected = unique_docs()
    # No document lost or duplicated, and EOS only between documents (the literal text stays text).
    assert Counter(tokenizer.decode(d) for d in docs) == Counter(expected)
    assert sum(len(d) + 1 for d in docs) == data.meta["train_tokens"] + data.meta["val_tokens"]
    assert data.meta["train_tokens"] == len(data.train) and data.meta["val_tokens"] == len(data.val)
    as_text = backend_tokenizer(tokenizer)  # special-token text inside a document is encoded as text
    assert sum(len(as_text.encode(t).ids) + 1 for t in expected) == len(data.train) + len(data.val)
    assert len(tokenizer.encode(DOCS["pkg/c.py"])) < len(as_text.encode(DOCS["pkg/c.py"]).ids)
    assert data.meta["duplicates"] == 1 and data.meta["val_documents"] >= 1 and data.meta["train_documents"] >= 1
    assert data.train.dtype == np.uint16

    seq = 7
    blocks = PackedBlocks(data.train, seq, pad_id=EOS)
    assert len(blocks) == -(-len(data.train) // seq)
    ids = np.concatenate([blocks.block(i)[0] for i in range(len(blocks))])
    labels = np.concatenate([blocks.block(i)[1] for i in range(len(blocks))])
    n = len(data.train)
    assert (ids[:n] == data.train).all() and (labels[:n] == data.train).all()  # consecutive, nothing dropped
    assert (ids[n:] == EOS).all() and (labels[n:] == -100).all()  # only the tail is padding, without loss
    with pytest.raises(IndexError):
        blocks.block(len(blocks))


def test_cache_reused_and_keyed_by_content(corpus, tokenizer, tmp_path, monkeypatch):
    from codegen_lm.train import data as data_module

    tokenize_into, tokenized = data_module._tokenize_into, []  # counted: a file's mtime may not move on a coarse clock

    def counted(directory, *args):
        tokenized.append(directory)
        return tokenize_into(directory, *args)

    monkeypatch.setattr(data_module, "_tokenize_into", counted)
    spec = DataSpec((str(corpus),), val_fraction=0.3)
    first = prepare(spec, tokenizer, tmp_path / "cache", progress=False)
    again = prepare(spec, tokenizer, tmp_path / "cache", progress=False)
    assert again.directory == first.directory and tokenized == [first.directory]
    (corpus / "a.py").write_text("def sub(a, b):\n    return a - b\n", encoding="utf-8")
    changed = prepare(spec, tokenizer, tmp_path / "cache", progress=False)
    assert changed.directory != first.directory
    other_split = prepare(DataSpec((str(corpus),), val_fraction=0.5), tokenizer, tmp_path / "cache", progress=False)
    assert other_split.directory != changed.directory and len(tokenized) == 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        {first.directory.name, changed.directory.name, other_split.directory.name})  # no temporary leftovers


def test_jsonl_and_no_val(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    rows = [{"content": "x = 1\n", "id": 1}, {"content": "y = 2\n"}, {"content": ""}, {"content": "x = 1\n"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    data = prepare(DataSpec((str(path),), text_field="content", val_fraction=0.0), tokenizer, tmp_path / "c", progress=False)
    assert len(data.val) == 0 and data.meta["empty"] == 1 and data.meta["duplicates"] == 1
    assert [tokenizer.decode(d) for d in split_docs(np.asarray(data.train))] == ["x = 1\n", "y = 2\n"]


def test_datasets_folder(tmp_path, tokenizer):
    import datasets  # the [train] extra's (in [test]): a missing one fails here rather than skip the test
    datasets.Dataset.from_dict({"text": ["a = 1\n", "b = 2\n", "c = 3\n"]}).save_to_disk(str(tmp_path / "ds"))
    data = prepare(DataSpec((str(tmp_path / "ds"),), val_fraction=0.3), tokenizer, tmp_path / "c", progress=False)
    assert data.meta["train_documents"] + data.meta["val_documents"] == 3
    with pytest.raises(DataError, match="no 'code' column"):
        prepare(DataSpec((str(tmp_path / "ds"),), text_field="code"), tokenizer, tmp_path / "c", progress=False)


def test_block_order_is_a_permutation_per_epoch():
    order = BlockOrder(10, seed=3)
    seen = [i for step in range(5) for i in order.step_indices(step, 4)]  # 20 blocks = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # each epoch is shuffled anew
    assert BlockOrder(10, seed=3).step_indices(2, 4) == seen[8:12]  # a pure function of the step
    assert BlockOrder(10, seed=4).step_indices(0, 10) != seen[:10]


# ---- bad input ------------------------------------------------------------------------------------------


def test_missing_and_empty_inputs(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(DataSpec((str(tmp_path / "nope"),))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no files ending in \.py under"):
        list(iter_documents(DataSpec((str(tmp_path / "empty"),))))
    with pytest.raises(DataError, match="no training data"):
        list(iter_documents(DataSpec(())))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("a = 1\n")
    with pytest.raises(DataError, match="at least two"):
        prepare(DataSpec((str(tmp_path / "one"),)), tokenizer, tmp_path / "c", progress=False)


def test_unreadable_file_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ok.py").write_text("a = 1\n")
    (tmp_path / "src" / "gone.py").symlink_to(tmp_path / "missing.py")  # a dangling link cannot be read
    with pytest.raises(DataError, match=r"cannot read .*gone\.py"):
        list(iter_documents(DataSpec((str(tmp_path / "src"),))))


def test_non_utf8_files_are_skipped_and_reported(corpus, tokenizer, tmp_path):
    (corpus / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    data = prepare(DataSpec((str(corpus),), val_fraction=0.3), tokenizer, tmp_path / "c", progress=False)
    assert data.meta["not_utf8"] == [str(corpus / "latin1.py")]
    assert "1 non-UTF-8 files skipped" in data.meta["summary"]
    assert data.meta["train_documents"] + data.meta["val_documents"] == len(unique_docs())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.py").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="no usable documents"):
        prepare(DataSpec((str(bad),)), tokenizer, tmp_path / "c", progress=False)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"content": "x"}', r"data\.jsonl:2 has no 'text' field \(its keys: content\); pass --text-field"),
        ("[1, 2]", r"data\.jsonl:2 is not a JSON object"),
        ('{"text": 3}', r"field 'text' is int, not a string"),
        ("{oops", r"data\.jsonl:2 is not valid JSON"),
    ],
)
def test_bad_jsonl_lines(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        list(iter_documents(DataSpec((str(path),))))


def test_non_utf8_jsonl_is_an_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="is not UTF-8"):
        list(iter_documents(DataSpec((str(path),))))
