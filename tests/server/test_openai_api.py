"""The OpenAI API as clients use it: every parameter works or gets a 400, no input gets a 5xx.

Two real servers on 127.0.0.1: a tiny random llama behind an API key (input handling, limits,
``n``, list prompts, the extra endpoints, OpenAPI, metrics) and SmolLM2 (logprobs against
``LLM``, structured output, tool calls) driven through the official ``openai`` client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
httpx = pytest.importorskip("httpx", reason="the tests need the 'test' extra")
openai = pytest.importorskip("openai", reason="the tests need the 'test' extra")

from shadowkv import LLM, EngineConfig, SamplingParams  # noqa: E402
from tests.server.live import Live, serve  # noqa: E402

KEY = "k-123"
CONTEXT = 256
DEFAULT_MAX = 8
BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Iterator[Live]:
    llm = LLM(
        str(tiny_checkpoint("llama")), device="cpu",
        engine=EngineConfig(max_model_len=CONTEXT, max_num_seqs=8, cache_memory_gb=0.01),
    )
    with serve(llm, "tiny", api_key=KEY, default_max_tokens=DEFAULT_MAX,
               max_body_bytes=BODY_LIMIT) as live:
        yield live


@pytest.fixture(scope="module")
def client(tiny: Live):
    return openai.OpenAI(base_url=f"{tiny.url}/v1", api_key=KEY, max_retries=0)


def post(live: Live, path: str, body: dict | bytes, **headers: str) -> httpx.Response:
    if isinstance(body, bytes):
        return live.client.post(
            path, content=body, headers={"content-type": "application/json", **headers}
        )
    return live.client.post(path, json=body, headers=headers)


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# item 1: the bullets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        pytest.param(b'{"prompt": "abc\\ud800", "max_tokens": 2}', "prompt", id="prompt"),
        pytest.param(
            b'{"messages": [{"role": "user", "content": "x"}, {"role": "user", '
            b'"content": "a\\udfffb"}]}', "messages[1].content", id="chat-content",
        ),
        pytest.param(b'{"prompt": "w5", "stop": ["\\ud83d"]}', "stop[0]", id="stop"),
    ],
)
def test_lone_surrogate_is_a_400_and_the_connection_lives_on(tiny: Live, body, param) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    with httpx.Client(base_url=tiny.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        for _ in range(3):  # the same keep-alive connection, again and again
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            err = error(r)
            assert err["param"] == param and "surrogate" in err["message"]
            ok = c.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2})
            assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
         "invalid_value"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "invalid_value"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"audio": {"voice": "x"}}, "audio", "unsupported_parameter"),
    ],
    ids=["top_logprobs-without-logprobs", "tool_choice-without-tools", "unknown-named-tool",
         "json_schema-without-schema", "unknown-format", "functions", "audio"],
)
def test_output_changing_fields_work_or_are_refused(tiny: Live, body, param, code) -> None:
    chat = {"messages": [{"role": "user", "content": "w5"}], **body}
    err = error(post(tiny, "/v1/chat/completions", chat))
    assert (err["param"], err["code"]) == (param, code), err


def test_completion_only_fields_are_refused(tiny: Live) -> None:
    for body, param in (({"suffix": "w9"}, "suffix"), ({"best_of": 3}, "best_of")):
        err = error(post(tiny, "/v1/completions", {"prompt": "w5", **body}))
        assert err["param"] == param and err["code"] == "unsupported_parameter"


def test_max_tokens_is_checked_against_the_context_never_cut(tiny: Live) -> None:
    prompt = " ".join(["w7"] * 200)
    err = error(post(tiny, "/v1/completions", {"prompt": prompt, "max_tokens": 100}))
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    assert "56" in err["message"]  # the most it could ask for
    t0 = time.monotonic()
    err = error(post(tiny, "/v1/completions", {"prompt": "w5", "max_tokens": 10**9}))
    assert err["param"] == "max_tokens" and time.monotonic() - t0 < 5
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 10**6}
    assert error(post(tiny, "/v1/chat/completions", chat))["code"] == "invalid_value"  # template
    # No max_tokens: the server's default, not the rest of the context.
    r = post(tiny, "/v1/completions", {"prompt": "w5", "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == DEFAULT_MAX


def test_request_size_is_limited_before_any_work(tiny: Live) -> None:
    huge = "w5 " * (7 * 2**20)  # ~20 MB
    for body in ({"prompt": huge}, {"prompt": "w5", "unknown": huge}):
        t0 = time.monotonic()
        err = error(post(tiny, "/v1/completions", body), 413)
        assert err["code"] == "request_too_large" and time.monotonic() - t0 < 5
    # Under the limit but far over the context: refused after tokenizing a prefix only.
    err = error(post(tiny, "/v1/completions", {"prompt": "w9 " * 60_000}))
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", "8"), ("max_tokens", True), ("max_tokens", 2.5), ("stream", "yes"),
     ("temperature", "0.5"), ("n", "2"), ("seed", False), ("echo", 1)],
)
def test_no_loose_coercion(tiny: Live, field, value) -> None:
    err = error(post(tiny, "/v1/completions", {"prompt": "w5", field: value}))
    assert err["param"] == field and err["code"] == "invalid_value"


def test_the_api_key_is_checked_before_the_body(tiny: Live) -> None:
    for body in (b'{"prompt": "w5",', b"\xff\xfe", b"w" * (2 * BODY_LIMIT)):
        r = post(tiny, "/v1/completions", body, Authorization="")
        assert error(r, 401)["code"] == "invalid_api_key"
    assert error(post(tiny, "/v1/completions", b'{"prompt": "w5",'))["code"] == "invalid_json"


@pytest.mark.parametrize(
    "messages, param, words",
    [
        ([{"role": "user", "content": "w5"}, {"role": "user", "content": 5}],
         "messages[1].content", "string"),
        ([{"role": "user", "content": [{"type": "text", "text": "w5"},
                                       {"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[1]", "text-only"),
        ([{"role": "user"}], "messages[0]", "needs content"),
        ([{"role": "user", "content": "w5", "tool_calls": []}, {"role": "robot", "content": "x"}],
         "messages[1].role", "'tool'"),
    ],
    ids=["content-not-text", "image-part", "no-content", "bad-role"],
)
def test_params_name_what_the_client_sent(tiny: Live, messages, param, words) -> None:
    err = error(post(tiny, "/v1/chat/completions", {"messages": messages}))
    assert err["param"] == param and words in err["message"], err
    assert ".str" not in err["message"] and "list[" not in err["message"]


def test_openapi_declares_what_is_served(tiny: Live) -> None:
    doc = tiny.client.get("/openapi.json").json()
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text
    schemas = doc["components"]["schemas"]
    temp = schemas["SamplingFields"] if "SamplingFields" in schemas else None
    comp = schemas["CompletionRequest"]["properties"]
    assert temp is None and comp["max_tokens"]["anyOf"][0]["minimum"] == 1
    assert comp["top_p"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, method in (("/v1/completions", "post"), ("/v1/chat/completions", "post"),
                         ("/v1/models", "get"), ("/tokenize", "post")):
        op = doc["paths"][path][method]
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok.get("$ref"), (path, ok)
        assert op["security"] == [{"bearer": []}]
        if method == "post":
            assert "400" in op["responses"] and "413" in op["responses"]
    assert "text/event-stream" in doc["paths"]["/v1/completions"]["post"]["responses"]["200"][
        "content"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"] and "security" not in doc["paths"]["/metrics"]["get"]


def test_metrics_parse_as_prometheus_text(tiny: Live) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    r = tiny.client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("shadowkv_queue_length", "shadowkv_generated_tokens", "shadowkv_prefill_tokens",
                 "shadowkv_requests", "shadowkv_sample_prefill_copies"):
        assert name in families, sorted(families)
    assert {s.labels["outcome"] for s in families["shadowkv_requests"].samples
            if s.name.endswith("_total")} == {"finished", "aborted", "failed", "rejected"}


# item 2: what clients rely on (tiny model) ---------------------------------------------------


def test_n_samples_share_one_prefill_and_equal_seeded_requests(tiny: Live, client) -> None:
    prompt = " ".join(f"w{i}" for i in range(40, 90))
    before = tiny.wait_idle()
    r = client.completions.create(
        model="tiny", prompt=prompt, n=3, seed=11, temperature=0.9, max_tokens=6
    )
    after = tiny.wait_idle()
    n_prompt = r.usage.prompt_tokens
    assert after["shadowkv_prefill_tokens_total"] - before["shadowkv_prefill_tokens_total"] == (
        n_prompt
    )
    assert after["shadowkv_prefill_chunks_total"] > before["shadowkv_prefill_chunks_total"]
    assert after["shadowkv_prefilling_requests"] == 0
    assert after['shadowkv_sample_prefill_copies_total{how="fork"}'] - before[
        'shadowkv_sample_prefill_copies_total{how="fork"}'] == 2
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 18
    alone = [
        client.completions.create(
            model="tiny", prompt=prompt, seed=11 + i, temperature=0.9, max_tokens=6
        ).choices[0].text
        for i in range(3)
    ]
    assert [c.text for c in r.choices] == alone and len(set(alone)) > 1
    # Streamed: chunks carry each choice's index; the texts are the same.
    parts: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in client.completions.create(
        model="tiny", prompt=prompt, n=3, seed=11, temperature=0.9, max_tokens=6, stream=True
    ):
        for c in chunk.choices:
            parts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [parts[i] for i in range(3)] == alone and set(finishes) == {0, 1, 2}


def test_a_list_of_prompts_gives_one_choice_each(tiny: Live, client) -> None:
    for prompts in (["w5 w6 w7", "w100 w101"], [[12, 13, 14, 15], [40, 41]]):
        r = client.completions.create(
            model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2
        )
        assert [c.index for c in r.choices] == list(range(4))
        for i, p in enumerate(prompts):
            alone = client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0)
            assert r.choices[2 * i].text == r.choices[2 * i + 1].text == alone.choices[0].text


def test_penalties_bias_and_min_tokens_through_the_client(tiny: Live, client) -> None:
    def text(**kw) -> str:
        return client.completions.create(
            model="tiny", prompt="w5 w6 w7", max_tokens=8, temperature=0, **kw
        ).choices[0].text

    base = text()
    forced = text(logit_bias={"77": 100})
    assert forced.split() == ["w77"] * 8
    assert text(logit_bias={"77": 6}).split().count("w77") == 8
    penalised = text(logit_bias={"77": 6}, frequency_penalty=2.0, presence_penalty=2.0)
    assert 1 <= penalised.split().count("w77") < 8
    assert text(extra_body={"repetition_penalty": 1.0}) == base
    eos = text(logit_bias={"2": 100})
    r = client.completions.create(
        model="tiny", prompt="w5", max_tokens=8, temperature=0, logit_bias={"2": 100},
        extra_body={"min_tokens": 4},
    )
    assert eos == "" and r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"


def test_echo_and_logprobs_on_completions(tiny: Live, client) -> None:
    prompt = "w5 w6 w7 w8"
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2
    )
    choice = r.choices[0]
    lp = choice.logprobs
    n = r.usage.prompt_tokens
    assert choice.text.startswith(prompt) and len(lp.tokens) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # The last token was greedy: it is the best of its top logprobs (what lm-eval checks).
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    # A second LLM on the same checkpoint: the served engine belongs to the server's thread.
    own = LLM(str(tiny.llm.path), device="cpu", engine=EngineConfig(max_model_len=CONTEXT))
    ids = own.encode(prompt)
    want = own.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    got = [round(x, 4) for x in lp.token_logprobs[1:n]]
    assert got == [round(e[0], 4) for e in want.prompt_logprobs[1:]]


def test_extra_endpoints(tiny: Live) -> None:
    c = tiny.client
    ids = c.post("/tokenize", json={"prompt": "w5 w6"}).json()
    assert ids["tokens"][-2:] == [5, 6] and ids["count"] == len(ids["tokens"])
    assert c.post("/detokenize", json={"tokens": [5, 6]}).json() == {"prompt": "w5 w6"}
    assert error(c.post("/detokenize", json={"tokens": [10**6]}))["param"] == "tokens"
    assert c.get("/version").json()["version"]
    assert c.get("/v1/models/tiny").json()["id"] == "tiny"
    assert error(c.get("/v1/models/gpt-4"), 404)["code"] == "model_not_found"
    assert error(c.post("/tokenize", json={"prompt": "w5"}, headers={"Authorization": ""}), 401)


# SmolLM2: structured output, tool calls, chat logprobs ---------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}, "required": ["zone"]}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Iterator[tuple[Live, object]]:
    pytest.importorskip("xgrammar", reason="structured output needs the 'serve' extra")
    llm = LLM(
        str(smollm2_dir), device="cpu",
        engine=EngineConfig(max_model_len=1024, max_num_seqs=4, cache_memory_gb=0.25),
    )
    with serve(llm, "smollm2") as live:
        yield live, openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)


def test_chat_logprobs(smol) -> None:
    live, client = smol
    r = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content[:3])
    streamed = []
    for chunk in client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=4, temperature=0, logprobs=True, stream=True
    ):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs and c.logprobs.content else []
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_structured_output(smol, kind: str) -> None:
    _, client = smol
    schema = {"type": "object", "properties": {"city": {"type": "string"},
              "population": {"type": "integer"}}, "required": ["city", "population"]}
    fmt = {"type": kind}
    if kind == "json_schema":
        fmt["json_schema"] = {"name": "city", "schema": schema}
    r = client.chat.completions.create(
        model="smollm2", max_tokens=48, temperature=0, response_format=fmt,
        messages=[{"role": "user", "content": "Give a city and its population as JSON."}],
    )
    doc = json.loads(r.choices[0].message.content)
    assert isinstance(doc, dict) and r.choices[0].finish_reason == "stop"
    if kind == "json_schema":
        assert isinstance(doc["city"], str) and isinstance(doc["population"], int)


def _check_call(call, name: str) -> dict:
    assert call.type == "function" and call.id and call.function.name == name
    return json.loads(call.function.arguments)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_named_tool_choice_gets_a_valid_call_from_smollm2(smol, stream: bool) -> None:
    _, client = smol
    kw = dict(
        model="smollm2", messages=ASK, tools=[WEATHER, TIME], max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    if not stream:
        r = client.chat.completions.create(**kw)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
    else:
        pieces, finish = {}, None
        for chunk in client.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                assert not c.delta.content
                for tc in c.delta.tool_calls or []:
                    pieces[tc.index] = tc
                finish = c.finish_reason or finish
        assert finish == "tool_calls"
        calls = [pieces[i] for i in sorted(pieces)]
    assert len(calls) == 1
    args = _check_call(calls[0], "get_weather")
    assert isinstance(args["city"], str) and args["unit"] in ("C", "F")


def test_required_and_none_and_a_tool_turn(smol) -> None:
    _, client = smol
    r = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=40, temperature=0,
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    _check_call(call, call.function.name)
    none = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=6,
        temperature=0,
    )
    plain = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=6, temperature=0
    )
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(
        model="smollm2", messages=history, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_serve_flags_reach_the_app_defaults() -> None:
    from shadowkv.cli import build_parser
    from shadowkv.commands import serve as cmd
    from shadowkv.server import app, body

    assert (cmd.DEFAULT_MAX_BODY_BYTES, cmd.DEFAULT_MAX_TOKENS) == (
        body.DEFAULT_MAX_BODY_BYTES, app.DEFAULT_MAX_TOKENS
    )
    args = build_parser().parse_args(
        ["serve", "--max-request-bytes", "1000", "--default-max-tokens", "64"]
    )
    assert (args.max_request_bytes, args.default_max_tokens) == (1000, 64)
