"""The engine in a thread of its own, fed by many clients: :class:`EngineThread`.

Handlers of the HTTP server (on asyncio) submit requests; the thread runs :meth:`LLM.step`
while any request is unfinished, so requests that arrive while others run join the next step
(continuous batching across clients), and hands each step's outputs to the queue of the client
that asked, through that client's event loop. A client that goes away aborts its request, whose
blocks go back to the pool at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..engine.llm import LLM
from ..engine.params import RequestOutput, SamplingParams

log = logging.getLogger("pagedkv.serve")


class EngineThread:
    """Runs ``llm`` for many asyncio clients (see the module docstring)."""

    def __init__(self, llm: LLM, after_step: Callable[[], object] | None = None) -> None:
        self.llm = llm
        self.after_step = after_step  # e.g. a KV event stream's flush: after each step, and twice a second when idle
        self.lock = threading.Lock()  # the engine is not thread-safe: one caller at a time
        self.wake = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="pagedkv-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: Any, params: SamplingParams, cache_salt: Any = None) -> tuple[str, asyncio.Queue]:
        """Queue a request; returns its id and the queue its outputs arrive on (the last one has
        ``finished``). Raises the engine's errors for a bad prompt (nothing queued then)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self.lock:
            request_id = self.llm.add_request(None, prompt, params, cache_salt=cache_salt)
            self.queues[request_id] = (loop, queue)
        self.wake.set()
        return request_id, queue

    def abort(self, request_id: str, index: int | None = None) -> None:
        """End a request (its client went away), or with ``index`` one completion of it (it met a
        stop string); its blocks go back at once."""
        with self.lock:
            self.llm.abort(request_id, index)
        self.wake.set()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

    def _after_step(self) -> None:
        if self.after_step is not None:
            try:
                self.after_step()
            except Exception:  # never the engine's concern
                log.exception("after a step of the engine")

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(timeout=None if self.after_step is None else 0.5)
            delivered = []
            with self.lock:
                idle = not self.llm.has_unfinished_requests()
                if idle:
                    self.wake.clear()
                else:
                    try:
                        outputs = self.llm.step()
                    except Exception:  # the step's requests finished with an error; the next step reports them
                        log.exception("a step of the engine failed")
                        continue
                    delivered = [(self.queues.get(o.request_id), o) for o in outputs]
                    for o in outputs:
                        if o.finished:
                            self.queues.pop(o.request_id, None)
            for target, out in delivered:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)
            self._after_step()
