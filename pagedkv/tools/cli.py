"""The ``pagedkv`` command: ``demo``, ``bench``, ``info``, ``generate``, ``verify``, ``serve``, ``accuracy``,
``plan``, ``warmup`` (``pagedkv --help``)."""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from ..backends import BACKENDS, available_backends, get_backend
from ..errors import ConfigError, PagedKVError
from ..geometry.formats import FORMATS


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is {'not positive' if minimum == 1 else 'negative'}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    return _integer(text, 0)


#: pagedkv.testing.checkers.CONVENTIONS (named here: the checkers import hypothesis, a test extra)
VERIFY_CONVENTIONS = ["pagedkv", "flashinfer", "vllm", "hnd", "vllm_paged", "vllm_cpu", "flashinfer_nhd",
                      "flashinfer_hnd", "transformers"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pagedkv", description="A paged KV cache for LLM inference: demo, benchmarks and environment.")
    p.add_argument("--version", action="version", version=f"pagedkv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="serve many requests with a small model over a paged KV cache",
                       description="Continuous batching of a small Llama-shaped model (random weights) over "
                                   "requests that share a system prompt and arrive over time; then a summary, "
                                   "a map of the pool, and a check that paged and dense generation agree.")
    d.add_argument("--requests", type=_positive, default=32, help="number of requests (default 32)")
    d.add_argument("--blocks", type=_positive, default=96, help="blocks in the pool, of 16 tokens (default 96)")
    d.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the model weights and the requests (default 0)")
    d.add_argument("--backend", choices=[*BACKENDS, "auto"], default="auto",
                   help="where the cache routines run (default auto: numba, else numpy; "
                        "cuda runs them on a GPU)")
    d.add_argument("--dtype", choices=list(FORMATS), default="float32",
                   help="how the pool stores K/V (default float32); another format is compared with a float32 run")
    d.add_argument("--plot", metavar="FILE.png", help="also draw memory in use over time (needs matplotlib)")
    d.add_argument("--store", metavar="DIR|redis://HOST:PORT",
                   help="back the prefix cache with a directory or a Redis/Valkey server, shared with other runs "
                        "and processes (a second run finds the shared prompt there)")
    d.add_argument("--model", choices=["llama", "gemma-like"], default="llama",
                   help="llama: two full-attention layers (default); gemma-like: four layers alternating a "
                        "sliding window of 16 and full attention, the sliding ones freeing what leaves the window")
    d.add_argument("--no-check", action="store_true",
                   help="skip re-running every request over a dense cache to compare the tokens")

    b = sub.add_parser("bench", help="a quick table of every routine on every backend beside its peers",
                       description="Times write, gather and copy_blocks at the decode (64 tokens) and prefill "
                                   "(8192 tokens) shapes, H=8, D=128, on each available backend, beside numpy "
                                   "fancy indexing, torch CPU indexing (when installed) and the fastest plain "
                                   "copy of the same bytes. The asv suite in benchmarks/ is the full record.")
    b.add_argument("--layout", choices=["NHD", "HND"], default="NHD", help="pool layout (default NHD)")
    b.add_argument("--shape", choices=["decode", "prefill", "both"], default="both", help="(default both)")

    sub.add_parser("info", help="version, backends available and why not, threading layer, GPU",
                   description="What pagedkv can use on this machine.")

    g = sub.add_parser("generate", help="text from a transformers checkpoint with pagedkv as its KV cache",
                       description="Loads a local transformers checkpoint (a directory with the model and its "
                                   "tokenizer; a hub id where there is network) and prints the greedy continuation "
                                   "of each prompt, then tokens/s, KV-cache bytes against a dense cache and prefix-"
                                   "cache hits. The prompts run on pagedkv.LLM as one continuous batch over one "
                                   "pool (a prefix computed before is not computed again). With --num-beams or "
                                   "--attention, they run one after another through transformers' generate with "
                                   "pagedkv as its cache instead. Needs pip install \"pagedkv[hf]\".")
    g.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory (or hub id)")
    prompts = g.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", metavar="TEXT", help="the prompt")
    prompts.add_argument("--batch", metavar="FILE", help="a file of prompts, one per line")
    g.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate per prompt (default 32)")
    g.add_argument("--dtype", choices=list(FORMATS), default=None,
                   help="how the pool stores K/V (default: the model's dtype, exact)")
    g.add_argument("--block-size", type=_positive, default=16, help="tokens per block (default 16)")
    g.add_argument("--kv-cache-bytes", type=_positive, default=None,
                   help="the KV pool's size in bytes (default 1 GiB; the engine)")
    g.add_argument("--max-num-seqs", type=_positive, default=64,
                   help="requests running at once, at most (default 64; the engine)")
    g.add_argument("--explain", action="store_true",
                   help="print, for each prompt, where each block of its K/V comes from or why not (the engine)")
    g.add_argument("--num-beams", type=_positive, default=1,
                   help="beam search width (default 1: greedy, on the engine; above 1: transformers' generate)")
    g.add_argument("--attention", choices=["pagedkv", "sdpa", "eager"], default=None,
                   help="run transformers' generate with this attention, one prompt at a time: pagedkv (its "
                        "kernels over the pool, nothing gathered) or the model's own, sdpa or eager, over "
                        "gathered K/V (default: the engine)")
    sv = sub.add_parser("serve", help="an OpenAI-compatible server on pagedkv.LLM (needs the serve extra)",
                        description="Serves a local transformers checkpoint (a directory with the model and its "
                                    "tokenizer) over HTTP with OpenAI's API: /v1/models, /v1/completions, "
                                    "/v1/chat/completions (streamed or not), /health. Requests from every client "
                                    "run in one continuous batch over one paged pool. Needs pip install "
                                    "\"pagedkv[hf,serve]\".")
    sv.add_argument("model", metavar="MODEL_DIR", help="checkpoint directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_positive, default=8000, help="port (default 8000)")
    sv.add_argument("--kv-cache-bytes", type=_positive, default=None, help="the KV pool's size (default 1 GiB)")
    sv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="the model's dtype (default: the checkpoint's)")
    sv.add_argument("--kv-dtype", choices=list(FORMATS), default=None,
                    help="how the pool stores K/V (default: the model's dtype, exact)")
    sv.add_argument("--max-model-len", type=_positive, default=None,
                    help="the longest request, prompt and output (default: the model's and the pool's bound)")
    sv.add_argument("--prepack-weights", action="store_true",
                    help="run the linear layers on weights reordered once for oneDNN (faster on the CPU, "
                         "a second copy of those weights)")
    sv.add_argument("--block-size", type=_positive, default=16, help="tokens per block (default 16)")
    sv.add_argument("--max-num-seqs", type=_positive, default=64, help="requests running at once (default 64)")
    sv.add_argument("--store", default=None, metavar="DIR_OR_URL",
                    help="a blocks store behind the prefix cache, shared with other servers: a directory, "
                         "redis://HOST:PORT, or redis+cluster://HOST:PORT for a Redis Cluster (any node of it); "
                         "prompt blocks computed by one server are loaded by the others")
    sv.add_argument("--kv-events", default=None, metavar="REDIS_URL",
                    help="publish the pool's numbered KV events to the Redis Stream pagedkv:kv-events:MODEL there, "
                         "for an external index (pagedkv.offload.kv_events.RedisIndexer follows it)")
    sv.add_argument("--api-key", default=None,
                    help="require Authorization: Bearer KEY on every endpoint but /health; several keys "
                         "separated by commas (default: the PAGEDKV_API_KEY environment variable, if set)")
    sv.add_argument("--salt-by-key", action="store_true",
                    help="salt each API key's requests apart: tenants never share prefix blocks, so none can "
                         "time another's prompts")
    a = sub.add_parser("accuracy", help="what each KV storage format costs a transformers model (needs the hf extra)",
                       description="Runs a text teacher-forced through the checkpoint with a float32 pool and with a "
                                   "pool of each storage format (and vLLM's fp8 encoder), and reports per format the "
                                   "KL divergence of the next-token distributions, top-1 agreement, perplexity, the "
                                   "stored K/V's error per layer and whether it is within the format's rounding.")
    a.add_argument("model", metavar="MODEL_DIR", help="checkpoint directory")
    a.add_argument("--text", metavar="FILE", help="a text file, tokenized with the checkpoint's tokenizer (default: "
                                                  "random tokens)")
    a.add_argument("--tokens", type=_positive, default=256,
                   help="tokens of the text: the random text's length, or the file's first ones (default 256)")
    a.add_argument("--formats", nargs="+", choices=[f for f in FORMATS if f != "float32"], default=None,
                   help="storage formats to measure (default: all)")
    a.add_argument("--block-size", type=_positive, default=16, help="tokens per block (default 16)")
    a.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also compare N greedy tokens from the text's start (default 0: none)")
    a.add_argument("--seed", type=int, default=0, help="seed of the random text (default 0)")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the model's dtype (default: the checkpoint's)")
    a.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    a.add_argument("--plot", metavar="FILE.png", help="also draw the report (needs matplotlib)")
    pl = sub.add_parser("plan", help="exactly how much KV memory a deployment takes (reads a transformers config)",
                        description="Bytes per block and per token in every layer group (sliding windows bounded by "
                                    "their window, scales included), the blocks a sequence holds at its end and at "
                                    "its worst, how many sequences fit, and token occupancy against block usage: the "
                                    "pool pagedkv.LLM would make from the same arguments, to the byte.")
    pl.add_argument("--model", required=True, metavar="CONFIG_OR_DIR",
                    help="a checkpoint directory or a config.json (only the config is read)")
    pl.add_argument("--kv-dtype", choices=list(FORMATS), default=None,
                    help="how the pool stores K/V (default: the config's dtype where it is one, else float32)")
    pl.add_argument("--max-model-len", type=_positive, default=None,
                    help="the longest sequence (default: the config's max_position_embeddings)")
    pl.add_argument("--max-num-seqs", type=_positive, default=1, help="sequences at once (default 1)")
    pl.add_argument("--block-size", type=_positive, default=16, help="tokens per block (default 16)")
    pl.add_argument("--kv-cache-bytes", type=_positive, default=None,
                    help="the pool's budget (default: what the sequences need at their worst)")
    pl.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                    help="tokens of a prefix every sequence shares (default 0)")
    pl.add_argument("--chunk", type=_positive, default=None,
                    help="the most prompt tokens computed in one step (default: max-model-len)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    w = sub.add_parser("warmup", help="compile the numba kernels ahead of time (they are cached on disk)",
                       description="Compiles (or loads from numba's disk cache) every kernel a pool of the given "
                                   "storage formats and layouts runs, so that a later process starts at once: run it "
                                   "when building a container image, say. Prints each kernel as it compiles.")
    w.add_argument("--dtype", nargs="+", choices=list(FORMATS), default=["float32"],
                   help="storage formats (default float32)")
    w.add_argument("--layout", nargs="+", choices=["NHD", "HND"], default=["NHD"], help="pool layouts (default NHD)")
    w.add_argument("--backend", choices=["numba", "numpy", "auto"], default="auto",
                   help="the backend to warm (default auto: numba, else numpy, which needs none)")
    v = sub.add_parser("verify", help="check your own kernel against the reference (needs the verify extra)",
                       description="Imports MODULE:FUNCTION, runs the conformance checker of --routine on cases "
                                   "drawn by hypothesis in --convention's shapes, and prints PASS with the number "
                                   "of calls, or FAIL with the smallest failing case and the first wrong element. "
                                   "Exits 1 on a failure. Needs pip install \"pagedkv[verify]\"; the signatures "
                                   "each convention expects are in pagedkv.testing.checkers.")
    v.add_argument("function", metavar="MODULE:FUNCTION", help="your kernel, e.g. mykernels:reshape_and_cache")
    v.add_argument("--routine", required=True,
                   choices=["write", "read", "gather", "copy_blocks", "swap_blocks", "paged_attention"])
    v.add_argument("--convention", default="pagedkv", choices=VERIFY_CONVENTIONS,
                   help="the shapes your function takes (default pagedkv)")
    v.add_argument("--dtype", choices=list(FORMATS), default="float32", help="storage format (default float32)")
    v.add_argument("--examples", type=_positive, default=100, help="cases to draw (default 100)")
    v.add_argument("--no-varlen", dest="varlen", action="store_false",
                   help="paged_attention: decode only, one query a sequence (query_lens always None)")
    v.add_argument("--no-soft-cap", dest="soft_cap", action="store_false",
                   help="paged_attention: never pass soft_cap= (for a kernel without it)")
    v.add_argument("--no-sliding-window", dest="sliding_window", action="store_false",
                   help="paged_attention: never pass sliding_window= (for a kernel without it)")
    arrays = v.add_mutually_exclusive_group()
    arrays.add_argument("--torch", action="store_const", const="torch", dest="arrays",
                        help="hand your function torch tensors (on the GPU if there is one)")
    arrays.add_argument("--cupy", action="store_const", const="cupy", dest="arrays", help="hand it CuPy arrays")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        commands = {"demo": _demo, "bench": _bench, "info": _info, "generate": _generate, "verify": _verify,
                    "serve": _serve, "accuracy": _accuracy, "plan": _plan, "warmup": _warmup}
        return commands[args.command](args)
    except PagedKVError as e:
        print(f"pagedkv: error: {e}", file=sys.stderr)
        return 2


def _warmup(args) -> int:
    from ..cache import warmup

    seconds = warmup(args.dtype, backend=args.backend, layouts=args.layout)
    print(f"pagedkv: kernels for {', '.join(args.dtype)} ({', '.join(args.layout)}) ready on the "
          f"{get_backend(args.backend).NAME} backend in {seconds:.1f} s")
    return 0


def _plan(args) -> int:
    import json

    from ..integrations.plan import plan_memory

    try:
        plan = plan_memory(args.model, kv_dtype=args.kv_dtype, max_model_len=args.max_model_len,
                           max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                           kv_cache_bytes=args.kv_cache_bytes, shared_prefix=args.shared_prefix, chunk=args.chunk)
    except ImportError as e:
        print(f"pagedkv: error: plan reads configs with transformers: pip install \"pagedkv[hf]\" ({e})",
              file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


def _accuracy(args) -> int:
    try:
        import torch

        from ..integrations.accuracy import accuracy_report
        from ..integrations.generate import load
    except ImportError as e:
        print(f"pagedkv: error: accuracy needs the hf extra: pip install \"pagedkv[hf]\" ({e})", file=sys.stderr)
        return 2
    if args.generate < 0:
        raise ConfigError(f"--generate must be 0 or more, got {args.generate}")
    tokenizer, model = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None,
                            tokenizer=args.text is not None)
    ids, text = None, None
    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8") as f:
                content = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --text {args.text!r}: {e}") from e
        ids = tokenizer(content)["input_ids"][:args.tokens]
        if len(ids) < 2:
            raise ConfigError(f"--text {args.text!r} holds fewer than 2 tokens")
        text = f"the first {len(ids)} tokens of {args.text}"
    report = accuracy_report(model, ids, num_tokens=args.tokens, formats=args.formats, block_size=args.block_size,
                             generate=args.generate, seed=args.seed, text=text)
    print(report.to_json() if args.json else report.table())
    if args.plot:
        report.plot(args.plot)
        if not args.json:
            print(f"\nplot written to {args.plot}")
    return 0


def _verify(args) -> int:
    try:
        from ..testing.verify import verify
    except ImportError as e:
        print(f"pagedkv: error: verify needs hypothesis: pip install \"pagedkv[verify]\" ({e})", file=sys.stderr)
        return 2
    try:
        return verify(args.function, args.routine, args.convention, args.dtype, args.examples, args.arrays,
                      varlen=args.varlen, soft_cap=args.soft_cap, sliding_window=args.sliding_window)
    except (ImportError, AttributeError, ValueError) as e:
        print(f"pagedkv: error: {e}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    try:
        from ..engine.generate import generate as on_engine
        from ..integrations.generate import generate
    except ImportError as e:
        print(f"pagedkv: error: generate needs transformers and torch: pip install \"pagedkv[hf]\" ({e})",
              file=sys.stderr)
        return 2
    if args.batch is not None:
        try:
            with open(args.batch, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            print(f"pagedkv: error: cannot read {args.batch}: {e.strerror}", file=sys.stderr)
            return 2
        except UnicodeDecodeError as e:
            print(f"pagedkv: error: {args.batch} is not UTF-8 text (byte {e.start}: {e.reason})", file=sys.stderr)
            return 2
        if not prompts:
            print(f"pagedkv: error: {args.batch} holds no prompt", file=sys.stderr)
            return 2
    else:
        prompts = [args.prompt]
    if args.explain and (args.num_beams > 1 or args.attention is not None):
        raise ConfigError("--explain explains the engine's prefix cache: not with --num-beams or --attention")
    if args.num_beams > 1 or args.attention is not None:
        generate(args.model, prompts, max_new_tokens=args.max_new_tokens, dtype=args.dtype, num_beams=args.num_beams,
                 block_size=args.block_size, attention=args.attention)
    else:
        on_engine(args.model, prompts, max_new_tokens=args.max_new_tokens, kv_dtype=args.dtype,
                  block_size=args.block_size, kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                  explain=args.explain)
    return 0


def _serve(args) -> int:
    import os

    try:
        import uvicorn

        from ..engine.llm import LLM
        from ..serve.app import create_app
    except ImportError as e:
        print(f"pagedkv: error: serve needs its extra: pip install \"pagedkv[hf,serve]\" ({e})", file=sys.stderr)
        return 2
    keys = [k.strip() for k in (args.api_key or os.environ.get("PAGEDKV_API_KEY") or "").split(",") if k.strip()]
    if args.salt_by_key and not keys:
        raise ConfigError("--salt-by-key needs API keys (--api-key or PAGEDKV_API_KEY)")
    from ..offload.stores import open_store

    stores = [open_store(args.store, "pagedkv-serve")] if args.store else []
    llm = LLM(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, kv_cache_bytes=args.kv_cache_bytes,
              block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=max(2048, args.max_num_seqs), stores=stores, max_model_len=args.max_model_len,
              prepack_weights=args.prepack_weights)
    name = os.path.basename(os.path.normpath(args.model))
    after_step = None
    if args.kv_events:
        from ..blocks.events import EventPublisher
        from ..offload.kv_events import RedisEventStream

        after_step = RedisEventStream(args.kv_events, f"pagedkv:kv-events:{name}",
                                      EventPublisher(llm.cache.manager.block_pool)).flush
    app = create_app(llm, model_name=name, api_keys=keys, salt_by_key=args.salt_by_key, after_step=after_step)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _demo(args) -> int:
    from .demo import format_summary, plot, run_demo

    backend = get_backend(args.backend).NAME
    print(f"pagedkv demo: {args.model} model, {args.requests} requests, {args.blocks} blocks of 16 tokens, "
          f"backend {backend}, K/V stored as {args.dtype}")
    res = run_demo(args.requests, seed=args.seed, backend=backend, num_blocks=args.blocks,
                   check=not args.no_check, dtype=args.dtype, store=args.store, model_name=args.model)
    print(format_summary(res, backend))
    if args.plot:
        plot(res, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0 if res.agree in (True, None) else 1


def _bench(args) -> int:
    from . import bench

    shapes = ["decode", "prefill"] if args.shape == "both" else [args.shape]
    backends = [n for n, why in available_backends().items() if why is None and n != "cuda"]
    print(f"pagedkv bench, layout {args.layout}: GB/s moved (read + written), medians; higher is better. Like "
          "with like: write and copy_blocks change the pool in place in every column; gather returns new arrays "
          "in every column (numpy and torch allocate theirs too), paying their first touch")
    header = ["routine", "shape", *backends, "numpy fancy", "torch", "copy limit"]
    rows = []
    for shape in shapes:
        w = bench.make_workload(shape, args.layout)
        for routine in bench.PEER_ROUTINES:
            n = bench.bytes_moved(w, routine)
            def gbps(f, n=n):
                return "n/a" if f is None else f"{n / bench.median_seconds(f, repeat=3) / 1e9:.1f}"

            row = [routine, shape] + [gbps(bench.backend_call(get_backend(b), w, routine)) for b in backends]
            row += [gbps(bench.numpy_peer(w, routine)), gbps(bench.torch_peer(w, routine)),
                    f"{n / bench.copy_limit_seconds(n) / 1e9:.1f}"]
            rows.append(row)
            print("  measured", routine, shape, file=sys.stderr)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)))
    return 0


def _info(args) -> int:
    import numba
    import numpy

    print(f"pagedkv {__version__}")
    print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, numba {numba.__version__}")
    for name, why in available_backends().items():
        print(f"  backend {name:6} {'available' if why is None else 'unavailable: ' + why}")
    layer: str = "unknown"
    try:
        _run_parallel_once()
        layer = numba.threading_layer()
    except (ImportError, ValueError):
        pass
    print(f"numba threads {numba.get_num_threads()}, threading layer {layer}")
    print(f"storage formats: {', '.join(FORMATS)} (every backend)")
    gpu = "none"
    if available_backends()["cuda"] is None:
        from numba import cuda

        name = getattr(cuda.get_current_device(), "name", "?")
        gpu = name.decode() if isinstance(name, bytes) else str(name)
    print(f"GPU: {gpu}")
    return 0


def _run_parallel_once() -> None:
    """Run one tiny parallel kernel, so that numba has chosen its threading layer."""
    import numpy as np

    from ..backends import numba as numba_backend
    from ..geometry.config import CacheConfig
    from ..memory.pool import KVPool

    pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=1, block_size=1))
    numba_backend.read(pool, 0, np.zeros(1, np.int64))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
