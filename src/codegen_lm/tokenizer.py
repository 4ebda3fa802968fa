"""CodeGen's tokenizer: GPT-2 byte-level BPE plus 37 whitespace-run tokens, on HF `tokenizers`.

``CodeGenTokenizer`` and ``CodeGenTokenizerFast`` take transformers' arguments and give its ids, offsets
and decoded text; both run on the same Rust engine (transformers 5 does the same: there its two names are
one class). Differences from transformers, on purpose: padding defaults to the LEFT with pad = eos (what
batched generation needs), and ``truncate_before_pattern`` bounds the time spent on each caller regex.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import regex
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .hub import atomic_write_text, resolve_file

DATA = Path(__file__).resolve().parent / "data"
ENDOFTEXT = "<|endoftext|>"
# Added after GPT-2's 50257 tokens, in this order: runs of 31..2 spaces (ids 50257..50286), 9..2 tabs.
WHITESPACE_TOKENS = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))
CODEGEN_TOKENS = 50257 + len(WHITESPACE_TOKENS)  # GPT-2's BPE + whitespace runs: 50295 (of the checkpoints' 51200 rows)
PATTERN_TIMEOUT_S = 1.0  # per caller regex in truncate_before_pattern
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer_config.json keys we take from a checkpoint; the rest (tokenizer_class, name_or_path, ...) is metadata.
CONFIG_KEYS = (
    "errors", *SPECIAL_NAMES, "add_prefix_space", "add_bos_token", "return_token_type_ids",
    "model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces",
)
KNOWN_CLASSES = {"CodeGenTokenizer", "CodeGenTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast"}


class PatternTimeoutError(ValueError):
    """A truncate_before_pattern regex ran past its time limit (catastrophic backtracking)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the alphabet of vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    """Bytes of one token, as the ByteLevel decoder sees them: raw UTF-8 for tokens outside the alphabet."""
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError:  # added tokens like "    " are stored as plain text
        return token.encode("utf-8")


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation (off by default: it changes code)."""
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
        .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re")
    )


def _cut_before_second(text: str, pattern: re.Pattern) -> str:
    matches = pattern.finditer(text)
    if next(matches, None) is not None and (second := next(matches, None)) is not None:
        return text[: second.start()]
    return text


_PRINT = re.compile("^print", re.MULTILINE)
_DEF = re.compile("^def", re.MULTILINE)


def truncate_before_pattern(text: str, patterns: Sequence[str], timeout: float | None = None) -> str:
    """CodeGen's completion truncation: before the 2nd line starting ``print``, then the 2nd ``def``, then the
    earliest match of any pattern (MULTILINE). Each pattern may search for at most ``timeout`` seconds
    (default PATTERN_TIMEOUT_S); a longer search raises PatternTimeoutError."""
    timeout = PATTERN_TIMEOUT_S if timeout is None else timeout
    if isinstance(patterns, str):
        raise ValueError("truncate_before_pattern takes a list of regular expressions, not one string")
    text = _cut_before_second(_cut_before_second(text, _PRINT), _DEF)
    cuts = []
    for pattern in patterns:
        try:
            compiled = regex.compile(pattern, regex.MULTILINE | regex.VERSION0)
        except (regex.error, TypeError) as e:
            raise ValueError(f"truncate_before_pattern: {pattern!r} is not a valid regular expression ({e})") from None
        try:
            match = compiled.search(text, timeout=timeout)
        except TimeoutError:
            raise PatternTimeoutError(
                f"truncate_before_pattern: {pattern!r} took over {timeout:g} s on a {len(text)}-character text "
                f"(catastrophic backtracking); simplify the pattern"
            ) from None
        if match:
            cuts.append(match.start())
    return text[: min(cuts)] if cuts else text


class BatchEncoding(dict):
    """What calling a tokenizer returns: a dict whose keys are also attributes; ``.to(device)`` for tensors."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def _read_json(path: Path | None, what: str) -> Any:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}; re-download it or delete it") from None


def _token_content(value: Any) -> Any:
    """A special token as tokenizer_config / special_tokens_map store it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _load_model(vocab_file: str | os.PathLike | None, merges_file: str | os.PathLike | None,
                tokenizer_file: str | os.PathLike | None) -> Tokenizer:
    """The Rust tokenizer from tokenizer.json, else vocab.json + merges.txt, else the files shipped with us."""
    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_file}")
        try:
            backend = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ValueError(f"{tokenizer_file} is not a valid tokenizer.json ({e}); re-download it or delete it") from None
        if not isinstance(backend.model, BPE):
            raise ValueError(f"{tokenizer_file} holds a {type(backend.model).__name__} model, not CodeGen's BPE")
        return backend
    if (vocab_file is None) != (merges_file is None):
        raise ValueError("pass both vocab_file and merges_file (or neither, for the built-in CodeGen vocabulary)")
    if vocab_file is None:
        vocab_file, merges_file = DATA / "vocab.json", DATA / "merges.txt"
    for path in (vocab_file, merges_file):
        if not Path(path).is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
    try:
        model = BPE.from_file(str(vocab_file), str(merges_file), continuing_subword_prefix="", end_of_word_suffix="")
    except Exception as e:
        raise ValueError(
            f"cannot read the BPE vocabulary {vocab_file} / {merges_file} ({e}); the files are corrupt or not "
            f"GPT-2 BPE files: re-download them, or omit them to use the built-in CodeGen vocabulary"
        ) from None
    return Tokenizer(model)


def _to_id_list(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):  # torch / numpy
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    ids = token_ids if isinstance(token_ids, list) else list(token_ids)
    if ids and not isinstance(ids[0], int):
        raise ValueError("decode takes one sequence of token ids; use batch_decode for several")
    return ids


class CodeGenTokenizer:
    """CodeGen's tokenizer with transformers' arguments and behaviour (see the module docstring)."""

    vocab_files_names = {"vocab_file": "vocab.json", "merges_file": "merges.txt", "tokenizer_file": "tokenizer.json"}
    is_fast = False

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        merges_file: str | os.PathLike | None = None,
        errors: str = "replace",
        unk_token: str | AddedToken = ENDOFTEXT,
        bos_token: str | AddedToken = ENDOFTEXT,
        eos_token: str | AddedToken = ENDOFTEXT,
        pad_token: str | AddedToken | None = None,
        add_prefix_space: bool = False,
        add_bos_token: bool = False,
        return_token_type_ids: bool = False,
        *,
        tokenizer_file: str | os.PathLike | None = None,
        added_tokens: dict[str, int] | None = None,
        model_max_length: int = 2048,
        padding_side: str = "left",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ):
        """``pad_token=None`` pads with eos. ``added_tokens`` (content -> id, as in added_tokens.json) must extend
        the vocabulary in id order; CodeGen's whitespace tokens are added after them when missing."""
        try:
            codecs.lookup_error(errors)  # an unknown handler fails here, not at the first decode
        except LookupError:
            raise ValueError(f"errors={errors!r} is not a codec error handler; use 'replace', 'strict' or 'ignore'") from None
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
        self.errors = errors
        self.add_prefix_space = add_prefix_space
        self.add_bos_token = add_bos_token
        self.return_token_type_ids = return_token_type_ids
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = str(name_or_path)

        backend = _load_model(vocab_file, merges_file, tokenizer_file)
        self._base_size = backend.get_vocab_size(with_added_tokens=False)
        # The pipeline transformers builds for CodeGen; offsets are not trimmed.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        for content, token_id in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
            self._add_at(backend, content, token_id)
        missing = [t for t in WHITESPACE_TOKENS if backend.token_to_id(t) is None]
        backend.add_tokens([AddedToken(t, normalized=True, special=False) for t in missing])
        tokens = {"unk_token": unk_token, "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token or eos_token}
        backend.add_special_tokens([t if isinstance(t, AddedToken) else AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys(tokens.values()) if t is not None])
        for name, value in tokens.items():
            setattr(self, name, None if value is None else str(value.content if isinstance(value, AddedToken) else value))
        self._tokenizer = backend
        self._size = backend.get_vocab_size(with_added_tokens=True)  # fixed from here on; costly in some versions

    @staticmethod
    def _add_at(backend: Tokenizer, content: str, token_id: int) -> None:
        if backend.token_to_id(content) == token_id:
            return
        size = backend.get_vocab_size(with_added_tokens=True)
        if token_id != size:
            raise ValueError(
                f"added token {content!r} has id {token_id}, but the vocabulary holds {size} tokens; the checkpoint's "
                f"tokenizer files disagree (added tokens must extend the vocabulary in order)"
            )
        backend.add_tokens([AddedToken(content, normalized=True, special=False)])

    # ---- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "CodeGenTokenizer":
        """Load from a checkpoint folder or hub id: its tokenizer.json, else vocab.json + merges.txt (with
        added_tokens.json), else the built-in vocabulary; tokenizer_config.json and special_tokens_map.json set
        the options; keyword arguments override them."""
        kwargs.pop("trust_remote_code", None)  # nothing remote to trust: the code is ours
        config = _read_json(resolve_file(name_or_path, "tokenizer_config.json", required=False), "tokenizer config") or {}
        tokenizer_class = config.get("tokenizer_class")
        if tokenizer_class is not None and tokenizer_class not in KNOWN_CLASSES:
            raise ValueError(f"{name_or_path} uses a {tokenizer_class}; codegen_lm reads CodeGen (GPT-2 BPE) tokenizers only")
        special_map = _read_json(resolve_file(name_or_path, "special_tokens_map.json", required=False), "special tokens map") or {}
        options: dict[str, Any] = {k: config[k] for k in CONFIG_KEYS if k in config}
        options.update({k: special_map[k] for k in SPECIAL_NAMES if k in special_map})
        for name in SPECIAL_NAMES:
            if name in options:
                options[name] = _token_content(options[name])
        files: dict[str, Any] = {"tokenizer_file": resolve_file(name_or_path, "tokenizer.json", required=False)}
        if files["tokenizer_file"] is None and (vocab := resolve_file(name_or_path, "vocab.json", required=False)):
            files = {"vocab_file": vocab, "merges_file": resolve_file(name_or_path, "merges.txt")}
        added = _read_json(resolve_file(name_or_path, "added_tokens.json", required=False), "added tokens file") or {}
        for token_id, token in (config.get("added_tokens_decoder") or {}).items():
            added.setdefault(_token_content(token), int(token_id))
        return cls(**files, added_tokens=added, name_or_path=str(name_or_path), **{**options, **kwargs})

    def _config(self) -> dict[str, Any]:
        return {
            "tokenizer_class": "CodeGenTokenizer",
            **{name: getattr(self, name) for name in CONFIG_KEYS},
        }

    def save_pretrained(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write tokenizer.json, vocab.json, merges.txt, added_tokens.json, special_tokens_map.json and
        tokenizer_config.json: readable by transformers' AutoTokenizer and by ours."""
        out = Path(save_directory)
        if out.is_file():
            raise ValueError(f"{out} is a file; save_pretrained needs a folder")
        out.mkdir(parents=True, exist_ok=True)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        files = {
            "tokenizer_config.json": self._config(),
            "special_tokens_map.json": {name: getattr(self, name) for name in SPECIAL_NAMES},
            "added_tokens.json": {t.content: i for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())
                                  if i >= self._base_size},
        }
        written = []
        for name, content in files.items():
            path = out / f"{prefix}{name}"
            atomic_write_text(path, json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            written.append(str(path))
        atomic_write_text(out / f"{prefix}tokenizer.json", self._tokenizer.to_str(pretty=True))
        return (*written, str(out / f"{prefix}tokenizer.json"), *self.save_vocabulary(out, filename_prefix))

    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, str]:
        """Write the BPE files (vocab.json, merges.txt) of the base vocabulary; returns their paths."""
        out = Path(save_directory)
        if not out.is_dir():
            raise FileNotFoundError(f"save_vocabulary: {out} is not a folder")
        model = json.loads(self._tokenizer.to_str())["model"]
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path, merges_path = out / f"{prefix}vocab.json", out / f"{prefix}merges.txt"
        atomic_write_text(vocab_path, json.dumps(model["vocab"], ensure_ascii=False) + "\n")
        merges = (" ".join(m) if isinstance(m, list) else m for m in model["merges"])
        atomic_write_text(merges_path, "#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
        return str(vocab_path), str(merges_path)

    # ---- vocabulary ---------------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary (50257), as in transformers; ``len(tok)`` counts added tokens too."""
        return self._base_size

    def __len__(self) -> int:
        return self._size

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_or_none(self.unk_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_or_none(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_or_none(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_or_none(self.pad_token)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of tokens; unknown tokens give unk's id, as in transformers."""
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            self._check_ids([int(ids)])
            return self._tokenizer.id_to_token(int(ids))
        ids = self._check_ids(_to_id_list(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in special]

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        return self._tokenizer.decoder.decode(list(tokens))

    # ---- encoding -----------------------------------------------------------------------------------------

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """0 for each token of the first sequence, 1 for the second's (CodeGen has no cls/sep tokens)."""
        return [0] * len(token_ids_0) + ([1] * len(token_ids_1) if token_ids_1 is not None else [])

    def __call__(
        self,
        text: str | Sequence[str] | Sequence[Sequence[str]],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool = True,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
    ) -> BatchEncoding:
        """Encode one text (flat lists) or a batch (lists of lists); ``return_tensors="pt"`` or ``"np"`` gives
        [batch, length] arrays (a single text becomes a batch of one)."""
        batched = isinstance(text, (list, tuple)) and (not is_split_into_words or (len(text) > 0 and isinstance(text[0], (list, tuple))))
        texts = list(text) if batched else [text]
        items = [w for words in texts for w in words] if is_split_into_words else texts
        if not all(isinstance(t, str) for t in items):
            raise ValueError("text must be a string or a list of strings (lists of words with is_split_into_words=True)")
        pad_to = self._pad_length(padding, max_length)
        if truncation is None:  # transformers: max_length without padding to it means truncate
            truncation = max_length is not None and pad_to is None
        if truncation not in (False, "do_not_truncate") and truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"truncation={truncation!r}: use True, False, 'longest_first' or 'do_not_truncate'")
        truncation = truncation not in (False, "do_not_truncate")

        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets.
        encode = self._tokenizer.encode_batch if return_offsets_mapping else getattr(
            self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode(texts, is_pretokenized=is_split_into_words, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        offsets = [e.offsets for e in encodings] if return_offsets_mapping else None
        bos = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        if truncation:
            limit = max(0, (max_length if max_length is not None else self.model_max_length) - len(bos))
            cut = (lambda s: s[:limit]) if self.truncation_side == "right" else (lambda s: s[len(s) - limit:] if len(s) > limit else s)
            ids = [cut(s) for s in ids]
            offsets = [cut(s) for s in offsets] if offsets is not None else None
        if bos:
            ids = [bos + s for s in ids]
            offsets = [[(0, 0)] + s for s in offsets] if offsets is not None else None

        lengths = [len(s) for s in ids]
        out: dict[str, list] = {"input_ids": ids}
        if return_token_type_ids or (return_token_type_ids is None and self.return_token_type_ids):
            out["token_type_ids"] = [[0] * n for n in lengths]
        if return_attention_mask:
            out["attention_mask"] = [[1] * n for n in lengths]
        if offsets is not None:
            out["offset_mapping"] = offsets
        if pad_to is not None:
            target = max(lengths, default=0) if pad_to == 0 else pad_to
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side={side!r}: use 'left' or 'right'")
            fill = {"input_ids": self.pad_token_id, "token_type_ids": 0, "attention_mask": 0, "offset_mapping": (0, 0)}
            for key, rows in out.items():
                out[key] = [self._pad(row, target - len(row), fill[key], side) for row in rows]
        if return_length:
            out["length"] = lengths
        if return_tensors is not None:
            return BatchEncoding({k: self._as_tensor(k, v, return_tensors) for k, v in out.items()})
        return BatchEncoding(out if batched else {k: v[0] for k, v in out.items()})

    def _pad_length(self, padding: bool | str, max_length: int | None) -> int | None:
        """None: no padding; 0: to the longest in the batch; n: to n tokens."""
        if padding in (False, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            return 0
        if padding == "max_length":
            return max_length if max_length is not None else self.model_max_length
        raise ValueError(f"padding={padding!r}: use True, 'longest', 'max_length' or False")

    @staticmethod
    def _pad(row: list, n: int, fill: Any, side: str) -> list:
        if n <= 0:
            return row
        return [fill] * n + row if side == "left" else row + [fill] * n

    @staticmethod
    def _as_tensor(key: str, rows: list, kind: str) -> Any:
        if kind not in ("pt", "np"):
            raise ValueError(f"return_tensors={kind!r}: use 'pt' (torch) or 'np' (numpy)")
        if key != "length" and len({len(r) for r in rows}) > 1:
            raise ValueError("the texts encode to different lengths; pass padding=True to return tensors")
        if kind == "np":
            import numpy as np

            return np.array(rows, dtype=np.int64)
        import torch

        return torch.tensor(rows, dtype=torch.long)

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = True, truncation: bool | str | None = None,
               max_length: int | None = None, is_split_into_words: bool = False, return_tensors: str | None = None) -> Any:
        """Token ids of one text (a list, or a [1, n] tensor with return_tensors)."""
        if is_split_into_words and (not isinstance(text, (list, tuple)) or (text and not isinstance(text[0], str))):
            raise ValueError("encode takes one text; with is_split_into_words=True, one list of words")
        if not is_split_into_words and not isinstance(text, str):
            raise ValueError("encode takes one string; call the tokenizer on a list to encode a batch")
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
                    is_split_into_words=is_split_into_words, return_tensors=return_tensors,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    # ---- decoding -----------------------------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> list[int]:
        if ids and (min(ids) < 0 or max(ids) >= self._size):
            raise self._range_error(ids)
        return ids

    def _range_error(self, ids: list[int]) -> ValueError:
        bad = next(i for i in ids if not 0 <= i < self._size)
        return ValueError(f"token id {bad} is out of range: this tokenizer has {self._size} tokens (ids 0..{self._size - 1})")

    def _decode_all(self, seqs: list[list[int]], skip_special_tokens: bool) -> list[str]:
        """Raw text of each sequence. Ids past the vocabulary are checked here (the Rust decoder would drop them
        silently); negative ids make tokenizers raise OverflowError, turned into the same message (one pass less)."""
        for ids in seqs:
            if ids and max(ids) >= self._size:
                raise self._range_error(ids)
        try:
            if self.errors != "replace":
                return [self._decode_bytes(ids, skip_special_tokens) for ids in seqs]
            # One call per sequence: faster than decode_batch's thread pool for the batches generation makes
            # (8 x 256 tokens: 0.22 vs 0.29 s per 2000 calls) and even for 2 MB of source, on 2 busy cores.
            return [self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in seqs]
        except OverflowError:
            raise self._range_error(next(ids for ids in seqs if ids and min(ids) < 0)) from None

    def _decode_bytes(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Decoding that honours ``errors`` other than "replace" (the Rust decoder always replaces)."""
        special = set(self.all_special_ids) if skip_special_tokens else set()
        data = b"".join(_token_bytes(self._tokenizer.id_to_token(i)) for i in ids if i not in special)
        return data.decode("utf-8", self.errors)

    def _finish(self, text: str, clean_up_tokenization_spaces: bool | None, patterns: Sequence[str] | None) -> str:
        if clean_up_tokenization_spaces if clean_up_tokenization_spaces is not None else self.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        if patterns:
            text = truncate_before_pattern(text, patterns)
        return text

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               truncate_before_pattern: Sequence[str] | None = None) -> str:
        """Text of a sequence of ids (list, tensor or array); ``truncate_before_pattern`` as in CodeGen."""
        text = self._decode_all([_to_id_list(token_ids)], skip_special_tokens)[0]
        return self._finish(text, clean_up_tokenization_spaces, truncate_before_pattern)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
                     truncate_before_pattern: Sequence[str] | None = None) -> list[str]:
        """decode() for each sequence of a batch (list of lists, or a 2-D tensor/array)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        texts = self._decode_all([_to_id_list(s) for s in sequences], skip_special_tokens)
        return [self._finish(t, clean_up_tokenization_spaces, truncate_before_pattern) for t in texts]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, tokens={len(self)}, "
                f"add_prefix_space={self.add_prefix_space}, add_bos_token={self.add_bos_token}, "
                f"padding_side={self.padding_side!r})")


class CodeGenTokenizerFast(CodeGenTokenizer):
    """The same tokenizer under transformers' fast name (ids, offsets and text are identical)."""

    is_fast = True


class AutoTokenizer:
    """``AutoTokenizer.from_pretrained(name)``: CodeGenTokenizerFast (or CodeGenTokenizer with use_fast=False)."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(name_or_path)")

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, use_fast: bool = True, **kwargs: Any) -> CodeGenTokenizer:
        cls = CodeGenTokenizerFast if use_fast else CodeGenTokenizer
        return cls.from_pretrained(name_or_path, **kwargs)
