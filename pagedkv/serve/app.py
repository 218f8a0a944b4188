"""The OpenAI-compatible HTTP API over :class:`~.engine_thread.EngineThread`.

Endpoints (the shapes of OpenAI's API, as vLLM's server serves them): ``GET /v1/models``;
``POST /v1/completions`` and ``POST /v1/chat/completions`` (the tokenizer's chat template),
each streamed as server-sent events with ``"stream": true``; ``GET /health``; ``GET /metrics``
(:mod:`.metrics`); ``POST /v1/explain_prefix`` (where each block of a prompt's K/V would
come from, or why not: :mod:`pagedkv.explain`; never naming another tenant's salt). Sampling takes
``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop`` (strings) and ``n`` (completions
forked from the one computed prompt, sharing its blocks); ``usage`` counts the
prompt tokens served from the prefix cache (``prompt_tokens_details.cached_tokens``). A request
may carry a ``cache_salt``: requests of other salts never share prefix blocks (tenants cannot
time each other's prompts). With an API key, every endpoint but ``/health`` answers 401 without
``Authorization: Bearer KEY`` (one of several keys), and ``salt_by_key`` salts each key's requests
apart. Bad requests get
an OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``) with a 4xx
status, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.llm import LLM
from ..engine.params import RequestOutput, SamplingParams
from ..errors import PagedKVError
from .engine_thread import EngineThread
from .metrics import Metrics

#: the largest request body taken, in bytes
MAX_BODY_BYTES = 1 << 20
#: the most completions one request may ask for (``n``)
MAX_N = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    cache_salt: str | None = None


class CompletionBody(_Body):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class ExplainBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    cache_salt: str | None = None


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status}})


def create_app(llm: LLM, *, model_name: str, api_keys: Sequence[str] = (), salt_by_key: bool = False,
               default_max_tokens: int = 16, after_step: Callable[[], object] | None = None) -> FastAPI:
    """The application serving ``llm`` as ``model_name``; with ``api_keys``, only to clients that
    send one of them, and with ``salt_by_key`` each key's requests salted apart (tenants never
    share prefix blocks). ``after_step`` runs after each engine step (and twice a second when
    idle): a KV event stream's ``flush``."""
    keys = [k for k in api_keys if k]
    if salt_by_key and not keys:
        raise ValueError("salt_by_key needs API keys: each key's requests are salted apart")
    engine = EngineThread(llm, after_step)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.stop()  # the server shuts down: the engine's thread ends with it

    app = FastAPI(title="pagedkv", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    metrics = Metrics(engine)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if keys and request.url.path != "/health":
            given = request.headers.get("authorization", "").encode()
            matches = [secrets.compare_digest(given, f"Bearer {k}".encode()) for k in keys]  # every key compared
            if not any(matches):
                return _error(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
            request.state.tenant = hashlib.sha256(keys[matches.index(True)].encode()).hexdigest()[:32]
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body",
                      param=where)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "pagedkv"}]}

    def params_of(body: _Body, prompt_len: int) -> SamplingParams:
        max_tokens = body.max_tokens or default_max_tokens
        if prompt_len + max_tokens > llm.max_model_len:
            raise ValueError(f"max_tokens: the prompt's {prompt_len} tokens and {max_tokens} new ones are more than "
                             f"this model serves ({llm.max_model_len})")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                              n=body.n)

    def other_model(name: str | None) -> JSONResponse | None:
        """A 404 for a request naming a model this server does not serve."""
        if name is not None and name != model_name:
            return _error(404, f"no model {name!r} here; this server serves {model_name!r}", param="model")
        return None

    def salt_of(given: str | None, request: Request) -> str | None:
        """A request's cache salt: with ``salt_by_key``, its key's tenant and within it its own."""
        return f"{request.state.tenant}:{given or ''}" if salt_by_key else given

    def chat_prompt(messages: list[ChatMessage]) -> str | JSONResponse:
        """The messages through the tokenizer's chat template, or a 400 when it has none."""
        try:
            return llm.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                     add_generation_prompt=True)
        except (ValueError, AttributeError) as e:
            return _error(400, f"messages: the tokenizer has no chat template to apply ({e})", param="messages")

    async def run(body: _Body, prompt: Any, chat: bool, request: Request) -> Any:
        if (wrong := other_model(body.model)) is not None:
            return wrong
        try:
            ids = prompt if isinstance(prompt, list) else llm.tokenizer(prompt)["input_ids"]
            if not ids:
                raise ValueError("prompt: empty")
            params = params_of(body, len(ids))
            request_id, queue = engine.submit(list(ids), params, salt_of(body.cache_salt, request))
        except (PagedKVError, ValueError) as e:
            return _error(400, str(e))
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        kind = "chat.completion" if chat else "text_completion"
        created, cid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        started = time.perf_counter()
        if body.stream:
            return StreamingResponse(_stream(engine, request_id, queue, stops, body.n, chat, kind, created, cid,
                                             model_name, metrics, started), media_type="text/event-stream")
        texts, last = await _collect(engine, request_id, queue, stops, body.n)
        metrics.observe(last, time.perf_counter() - started)
        if any(c.finish_reason == "error" for c in last.outputs):
            return _error(400, next(c.error for c in last.outputs if c.error) or "the request could not run")
        choices = []
        for text in texts:
            choice: dict[str, Any] = {"index": text.index, "finish_reason": text.reason(last), "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text.text}
            else:
                choice["text"] = text.text
            choices.append(choice)
        return {"id": cid, "object": kind, "created": created, "model": model_name, "choices": choices,
                "usage": _usage(last)}

    @app.post("/v1/explain_prefix")
    async def explain(body: ExplainBody, request: Request) -> Any:
        """Where each block of a prompt's K/V would come from, or why not (pagedkv.explain),
        for this tenant: another tenant's salt is never named."""
        if (wrong := other_model(body.model)) is not None:
            return wrong
        prompt: Any = body.prompt
        if prompt is None:
            if not body.messages:
                return _error(400, "give a prompt or messages", param="prompt")
            prompt = chat_prompt(body.messages)
            if isinstance(prompt, JSONResponse):
                return prompt
        try:
            with engine.lock:
                report = llm.explain_prefix(prompt, cache_salt=salt_of(body.cache_salt, request),
                                            reveal_other_salts=False)
        except (PagedKVError, ValueError) as e:
            return _error(400, str(e))
        return report.to_dict()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        return await run(body, body.prompt, False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        prompt = chat_prompt(body.messages)
        if isinstance(prompt, JSONResponse):
            return prompt
        return await run(body, prompt, True, request)

    return app


def _usage(out: RequestOutput) -> dict[str, Any]:
    prompt, completion = len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


class _Text:
    """The text of completion ``index`` of a request as it grows, cut at the first stop string."""

    def __init__(self, engine: EngineThread, request_id: str, stops: list[str], index: int) -> None:
        self.engine, self.request_id, self.stops, self.index = engine, request_id, stops, index
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped, self.done = "", 0, False, False

    def add(self, out: RequestOutput) -> str:
        """The new text since the last call (held back while it may begin a stop string)."""
        mine = [c for c in out.outputs if c.index == self.index]
        if not mine or self.done:  # not forked yet, or over
            return ""
        c = mine[0]
        self.tokens += c.new_token_ids
        finished = c.finish_reason is not None
        tokenizer = self.engine.llm.tokenizer
        self.text = tokenizer.decode(self.tokens, skip_special_tokens=True) if tokenizer else ""
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped and not finished:
            self.engine.abort(self.request_id, self.index)
        self.done = self.stopped or finished
        hold = 0 if self.done else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        new, self.sent = self.text[self.sent:end], end
        return new

    def reason(self, out: RequestOutput) -> str | None:
        if self.stopped:
            return "stop"
        return next((c.finish_reason for c in out.outputs if c.index == self.index), out.outputs[0].finish_reason)


async def _collect(engine: EngineThread, request_id: str, queue, stops: list[str],
                   n: int) -> tuple[list[_Text], RequestOutput]:
    texts = [_Text(engine, request_id, stops, i) for i in range(n)]
    try:
        while True:
            out = await queue.get()
            for text in texts:
                text.add(out)
            if out.finished:
                return texts, out
    except asyncio.CancelledError:  # the client went away before the answer: its request ends
        engine.abort(request_id)
        raise


async def _stream(engine: EngineThread, request_id: str, queue, stops: list[str], n: int, chat: bool, kind: str,
                  created: int, cid: str, model: str, metrics: Metrics, started: float) -> AsyncIterator[str]:
    """Server-sent events: per completion, its pieces of text as they come and a last chunk with
    its finish reason; the last event carries the usage, then ``[DONE]``."""
    texts = [_Text(engine, request_id, stops, i) for i in range(n)]
    chunk_kind = "chat.completion.chunk" if chat else kind

    def event(index: int, piece: str | None, reason: str | None, usage: dict | None = None,
              role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if piece:
                delta["content"] = piece
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": piece or "", "finish_reason": reason, "logprobs": None}
        body: dict[str, Any] = {"id": cid, "object": chunk_kind, "created": created, "model": model,
                                "choices": [choice]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        if chat:
            for i in range(n):
                yield event(i, None, None, role=True)
        while True:
            out = await queue.get()
            if out.finished and any(c.finish_reason == "error" for c in out.outputs):
                finished = True
                metrics.observe(out, time.perf_counter() - started)
                message = next(c.error for c in out.outputs if c.error)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            ended = []
            for text in texts:
                was_done = text.done
                piece = text.add(out)
                if text.done and not was_done:
                    ended.append((text, piece))
                elif piece:
                    yield event(text.index, piece, None)
            for j, (text, piece) in enumerate(ended):
                last = out.finished and j == len(ended) - 1
                yield event(text.index, piece, text.reason(out), _usage(out) if last else None)
            if out.finished:
                finished = True
                metrics.observe(out, time.perf_counter() - started)
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:  # the client went away mid-stream: its request ends, its blocks go back
            engine.abort(request_id)
