"""The wire format: OpenAI-style request bodies (checked against the server's limits), the responses and
stream chunks built from scheduler outputs, and the OpenAI error shape."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine import Completion, SamplingParams
from ..session import MTPB_PRELUDE

@dataclass
class Limits:
    """Bounds on what one request may ask for (every one answered with a 400 naming the limit)."""

    max_tokens: int = 1024  # per completion
    max_n: int = 16
    max_prompts: int = 16  # entries of a prompt list
    max_stop: int = 4
    max_stop_length: int = 64  # characters
    max_messages: int = 64  # chat turns
    max_body_bytes: int = 1 << 20
    body_timeout: float = 10.0  # seconds to receive the whole body
    request_timeout: float = 300.0  # seconds from arrival to the last token


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {401: "authentication_error", 429: "rate_limit_error"}  # other 4xx: invalid_request_error

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# -- requests --------------------------------------------------------------------------------------------


# Strict types, as OpenAI's API checks them: "5", 5.0 and true are not integers, "0.5" is not a number, "yes" is not a
# boolean. Clients send fields we do not use (user, ...): they are ignored.
STRICT = ConfigDict(extra="ignore", strict=True)


class _Request(BaseModel):
    model_config = STRICT

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # below 1e-5 it is greedy (see SamplingParams)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # an extension (vLLM has it too); 0 = no limit
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = "<|endoftext|>"  # OpenAI's default
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones are meaningful here
            kinds = {p.get("type") for p in self.content}
            if kinds - {"text"}:
                raise ApiError(400, f"only text content parts are supported (got {sorted(map(str, kinds - {'text'}))})",
                               param="messages")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)


# What a union field takes, for a message that names the field rather than one of the union's members.
UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
                "stop": "a string or a list of strings", "content": "a string or a list of content parts"}


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc, message = list(first["loc"]), first["msg"]
        for i, name in enumerate(loc[:-1]):  # the union member pydantic tried last is not what the client meant
            if name in UNION_FIELDS and isinstance(loc[i + 1], str):
                loc, message = loc[: i + 1], f"should be {UNION_FIELDS[name]}"
                break
        where = ".".join(map(str, loc)) or "body"
        raise ApiError(400, f"{where}: {message}", param=str(loc[0]) if loc else None) from None


MAX_DEPTH = 8  # no request field nests deeper than messages[i].content[j].text


class _HugeInt(int):
    """An integer literal too long to convert (Python refuses over 4300 digits): kept as its digit count."""


def _parse_int(digits: str) -> int:
    return int(digits) if len(digits) <= 64 else _HugeInt(len(digits))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loads(body: bytes) -> Any:
    """The body as JSON, with every value checked before any field is read: nesting at most ``MAX_DEPTH`` deep,
    strings valid Unicode (a lone surrogate such as \\ud800 is not), integers at most 64 digits. Each problem is a
    400 naming where it is."""
    try:
        value = json.loads(body, parse_int=_parse_int)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        problem = None
        if len(path) > MAX_DEPTH:
            problem = f"nested more than {MAX_DEPTH} levels deep"
        elif isinstance(item, _HugeInt):
            problem = f"an integer of {int(item)} digits is out of range"
        elif isinstance(item, (str, dict)) and not all(map(_is_unicode, [item] if isinstance(item, str) else item)):
            problem = "holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode"
        if problem:
            raise ApiError(400, f"{'.'.join(map(str, path)) or 'body'}: {problem}", param=str(path[0]) if path else None)
        if isinstance(item, dict):
            stack.extend((path + (k,), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((path + (i,), v) for i, v in enumerate(item))
    return value


def sampling_params(req: _Request, limits: Limits, max_tokens: int | None, default_max_tokens: int,
                    logprobs: bool = False, extra_stop: list[str] = ()) -> SamplingParams:
    """Check the request against ``limits`` and turn it into SamplingParams."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported; leave it at 0", param=name)
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                       param="max_tokens")
    if req.n > limits.max_n:
        raise ApiError(400, f"n is {req.n}; this server allows at most {limits.max_n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise ApiError(400, f"{len(stop)} stop sequences given; at most {limits.max_stop} are allowed", param="stop")
    for s in stop:
        if not s or len(s) > limits.max_stop_length:
            raise ApiError(400, f"each stop sequence must have 1 to {limits.max_stop_length} characters "
                                f"(got {len(s)})", param="stop")
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, n=req.n,
        stop=stop + [s for s in extra_stop if s not in stop], seed=req.seed, logprobs=logprobs,
    )


def check_prompt_length(prompts: list[list[int]], max_tokens: int, n_positions: int) -> None:
    for i, ids in enumerate(prompts):
        which = "prompt" if len(prompts) == 1 else f"prompt {i}"
        if not ids:
            raise ApiError(400, f"{which} is empty; give at least one token of text", param="prompt")
        if len(ids) + max_tokens > n_positions:
            raise ApiError(
                400,
                f"{which} has {len(ids)} tokens; with max_tokens {max_tokens} the limit is "
                f"{n_positions - max_tokens} prompt tokens (the model has {n_positions} positions)",
                param="prompt", code="context_length_exceeded",
            )


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


# -- chat ------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def chat_turns(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]], str]:
    """A conversation as a multi-turn synthesis session (``session.py``, MTPB's format): ``(prelude, turns,
    spec)``. Each user message is a turn's spec (one line: its lines are joined), the assistant message after
    it that turn's code, and the last user message the spec the model writes code for. System text goes
    above MTPB's prelude as comment lines."""
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must be from the user (the spec the model writes code for)",
                       param="messages")
    system = [_one_line(m.text()) for m in messages if m.role in ("system", "developer")]
    prelude = "".join(f"# {line}\n" for line in system if line) + ("\n" if any(system) else "") + MTPB_PRELUDE
    turns: list[list[Any]] = []  # [spec, code or None while unanswered]
    for m in messages:
        if m.role == "user":
            spec = _one_line(m.text())
            if not spec:
                raise ApiError(400, "a user message is empty; say in words what the next step should do",
                               param="messages")
            turns.append([spec, None])
        elif m.role == "assistant":
            if not turns or turns[-1][1] is not None:
                raise ApiError(400, "an assistant message must follow a user message (its code answers that spec)",
                               param="messages")
            turns[-1][1] = m.text().strip("\n")
    *history, (spec, _) = turns
    return prelude, [(s, c or "") for s, c in history], spec


# -- responses -------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose keys and values were reused, not computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_tokens(per_prompt: dict[int, int]) -> int:
    return sum(per_prompt.values())


def token_strings(tokenizer: Any, token_ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in token_ids]


def completion_logprobs(tokenizer: Any, completion: Completion, offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for the generated tokens. Only the chosen tokens' log-probabilities
    are computed, so ``top_logprobs`` is null."""
    tokens = token_strings(tokenizer, completion.token_ids)
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": list(completion.logprobs or []), "top_logprobs": None,
            "text_offset": offsets}


def envelope(kind: str, response_id: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            **extra}
