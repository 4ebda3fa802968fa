"""The completion server against the official openai client and raw HTTP: endpoints, streaming, batching
parity, limits, auth, and hostile clients. A tiny random-weight checkpoint with the real tokenizer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
import torch

from codegen_lm.engine import SamplingParams
from codegen_lm.serve import load_api_keys
from codegen_lm.serve.protocol import ChatMessage, chat_turns
from codegen_lm.session import MTPB_PRELUDE, Session
from serving import (KEY, MODEL, GatedScheduler, alone, free_port, metric, raw, running, settle, wait_until)



@pytest.fixture(scope="module")
def srv(served_generator):
    with running(served_generator, body_timeout=1.0, max_body_bytes=64 * 1024) as s:
        yield s


# -- endpoints through the official client -----------------------------------------------------------------


def test_models_and_health(srv):
    assert [m.id for m in srv.client.models.list().data] == [MODEL]
    health = httpx.get(srv.url + "/health").json()  # no key needed: load balancers probe it
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_is_the_generators(srv, served_generator):
    prompt = "def fibonacci(n):\n    "
    r = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    [expected] = alone(served_generator, prompt, max_new_tokens=12)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == expected.finish_reason
    n_prompt = len(served_generator.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)


def test_prompt_list_n_and_seed(srv, served_generator):
    # Over a random model's nearly flat distribution, float noise from the batch shape can move an inverse-CDF
    # draw across a bin edge; top_k=5 makes the bins wide enough that seeds reproduce exactly.
    prompts = ["import os\n", "class A:\n"]
    sampling = dict(max_tokens=6, temperature=0.9, top_p=0.95, n=3, seed=11, extra_body={"top_k": 5})
    r = srv.client.completions.create(model=MODEL, prompt=prompts, **sampling)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:  # sample j of a prompt is that prompt alone with seed 11 + j
        p, j = divmod(c.index, 3)
        [expected] = alone(served_generator, prompts[p], max_new_tokens=6, temperature=0.9, top_p=0.95, top_k=5, seed=11 + j)
        assert c.text == expected.text
    assert len({c.text for c in r.choices}) > 1
    again = srv.client.completions.create(model=MODEL, prompt=prompts, **sampling)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert r.usage.completion_tokens == 36


def test_token_id_prompt_and_echo(srv, served_generator):
    ids = served_generator.tokenizer.encode("x = [1, 2, 3]\n")
    r = srv.client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    [expected] = alone(served_generator, "x = [1, 2, 3]\n", max_new_tokens=5)
    assert r.choices[0].text == "x = [1, 2, 3]\n" + expected.text


def test_stop_sequences(srv, served_generator):
    prompt = "for i in range(10):\n"
    [free] = alone(served_generator, prompt, max_new_tokens=24)
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    r = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == free.text[: free.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streamed_stop_strings_are_never_emitted_even_across_tokens(srv, served_generator):
    prompt = "for i in range(10):\n"
    [free] = alone(served_generator, prompt, max_new_tokens=40)
    decode = served_generator.tokenizer.decode
    # Stop strings that straddle a boundary between two generated tokens (so no single chunk holds them whole).
    cuts = [len(decode(free.token_ids[:k])) for k in range(4, len(free.token_ids) - 4, 5)]
    stops = [free.text[c - 2 : c + 2] for c in cuts if len(free.text[c - 2 : c + 2].strip()) == 4]
    assert len(stops) >= 2
    for stop in stops:
        chunks = list(srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                                    stream=True))
        pieces = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(pieces) == free.text[: free.text.index(stop)], stop
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models(srv, served_generator):
    prompt = "def add(a, b):\n"
    r = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and lp.top_logprobs is None
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    ids = torch.tensor([served_generator.tokenizer.encode(prompt)])
    with torch.no_grad():
        logits = served_generator.model(ids).logits[0, -1].float()
    first = logits[: len(served_generator.tokenizer)].log_softmax(-1)  # the padding rows are never sampled
    assert lp.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)


def test_streaming(srv, served_generator):
    prompt = "while True:\n"
    [expected] = alone(served_generator, prompt, max_new_tokens=16)
    chunks = list(srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": True, "n": 2, "temperature": 0}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=srv.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    indexes = {json.loads(e[6:])["choices"][0]["index"] for e in events[:-1]}
    assert indexes == {0, 1}


def test_chat_is_a_session(srv, served_generator):
    messages = [{"role": "system", "content": "You write short programs."},
                {"role": "user", "content": "Assign the list [3, 1, 2] to xs."},
                {"role": "assistant", "content": "xs = [3, 1, 2]"},
                {"role": "user", "content": "Sort xs\nin place."}]
    prelude, turns, spec = chat_turns([ChatMessage(**m) for m in messages])
    assert (prelude, turns, spec) == ("# You write short programs.\n\n" + MTPB_PRELUDE,
                                      [("Assign the list [3, 1, 2] to xs.", "xs = [3, 1, 2]")], "Sort xs in place.")
    # The server's answer is what a Session with that history says for the last spec.
    session = Session(served_generator, prelude, turns, SamplingParams(max_new_tokens=24))
    expected = session.say(spec)
    r = srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.code
    prompt, _ = session.prompt_for(spec, turns)
    assert r.usage.prompt_tokens == len(served_generator.tokenizer.encode(prompt))
    chunks = list(srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                     stream=True, n=2))
    assert {c.choices[0].index for c in chunks[:2]} == {0, 1} and chunks[0].choices[0].delta.role == "assistant"
    for j in range(2):
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == j)
        assert content == expected.code
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert set(finishes) == {0, 1} and set(finishes.values()) <= {"stop", "length"}


def test_fauxpilot_request(srv, served_generator):
    # What FauxPilot's Copilot-compatible clients send (engine name in the path, extra fields).
    body = {"prompt": "def hello():\n", "max_tokens": 8, "temperature": 0.0, "top_p": 1, "n": 1, "stop": ["\n\n"],
            "stream": False, "logprobs": None, "echo": False, "nwo": "me/repo", "extra": {"language": "python"}}
    r = httpx.post(srv.url + "/v1/engines/codegen/completions", json=body, headers=srv.headers)
    assert r.status_code == 200, r.text
    [expected] = alone(served_generator, "def hello():\n", max_new_tokens=8, stop=["\n\n"])
    assert r.json()["choices"][0]["text"] == expected.text
    with httpx.stream("POST", srv.url + "/v1/engines/codegen/completions", json=dict(body, stream=True),
                      headers=srv.headers) as response:
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == expected.text


def test_metrics(srv):
    srv.client.completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=0)
    text = httpx.get(srv.url + "/metrics", headers=srv.headers).text
    for name in ('codegen_requests_total{endpoint="/v1/completions",status="200"}', "codegen_generation_tokens_total",
                 "codegen_prompt_tokens_total", "codegen_queue_depth", "codegen_running_sequences",
                 'codegen_request_duration_seconds_bucket{endpoint="/v1/completions"',
                 "codegen_time_to_first_token_seconds_count"):
        assert name in text, name
    assert metric(srv, "codegen_generation_tokens_total") >= 3


def test_openapi_document_holds_the_limits_and_describes_real_responses(srv):
    import jsonschema

    assert httpx.get(srv.url + "/openapi.json").status_code == 401
    doc = httpx.get(srv.url + "/openapi.json", headers=srv.headers).json()
    assert doc["openapi"].startswith("3.1") and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

    def errors(instance, name: str) -> list[str]:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(instance)]

    body = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1024, "n": 16, "stop": ["x"] * 4, "logprobs": 2}
    assert errors(body, "CompletionRequest") == []
    for change in ({"max_tokens": 1025}, {"n": 17}, {"stop": ["x"] * 5}, {"stop": "s" * 65}, {"prompt": ["a"] * 17},
                   {"max_tokens": "5"}, {"temperature": 2.5}, {"top_p": 0}):
        assert errors({**body, **change}, "CompletionRequest"), change
    chat = {"messages": [{"role": "user", "content": "Print 1."}], "max_completion_tokens": 1024}
    assert errors(chat, "ChatRequest") == [] and errors({**chat, "messages": chat["messages"] * 65}, "ChatRequest")

    post = lambda path, **kw: httpx.post(srv.url + path, json={"model": MODEL, "max_tokens": 3, **kw}, headers=srv.headers)
    assert errors(post("/v1/completions", prompt=["a", "b"], n=2, logprobs=1).json(), "CompletionResponse") == []
    assert errors(post("/v1/chat/completions", messages=chat["messages"]).json(), "ChatCompletionResponse") == []
    for path, kind, extra in (("/v1/completions", "CompletionResponse", {"prompt": "x", "echo": True}),
                              ("/v1/chat/completions", "ChatCompletionChunk", {"messages": chat["messages"], "n": 2})):
        text = post(path, stream=True, stream_options={"include_usage": True}, **extra).text
        chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e and e != "data: [DONE]"]
        assert chunks and all(errors(c, kind) == [] for c in chunks), chunks
    assert errors(post("/v1/completions", prompt="x", n=99).json(), "ErrorResponse") == []
    assert errors(httpx.get(srv.url + "/v1/models", headers=srv.headers).json(), "ModelList") == []
    assert errors(httpx.get(srv.url + "/health").json(), "Health") == []
    assert errors({"status": "ok"}, "Health")  # (the check can fail)


# -- security and validation -------------------------------------------------------------------------------


def test_auth(srv, tmp_path, monkeypatch):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics")):
            r = httpx.request(method, srv.url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key" and KEY not in r.text
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-a\n\nsk-b\n")
    monkeypatch.setenv("CODEGEN_LM_API_KEYS", "sk-c, sk-d")
    assert load_api_keys(keys) == ("sk-a", "sk-b", "sk-c", "sk-d")
    keys.write_text("\n# none\n")
    with pytest.raises(ValueError, match="no API key"):
        load_api_keys(keys)
    with pytest.raises(FileNotFoundError, match="API key file .* does not exist"):
        load_api_keys(tmp_path / "missing")


LONG = "x" * 5000  # about 600 tokens: over the limit with max_tokens 600 (1024 positions)
INVALID = [
    ({"max_tokens": 5000}, "max_tokens is 5000; this server allows at most 1024"),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"n": 17}, "n is 17; this server allows at most 16"),
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "5 stop sequences given; at most 4 are allowed"),
    ({"stop": "s" * 65}, "each stop sequence must have 1 to 64 characters (got 65)"),
    ({"stop": [""]}, "each stop sequence must have 1 to 64 characters (got 0)"),
    ({"prompt": LONG, "max_tokens": 600}, "with max_tokens 600 the limit is 424 prompt tokens (the model has 1024 positions)"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": []}, "prompt is an empty list"),
    ({"prompt": ["a"] * 17}, "17 prompts given; at most 16 per request"),
    ({"prompt": [1, 2, 99999]}, "prompt token ids must be in [0, 50295)"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"temperature": 3}, "temperature: Input should be less than or equal to 2"),
    ({"top_p": 0}, "top_p: Input should be greater than 0"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"max_tokens": "many"}, "max_tokens: Input should be a valid integer"),
    ({"frequency_penalty": 0.5}, "frequency_penalty is not supported"),
    ({"logit_bias": {"50256": -100}}, "logit_bias is not supported"),
    ({"suffix": "\n    return x"}, "suffix (fill-in-the-middle) is not supported"),
    ({"best_of": 3}, "best_of is not supported"),
    ({"echo": True, "logprobs": 1}, "echo with logprobs is not supported"),
    ({"logprobs": 6}, "logprobs: Input should be less than or equal to 5"),
    ({"n": 16, "prompt": ["a"] * 5}, "asks for 80 sequences; the server holds at most 72"),
]


@pytest.mark.parametrize("change,message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_completion_validation(srv, change, message):
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 4, **change}
    r = httpx.post(srv.url + "/v1/completions", json=body, headers=srv.headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_validation_through_client(srv):
    with pytest.raises(openai.BadRequestError, match="the limit is 424 prompt tokens"):
        srv.client.completions.create(model=MODEL, prompt=LONG, max_tokens=600)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        srv.client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


CHAT_INVALID = [
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "assistant", "content": "x = 1"}]}, "the last message must be from the user"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text content parts are supported"),
    ({"messages": [{"role": "user", "content": "x"}] * 65}, "65 messages given; at most 64"),
    ({"logprobs": True}, "logprobs is not supported on chat"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]},
     "an assistant message must follow a user message"),
    ({"messages": [{"role": "user", "content": " \n "}]}, "a user message is empty"),
    ({"messages": [{"role": "user", "content": "x " * 1100}], "max_tokens": 1000}, "exceeds the model's 1024 positions"),
    ({"max_completion_tokens": 2000}, "max_tokens is 2000; this server allows at most 1024"),
]


@pytest.mark.parametrize("change,message", CHAT_INVALID, ids=[m[:40] for _, m in CHAT_INVALID])
def test_chat_validation(srv, change, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Print 1."}], "max_tokens": 4, **change}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=srv.headers)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_bad_bodies(srv):
    post = lambda **kw: httpx.post(srv.url + "/v1/completions", headers={**srv.headers, **kw.pop("headers", {})}, **kw)
    r = post(content=b'{"prompt": "x", "max_tokens": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert post(json=[1, 2]).json()["error"]["message"] == "the request body must be a JSON object"
    huge = json.dumps({"prompt": "x" * 100_000}).encode()
    r = post(content=huge)
    assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b" " * 1024

    assert post(content=chunks()).status_code == 413
    r = httpx.get(srv.url + "/v1/nothing", headers=srv.headers)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route /v1/nothing"
    assert httpx.get(srv.url + "/v1/completions", headers=srv.headers).status_code == 405


def test_slow_body_times_out(srv):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    sock = raw(srv, head + b'{"prompt": ')
    sock.settimeout(30)
    reply = b""
    while b"did not arrive" not in reply and (chunk := sock.recv(4096)):
        reply += chunk
    sock.close()
    assert reply.decode().startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply.decode()
    assert srv.client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices  # still serving


# -- load, capacity and faults ----------------------------------------------------------------------------


def test_32_concurrent_requests_get_what_they_get_alone(srv, served_generator):
    cases = []
    for i in range(32):
        params = dict(max_new_tokens=4 + (i * 7) % 37, n=1 + (i % 4 == 0),
                      stop=[["\n"], [], ["(", "x"], []][i % 4])
        if i % 3 == 0:  # sampled, reproducible through its seed (top_k keeps float noise from moving a draw)
            params.update(temperature=0.8, top_p=0.9, top_k=5, seed=i)
        cases.append((f"# case {i}\n" + "def f(x):\n" * (1 + i % 5), params))

    async def one(client, prompt, params):
        return await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=params["max_new_tokens"], n=params["n"], stop=params["stop"] or None,
            temperature=params.get("temperature", 0), top_p=params.get("top_p", 1.0), seed=params.get("seed"),
            extra_body={"top_k": params.get("top_k", 0)})

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one(client, p, params) for p, params in cases))

    responses = asyncio.run(all_at_once())
    assert len({r.id for r in responses}) == 32
    for (prompt, params), r in zip(cases, responses):
        expected = alone(served_generator, prompt, **params)
        assert [c.index for c in r.choices] == list(range(params["n"]))
        assert [c.text for c in r.choices] == [e.text for e in expected], prompt
        assert [c.finish_reason for c in r.choices] == [e.finish_reason for e in expected]
        assert r.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    settle(srv.state)


def test_queue_full_answers_429(served_generator):
    with running(served_generator, max_batch=1, max_queue=1, scheduler=GatedScheduler) as s:
        body = {"model": MODEL, "prompt": "def f():", "max_tokens": 1000, "n": 2, "stream": True, "temperature": 0}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers):
            # Accepted, and it cannot finish (its steps are held): both sequence slots are taken.
            assert s.state.engine.pending == 2
            with pytest.raises(openai.RateLimitError) as caught:
                s.client.completions.create(model=MODEL, prompt="x", max_tokens=1)
            # The backlog (2 sequences taken + 1 asked for, over 1 decode row) times the smoothed seconds per job
            # (1 s until a job has finished).
            assert caught.value.response.headers["retry-after"] == "3"
            assert caught.value.response.json()["error"]["code"] == "queue_full"
        settle(s.state)  # the stream closed mid-way: its rows were freed
        s.scheduler.open()
        assert s.client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 3}, headers=s.headers)
        assert r.status_code == 400 and "holds at most 2" in r.text


def test_disconnect_aborts_at_once(served_generator):
    """A client that goes away (streaming, or waiting for a whole answer) costs no step after the engine has seen it."""
    with running(served_generator, scheduler=GatedScheduler) as s:
        tokens = lambda: metric(s, "codegen_generation_tokens_total")
        body = {"model": MODEL, "prompt": "def f():", "max_tokens": 1000, "stream": True, "temperature": 0}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers) as r:
            lines = r.iter_lines()
            s.scheduler.run(2)
            assert next(lines).startswith("data: ")  # generating; then the client goes away
        wait_until(lambda: not s.scheduler.requests, "the engine dropped the stream's request")
        payload = json.dumps({**body, "stream": False}).encode()
        sock = raw(s, (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                       f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload)
        wait_until(lambda: s.scheduler.requests, "the request reached the scheduler")
        s.scheduler.run(2)
        sock.close()
        wait_until(lambda: not s.scheduler.requests, "the engine dropped the request")
        settle(s.state)
        generated = tokens()
        assert metric(s, 'codegen_aborted_requests_total{reason="disconnect"}') == 2
        s.scheduler.open()  # steps run freely now: the next request's tokens are the only ones added
        r = s.client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=0)
        settle(s.state)
        assert tokens() == generated + r.usage.completion_tokens


def test_timeouts(served_generator):
    # Steps are held, so nothing can finish within the 0.3 s, however fast the machine.
    with running(served_generator, scheduler=GatedScheduler, request_timeout=0.3) as s:
        body = {"model": MODEL, "prompt": "def f():", "max_tokens": 1000, "temperature": 0}
        r = httpx.post(s.url + "/v1/completions", json=body, headers=s.headers)
        assert r.status_code == 504 and "did not finish within 0.3 s" in r.json()["error"]["message"]
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, headers=s.headers) as r:
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert "did not finish within 0.3 s" in events[-2] and events[-1] == "data: [DONE]"
        assert metric(s, 'codegen_stream_errors_total{endpoint="/v1/completions",reason="timeout"}') == 1
        assert metric(s, 'codegen_aborted_requests_total{reason="timeout"}') == 2
        settle(s.state)
        s.scheduler.open()
        assert s.client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices


def test_shutdown_drains_while_still_answering(served_generator):
    """SIGTERM: /health answers 503 and new requests are refused while running ones finish; then the server stops."""
    with running(served_generator, scheduler=GatedScheduler, shutdown_timeout=300) as s:
        body = {"model": MODEL, "prompt": "def f():", "max_tokens": 20, "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers) as r:
            s.scheduler.run(1)
            s.server.should_exit = True  # what uvicorn's SIGTERM/SIGINT handler does
            wait_until(lambda: s.state.engine.closed, "the server is draining")
            health = httpx.get(s.url + "/health")
            assert health.status_code == 503 and health.json()["status"] == "shutting down"
            refused = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, headers=s.headers)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            s.scheduler.open()  # the running stream may finish now, within the drain
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] == 20
        s.thread.join(60)
        assert not s.thread.is_alive()


def test_shutdown_timeout_ends_streams_with_an_error_event(served_generator):
    with running(served_generator, scheduler=GatedScheduler, shutdown_timeout=0.5) as s:
        body = {"model": MODEL, "prompt": "def f():", "max_tokens": 1000, "stream": True, "temperature": 0}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers) as r:
            s.scheduler.run(1)
            s.server.should_exit = True  # the stream cannot finish: its steps are held
            events = [e for e in r.read().decode().split("\n\n") if e]
        error = json.loads(events[-2][6:])["error"]
        assert "the server shut down before this request finished" in error["message"] and error["type"] == "server_error"
        assert events[-1] == "data: [DONE]"
        assert metric_after_shutdown(s.state, "codegen_stream_errors_total", reason="shutdown") == 1


def metric_after_shutdown(state, name: str, **labels) -> float:
    """A metric read from the registry itself (the server no longer answers)."""
    from prometheus_client import generate_latest

    text = generate_latest(state.metrics.registry).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


@contextmanager
def cli_server(served_checkpoint: Path, tmp_path: Path, *args: str):
    """``codegen-lm serve`` in a subprocess, once it answers /health (it may compile first: no deadline but the test's)."""
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    port = free_port()
    env = {**os.environ, "CODEGEN_LM_API_KEYS": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "codegen_lm.cli", "serve", "--model", str(served_checkpoint), "--port", str(port),
         "--api-key-file", str(keys), "--served-model-name", MODEL, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield SimpleNamespace(url=url, port=port, process=process, headers={"Authorization": f"Bearer {KEY}"},
                              client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_hostile_clients_leave_memory_at_baseline(served_checkpoint, tmp_path):
    """The server process's own memory (not the test's): a barrage of hostile clients leaves nothing behind."""
    body = {"model": MODEL, "prompt": "def f():\n" * 50, "max_tokens": 200, "temperature": 0, "n": 4}
    with cli_server(served_checkpoint, tmp_path) as s:
        process = psutil.Process(s.process.pid)

        def barrage():
            for _ in range(3):
                with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True},
                                  headers=s.headers) as r:
                    lines = r.iter_lines()
                    next(lines)
                httpx.post(s.url + "/v1/completions", content=b"{" * 1000, headers=s.headers)
                httpx.post(s.url + "/v1/completions", content=b"x" * 200_000, headers=s.headers)
                sock = raw(s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
                sock.close()
                s.client.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=8, n=4, temperature=0)
            wait_until(lambda: httpx.get(s.url + "/health").json()["pending"] == 0, "the server is idle")

        barrage()  # warm up: the KV cache grows to its working size once
        baseline = process.memory_info().rss
        for _ in range(2):
            barrage()
        assert process.memory_info().rss - baseline < 40 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cli_serves_and_shuts_down_gracefully(served_checkpoint, tmp_path, compile):
    """``serve`` from the command line; with ``--compile`` it compiles the decode step before it takes requests."""
    with cli_server(served_checkpoint, tmp_path, *["--compile"] * compile) as s:
        body = {"model": MODEL, "prompt": "def f():", "max_tokens": 300, "stream": True, "temperature": 0}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            s.process.send_signal(signal.SIGTERM)  # in flight: it finishes before the server exits
            events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert s.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        output = s.process.stdout.read()
        assert "Application shutdown complete" in output and KEY not in output
        assert ("decode graphs in" in output) == compile
