"""The engine thread: one background thread owns the ``Engine`` and steps it in a loop.

HTTP handlers never touch the engine. They ``submit`` a request (refused at once when it can
never be served), then read events from the request's own asyncio queue; the engine thread
feeds those queues with ``loop.call_soon_threadsafe``. Commands (add, abort, stop) reach the
engine thread through one thread-safe FIFO, so admission order is arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from shadowkv.cache.base import CacheCapacityError, CacheMemory, CacheOptions
from shadowkv.engine.engine import ContextLengthError, Engine, PromptError, StepOutput
from shadowkv.engine.request import Logprob, Request
from shadowkv.engine.sampling import SamplingParams
from shadowkv.errors import USER_ERRORS

log = logging.getLogger("shadowkv.server")


class EngineFailure(RuntimeError):
    """The engine raised while stepping; every request in flight is failed with this."""


class WorkerStopped(RuntimeError):
    """The engine thread is not running (the server is shutting down or has crashed)."""


@dataclass(frozen=True)
class Delta:
    """New text of sample ``index``, with the logprobs of the tokens since the last delta."""

    text: str
    logprobs: tuple[Logprob, ...] = ()
    index: int = 0
    token_ids: tuple[int, ...] = ()  # the tokens since the last delta


@dataclass(frozen=True)
class Finished:
    """A request's last event: ``tail`` is the text not yet streamed, ``text`` all of it;
    ``logprobs`` those not yet streamed (all of them for a request that is not streamed)."""

    tail: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[Logprob, ...] = ()
    prompt_logprobs: tuple[Logprob | None, ...] | None = None
    index: int = 0
    cached_tokens: int = 0  # prompt tokens a stored prefix served (prefix sharing)


@dataclass(frozen=True)
class Failed:
    error: Exception
    index: int = 0


Event = Delta | Finished | Failed


class Handle:
    """One request as its HTTP handler sees it; events arrive on ``events`` in ``loop``."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stream: bool,
        loop: asyncio.AbstractEventLoop,
        cache_options: CacheOptions | None = None,
        index: int = 0,
        events: asyncio.Queue[Event] | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.cache_options = cache_options
        self.stream = stream  # False: only the last event is sent (``Finished`` holds all the text)
        self.loop = loop
        self.index = index  # which sample of its group; events carry it
        # Samples of one prompt share one queue: a handler reads one stream of tagged events.
        self.events: asyncio.Queue[Event] = events if events is not None else asyncio.Queue()
        self.group: list[Handle] = [self]
        self.closed = False  # set by the handler once it has read the last event
        self.request: Request | None = None  # set and read by the engine thread only
        self.sent_logprobs = 0  # engine thread: logprobs already delivered in deltas
        self.sent_tokens = 0  # engine thread: output tokens already delivered in deltas


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot published by the engine thread after each loop turn (read from any thread)."""

    queued: int = 0
    running: int = 0
    prefilling: int = 0  # admitted requests whose prompt is partly prefilled (between chunks)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    tokens_per_s: float = 0.0
    cache_device_bytes: int = 0
    cache_host_bytes: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    steps: int = 0
    prefill_tokens: int = 0
    prefill_chunks: int = 0
    forked_samples: int = 0
    replayed_samples: int = 0
    preemptions: int = 0  # running requests freed and requeued (optimistic admission)
    replayed_tokens: int = 0  # decode rows that replayed a preempted request's tokens
    prefix_hits: int = 0  # prefills that reused a stored prefix
    cached_tokens: int = 0  # prompt tokens those prefixes spared
    prefix_store_bytes: int = 0  # host bytes of the stored prefixes' K/V copies (gauge)
    # Cache bytes the stored prefixes of cache pages hold (gauges; running requests may hold
    # the same pages: they are counted in the cache's bytes too).
    prefix_shared_device_bytes: int = 0
    prefix_shared_host_bytes: int = 0


_STOP = object()


def _is_add(cmd: object) -> bool:
    return cmd is not _STOP and cmd[0] == "add"  # type: ignore[index]


class EngineWorker:
    """Owns ``engine`` on a background thread; call ``submit``/``abort`` from the event loop."""

    def __init__(
        self, engine: Engine, rate_window_s: float = 10.0, idle_poll_s: float = 1.0
    ) -> None:
        self.engine = engine
        self.rate_window_s = rate_window_s
        self.idle_poll_s = idle_poll_s
        self.rejected = 0  # event-loop thread only
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Requests put in the inbox (event-loop thread) and taken out of it (engine thread): the
        # inbox also carries aborts, which are not queued requests. One writer each.
        self._adds_sent = 0
        self._adds_taken = 0
        self._active: dict[int, Handle] = {}
        self._outbox: list[tuple[Handle, Event]] = []  # this loop turn's events, sent by _flush
        self._recent: deque[tuple[float, int]] = (
            deque()
        )  # (time, tokens) per step, within the window
        self._counts = {
            "generated": 0,
            "prompt": 0,
            "finished": 0,
            "aborted": 0,
            "failed": 0,
            "steps": 0,
        }
        self._stats = WorkerStats()
        engine.on_outputs = self._deliver_outputs  # runs on the engine thread, inside step()
        self._thread: threading.Thread | None = None
        self._started = time.perf_counter()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine worker is already started")
        self._thread = threading.Thread(target=self._run, name="shadowkv-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Fail what is in flight and join the thread (waits for the current step to end)."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        # Requests submitted while the thread was exiting are refused rather than left waiting.
        self._refuse(self._drain(block=False), WorkerStopped("the server is shutting down"))
        self._flush()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> WorkerStats:
        return self._stats

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams | Sequence[SamplingParams],
        stream: bool = True,
        cache_options: CacheOptions | None = None,
        events: asyncio.Queue[Event] | None = None,
        first_index: int = 0,
    ) -> list[Handle]:
        """Queue a request (several ``params``: samples of one prompt sharing its prefill, one
        handle each), or raise a user error now if it could never be served. The handles'
        events go to one queue (``events``, or a new one), tagged ``first_index + i``.

        Must be called from a running event loop: its events are delivered to that loop.
        """
        plist = [params] if isinstance(params, SamplingParams) else list(params)
        try:
            for p in plist:
                self._check_admissible(prompt_ids, p, cache_options, len(plist))
        except USER_ERRORS:
            self.rejected += 1
            raise
        if not self.alive:
            raise WorkerStopped("the engine thread is not running")
        loop = asyncio.get_running_loop()
        queue_ = events if events is not None else asyncio.Queue()
        group = [
            Handle(list(prompt_ids), p, stream, loop, cache_options, first_index + i, queue_)
            for i, p in enumerate(plist)
        ]
        for h in group:
            h.group = group
        self._adds_sent += 1
        self._inbox.put(("add", group[0]))
        return group

    def abort(self, handle: Handle) -> None:
        """Stop generating for ``handle``'s group and free its cache memory (a no-op for what
        has finished)."""
        self._inbox.put(("abort", handle))

    def _check_admissible(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        options: CacheOptions | None,
        samples: int = 1,
    ) -> None:
        n, limit = len(prompt_ids), self.engine.max_model_len
        if samples > self.engine.cfg.max_num_seqs:
            raise CacheCapacityError(
                f"n={samples} samples need {samples} sequence slots; this server decodes at "
                f"most {self.engine.cfg.max_num_seqs} sequences at once (--max-num-seqs)"
            )
        if options is not None:
            self.engine.cache.check_options(options)  # reads the method's settings only
        if n == 0:
            raise PromptError("the prompt is empty")
        if n >= limit:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the model's context is {limit}; shorten it to at "
                f"most {limit - 1} tokens"
            )
        vocab = self.engine.model_cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise PromptError(f"prompt token ids must be in [0, {vocab}) for this model")
        if not self.engine.fits_ever(n, params.max_tokens, options):
            max_new = min(params.max_tokens, limit - n)
            raise CacheCapacityError(
                f"a request of {n} prompt + {max_new} new tokens can never fit in this server's "
                "cache, even when it is empty; lower max_tokens or shorten the prompt, or restart "
                "the server with more cache memory (--cache-memory-gb)"
            )

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as err:  # noqa: BLE001 - a dead thread must not leave clients waiting
            log.error("the engine thread failed", exc_info=err)
            failure = EngineFailure(f"the engine thread failed: {type(err).__name__}: {err}")
            self._fail_all(failure)
            self._refuse(self._drain(block=False), failure)
            self._flush()

    def _loop(self) -> None:
        while True:
            cmds = self._drain(block=not self.engine.has_unfinished())
            for i, cmd in enumerate(cmds):
                if cmd is _STOP:
                    stopped = WorkerStopped("the server is shutting down")
                    self._fail_all(stopped)
                    self._refuse(cmds[i + 1 :], stopped)
                    self._publish()
                    self._flush()
                    return
                kind, handle = cmd  # type: ignore[misc]
                if kind == "add":
                    self._admit(handle)
                else:
                    self._abort(handle)
            if self.engine.has_unfinished():
                self._step()
            self._publish()
            self._flush()

    def _drain(self, block: bool) -> list[object]:
        cmds: list[object] = []
        try:
            if block:
                cmds.append(self._inbox.get(timeout=self.idle_poll_s))
            while True:
                cmds.append(self._inbox.get_nowait())
        except queue.Empty:
            self._adds_taken += sum(_is_add(c) for c in cmds)
            return cmds

    def _admit(self, handle: Handle) -> None:
        group = handle.group
        try:
            reqs = self.engine.add_requests(
                handle.prompt_ids, [h.params for h in group], cache_options=handle.cache_options
            )
        except Exception as err:  # noqa: BLE001 - a refused request must not stop the thread
            if not isinstance(err, USER_ERRORS):
                log.exception("admitting a request failed")
                err = EngineFailure(f"admitting the request failed: {type(err).__name__}: {err}")
            for h in group:
                self._deliver(h, Failed(err, h.index))
            return
        for h, req in zip(group, reqs):
            h.request = req
            self._active[req.request_id] = h
        self._counts["prompt"] += len(handle.prompt_ids)

    def _abort(self, handle: Handle) -> None:
        for h in handle.group:
            req = h.request
            if req is None or req.finish_reason is not None:
                continue
            self.engine.abort(req.request_id)
            self._counts["aborted"] += 1
        for h in handle.group:
            if h.request is not None:
                self._active.pop(h.request.request_id, None)

    def _step(self) -> None:
        try:
            self.engine.step()  # its outputs go out part by part through _deliver_outputs
        except CacheCapacityError as err:
            if self.engine.running or not self.engine.waiting:
                self._crash(err)
                return
            # Nothing runs and the head still cannot be admitted: it never will be (caches that
            # cannot answer ``fits_empty`` up front land here). Refuse it and go on.
            head = self.engine.waiting[0]
            self.engine.abort(head.request_id)
            handle = self._active.get(head.request_id)
            for h in handle.group if handle is not None else ():
                if h.request is not None:
                    self._active.pop(h.request.request_id, None)
                self._counts["failed"] += 1
                self._deliver(h, Failed(err, h.index))
            return
        except Exception as err:  # noqa: BLE001 - any engine bug must fail requests, not the thread
            self._crash(err)
            return
        self._counts["steps"] += 1

    def _deliver_outputs(self, outputs: list[StepOutput]) -> None:
        """Send a part of a step's outputs (the engine's ``on_outputs``, called mid-step): the
        decode's tokens, then each packed prefill's first token, as soon as each is final."""
        tokens = 0
        for out in outputs:
            tokens += out.new_token is not None
            handle = self._active.get(out.request.request_id)
            if handle is not None:
                self._forward(handle, out)
        self._counts["generated"] += tokens
        self._recent.append((time.perf_counter(), tokens))
        self._publish()
        self._flush()

    def _forward(self, handle: Handle, out: StepOutput) -> None:
        # The engine's deltas hold back partial characters and possible stop-string starts, so
        # the streamed text is always a prefix of the final text and the last delta completes it.
        req = out.request
        if out.finished:
            self._active.pop(req.request_id, None)
            self._counts["finished"] += 1
            reason = req.finish_reason or "stop"
            plp = req.prompt_logprobs
            done = Finished(
                out.text_delta, req.text, reason, len(req.prompt_ids), len(req.output_ids),
                tuple(req.output_ids), tuple(req.logprobs[handle.sent_logprobs :]),
                None if plp is None else tuple(plp), handle.index, req.cached_tokens,
            )
            self._deliver(handle, done)
        elif handle.stream and out.text_delta:
            new = tuple(req.logprobs[handle.sent_logprobs :])
            tokens = tuple(req.output_ids[handle.sent_tokens :])
            handle.sent_logprobs, handle.sent_tokens = len(req.logprobs), len(req.output_ids)
            self._deliver(handle, Delta(out.text_delta, new, handle.index, tokens))

    def _crash(self, err: Exception) -> None:
        log.error("engine step failed; failing %d requests", len(self._active), exc_info=err)
        self._fail_all(EngineFailure(f"the engine failed: {type(err).__name__}: {err}"))

    def _fail_all(self, err: Exception) -> None:
        for rid, handle in list(self._active.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - a broken engine must not keep clients waiting
                log.exception("aborting request %d failed", rid)
            self._deliver(handle, Failed(err, handle.index))
            self._counts["failed"] += 1
        self._active.clear()

    def _refuse(self, cmds: list[object], err: Exception) -> None:
        for cmd in cmds:
            if _is_add(cmd):
                for h in cmd[1].group:  # type: ignore[index]
                    self._deliver(h, Failed(err, h.index))

    def _deliver(self, handle: Handle, event: Event) -> None:
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        """Send this turn's events, after ``_publish`` so a client holding its answer also finds
        it counted in ``stats()``."""
        for handle, event in self._outbox:
            try:
                handle.loop.call_soon_threadsafe(handle.events.put_nowait, event)
            except RuntimeError:
                pass  # the handler's loop is closed: nobody is listening any more
        self._outbox.clear()

    def _publish(self) -> None:
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - self.rate_window_s:
            self._recent.popleft()
        try:
            mem = self.engine.cache.memory()
            shared = self.engine.prefix_memory()
        except Exception:  # noqa: BLE001 - accounting must not stop serving
            log.exception("cache.memory() failed; keeping the last published bytes")
            mem = CacheMemory(self._stats.cache_device_bytes, self._stats.cache_host_bytes)
            shared = CacheMemory(
                self._stats.prefix_shared_device_bytes, self._stats.prefix_shared_host_bytes
            )
        c = self._counts
        store = getattr(self.engine, "prefix_store", None)
        self._stats = WorkerStats(
            queued=len(self.engine.waiting) + self._adds_sent - self._adds_taken,
            running=len(self.engine.running),
            prefilling=int(self.engine.prefilling is not None),
            generated_tokens=c["generated"],
            prompt_tokens=c["prompt"],
            tokens_per_s=sum(t for _, t in self._recent)
            / max(1e-9, min(self.rate_window_s, now - self._started)),
            cache_device_bytes=mem.device_bytes,
            cache_host_bytes=mem.host_bytes,
            finished=c["finished"],
            aborted=c["aborted"],
            failed=c["failed"],
            steps=c["steps"],
            prefix_store_bytes=store.nbytes if store is not None else 0,
            prefix_shared_device_bytes=shared.device_bytes,
            prefix_shared_host_bytes=shared.host_bytes,
            **self.engine.counters,
        )
