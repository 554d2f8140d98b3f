"""The HTTP server end to end: a real uvicorn on 127.0.0.1, the official ``openai`` client,
bad input, client disconnects and a soak of concurrent clients."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip(
    "fastapi", reason="the server needs the 'serve' extra: pip install 'shadowkv[serve]'"
)
uvicorn = pytest.importorskip(
    "uvicorn", reason="the server needs the 'serve' extra: pip install 'shadowkv[serve]'"
)
httpx = pytest.importorskip(
    "httpx", reason="the tests need the 'test' extra: pip install 'shadowkv[test]'"
)

from shadowkv import LLM, CacheConfig, DenseConfig, EngineConfig, QuestConfig, SamplingParams  # noqa: E402
from shadowkv.models.loader import read_config  # noqa: E402
from tests.server.live import Live, serve  # noqa: E402

KEY = "test-key"
TINY_CONTEXT = 1024
TINY_POOL_TOKENS = 512  # the whole cache: smaller than the context, so some requests never fit


def tiny_prompt(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, 512)}" for _ in range(n))


TINY_CASES = [
    ("w5 w6 w7", 12),
    ("w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50 w51", 20),
    (" ".join(f"w{i}" for i in range(100, 160)), 7),
    ("w300", 16),
]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Iterator[tuple[Live, dict[tuple[str, int], str]]]:
    """A tiny random llama served with an API key, and greedy texts from ``LLM.generate``."""
    path = tiny_checkpoint("llama")
    cache = DenseConfig()
    model = read_config(path)
    per_block = 2 * model.num_layers * cache.page_size * model.kv_dim * 4  # K and V in fp32
    # The pool's blocks plus DenseCache's scratch block (padding entries of fixed-shape steps).
    gb = (TINY_POOL_TOKENS // cache.page_size + 1) * per_block / 2**30
    llm = LLM(
        str(path),
        device="cpu",
        engine=EngineConfig(max_model_len=TINY_CONTEXT, max_num_seqs=8, cache_memory_gb=gb),
    )
    expected = {}
    for prompt, n in TINY_CASES:  # one by one: the server's batched answers must equal these
        expected[(prompt, n)] = llm.generate(prompt, SamplingParams(max_tokens=n))[0].text
    with serve(llm, "tiny", api_key=KEY) as live:
        yield live, expected


def test_serve_command_binds_loopback_by_default() -> None:
    from shadowkv.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "some/dir", "--cache", "shadowkv"])
    assert (args.host, args.port, args.api_key, args.cache) == ("127.0.0.1", 8000, None, "shadowkv")
    assert args._run.__module__ == "shadowkv.commands.serve"


def test_models_health_metrics(tiny) -> None:
    live, _ = tiny
    models = live.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == TINY_CONTEXT
    assert live.client.get("/health").json() == {"status": "ok"}
    m = live.metrics()
    for name in (
        "queue_length",
        "running_requests",
        "prefilling_requests",
        "prefill_chunks_total",
        "generated_tokens_total",
        "generation_tokens_per_second",
        "cache_device_bytes",
        "cache_host_bytes",
    ):
        assert f"shadowkv_{name}" in m
    before = m["shadowkv_generated_tokens_total"]
    r = live.client.post(
        "/v1/completions", json={"prompt": "w9 w10", "max_tokens": 5, "ignore_eos": True}
    )
    assert r.status_code == 200, r.text
    # The snapshot is published after the step that answered, so it may trail by a moment.
    assert live.wait_idle()["shadowkv_generated_tokens_total"] == before + 5


def _complete_stream(client: httpx.Client, body: dict) -> tuple[str, dict]:
    """Concatenated text and the final usage of a streamed completion (asserts the SSE framing)."""
    text, usage, finishes, done = [], None, [], False
    with client.stream(
        "POST",
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                text.append(choice["text"])
                if choice["finish_reason"]:
                    finishes.append(choice["finish_reason"])
    assert done and len(finishes) == 1 and usage is not None
    return "".join(text), {**usage, "finish_reason": finishes[0]}


def test_concurrent_requests_match_generate_alone(tiny) -> None:
    live, expected = tiny
    jobs = [(p, n, stream) for (p, n) in expected for stream in (False, True)]

    def run(job: tuple[str, int, bool]) -> str:
        prompt, n, stream = job
        body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}
        if stream:
            return _complete_stream(live.client, body)[0]
        r = live.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    assert got == [expected[(p, n)] for p, n, _ in jobs]


def test_stop_string_cuts_streamed_and_whole_text(tiny) -> None:
    live, expected = tiny
    prompt, n = TINY_CASES[0]
    full = expected[(prompt, n)]
    words = full.split(" ")
    stop = " " + " ".join(words[3:5])  # spans two tokens, so the stream must hold back the first
    cut = full[: full.find(stop)]
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stop": [stop]}
    whole = live.client.post("/v1/completions", json=body).json()
    assert whole["choices"][0]["text"] == cut
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed, info = _complete_stream(live.client, body)
    assert (streamed, info["finish_reason"]) == (cut, "stop")


def _long_prompt(words: int) -> str:
    return " ".join(["w7"] * words)


BAD_REQUESTS = [
    pytest.param(
        "/v1/completions", {"prompt": "w5", "cache": {"sparse_budget": 64}}, {}, 400,
        "invalid_parameter", "cache", id="sparse-budget-on-a-dense-server",
    ),
    pytest.param(
        "/v1/completions", {"prompt": "w5", "cache": {"sparse_budget": -1}}, {}, 400,
        "invalid_value", "cache.sparse_budget", id="negative-sparse-budget",
    ),
    pytest.param(
        "/v1/completions", {"prompt": "w5", "cache": {"budget": 64}}, {}, 400,
        "invalid_value", "cache.budget", id="unknown-cache-field",
    ),
    pytest.param(
        "/v1/completions", b'{"prompt": "w5",', {}, 400, "invalid_json", None, id="malformed-json"
    ),
    pytest.param(
        "/v1/completions", b"[1, 2]", {}, 400, "invalid_value", None, id="body-not-an-object"
    ),
    pytest.param(
        "/v1/completions",
        {"max_tokens": 3},
        {},
        400,
        "invalid_value",
        "prompt",
        id="missing-prompt",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5", "temperature": "hot"},
        {},
        400,
        "invalid_value",
        "temperature",
        id="temperature-not-a-number",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5", "model": "gpt-4"},
        {},
        404,
        "model_not_found",
        "model",
        id="unknown-model",
    ),
    pytest.param(
        "/v1/completions", {"prompt": "w5", "n": 99}, {}, 400, "invalid_value", "n", id="n-99"
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5", "temperature": -1},
        {},
        400,
        "invalid_value",
        "temperature",
        id="negative-temperature",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5", "top_p": 0},
        {},
        400,
        "invalid_value",
        "top_p",
        id="top_p-0",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5", "max_tokens": 0},
        {},
        400,
        "invalid_value",
        "max_tokens",
        id="max_tokens-0",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5", "frequency_penalty": 2.5},
        {},
        400,
        "invalid_value",
        "frequency_penalty",
        id="frequency-penalty-out-of-range",
    ),
    pytest.param(
        "/v1/completions", {"prompt": ""}, {}, 400, "invalid_value", "prompt", id="empty-prompt"
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": [5, 9999]},
        {},
        400,
        "invalid_prompt",
        "prompt",
        id="token-id-out-of-vocab",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": ["w5", ""]},
        {},
        400,
        "invalid_prompt",
        "prompt",
        id="an-empty-prompt-in-a-list",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": _long_prompt(TINY_CONTEXT)},
        {},
        400,
        "context_length_exceeded",
        "prompt",
        id="prompt-over-context",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5 w6", "max_tokens": TINY_POOL_TOKENS},
        {},
        400,
        "cache_capacity_exceeded",
        "max_tokens",
        id="never-fits-cache",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5 w6", "max_tokens": TINY_POOL_TOKENS, "stream": True},
        {},
        400,
        "cache_capacity_exceeded",
        "max_tokens",
        id="never-fits-cache-stream",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "w5"}]},
        {},
        400,
        "invalid_value",
        "messages",
        id="chat-without-template",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": []},
        {},
        400,
        "invalid_value",
        "messages",
        id="chat-no-messages",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "w5"}]},
        {},
        400,
        "invalid_value",
        "messages[0].role",
        id="chat-bad-role",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "w5"},
        {"Authorization": ""},
        401,
        "invalid_api_key",
        None,
        id="no-api-key",
    ),
    pytest.param(
        "/v1/models",
        None,
        {"Authorization": "Bearer wrong"},
        401,
        "invalid_api_key",
        None,
        id="wrong-api-key",
    ),
    pytest.param("/v1/embeddings", {"input": "w5"}, {}, 404, None, None, id="unknown-route"),
]


@pytest.mark.parametrize("path, body, headers, status, code, param", BAD_REQUESTS)
def test_bad_request_gets_4xx_and_server_keeps_serving(
    tiny, path, body, headers, status, code, param
) -> None:
    live, _ = tiny
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json", **headers}}
        if isinstance(body, bytes)
        else {"json": body, "headers": headers}
    )
    r = live.client.get(path, headers=headers) if body is None else live.client.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"]) == (code, param), err
    ok = live.client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_request_refused_at_admission_when_the_cache_cannot_say_up_front(tiny, monkeypatch) -> None:
    """A cache whose ``fits_empty`` cannot tell: the engine refuses it once nothing else runs."""
    live, _ = tiny
    monkeypatch.setattr(live.llm.engine.cache, "fits_empty", lambda n, m, options=None: True)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(
            live.client.post,
            "/v1/completions",
            json={"prompt": "w5", "max_tokens": 40, "ignore_eos": True},
        )
        time.sleep(0.2)
        never = pool.submit(
            live.client.post,
            "/v1/completions",
            json={"prompt": "w5 w6", "max_tokens": TINY_POOL_TOKENS},
        )
        assert never.result().status_code == 400, never.result().text
        assert never.result().json()["error"]["code"] == "cache_capacity_exceeded"
        assert running.result().status_code == 200
    assert live.wait_idle()["shadowkv_cache_device_bytes"] == 0


def test_engine_failure_fails_requests_in_flight_and_serving_goes_on(tiny, monkeypatch) -> None:
    live, _ = tiny
    engine = live.llm.engine
    step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return step()

    monkeypatch.setattr(engine, "step", flaky_step)
    body = {"prompt": "w5 w6", "max_tokens": 10, "ignore_eos": True}
    r = live.client.post("/v1/completions", json=body)
    assert r.status_code == 500, r.text
    assert (
        r.json()["error"]["code"] == "engine_failure"
        and "injected fault" in r.json()["error"]["message"]
    )
    assert live.client.post("/v1/completions", json=body).status_code == 200
    assert live.client.get("/health").status_code == 200
    assert live.wait_idle()["shadowkv_cache_device_bytes"] == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_client_disconnect_frees_the_sequence(tiny, stream, monkeypatch) -> None:
    live, _ = tiny
    engine = live.llm.engine
    step = engine.step

    def slow_step():  # >= 2.5 s for the whole answer, so the client always leaves first
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    idle = live.wait_idle()
    idle_bytes = (
        live.llm.engine.cache.memory().device_bytes
    )  # the engine thread is idle: safe to read
    assert idle["shadowkv_cache_device_bytes"] == idle_bytes
    body = {
        "prompt": "w11 w12 w13",
        "max_tokens": TINY_POOL_TOKENS - 16,
        "ignore_eos": True,
        "stream": stream,
    }
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}) as own:
        if stream:
            with own.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                first = [next(lines) for _ in range(6)]
                assert sum(line.startswith("data: ") for line in first) >= 3
                busy = live.metrics()
        else:
            # Read the busy server while the request runs: once the client times out, the server
            # may abort it before a read made after the timeout (a race that failed once).
            with ThreadPoolExecutor(1) as pool:
                call = pool.submit(
                    own.post, "/v1/completions", json=body,
                    timeout=httpx.Timeout(30, read=0.5),
                )
                deadline = time.monotonic() + 10
                busy = live.metrics()
                while busy["shadowkv_running_requests"] != 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                    busy = live.metrics()
                with pytest.raises(httpx.ReadTimeout):
                    call.result()
    assert (
        busy["shadowkv_running_requests"] == 1 and busy["shadowkv_cache_device_bytes"] > idle_bytes
    )
    after = live.wait_idle(timeout=10)
    assert after["shadowkv_cache_device_bytes"] == idle_bytes
    assert (
        after['shadowkv_requests_total{outcome="aborted"}']
        == idle['shadowkv_requests_total{outcome="aborted"}'] + 1
    )
    assert live.llm.engine.cache.memory().device_bytes == idle_bytes


@dataclass
class SoakTally:
    ok: int = 0
    server_errors: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    hung_up: int = 0


def _soak_client(
    live: Live, expected: dict, seed: int, deadline: float, tally: SoakTally, lock: threading.Lock
) -> None:
    rng = random.Random(seed)
    with httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    ) as c:
        while time.monotonic() < deadline:
            greedy = rng.random() < 0.5
            if greedy:
                prompt, n = rng.choice(list(expected))
            else:
                prompt, n = tiny_prompt(rng, rng.randint(1, 64)), rng.randint(1, 32)
            body = {
                "prompt": prompt,
                "max_tokens": n,
                "temperature": 0 if greedy else 0.8,
                "seed": seed,
            }
            what = f"client {seed}: {prompt[:30]!r} x{n}"
            try:
                if rng.random() < 0.5:
                    r = c.post("/v1/completions", json=body)
                    if r.status_code >= 500:
                        with lock:
                            tally.server_errors.append(f"{what}: {r.status_code} {r.text}")
                        continue
                    choice = r.json()["choices"][0]
                    text, finish, used = choice["text"], choice["finish_reason"], r.json()["usage"]
                elif rng.random() < 0.1:  # hang up mid-stream: the server must free it and go on
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        next(r.iter_lines())
                    with lock:
                        tally.hung_up += 1
                    continue
                else:
                    text, info = _complete_stream(c, body)
                    finish, used = info["finish_reason"], info
            except (httpx.HTTPError, AssertionError, KeyError, ValueError) as err:
                with lock:
                    tally.lost.append(f"{what}: {type(err).__name__}: {err}")
                continue
            with lock:
                if finish not in ("stop", "length") or not 1 <= used["completion_tokens"] <= n:
                    tally.lost.append(f"{what}: finish {finish!r}, usage {used}")
                elif greedy and text != expected[(prompt, n)]:
                    tally.wrong.append(f"{what}: {text!r} != {expected[(prompt, n)]!r}")
                else:
                    tally.ok += 1


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(10, id="10s"),
        pytest.param(
            120, marks=pytest.mark.slow(reason="the issue's full 2-minute soak"), id="120s"
        ),
    ],
)
def test_soak_concurrent_clients(tiny, seconds) -> None:
    """16 clients for ``seconds``: mixed lengths, streamed or not, some hang up; no 5xx or loss."""
    live, expected = tiny
    tally, lock = SoakTally(), threading.Lock()
    failed_before = live.wait_idle()['shadowkv_requests_total{outcome="failed"}']
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_soak_client, args=(live, expected, s, deadline, tally, lock))
        for s in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)
    assert not any(t.is_alive() for t in threads), "a soak client hung"
    print(f"soak {seconds} s: {tally.ok} complete, {tally.hung_up} hung up on purpose")
    assert tally.server_errors == [] and tally.lost == [] and tally.wrong == []
    assert tally.ok >= 16, f"only {tally.ok} requests completed in {seconds} s"
    after = live.wait_idle()
    assert after["shadowkv_cache_device_bytes"] == 0
    assert after['shadowkv_requests_total{outcome="failed"}'] == failed_before


SMOL_PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three colours:",
    "Explain in one sentence why the sky is blue. " * 6,
]


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Iterator[tuple[Live, dict]]:
    """SmolLM2 behind the server, and greedy texts from ``LLM.generate`` one request at a time."""
    llm = LLM(
        str(smollm2_dir),
        device="cpu",
        engine=EngineConfig(max_model_len=1024, max_num_seqs=8, cache_memory_gb=0.25),
    )
    expected = {}
    for i, prompt in enumerate(SMOL_PROMPTS):
        chat = i % 2 == 1
        expected[prompt] = llm.generate(prompt, SamplingParams(max_tokens=6 + i), chat=chat)[0]
    with serve(llm, "smollm2") as live:
        yield live, expected


def test_smollm2_concurrent_mixed_requests_match_generate(smol) -> None:
    """Completions and chat, streamed and not, with a stop string, all at once: same greedy text."""
    openai = pytest.importorskip(
        "openai", reason="needs the 'test' extra: pip install 'shadowkv[test]'"
    )
    live, expected = smol
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    full = expected[SMOL_PROMPTS[0]].text
    stop = full[
        len(full) // 2 : len(full) // 2 + 3
    ]  # likely inside a token: the stream must hold back
    stopped = full[
        : full.find(stop)
    ]  # greedy, so the stop request generates the same tokens up to there

    def completion(
        prompt: str, n: int, stream: bool, stop: list[str] | None = None
    ) -> tuple[str, str, int]:
        if not stream:
            r = client.completions.create(
                model="smollm2", prompt=prompt, max_tokens=n, temperature=0, stop=stop
            )
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        parts, finish, used = [], None, None
        for chunk in client.completions.create(
            model="smollm2",
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            stop=stop,
            stream=True,
            stream_options={"include_usage": True},
        ):
            for c in chunk.choices:
                parts.append(c.text)
                finish = c.finish_reason or finish
            used = chunk.usage.completion_tokens if chunk.usage else used
        return "".join(parts), finish, used

    def chat(prompt: str, n: int, stream: bool) -> tuple[str, str, int]:
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            r = client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=n, temperature=0
            )
            return (
                r.choices[0].message.content,
                r.choices[0].finish_reason,
                r.usage.completion_tokens,
            )
        parts, finish, used, roles = [], None, None, []
        for chunk in client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                roles += [c.delta.role] if c.delta.role else []
                finish = c.finish_reason or finish
            used = chunk.usage.completion_tokens if chunk.usage else used
        assert roles == ["assistant"]
        return "".join(parts), finish, used

    jobs = {
        "completion": (completion, SMOL_PROMPTS[0], 6, False),
        "chat-stream": (chat, SMOL_PROMPTS[1], 7, True),
        "completion-stream": (completion, SMOL_PROMPTS[2], 8, True),
        "chat": (chat, SMOL_PROMPTS[3], 9, False),
    }
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = {k: pool.submit(fn, p, n, s) for k, (fn, p, n, s) in jobs.items()}
        futures["stop-stream"] = pool.submit(completion, SMOL_PROMPTS[0], 6, True, [stop])
        futures["stop"] = pool.submit(completion, SMOL_PROMPTS[0], 6, False, [stop])
        got = {k: f.result() for k, f in futures.items()}
    for key, (_, prompt, _, _) in jobs.items():
        want = expected[prompt]
        assert got[key] == (want.text, want.finish_reason, len(want.token_ids)), key
    for key in ("stop-stream", "stop"):
        assert got[key][:2] == (stopped, "stop"), key


def test_per_request_cache_options_on_a_sparse_server(tiny_checkpoint) -> None:
    """On a Quest server, ``"cache": {"exact": true}`` answers as dense attention does, and a
    request's own budget answers as a server started with that budget does."""
    path = str(tiny_checkpoint("llama"))
    prompt = " ".join(f"w{(7 * i) % 500 + 3}" for i in range(300))
    engine = EngineConfig(max_model_len=TINY_CONTEXT, cache_memory_gb=0.02)

    def text(cache: CacheConfig) -> str:
        llm = LLM(path, device="cpu", cache=cache, engine=engine)
        return llm.generate(prompt, SamplingParams(max_tokens=12))[0].text

    dense, quest16 = text(DenseConfig()), text(QuestConfig(sparse_budget=16))
    llm = LLM(path, device="cpu", cache=QuestConfig(sparse_budget=64), engine=engine)
    with serve(llm, "tiny-quest") as live:
        def complete(cache: dict | None) -> str:
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
            if cache:
                body["cache"] = cache
            r = live.client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        own = complete(None)
        assert complete({"exact": True}) == dense != quest16
        assert complete({"sparse_budget": 16}) == quest16 != own
