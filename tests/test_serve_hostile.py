"""The server against hostile and broken input: one failing request never fails another, every value validation
accepts samples correctly, malformed bodies get a 400 naming the field (never a 500), slow clients cannot lock
anyone out, and property-based fuzzing of the three POST routes."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen_lm.engine import Generator, SamplingParams, TextStream
from codegen_lm.serve import app as serve_app
from codegen_lm.serve.connections import DrainingServer
from faults import POISON, poisoned
from serving import (KEY, MODEL, GatedScheduler, alone, metric, raw, read_all, running, save_tiny_checkpoint, settle,
                     wait_until)

# Reproducible fuzzing: examples derived from each test's name, nothing read from or written to a database.
settings.register_profile("serve-fuzz", derandomize=True, database=None, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def srv(served_generator):
    with running(served_generator, body_timeout=5.0, max_body_bytes=256 * 1024) as s:
        yield s


def post(srv, path: str, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, headers={**srv.headers, "Content-Type": "application/json"},
                      timeout=60)


# -- one request's failure is its own ----------------------------------------------------------------------

TEXT_FAULT = "@@fault@@"  # a request with this stop string breaks while its text is decoded


@pytest.fixture
def faults(served_generator, monkeypatch):
    """Two ways for one request to fail inside the engine: NaN logits, and an error while decoding its text."""
    clean_add = TextStream.add

    def add(self, token_id):
        if TEXT_FAULT in self.stop and len(self.ids) >= 3:
            raise RuntimeError("the detokenizer broke")
        return clean_add(self, token_id)

    monkeypatch.setattr(served_generator.model, "logits_packed", poisoned(served_generator.model.logits_packed))
    monkeypatch.setattr(TextStream, "add", add)


GOOD = [("def fib(n):\n", dict(max_new_tokens=40, temperature=0.8, top_p=0.9, top_k=5, seed=1)),
        ("import os\n", dict(max_new_tokens=33, temperature=0.7, top_k=5, seed=2)),
        ("class Stack:\n", dict(max_new_tokens=25)),
        ("x = [1, 2]\n", dict(max_new_tokens=30, n=2, temperature=0.9, top_k=5, seed=3))]


def test_one_failing_request_fails_alone(served_generator, faults):
    """The fuzzer's find: a request that breaks sampling (here: NaN logits, a broken detokenizer, and the underflowing
    temperature/top_p that used to) fails alone; every other request in the same batch gets, token for token, what
    it gets when it runs alone."""
    expected = [[c.text for c in alone(served_generator, prompt, **params)] for prompt, params in GOOD]
    poisoned = served_generator.tokenizer.encode("def f():\n") + [POISON]

    def body(prompt, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None, n=1, stop=None):
        return {"model": MODEL, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "top_k": top_k, "seed": seed, "n": n, "stop": stop, "stream": True}

    bad = [body(poisoned, 20), {**body("def g():\n", 30, stop=[TEXT_FAULT]), "n": 2}]
    extreme = [body("def h():\n", 12, temperature=1e-40), body("def h():\n", 12, temperature=0.8, top_p=5e-324),
               body("def h():\n", 12, temperature=2e-38, top_p=7e-46, seed=5)]

    async def stream(client, payload):
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            assert r.status_code == 200
            events = [json.loads(e[6:]) for e in (await r.aread()).decode().split("\n\n") if e and e != "data: [DONE]"]
        texts: dict[int, str] = {}
        for event in events:
            if "error" in event:
                return event["error"]
            for choice in event["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        return [texts[i] for i in sorted(texts)]

    with running(served_generator, scheduler=GatedScheduler) as s:
        async def scenario():
            async with httpx.AsyncClient(base_url=s.url, headers=s.headers, timeout=120) as client:
                tasks = [asyncio.create_task(stream(client, body(p, **params))) for p, params in GOOD]
                tasks += [asyncio.create_task(stream(client, b)) for b in bad + extreme]
                # Every request is in before the first step: they share the batch.
                await asyncio.to_thread(wait_until, lambda: len(s.scheduler.requests) == 9, "all requests are queued")
                s.scheduler.open()
                return await asyncio.gather(*tasks)

        results = asyncio.run(scenario())
        settle(s.state)
        assert results[: len(GOOD)] == expected
        nan_error, text_error = results[len(GOOD) : len(GOOD) + 2]
        assert nan_error["type"] == "server_error" and "logits hold NaN or inf" in nan_error["message"]
        assert "the detokenizer broke" in text_error["message"]
        greedy = alone(served_generator, "def h():\n", max_new_tokens=12)[0].text
        assert results[len(GOOD) + 2 :] == [[greedy]] * 3  # below 1e-5, temperature is greedy; tiny top_p keeps the top
        assert metric(s, 'codegen_stream_errors_total{endpoint="/v1/completions",reason="generation_error"}') == 2
        # Not streamed, the failure is a 500 naming the cause; the server goes on serving.
        r = post(s, "/v1/completions", {**bad[0], "stream": False})
        assert r.status_code == 500 and "logits hold NaN or inf" in r.json()["error"]["message"]
        assert s.client.completions.create(model=MODEL, prompt=GOOD[2][0], max_tokens=25, temperature=0).choices[0].text \
            == expected[2][0]


# -- hostile bodies get a 400 naming the field -------------------------------------------------------------

HOSTILE = [
    (b'{"prompt": "\\ud800"}', "prompt: holds a lone surrogate"),
    (b'{"prompt": "a\\udfffb", "echo": true}', "prompt: holds a lone surrogate"),
    (b'{"prompt": ["ok", "\\ud800"]}', "prompt.1: holds a lone surrogate"),
    (b'{"prompt": "x", "stop": ["\\ud800"]}', "stop.0: holds a lone surrogate"),
    (b'{"prompt": "x", "\\ud800": 1}', "body: holds a lone surrogate"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "the request body is nested too deeply"),
    (b'{"prompt": [[[[[[[[[[1]]]]]]]]]]}', "nested more than 8 levels deep"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens: an integer of 5000 digits is out of range"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature: Input should be a finite number"),
    (b'{"prompt": "x", "top_p": Infinity}', "top_p: Input should be a finite number"),
    (b'{"prompt": [["a"]]}', "prompt: should be a string, a list of strings, a list of token ids or a list of lists"),
    (b'{"prompt": [true, false]}', "prompt: should be a string"),
    (b'{"prompt": [1.0, 2.0]}', "prompt: should be a string"),
    (b'{"prompt": "x", "logprobs": false}', "logprobs: Input should be a valid integer"),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens: Input should be a valid integer"),
    (b'{"prompt": "x", "max_tokens": 5.0}', "max_tokens: Input should be a valid integer"),
    (b'{"prompt": "x", "max_tokens": true}', "max_tokens: Input should be a valid integer"),
    (b'{"prompt": "x", "temperature": "0.5"}', "temperature: Input should be a valid number"),
    (b'{"prompt": "x", "stream": "yes"}', "stream: Input should be a valid boolean"),
    (b'{"prompt": "x", "seed": "7"}', "seed: Input should be a valid integer"),
    (b'{"prompt": "x", "stop": 5}', "stop: should be a string or a list of strings"),
]


CHAT_HOSTILE = [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content: holds a lone surrogate"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text: holds a lone surrogate"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages.0.content: should be a string or a list of content"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e3}', "max_tokens: Input should be a valid int"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": "no"}', "logprobs: Input should be a valid bool"),
]


BODIES = [("/v1/completions", *case) for case in HOSTILE] + [("/v1/chat/completions", *case) for case in CHAT_HOSTILE]


@pytest.mark.parametrize("route,body,message", BODIES, ids=[m[:40] for _, _, m in BODIES])
def test_hostile_bodies_get_a_400_naming_the_field(srv, route, body, message):
    r = post(srv, route, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_wrong_method_is_a_client_error(srv):
    r = httpx.get(srv.url + "/v1/completions", headers=srv.headers)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# -- property-based fuzzing of the three POST routes --------------------------------------------------------

junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(), st.text(max_size=4),
                 st.lists(st.integers(-2, 60000), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
texts = st.one_of(st.text(max_size=12), st.sampled_from(["def f():\n", "\ud800", "x\udfff", "", "<|endoftext|>", "\t\t"]))
token_ids = st.lists(st.integers(-2, 51300), min_size=0, max_size=6)
small_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([0, 0.0, 1e-40, 5e-324, 1e-6, 1e-5, 0.3, 1, 2, 2.0001, -0.1]))
SAMPLING = {
    "max_tokens": st.one_of(st.integers(-2, 10), junk),
    "temperature": st.one_of(small_floats, junk),
    "top_p": st.one_of(small_floats, junk),
    "top_k": st.one_of(st.integers(-1, 60000), junk),
    "n": st.one_of(st.integers(-1, 3), junk),
    "stop": st.one_of(texts, st.lists(texts, max_size=5), junk),
    "stream": st.one_of(st.booleans(), junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "seed": st.one_of(st.integers(-1, 2**63), junk),
    "model": st.one_of(st.just(MODEL), junk),
    "user": junk,
}
COMPLETION = {**SAMPLING, "prompt": st.one_of(texts, st.lists(texts, max_size=3), token_ids,
                                              st.lists(token_ids, max_size=2), junk),
              "echo": st.one_of(st.booleans(), junk), "logprobs": st.one_of(st.integers(-1, 6), junk)}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                 "content": st.one_of(texts, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2), junk)})
CHAT = {**SAMPLING, "messages": st.one_of(st.lists(message, min_size=0, max_size=3), junk),
        "max_completion_tokens": st.one_of(st.integers(-1, 10), junk), "logprobs": st.one_of(st.booleans(), junk)}


def check_response(r: httpx.Response, body: dict, chat: bool) -> None:
    """No 5xx; a 400 in OpenAI's error shape; a 200 complete and well-formed (streamed or not)."""
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)
        return
    if body.get("stream") is True:
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", (body, r.text[-300:])
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all("error" not in c for c in chunks), (body, chunks)
        kind = "chat.completion.chunk" if chat else "text_completion"
        assert all(c["object"] == kind for c in chunks)
        finished = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
        assert finished and all(f in {"stop", "length"} for c in chunks if c["choices"]
                                for f in [c["choices"][0]["finish_reason"]] if f)
        return
    data = r.json()
    assert data["object"] == ("chat.completion" if chat else "text_completion")
    assert [c["index"] for c in data["choices"]] == list(range(len(data["choices"]))) and data["choices"]
    for c in data["choices"]:
        assert c["finish_reason"] in {"stop", "length"}
        assert isinstance(c["message"]["content"] if chat else c["text"], str)
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0


@settings(settings.get_profile("serve-fuzz"))
@given(body=st.fixed_dictionaries({}, optional=COMPLETION))
def test_fuzz_completions(srv, body):
    for path in ("/v1/completions", "/v1/engines/codegen/completions"):
        check_response(post(srv, path, body), body, chat=False)


@settings(settings.get_profile("serve-fuzz"))
@given(body=st.fixed_dictionaries({}, optional=CHAT))
def test_fuzz_chat(srv, body):
    check_response(post(srv, "/v1/chat/completions", body), body, chat=True)


@settings(settings.get_profile("serve-fuzz"), max_examples=25)
@given(prompt=st.text(min_size=1, max_size=30), max_tokens=st.integers(1, 12),
       temperature=st.sampled_from([0, 1e-9, 1e-30]), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
       chat=st.booleans())
def test_fuzz_greedy_streamed_text_equals_whole(srv, prompt, max_tokens, temperature, stop, chat):
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update(max_tokens=max_tokens, temperature=temperature, stop=stop or None)
    whole = post(srv, path, body)
    if whole.status_code == 400:  # (an empty prompt, a chat spec of only whitespace)
        assert post(srv, path, {**body, "stream": True}).status_code == 400
        return
    assert whole.status_code == 200, whole.text
    expected = whole.json()["choices"][0]["message"]["content"] if chat else whole.json()["choices"][0]["text"]
    events = [json.loads(e[6:]) for e in post(srv, path, {**body, "stream": True}).text.split("\n\n")
              if e and e != "data: [DONE]"]
    pieces = [c["choices"][0]["delta"].get("content") or "" if chat else c["choices"][0]["text"]
              for c in events if c["choices"]]
    assert "".join(pieces) == expected


# -- slow and idle clients ---------------------------------------------------------------------------------

SLOW_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"  # and the rest of the headers never comes


def closed(sock) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16) == b"" or closed(sock)
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_slow_headers_cannot_lock_out_health_or_requests(served_generator):
    """300 sockets that never finish their headers, against a limit of 32 connections and a header timeout that never
    fires here: each newcomer evicts the longest-waiting one, so /health and completions are answered at once."""
    with running(served_generator, max_connections=32, header_timeout=600) as s:
        slow = [raw(s, SLOW_HEAD) for _ in range(300)]
        health = httpx.get(s.url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "temperature": 0},
                       headers=s.headers, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        wait_until(lambda: sum(map(closed, slow)) >= 300 - 32, "the oldest slow sockets are evicted")
        assert len(s.server.server_state.connections) <= 32
        for sock in slow:
            sock.close()


def test_header_timeout_cuts_slow_trickling_and_idle_connections(served_generator):
    with running(served_generator, header_timeout=0.5) as s:
        slow, idle = raw(s, SLOW_HEAD), raw(s, b"")
        trickling = raw(s, b"P")
        stop = threading.Event()

        def trickle():  # a byte at a time: data keeps coming, the headers never complete
            for byte in b"OST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 10_000:
                if stop.wait(0.02):
                    return
                try:
                    trickling.send(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        for sock in (slow, trickling):
            reply = read_all(sock).decode()
            assert reply.startswith("HTTP/1.1 408") and "the request headers did not arrive within 0.5 s" in reply
        assert read_all(idle) == b""  # nothing was asked: closed without a word
        stop.set()
        sender.join()
        # A keep-alive connection gets the same budget for its next request's headers.
        with httpx.Client(base_url=s.url) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/health").status_code == 200  # (the same connection, well within the timeout)
        assert httpx.get(s.url + "/health").status_code == 200


def test_connection_limit_answers_503_only_when_every_connection_is_busy(served_generator):
    with running(served_generator, max_connections=2, scheduler=GatedScheduler) as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True, "temperature": 0}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers), \
                httpx.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers):
            reply = read_all(raw(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")).decode()
            assert reply.startswith("HTTP/1.1 503") and "retry-after: 1" in reply
            assert "too many open connections, all of them busy" in reply
            s.scheduler.open()
        assert httpx.get(s.url + "/health").status_code == 200


# -- padding rows, and where the server listens -------------------------------------------------------------


def test_padding_rows_are_never_sampled_by_any_front_end(tmp_path):
    """A model whose 905 padding logit rows (50295-51199) dwarf every real token: no front end ever returns one."""
    folder = save_tiny_checkpoint(tmp_path / "padded", padding_bias=1e4)
    generator = Generator.from_pretrained(str(folder))
    real = len(generator.tokenizer)
    greedy, sampled = SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=2.0, n=4, seed=0)
    for params in (greedy, sampled):
        for completion in generator.complete(["def f():", "x ="], params)[0]:
            assert max(completion.token_ids) < real and len(completion.token_ids) == 12
    assert "".join(generator.stream("def f():", greedy)) == generator.complete(["def f():"], greedy)[0][0].text
    ids = torch.tensor([generator.tokenizer.encode("def f():")])
    model = generator.model
    for kwargs in ({}, {"do_sample": True, "temperature": 2.0, "top_k": 0}):
        assert int(model.generate(ids, max_new_tokens=12, seed=0, **kwargs)[:, ids.shape[1]:].max()) < real
    with running(generator) as s:
        r = s.client.completions.create(model=MODEL, prompt="def f():", max_tokens=12, temperature=2.0, seed=0,
                                        logprobs=0)
        assert len(r.choices[0].logprobs.tokens) == 12
        expected = alone(generator, "def f():", max_new_tokens=12, temperature=2.0, seed=0)[0]
        assert r.choices[0].text == expected.text and max(expected.token_ids) < real


def test_serve_listens_on_loopback_and_warns_when_exposed_without_keys(served_checkpoint, monkeypatch, caplog):
    from codegen_lm.cli import serve_command

    assert inspect.signature(serve_command).parameters["host"].default.default == "127.0.0.1"
    assert inspect.signature(serve_app.serve).parameters["host"].default == "127.0.0.1"
    configs = []
    monkeypatch.setattr(DrainingServer, "run", lambda self: configs.append(self.config))
    monkeypatch.setenv(serve_app.API_KEYS_ENV, "")
    warning = "without API keys: anyone who can reach it can use it"
    with caplog.at_level(logging.WARNING, logger="codegen_lm.serve"):
        serve_app.serve(str(served_checkpoint))
        assert configs[-1].host == "127.0.0.1" and warning not in caplog.text
        serve_app.serve(str(served_checkpoint), host="0.0.0.0")
        assert configs[-1].host == "0.0.0.0" and f"listening on 0.0.0.0 {warning}" in caplog.text
        caplog.clear()
        monkeypatch.setenv(serve_app.API_KEYS_ENV, KEY)
        serve_app.serve(str(served_checkpoint), host="0.0.0.0")
        assert warning not in caplog.text
