"""Two ``pagedkv serve`` processes sharing prompt prefixes through Redis: time to first token.

Three servers run the benchmark engine's model (``benchmarks.engine``: a randomly initialised
Llama of 4 layers, hidden 512, 8 query and 2 KV heads of 64, saved with a word-level tokenizer):
``A`` and ``B`` share a Redis server (``--store``), ``C`` has no store. Each round draws a new
prefix of ``--prefix`` random tokens; ``A`` serves it with a suffix of its own (computing it and
writing its whole blocks through to Redis), then the same prefix with another suffix goes to

- ``B``, which has never seen it: its blocks are loaded from Redis;
- ``C``, which has never seen it either: it computes the whole prompt (the cold server);
- ``A`` again: the prefix is in its own pool (the prefix cache's best case).

Time to first token is measured by the client: a non-streamed completion of one token, sent
over HTTP on localhost (what a client waits for before its first token). Medians of
``--rounds`` rounds, the servers asked in turn.

    python -m benchmarks.serve_prefix [--prefix 1024] [--rounds 5] [--store redis://HOST:PORT]

Without ``--store``, a ``redis-server`` from PATH is started on a free localhost port and stopped
at the end (``--store redis+cluster://HOST:PORT`` measures a Redis Cluster instead). Needs the
``hf`` and ``serve`` extras and the ``openai`` client. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import numpy as np

from .engine import build_model

VOCAB = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tokenizer(path: str) -> None:
    """A word-level tokenizer over the model's vocabulary: ``[PAD]``, ``[UNK]``, ``[EOS]``, then token
    i is the word ``w{i}``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                         eos_token="[EOS]").save_pretrained(path)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server from PATH on a free localhost port; its URL."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        sys.exit("no redis-server on PATH: install one (apt-get install redis-server) or pass --store")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def server(path: str, *args: str) -> Iterator[str]:
    """``pagedkv serve path`` on a free localhost port, up; its URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pagedkv", "serve", path, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    raise RuntimeError(f"the server did not start:\n{out[-3000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    import openai

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", type=int, default=1024, help="tokens of the shared prefix (default 1024)")
    p.add_argument("--suffix", type=int, default=32, help="tokens of each request's own (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each with a new prefix (default 5)")
    p.add_argument("--store", default=None, help="a Redis URL to share (default: start a redis-server)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)

    def words(n: int) -> str:
        return " ".join(f"w{t}" for t in rng.integers(3, VOCAB, n))

    with tempfile.TemporaryDirectory() as tmp, (contextlib.nullcontext(args.store) if args.store
                                                 else redis_server()) as store:
        path = os.path.join(tmp, "model")
        build_model(path, "float32")
        save_tokenizer(path)
        common = ["--kv-cache-bytes", str(1 << 30), "--max-model-len", str(args.prefix + args.suffix + 8)]
        with server(path, "--store", store, *common) as a, server(path, "--store", store, *common) as b, \
                server(path, *common) as c:
            clients = {url: openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
                       for url in (a, b, c)}

            def ttft(url: str, prompt: str) -> tuple[float, int]:
                start = time.perf_counter()
                got = clients[url].completions.create(model="model", prompt=prompt, max_tokens=1, temperature=0)
                details = got.usage.prompt_tokens_details
                return time.perf_counter() - start, details.cached_tokens if details else 0

            for url in (a, b, c):  # warm-up: each server compiles its kernels on a prompt of its own
                ttft(url, words(args.prefix + args.suffix))
            times: dict[str, list[float]] = {"other server, through the store": [], "cold server": [],
                                             "same server, its own pool": []}
            cached: dict[str, list[int]] = {k: [] for k in times}
            for _ in range(args.rounds):
                prefix = words(args.prefix)
                ttft(a, f"{prefix} {words(args.suffix)}")
                for name, url in zip(times, (b, c, a), strict=True):
                    seconds, hit = ttft(url, f"{prefix} {words(args.suffix)}")
                    times[name].append(seconds)
                    cached[name].append(hit)
    cold = statistics.median(times["cold server"])
    print(f"Time to first token, prompt of {args.prefix} shared + {args.suffix} own tokens, median of "
          f"{args.rounds} rounds ({os.cpu_count()} cores):\n")
    print("| server | prompt tokens cached | time to first token | vs cold |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {int(statistics.median(cached[name]))} | {median * 1e3:.0f} ms | {cold / median:.1f}x |")


if __name__ == "__main__":
    main()
