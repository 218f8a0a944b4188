"""``pagedkv serve``: an OpenAI-compatible HTTP server on :class:`pagedkv.LLM` (the ``serve`` extra).

- :mod:`.engine_thread`: the engine stepping in a thread of its own, requests from many clients
  batched together (continuous batching across clients), each client's tokens handed back to it;
- :mod:`.metrics`: ``/metrics``, the engine's state for Prometheus;
- :mod:`.app`: the FastAPI application: ``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions`` (streamed as server-sent events or not), ``/health``; bearer-token
  authentication, per-tenant cache salts, bounded requests, OpenAI-style errors.

``import pagedkv`` imports none of it. Imports anything below it but the tools.
"""
