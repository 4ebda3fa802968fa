"""The OpenAPI document at ``GET /openapi.json``: the request bodies with this server's limits as schema constraints,
and the shapes of the responses, so that clients and fuzzers can check against it. Routes read their bodies
themselves (size and time limits come first), so the bodies are declared here; tests validate real responses
against this document to keep it true."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from .protocol import ChatRequest, CompletionRequest, Limits

FinishReason = Literal["stop", "length"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys and values were reused from earlier requests, not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class LogProbs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    finish_reason: FinishReason | None
    logprobs: LogProbs | None


class CompletionResponse(BaseModel):
    """A whole completion, or (streamed) one chunk of it: then ``finish_reason`` is null until a choice ends, and the
    last chunk, when ``stream_options.include_usage`` asks for it, has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "shutting down"]
    model: str
    running: int
    waiting: int
    pending: int
    capacity: int


RESPONSES = (ErrorResponse, CompletionResponse, ChatCompletionResponse, ChatCompletionChunk, ModelList, Health)
EVENT_STREAM = ("Server-sent events when `stream` is true: each `data:` line holds one {chunk} as JSON (or, if the "
                "request fails after the stream began, an ErrorResponse), and the last one is `data: [DONE]`.")


REF = "#/components/schemas/{model}"


def request_schema(model: type[BaseModel], limits: Limits) -> dict[str, Any]:
    """``model``'s JSON schema with ``limits`` written in as constraints."""
    schema = model.model_json_schema(ref_template=REF)
    props = schema["properties"]
    for name in ("max_tokens", "max_completion_tokens"):
        if name in props:
            _constrain(props[name], maximum=limits.max_tokens)
    _constrain(props["n"], maximum=limits.max_n)
    one_stop = {"type": "string", "minLength": 1, "maxLength": limits.max_stop_length}
    props["stop"] = {"anyOf": [one_stop, {"type": "array", "maxItems": limits.max_stop, "items": one_stop},
                               {"type": "null"}], "default": None}
    for option in props.get("prompt", {}).get("anyOf", []):
        if option.get("type") == "array":
            option["maxItems"] = limits.max_prompts
    if "messages" in props:
        props["messages"]["maxItems"] = limits.max_messages
    return schema


def _constrain(prop: dict[str, Any], **bounds: Any) -> None:
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option.update(bounds)


def document(app_openapi: dict[str, Any], limits: Limits, api_keys: bool) -> dict[str, Any]:
    """FastAPI's document for our routes, with the request bodies, responses and (with ``api_keys``) bearer auth."""
    doc = dict(app_openapi)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in RESPONSES + (CompletionRequest, ChatRequest):
        schema = model.model_json_schema(ref_template=REF) if model in RESPONSES else request_schema(model, limits)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema

    def ref(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": {"$ref": REF.format(model=name)}}}}

    errors = {str(status): {"description": what, **ref("ErrorResponse")} for status, what in (
        (400, "Invalid request (the message names the field)"), (401, "Missing or wrong API key"),
        (404, "Unknown model"), (408, "The body did not arrive in time"), (413, "Body too large"),
        (429, "At capacity: retry after the Retry-After header's seconds"), (500, "Generation failed"),
        (503, "Shutting down"), (504, "Not finished within the server's request timeout"))}

    def post(request: str, response: str, chunk: str) -> dict[str, Any]:
        ok = ref(response)
        ok["content"]["text/event-stream"] = {"schema": {"type": "string", "description": EVENT_STREAM.format(chunk=chunk)}}
        return {"requestBody": {"required": True, **ref(request)},
                "responses": {"200": {"description": f"A {response}, or a stream of {chunk}s", **ok}, **errors}}

    paths = doc.setdefault("paths", {})
    completion = post("CompletionRequest", "CompletionResponse", "CompletionResponse")
    for path in ("/v1/completions", "/v1/engines/{engine}/completions"):
        paths[path]["post"].update(completion)
    paths["/v1/chat/completions"]["post"].update(post("ChatRequest", "ChatCompletionResponse", "ChatCompletionChunk"))
    paths["/v1/models"]["get"]["responses"] = {"200": {"description": "The served model", **ref("ModelList")}}
    paths["/health"]["get"]["responses"] = {"200": {"description": "Serving", **ref("Health")},
                                            "503": {"description": "Draining before shutdown", **ref("Health")}}
    if api_keys:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in paths.items():
            if path != "/health":
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return doc
