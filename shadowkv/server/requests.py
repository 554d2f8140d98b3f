"""From a validated body to engine requests, and from their events to OpenAI answers.

``completion_request`` / ``chat_request`` tokenize, resolve ``max_tokens`` against the context
(a request that cannot fit is a 400, never silently cut), compile any JSON grammar and build
one ``SamplingParams`` per choice (``n`` samples per prompt, seeds ``seed + i``).
``run_completion`` / ``run_chat`` submit every prompt's samples (one shared prefill per prompt),
then answer with one JSON body or an SSE stream whose chunks carry each choice's ``index``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from shadowkv.cache.base import CacheCapacityError, CacheOptions, CacheOptionsError
from shadowkv.engine.engine import ContextLengthError, PromptError
from shadowkv.engine.grammar import GrammarError
from shadowkv.engine.sampling import SamplingError, SamplingParams
from shadowkv.errors import USER_ERRORS
from shadowkv.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
)
from shadowkv.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    Usage,
    chat_chunk,
    chat_logprobs,
    completion_chunk,
    completion_logprobs,
    new_id,
    now,
)
from shadowkv.server.tools import (
    ToolStream,
    forced_schema,
    parse_calls,
    parse_forced,
    template_messages,
    template_renders_tools,
    tool_dict,
)
from shadowkv.server.worker import (
    Delta,
    EngineFailure,
    EngineWorker,
    Event,
    Failed,
    Finished,
    Handle,
    WorkerStopped,
)

if TYPE_CHECKING:
    from shadowkv.llm import LLM

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming handler checks that its client is there
# Tokenizing text of more than this many characters per context token starts with a prefix:
# if the prefix alone overflows the context, the whole cannot fit (a 20 MB prompt is refused
# after tokenizing ~16 characters per context token, not all of it).
PREFIX_CHARS_PER_TOKEN = 16


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class Served:
    """What the handlers share: the model, its engine thread and the server's settings."""

    llm: LLM
    worker: EngineWorker
    name: str
    default_max_tokens: int

    def unknown_model(self, model: str) -> APIError:
        return APIError(
            404,
            f"the model {model!r} does not exist; this server serves {self.name!r} "
            "(see /v1/models)",
            param="model",
            code="model_not_found",
        )

    def check(self, body: SamplingFields) -> None:
        if body.model not in (None, self.name):
            raise self.unknown_model(body.model)  # type: ignore[arg-type]
        body.check_supported()

    async def encode(self, text: str, add_special: bool = True, limit: bool = True) -> list[int]:
        tok, ctx = self.llm.tokenizer, self.llm.max_model_len
        bound = PREFIX_CHARS_PER_TOKEN * ctx
        if limit and len(text) > bound:
            head = await asyncio.to_thread(tok.encode, text[:bound], add_special)
            if len(head) >= ctx:
                raise ContextLengthError(
                    f"the prompt has more than {len(head)} tokens but the model's context is "
                    f"{ctx}; shorten it to at most {ctx - 1} tokens"
                )
        return await asyncio.to_thread(tok.encode, text, add_special)

    async def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], str | None]:
        """The prompt ids of the messages (tools rendered unless ``tool_choice`` is "none"),
        and the tool mode: None, "auto" (parse calls) or "forced" (a grammar forces one)."""
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        mode = None
        if tools:
            forced = body.tool_choice == "required" or isinstance(
                body.tool_choice, NamedToolChoice
            )
            mode = "forced" if forced else "auto"
        tok = self.llm.tokenizer
        renders = template_renders_tools(tok.chat_template)
        messages = template_messages(body.messages, tools, renders)
        tool_list = [tool_dict(t) for t in tools] if tools and renders else None
        try:
            ids = await asyncio.to_thread(tok.chat_ids, messages, tool_list)
        except Exception as err:  # no template, or the template refused the messages (jinja)
            raise APIError(400, f"the chat template refused the messages: {err}",
                           param="messages", code="invalid_value") from err
        return ids, mode

    def max_new(self, n: int, asked: int | None, param: str) -> int:
        ctx = self.llm.max_model_len
        if n >= ctx:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the model's context is {ctx}; shorten it to at "
                f"most {ctx - 1} tokens"
            )
        if asked is None:
            return min(ctx - n, self.default_max_tokens)
        if n + asked > ctx:
            raise APIError(
                400,
                f"the model's context is {ctx} tokens: the prompt has {n} and {param} asks for "
                f"{asked} more; lower {param} to at most {ctx - n} or shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
        return asked

    async def compile(self, schema: dict[str, Any] | None, param: str) -> None:
        """Refuse a schema the grammar engine cannot use (or a missing engine) before queueing."""
        if schema is None:
            return
        try:
            await asyncio.to_thread(self.llm.engine.grammars.compile, schema)
        except GrammarError as err:
            raise APIError(400, str(err), param=param, code="invalid_value") from err

    def token_text(self, token: int) -> str:
        return self.llm.tokenizer.decode([token], skip_special_tokens=False)


@dataclass
class Job:
    """A validated request, ready to submit: per prompt its ids and one params per choice."""

    prompts: list[list[int]]
    params: list[list[SamplingParams]]
    stream: bool
    include_usage: bool
    options: CacheOptions | None
    param: str  # the field a prompt error names
    echo: bool = False
    logprobs: bool = False
    tools: str | None = None  # None, "auto" or "forced"
    max_calls: int | None = None  # 1 when parallel_tool_calls is false
    texts: list[str] = field(default_factory=list)  # the prompts' text (echo)

    @property
    def n(self) -> int:
        return len(self.params[0])


def _params(
    body: SamplingFields, n_prompt: int, max_new: int, **kw: Any
) -> list[SamplingParams]:
    try:
        return [body.sampling_params(max_new, seed_offset=i, **kw) for i in range(body.n or 1)]
    except SamplingError as err:
        raise to_api_error(err, None) from err


async def completion_request(served: Served, body: CompletionRequest) -> Job:
    try:
        return await _completion_request(served, body)
    except USER_ERRORS as err:
        raise to_api_error(err, "prompt") from err


async def chat_request(served: Served, body: ChatCompletionRequest) -> Job:
    try:
        return await _chat_request(served, body)
    except USER_ERRORS as err:
        raise to_api_error(err, "messages") from err


async def _completion_request(served: Served, body: CompletionRequest) -> Job:
    served.check(body)
    ids_list, texts = [], []
    for p in body.prompts():
        if isinstance(p, str):
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_prompt")
            ids = await served.encode(p)
            texts.append(p)
        else:
            ids = list(p)
            vocab = served.llm.model_config.vocab_size
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise APIError(
                    400, f"a token prompt must be non-empty with ids in [0, {vocab})",
                    param="prompt", code="invalid_prompt",
                )
            texts.append(await asyncio.to_thread(served.llm.tokenizer.decode, ids, False))
        ids_list.append(ids)
    schema = body.response_format.target_schema() if body.response_format else None
    await served.compile(schema, "response_format")
    plp = body.logprobs if body.echo and body.logprobs is not None else None
    if plp is not None and body.stream:
        raise APIError(
            400, "echo with logprobs is answered whole, not streamed; send stream: false",
            param="echo", code="unsupported_parameter",
        )
    params = [
        _params(body, len(ids), served.max_new(len(ids), body.max_tokens, "max_tokens"),
                logprobs=body.logprobs, prompt_logprobs=plp, json_schema=schema)
        for ids in ids_list
    ]
    return Job(
        ids_list, params, bool(body.stream), body.include_usage, _options(body), "prompt",
        echo=body.echo, logprobs=body.logprobs is not None, texts=texts,
    )


async def _chat_request(served: Served, body: ChatCompletionRequest) -> Job:
    served.check(body)
    ids, tools = await served.chat_prompt(body)
    if tools == "forced":
        schema, where = forced_schema(body.tools or [], body.tool_choice), "tool_choice"  # type: ignore[arg-type]
    else:
        schema = body.response_format.target_schema() if body.response_format else None
        where = "response_format"
    await served.compile(schema, where)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(
        body, len(ids), served.max_new(len(ids), body.max_new, param), logprobs=k,
        json_schema=schema,
    )
    return Job(
        [ids], [params], bool(body.stream), body.include_usage, _options(body), "messages",
        logprobs=k is not None, tools=tools,
        max_calls=1 if body.parallel_tool_calls is False else None,
    )


def _options(body: SamplingFields) -> CacheOptions | None:
    try:
        return body.cache_options()
    except CacheOptionsError as err:
        raise to_api_error(err, None) from err


async def submit(served: Served, request: Request, job: Job) -> tuple[list[Handle], Event, Any]:
    """Queue every prompt's samples and wait for the first event (admission errors: 4xx)."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    handles: list[Handle] = []
    try:
        for i, (ids, plist) in enumerate(zip(job.prompts, job.params)):
            handles += served.worker.submit(
                ids, plist, stream=job.stream, cache_options=job.options, events=queue,
                first_index=i * job.n,
            )
    except USER_ERRORS as err:
        abort_all(served.worker, handles)
        raise to_api_error(err, job.param) from err
    first = await next_event(queue, request, served.worker, handles)
    if isinstance(first, Failed):
        abort_all(served.worker, handles)
        raise to_api_error(first.error, job.param) from first.error
    return handles, first, queue


def abort_all(worker: EngineWorker, handles: list[Handle]) -> None:
    for h in handles:
        h.closed = True
        if h.index == h.group[0].index:
            worker.abort(h)  # aborts its whole group


async def next_event(
    queue: asyncio.Queue[Event], request: Request, worker: EngineWorker, handles: list[Handle]
) -> Event:
    """The next event; aborts the requests and raises ``ClientGone`` if the client left.

    Streams only wait here for their first event; after that Starlette cancels them on disconnect.
    """
    while True:
        try:
            return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                abort_all(worker, handles)
                raise ClientGone from None


async def collect(
    served: Served, request: Request, job: Job, handles: list[Handle], first: Event, queue: Any
) -> list[Finished]:
    done: dict[int, Finished] = {}
    event = first
    while True:
        if isinstance(event, Failed):
            abort_all(served.worker, handles)
            raise to_api_error(event.error, None) from event.error
        if isinstance(event, Finished):
            done[event.index] = event
            handles[event.index].closed = True
        if len(done) == len(handles):
            return [done[i] for i in range(len(handles))]
        event = await next_event(queue, request, served.worker, handles)


def usage_of(job: Job, finished: list[Finished]) -> Usage:
    prompt = sum(len(ids) for ids in job.prompts)  # once per prompt, whatever n is
    # Samples of one prompt share its prefill: the first one's cached tokens count, once.
    cached = sum(f.cached_tokens for f in finished if f.index % job.n == 0)
    return Usage.of(prompt, sum(f.completion_tokens for f in finished), cached)


async def run_completion(served: Served, request: Request, job: Job) -> Any:
    handles, first, queue = await submit(served, request, job)
    rid, created = new_id("cmpl"), now()
    if job.stream:
        return sse(_completion_stream(served, job, handles, first, queue, rid, created))
    finished = await collect(served, request, job, handles, first, queue)
    choices = []
    for f in finished:
        p = f.index // job.n
        text = job.texts[p] + f.text if job.echo else f.text
        choices.append(CompletionChoice(
            index=f.index, text=text, finish_reason=f.finish_reason,  # type: ignore[arg-type]
            logprobs=_completion_lp(served, job, p, f, f.token_ids, f.logprobs),
        ))
    return Completion(
        id=rid, created=created, model=served.name, choices=choices,
        usage=usage_of(job, finished),
    ).model_dump()


def _completion_lp(
    served: Served, job: Job, p: int, f: Finished | None, ids: tuple[int, ...], lps: tuple,
    prompt: bool = True,
) -> Any:
    if not job.logprobs:
        return None
    entries, tokens = list(lps), list(ids[len(ids) - len(lps):]) if lps else []
    start = len(job.texts[p]) if not job.echo else 0
    if job.echo and prompt and f is not None and f.prompt_logprobs is not None:
        entries = list(f.prompt_logprobs) + entries
        tokens = list(job.prompts[p]) + tokens
    return completion_logprobs(entries, tokens, served.token_text, start)


def _completion_stream(
    served: Served, job: Job, handles: list[Handle], event: Event, queue: Any, rid: str,
    created: int,
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        return _sse(completion_chunk(rid, served.name, created, choices, usage))

    def choice(i: int, text: str, finish: str | None, lp: Any = None) -> dict[str, Any]:
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

    async def body() -> AsyncIterator[str]:
        if job.echo:
            yield chunk([choice(h.index, job.texts[h.index // job.n], None) for h in handles])
        nonlocal event
        finished: list[Finished] = []
        while True:
            if isinstance(event, Delta):
                lp = _completion_lp(served, job, event.index // job.n, None, event.token_ids,
                                    event.logprobs)
                yield chunk([choice(event.index, event.text, None,
                                    lp.model_dump() if lp else None)])
            elif isinstance(event, Finished):
                handles[event.index].closed = True
                finished.append(event)
                p = event.index // job.n
                lp = _completion_lp(served, job, p, event, event.token_ids, event.logprobs, False)
                if event.tail or lp:
                    yield chunk([choice(event.index, event.tail, None,
                                        lp.model_dump() if lp else None)])
                yield chunk([choice(event.index, "", event.finish_reason)])
                if len(finished) == len(handles):
                    break
            else:
                yield _sse(to_api_error(event.error, None).body())
                return
            event = await queue.get()
        if job.include_usage:
            yield chunk([], usage_of(job, finished))

    return _framed(served, handles, body())


async def run_chat(served: Served, request: Request, job: Job) -> Any:
    handles, first, queue = await submit(served, request, job)
    rid, created = new_id("chatcmpl"), now()
    if job.stream:
        return sse(_chat_stream(served, job, handles, first, queue, rid, created))
    finished = await collect(served, request, job, handles, first, queue)
    choices = []
    for f in finished:
        content: str | None = f.text
        calls: list[Any] = []
        if job.tools == "forced":
            calls = parse_forced(f.text)
            content = None if calls else f.text
        elif job.tools == "auto":
            content, calls = parse_calls(f.text)
        calls = calls[: job.max_calls]
        reason = "tool_calls" if calls else f.finish_reason
        lp = chat_logprobs(f.logprobs, f.token_ids, served.token_text) if job.logprobs else None
        choices.append(ChatChoice(
            index=f.index, finish_reason=reason,  # type: ignore[arg-type]
            message=AssistantMessage(content=(content or None) if calls else content,
                                     tool_calls=calls or None),
            logprobs=lp,
        ))
    return ChatCompletion(
        id=rid, created=created, model=served.name, choices=choices,
        usage=usage_of(job, finished),
    ).model_dump()


def _chat_stream(
    served: Served, job: Job, handles: list[Handle], event: Event, queue: Any, rid: str,
    created: int,
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        return _sse(chat_chunk(rid, served.name, created, choices, usage))

    def choice(i: int, delta: dict[str, Any], finish: str | None = None,
               lp: Any = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def lp_of(ids: tuple[int, ...], lps: tuple) -> Any:
        if not job.logprobs or not lps:
            return None
        return chat_logprobs(lps, ids[len(ids) - len(lps):], served.token_text).model_dump()

    streams = {h.index: ToolStream(forced=job.tools == "forced") for h in handles}

    async def body() -> AsyncIterator[str]:
        nonlocal event
        yield chunk([choice(h.index, {"role": "assistant", "content": ""}) for h in handles])
        finished: list[Finished] = []
        while True:
            if isinstance(event, Delta):
                text = streams[event.index].feed(event.text) if job.tools else event.text
                lp = lp_of(event.token_ids, event.logprobs)
                if text or lp:
                    yield chunk([choice(event.index, {"content": text} if text else {}, None, lp)])
            elif isinstance(event, Finished):
                handles[event.index].closed = True
                finished.append(event)
                reason: str = event.finish_reason
                lp = lp_of(event.token_ids, event.logprobs)
                if job.tools:
                    ts = streams[event.index]
                    ts.feed(event.tail)
                    rest, calls = ts.finish()
                    calls = calls[: job.max_calls]
                    if rest or lp:
                        yield chunk([choice(event.index, {"content": rest} if rest else {},
                                            None, lp)])
                    if calls:
                        reason = "tool_calls"
                        deltas = [{"index": k, **c.model_dump()} for k, c in enumerate(calls)]
                        yield chunk([choice(event.index, {"tool_calls": deltas})])
                elif event.tail or lp:
                    yield chunk([choice(event.index, {"content": event.tail} if event.tail
                                        else {}, None, lp)])
                yield chunk([choice(event.index, {}, reason)])
                if len(finished) == len(handles):
                    break
            else:
                yield _sse(to_api_error(event.error, None).body())
                return
            event = await queue.get()
        if job.include_usage:
            yield chunk([], usage_of(job, finished))

    return _framed(served, handles, body())


async def _framed(
    served: Served, handles: list[Handle], events: AsyncIterator[str]
) -> AsyncIterator[str]:
    """The stream, ``[DONE]`` at its end; a closed connection aborts what is still running
    (Starlette cancels the generator)."""
    try:
        async for e in events:
            yield e
        yield "data: [DONE]\n\n"
    finally:
        if not all(h.closed for h in handles):
            abort_all(served.worker, handles)


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def to_api_error(err: Exception, param: str | None) -> APIError:
    """The HTTP answer for an exception: 4xx for what the client can fix, 5xx otherwise."""
    if isinstance(err, APIError):
        return err
    msg = str(err)
    if isinstance(err, ContextLengthError):
        return APIError(400, msg, param=param, code="context_length_exceeded")
    if isinstance(err, CacheCapacityError):
        name = "n" if msg.startswith(("n=", "n ")) or "samples" in msg else "max_tokens"
        return APIError(400, msg, param=name, code="cache_capacity_exceeded")
    if isinstance(err, GrammarError):
        return APIError(400, msg, param="response_format", code="invalid_value")
    if isinstance(err, SamplingError):
        # SamplingParams messages start with the offending field's name.
        return APIError(400, msg, param=msg.split(" ", 1)[0], code="invalid_parameter")
    if isinstance(err, PromptError):
        return APIError(400, msg, param=param, code="invalid_prompt")
    if isinstance(err, CacheOptionsError):
        return APIError(400, msg, param="cache", code="invalid_parameter")
    if isinstance(err, USER_ERRORS):
        return APIError(400, msg, param=param)
    if isinstance(err, WorkerStopped):
        return APIError(503, msg, type="server_error", code="unavailable")
    if isinstance(err, EngineFailure):
        return APIError(500, msg, type="server_error", code="engine_failure")
    return APIError(500, f"internal error: {type(err).__name__}", type="server_error")
