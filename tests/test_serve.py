"""``pagedkv serve``: a real server process on a free localhost port, driven by the official
``openai`` client (and plain HTTP for what the client hides): completions and chat, streamed
and not, stop strings, seeded sampling, concurrent clients, API keys, bad requests."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from pagedkv import LLM, SamplingParams  # noqa: E402

from .test_stores import redis_cluster, redis_url  # noqa: E402, F401  (fixtures: a real Redis, a real cluster)
from .test_transformers import save_checkpoint  # noqa: E402

KEY = "test-key"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer with a chat template, saved as a checkpoint."""
    return save_checkpoint(tmp_path_factory.mktemp("served"), ["user", "assistant", "system"], CHAT_TEMPLATE)


#: the process id of each running server, by URL
SERVER_PIDS: dict[str, int] = {}


@contextlib.contextmanager
def serving(checkpoint, *args):
    """``pagedkv serve`` as its own process on a free port, with an API key; its URL (its process
    id in SERVER_PIDS)."""
    port = _free_port()
    env = {**os.environ, "PAGEDKV_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "pagedkv", "serve", checkpoint, "--port", str(port),
                             "--kv-cache-bytes", str(4 << 20), "--block-size", "4", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"the server did not start:\n{proc.stdout.read().decode()[-3000:]}") from None
                time.sleep(0.3)
        SERVER_PIDS[url] = proc.pid
        yield url
    finally:
        SERVER_PIDS.pop(url, None)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(checkpoint):
    """One server for the module's tests."""
    with serving(checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return LLM(checkpoint, num_blocks=256, block_size=4)


def model_name(checkpoint):
    return os.path.basename(checkpoint)


def test_completions_are_the_engines_own(client, engine, checkpoint):
    prompt = "w1 w2 w3 w4 w5"
    want = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0]
    got = client.completions.create(model=model_name(checkpoint), prompt=prompt, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == 5 and got.usage.completion_tokens == len(want.outputs[0].token_ids)
    again = client.completions.create(model=model_name(checkpoint), prompt=prompt + " w6 w7 w8", max_tokens=2,
                                      temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 4  # the first prompt's whole block of 4


def test_streamed_completions_and_chat_match_the_whole(client, checkpoint):
    kw = {"model": model_name(checkpoint), "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(prompt="w9 w8 w7", **kw).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(prompt="w9 w8 w7", stream=True, **kw)]
    assert "".join(pieces) == whole and len(pieces) > 1
    messages = [{"role": "user", "content": "w3 w4"}]
    chat = client.chat.completions.create(messages=messages, **kw)
    assert chat.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(messages=messages, stream=True, **kw))
    assert streamed == chat.choices[0].message.content


def test_stop_strings_and_seeded_sampling(client, checkpoint):
    for first in range(6, 58):  # a prompt whose greedy continuation runs a few words before end-of-sequence
        kw = {"model": model_name(checkpoint), "prompt": f"w{first} w5 w7", "max_tokens": 12}
        full = client.completions.create(temperature=0, **kw).choices[0].text
        words = full.split()
        if len(words) > 3 and full.index(words[2]) > 0:
            break
    else:
        pytest.fail("no prompt's continuation runs past three words")
    stopped = client.completions.create(temperature=0, stop=[words[2]], **kw).choices[0]
    assert stopped.text == full[:full.index(words[2])] and stopped.finish_reason == "stop"
    a, b = (client.completions.create(temperature=1.0, seed=5, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_n_completions_whole_and_streamed(client, engine, checkpoint):
    """``n=3``: three choices by index; greedy, each is the engine's own; seeded, the streamed
    pieces of each index put together are the whole answer's choice of that index."""
    kw = {"model": model_name(checkpoint), "prompt": "w4 w8 w15 w16 w23 w42", "max_tokens": 6}
    want = engine.generate(kw["prompt"], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    greedy = client.completions.create(temperature=0, n=3, **kw)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.text for c in greedy.choices] == [want.text] * 3
    assert greedy.usage.completion_tokens == 3 * len(want.token_ids)
    whole = client.completions.create(temperature=1.0, seed=11, n=3, **kw)
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    reasons = {}
    for chunk in client.completions.create(temperature=1.0, seed=11, n=3, stream=True, **kw):
        for c in chunk.choices:
            pieces[c.index].append(c.text)
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    assert ["".join(pieces[i]) for i in range(3)] == [c.text for c in whole.choices]
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    chat = client.chat.completions.create(model=model_name(checkpoint), messages=[{"role": "user", "content": "w1"}],
                                          max_tokens=4, temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def _ask_all(url, checkpoint, prompts, max_tokens):
    """Every prompt streamed at once, each by a client of its own (the async client, one task each);
    the text each got."""
    import asyncio

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            async def ask(prompt):
                stream = await client.completions.create(model=model_name(checkpoint), prompt=prompt,
                                                         max_tokens=max_tokens, temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream])

            return await asyncio.gather(*(ask(p) for p in prompts))

    return asyncio.run(run())


def _metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def _holds_nothing(url):
    """The server's engine has no request left and holds no block (its cached ones are free)."""
    value = {name: f.samples[0].value for name, f in _metrics(url).items() if f.samples}
    return (value["pagedkv_kv_blocks_used"], value["pagedkv_requests_running"],
            value["pagedkv_requests_waiting"]) == (0, 0, 0)


def test_64_concurrent_streaming_clients_each_get_their_own_tokens(server, checkpoint, engine):
    """64 clients at once, streaming: their requests batched together, each getting the tokens it
    gets alone; afterwards the engine holds nothing."""
    prompts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + i % 9)) for i in range(64)]
    want = [o.outputs[0].text for o in engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]
    assert _ask_all(server, checkpoint, prompts, 6) == want
    assert _holds_nothing(server)


def test_a_burst_larger_than_the_pool_waits_or_is_preempted(checkpoint, engine):
    """A pool of 16 blocks of 4 tokens (64 slots) and 24 requests of about 4 blocks each at once:
    they queue (and the newest running ones are preempted when decoding outgrows the pool) rather
    than fail, and each gets the tokens it gets alone."""
    prompts = [" ".join(f"w{(i * 5 + j) % 40 + 1}" for j in range(5 + i % 4)) for i in range(24)]
    want = [o.outputs[0].text for o in engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))]
    with serving(checkpoint, "--kv-cache-bytes", str(16 * 2048)) as url:
        assert _metrics(url)["pagedkv_kv_blocks_total"].samples[0].value == 16
        assert _ask_all(url, checkpoint, prompts, 8) == want
        assert _holds_nothing(url)


def _post(url, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, key, status, words", [
    ({"prompt": "w1", "max_tokens": 2}, None, 401, "API key"),
    ({"prompt": "w1", "max_tokens": 2}, "wrong", 401, "API key"),
    ({"prompt": "w1", "max_tokens": 0}, KEY, 400, "max_tokens"),
    ({"prompt": "w1", "max_tokens": "many"}, KEY, 400, "max_tokens"),
    ({"prompt": "w1", "max_tokens": 2, "model": "other"}, KEY, 404, "no model"),
    ({"prompt": "w1", "max_tokens": 300}, KEY, 400, "max_tokens"),
    ({"prompt": " ".join(["w1"] * 300), "max_tokens": 2}, KEY, 400, "tokens"),
    ({"max_tokens": 2}, KEY, 400, "prompt"),
    ({"prompt": "w1", "max_tokens": 2, "n": 17}, KEY, 400, "n"),
    (None, KEY, 400, "not valid JSON"),
])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, client, checkpoint, body, key, status, words):
    raw = b"{not json" if body is None else None
    got, answer = _post(f"{server}/v1/completions", body, key, raw)
    assert got == status and words in answer["error"]["message"]
    served = client.completions.create(model=model_name(checkpoint), prompt="w2", max_tokens=2)  # still serving
    assert served.usage.completion_tokens >= 1 and served.choices[0].finish_reason in ("stop", "length")
    assert _holds_nothing(server)


def test_models_and_health(server, client, checkpoint):
    assert [m.id for m in client.models.list()] == [model_name(checkpoint)]
    with urllib.request.urlopen(f"{server}/health", timeout=5) as r:  # no key needed
        assert json.loads(r.read()) == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_client_that_vanishes_mid_stream_frees_its_blocks(checkpoint):
    """The server in this process (uvicorn in a thread), so that its engine can be looked at: a
    streaming client reads one event and drops the connection; its request ends and the pool
    holds no block, and it passes check()."""
    import threading

    import uvicorn

    from pagedkv.serve.app import create_app

    llm = LLM(checkpoint, num_blocks=64, block_size=4)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(llm, model_name="m"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = json.dumps({"prompt": "w1 w2 w3", "max_tokens": 200, "temperature": 1.0, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            got = b""
            while b"data:" not in got:  # one event arrived: the request runs
                got += s.recv(65536)
        deadline = time.monotonic() + 30
        while llm.has_unfinished_requests() or llm.cache.stats()["blocks_used"]:
            assert time.monotonic() < deadline, "the vanished client's request still holds blocks"
            time.sleep(0.05)
        llm.cache.check()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_metrics_say_what_the_engine_holds(server, client, checkpoint):
    """/metrics in Prometheus' text format: the pool's blocks, the requests, the latencies."""
    for _ in range(2):  # the second finds the first's whole block in the prefix cache
        client.completions.create(model=model_name(checkpoint), prompt="w4 w5 w6 w7 w8", max_tokens=4, temperature=0)
    families = _metrics(server)
    value = {name: f.samples[0].value for name, f in families.items() if f.samples}
    assert value["pagedkv_kv_blocks_total"] == (4 << 20) // (2 * 2 * 4 * 2 * 16 * 4)  # 4 MiB of float32 blocks
    assert value["pagedkv_kv_blocks_used"] == 0 and value["pagedkv_requests_running"] == 0  # all finished
    assert value["pagedkv_requests_finished"] >= 1
    ttft = {s.name: s.value for s in families["pagedkv_time_to_first_token_seconds"].samples}
    assert ttft["pagedkv_time_to_first_token_seconds_count"] >= 1
    assert 0 < value["pagedkv_prefix_cache_hit_rate"] <= 1


@pytest.mark.parametrize("kind", ["directory", "redis", "redis cluster"])
def test_two_servers_share_prefixes_through_a_store(checkpoint, engine, tmp_path, request, kind):
    """Two server processes at once over one store (a directory, a Redis server, a Redis Cluster
    of three masters): a prompt sharing two whole blocks with one the first served is answered by
    the second with those blocks loaded from the store, and the tokens the engine gives it."""
    if kind == "directory":
        spec = str(tmp_path / "blocks")
    elif kind == "redis":
        spec = request.getfixturevalue("redis_url")
    else:
        spec = request.getfixturevalue("redis_cluster").url
    first_prompt = "w11 w12 w13 w14 w15 w16 w17 w18 w19 w20"  # two whole blocks of 4 before the last
    second_prompt = "w11 w12 w13 w14 w15 w16 w17 w18 w30 w31 w32"
    want = engine.generate(second_prompt, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    with serving(checkpoint, "--store", spec) as a, serving(checkpoint, "--store", spec) as b:
        answers = []
        for url, prompt in ((a, first_prompt), (b, second_prompt)):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
            answers.append(client.completions.create(model=model_name(checkpoint), prompt=prompt, max_tokens=6,
                                                     temperature=0))
        first, second = answers
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == 8
        assert second.choices[0].text == want
        served = {s.labels["tier"]: s.value for s in _metrics(b)["pagedkv_prompt_tokens_served"].samples}
        assert served["disk" if kind == "directory" else "redis"] == 8


def test_each_api_key_is_a_tenant_of_its_own(checkpoint):
    """--salt-by-key: a prompt one key sent before is found in the prefix cache for that key only;
    another key's request computes it all (and cannot time the first's)."""
    prompt = "w21 w22 w23 w24 w25 w26 w27 w28 w29"
    with serving(checkpoint, "--api-key", "alice,bob", "--salt-by-key") as url:
        def cached(key):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
            answer = client.completions.create(model=model_name(checkpoint), prompt=prompt, max_tokens=2,
                                               temperature=0)
            return answer.usage.prompt_tokens_details.cached_tokens

        assert [cached("alice"), cached("alice"), cached("bob")] == [0, 8, 0]
        for key, want in (("alice", "pool"), ("bob", "pool")):
            status, e = _post(f"{url}/v1/explain_prefix", {"prompt": prompt}, key)
            assert status == 200 and e["num_cached_tokens"] == 8 and e["blocks"][0]["source"] == want
        status, e = _post(f"{url}/v1/explain_prefix", {"prompt": prompt, "cache_salt": "x"}, "alice")
        assert [b["source"] for b in e["blocks"]] == ["never_seen", "never_seen", "last"]  # no other tenant named
        assert _post(f"{url}/v1/explain_prefix", {"prompt": prompt}, "wrong")[0] == 401
        assert _post(f"{url}/v1/explain_prefix", {}, "alice")[0] == 400
        assert cached("bob") == 8
        with pytest.raises(openai.AuthenticationError):
            cached(KEY)  # the environment's key is not one of those given


def _rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc")
def test_soak_memory_stays_flat(checkpoint):
    """Opt-in (``-m slow``; ``PAGEDKV_SOAK_SECONDS``, default 120): 16 clients stream requests of
    varied prompts, lengths and sampling without pause, a quarter of them hanging up mid-stream;
    after the first third of the time (allocator and caches warm), the server's resident memory
    grows by less than 16 MiB, and at the end the engine holds nothing."""
    import asyncio
    import random

    seconds = float(os.environ.get("PAGEDKV_SOAK_SECONDS", "120"))
    with serving(checkpoint) as url:
        pid, samples = SERVER_PIDS[url], []

        async def client(seed, deadline):
            rng = random.Random(seed)
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
                while time.monotonic() < deadline:
                    prompt = " ".join(f"w{rng.randrange(3, 60)}" for _ in range(rng.randrange(1, 40)))
                    stream = await c.completions.create(model=model_name(checkpoint), prompt=prompt, stream=True,
                                                        max_tokens=rng.randrange(1, 40), temperature=rng.random())
                    hang_up = rng.random() < 0.25
                    async for _ in stream:
                        if hang_up:
                            await stream.close()
                            break

        async def watch(deadline):
            while time.monotonic() < deadline:
                samples.append((time.monotonic(), _rss_bytes(pid)))
                await asyncio.sleep(1)

        async def run():
            deadline = time.monotonic() + seconds
            await asyncio.gather(watch(deadline), *(client(i, deadline) for i in range(16)))

        start = time.monotonic()
        asyncio.run(run())
        warm = [rss for t, rss in samples if t - start >= seconds / 3]
        assert len(warm) >= 3 and max(warm) - warm[0] < 16 << 20, [rss >> 20 for _, rss in samples]
        deadline = time.monotonic() + 30
        while not _holds_nothing(url):
            assert time.monotonic() < deadline, "requests still held after the soak"
            time.sleep(0.2)


def test_the_serving_pages_client_example_prints_what_the_page_says(tmp_path, capsys):
    """The serving page's ``openai`` example, run against ``pagedkv serve`` on the checkpoint it names
    (the serve benchmark's small random Llama and word-level tokenizer), prints the output the page
    shows under it."""
    import pathlib
    import re

    from benchmarks.serve_prefix import build_model, save_tokenizer

    readme = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    code, shown = re.search(r"```python\n(from openai import.*?)```\n```\n(.*?)```", readme, re.S).groups()
    path = str(tmp_path / "tiny-llama")
    build_model(path, "float32")
    save_tokenizer(path)
    with serving(path, "--kv-cache-bytes", str(64 << 20), "--block-size", "16", "--api-key", "secret") as url:
        exec(compile(code.replace("http://localhost:8123", url), "serving.md", "exec"), {})
    assert capsys.readouterr().out == shown


def test_kv_events_of_a_server_reach_an_indexer(checkpoint, redis_url):  # noqa: F811
    """--kv-events: the server's numbered KV events go to a Redis Stream; an indexer following it
    learns the blocks a request's prompt left in the prefix cache."""
    from pagedkv.offload.kv_events import RedisIndexer

    with serving(checkpoint, "--kv-events", redis_url) as url:
        indexer = RedisIndexer(redis_url, f"pagedkv:kv-events:{model_name(checkpoint)}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        client.completions.create(model=model_name(checkpoint), prompt="w31 w32 w33 w34 w35 w36 w37 w38 w39 w40",
                                  max_tokens=2, temperature=0)
        deadline = time.monotonic() + 30
        while len(indexer.index.blocks) < 2:  # the prompt's two whole blocks of 4, cached
            assert time.monotonic() < deadline, "no KV event reached the indexer"
            indexer.poll(block_ms=100)
        assert indexer.index.source is not None and not indexer.waiting
