"""pagedkv.LLM: many requests of a transformers model over one pool, each getting the model's own tokens.

Every request's greedy tokens equal transformers' ``generate`` of that request alone (default
cache), whatever else runs beside it: requests of unequal lengths arriving at different steps,
prompts chunked under a small token budget, shared prefixes served from the prefix cache,
preemption forced by a small pool, aborts. Tiny models with random weights (nothing is
downloaded).
"""

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pagedkv  # noqa: E402
from pagedkv import LLM, SamplingParams  # noqa: E402

from .test_transformers import architecture, gemma2, llama  # noqa: E402
from .test_transformers import checkpoint as checkpoint  # noqa: E402  (a fixture, for the text test)


def alone(model, prompt, max_tokens):
    """transformers' greedy tokens for ``prompt`` alone, with its default cache (``DynamicCache``),
    going on past end-of-sequence tokens as ``ignore_eos`` does (``generate`` stops at them, and
    ``min_new_tokens`` would forbid them instead): generate's greedy loop, written out."""
    cache = transformers.DynamicCache(config=model.config)
    ids, tokens = torch.tensor([prompt]), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
            tokens.append(int(logits.float().argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens


def random_prompts(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

FAMILIES = {
    "llama MHA": lambda: llama(kv_heads=4),
    "llama GQA": lambda: llama(kv_heads=2),
    "llama MQA": lambda: llama(kv_heads=1),
    "qwen3": lambda: architecture("qwen3"),
    "qwen2 sliding": lambda: architecture("qwen2"),
    "mistral sliding": lambda: architecture("mistral"),
    "gemma2 sliding, soft cap": lambda: gemma2(window=8),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_request_gets_the_tokens_it_gets_alone(family):
    """Unequal prompts, some sharing a 12-token prefix, arriving over several steps, with prompts
    chunked by a budget of 16 tokens a step (a long one takes three steps)."""
    model = FAMILIES[family]().eval()
    prompts = random_prompts([5, 19, 33, 9], seed=1) + random_prompts([4, 11], seed=2, prefix=range(1, 13))
    want = [alone(model, p, GREEDY.max_tokens) for p in prompts]
    llm = LLM(model, num_blocks=96, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    got = {}
    pending = list(enumerate(prompts))
    while pending or llm.has_unfinished_requests():
        if pending:  # one new request every step
            i, p = pending.pop(0)
            llm.add_request(str(i), p, GREEDY)
        for out in llm.step():
            if out.finished:
                got[int(out.request_id)] = out.outputs[0].token_ids
                assert out.outputs[0].finish_reason == "length"
    assert [got[i] for i in range(len(prompts))] == want
    llm.cache.check()
    assert llm.cache.stats()["blocks_used"] == 0  # every finished request gave its blocks back


def test_prepacked_weights_give_the_same_tokens():
    """The linear layers on oneDNN's reordered weights: other float32 roundings (another order of
    the sums), the same greedy tokens here; the model itself is left as it was."""
    model = llama()
    prompts = random_prompts([7, 21, 12], seed=12)
    want = [alone(model, p, 10) for p in prompts]
    llm = LLM(model, num_blocks=64, block_size=4, prepack_weights=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want
    assert alone(model, prompts[0], 10) == want[0]  # the model's own forward again


def test_a_pool_too_small_for_everyone_preempts_and_recomputes():
    """A pool of 12 blocks of 4 for 4 requests of about 30 tokens each: the newest running request
    is preempted (its blocks freed) whenever the others need them, and recomputed later; every
    request still gets its own tokens."""
    model = llama()
    prompts = random_prompts([14, 18, 11, 16], seed=3)
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    want = [alone(model, p, params.max_tokens) for p in prompts]
    llm = LLM(model, num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert llm.scheduler.num_preemptions > 0
    llm.cache.check()


def test_a_shared_prefix_is_computed_once():
    model = llama()
    system = list(range(1, 25))  # 24 tokens: 6 full blocks of 4
    prompts = random_prompts([3, 5, 7], seed=4, prefix=system)
    llm = LLM(model, num_blocks=64, block_size=4)
    first = llm.generate(prompts[0], GREEDY)[0]
    rest = llm.generate(prompts[1:], GREEDY)
    assert first.num_cached_tokens == 0
    assert [o.num_cached_tokens for o in rest] == [24, 24]
    assert [o.outputs[0].token_ids for o in rest] == [alone(model, p, 10) for p in prompts[1:]]


def test_a_prompt_seen_before_still_computes_its_last_block():
    """The prefix cache never serves the block of a prompt's last token: its logits pick the first
    new token, so the model computes that block again."""
    model = llama()
    prompt = random_prompts([16], seed=5)[0]  # 4 whole blocks
    llm = LLM(model, num_blocks=32, block_size=4)
    a, b = (llm.generate(prompt, GREEDY)[0] for _ in range(2))
    assert b.num_cached_tokens == 12 and a.outputs[0].token_ids == b.outputs[0].token_ids == alone(model, prompt, 10)


def test_aborted_requests_leave_and_the_others_go_on():
    model = llama()
    prompts = random_prompts([6, 9, 12], seed=6)
    llm = LLM(model, num_blocks=64, block_size=4)
    for i, p in enumerate(prompts):
        llm.add_request(str(i), p, GREEDY)
    llm.step()
    llm.step()
    llm.abort("1")
    outs = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            outs[o.request_id] = o
    assert outs["1"].outputs[0].finish_reason == "abort" and len(outs["1"].outputs[0].token_ids) == 2
    assert outs["0"].outputs[0].token_ids == alone(model, prompts[0], 10)
    assert outs["2"].outputs[0].token_ids == alone(model, prompts[2], 10)
    assert llm.cache.stats()["blocks_used"] == 0


def test_a_request_that_can_never_fit_fails_alone():
    model = llama()
    llm = LLM(model, num_blocks=8, block_size=4)  # 32 slots
    prompts = random_prompts([40, 6], seed=7)
    long, short = llm.generate(prompts, GREEDY)
    assert long.outputs[0].finish_reason == "error" and "40 tokens" in long.outputs[0].error
    assert short.outputs[0].token_ids == alone(model, prompts[1], 10)
    capped = llm.generate(random_prompts([28], seed=8), SamplingParams(max_tokens=50, temperature=0))[0]
    assert capped.outputs[0].finish_reason == "length" and len(capped.outputs[0].token_ids) == 4  # 32 slots


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = llama()
    prompts = random_prompts([7, 13, 5], seed=9)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=123, ignore_eos=True)
    alone_tokens = [LLM(model, num_blocks=64, block_size=4).generate(p, params)[0].outputs[0].token_ids
                    for p in prompts]
    together = LLM(model, num_blocks=64, block_size=4).generate(prompts[::-1], params)
    assert [o.outputs[0].token_ids for o in together][::-1] == alone_tokens


def test_n_completions_fork_the_prompt_and_share_its_blocks():
    """``n=3``: the prompt is computed once and forked; greedy, every completion is the model's own
    tokens; seeded, completion i is what a request alone gets with ``seed + i``; while they run
    the three hold the prompt's full blocks once; at the end the pool holds nothing."""
    model = llama()
    prompt = random_prompts([14], seed=21)[0]  # 3 full blocks of 4 and a partial one
    llm = LLM(model, num_blocks=64, block_size=4)
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, n=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [alone(model, prompt, 6)] * 3
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True, n=3)
    got = llm.generate(prompt, seeded)[0]
    for i, c in enumerate(got.outputs):
        one = LLM(model, num_blocks=64, block_size=4).generate(prompt, replace(seeded, n=1, seed=5 + i))[0]
        assert c.token_ids == one.outputs[0].token_ids and c.finish_reason == "length"
    assert len({tuple(c.token_ids) for c in got.outputs}) > 1  # three seeds, not one sample copied
    fresh = LLM(model, num_blocks=64, block_size=4, enable_prefix_caching=False)
    fresh.add_request("r", prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, n=3))
    fresh.step()  # the prompt and the forks' first tokens
    fresh.step()  # each fork writes its first token: a copy of the shared partial block each
    assert fresh.cache.stats()["blocks_used"] == 3 + 3  # full prompt blocks once, a last block each
    fresh.abort("r", index=1)
    outs = {}
    while fresh.has_unfinished_requests():
        for o in fresh.step():
            outs[o.request_id] = o
    assert [c.finish_reason for c in outs["r"].outputs] == ["length", "abort", "length"]
    assert len(outs["r"].outputs[1].token_ids) == 2 and len(outs["r"].outputs[2].token_ids) == 4
    fresh.cache.check()
    assert fresh.cache.stats()["blocks_used"] == 0


def test_the_engine_explains_where_a_prompts_blocks_come_from():
    model = llama()
    prompt = random_prompts([14], seed=22)[0]
    llm = LLM(model, num_blocks=64, block_size=4)
    before = llm.explain_prefix(prompt)
    assert [b.source for b in before.blocks] == ["never_seen"] * 3 + ["last"]
    llm.generate(prompt, GREEDY)
    after = llm.explain_prefix(prompt + [5])
    assert [b.source for b in after.blocks] == ["pool"] * 3 + ["last"] and after.num_cached_tokens == 12
    assert llm.explain_prefix(prompt, cache_salt="t").blocks[0].source == "other_salt"


def test_stop_tokens_and_streaming():
    model = llama()
    prompt = random_prompts([8], seed=10)[0]
    tokens = alone(model, prompt, 10)
    llm = LLM(model, num_blocks=64, block_size=4)
    out = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[tokens[3]]))[0]
    assert out.outputs[0].token_ids == tokens[:tokens.index(tokens[3]) + 1]
    assert out.outputs[0].finish_reason == "stop" and out.time_to_first_token > 0
    rid = llm.add_request(None, prompt, GREEDY)
    assert list(llm.stream(rid)) == tokens


def test_text_in_text_out(checkpoint, tmp_path):  # noqa: F811  (the fixture)
    llm = LLM(checkpoint, num_blocks=64, block_size=4)
    out = llm.generate(["w1 w2 w3 w4"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.prompt == "w1 w2 w3 w4" and out.outputs[0].text.startswith("w")
    assert len(out.outputs[0].token_ids) == 5
    with pytest.raises(pagedkv.ConfigError, match="no checkpoint directory"):
        LLM(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kw, match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"seed": "1"}, "seed"), ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
])
def test_sampling_params_are_checked(kw, match):
    with pytest.raises(pagedkv.ArgumentError, match=match):
        SamplingParams(**kw)


def test_bad_arguments_are_refused_before_anything_runs():
    model = llama()
    with pytest.raises(pagedkv.ConfigError, match="not both"):
        LLM(model, num_blocks=8, kv_cache_bytes=1 << 20)
    with pytest.raises(pagedkv.ArgumentError, match="max_num_batched_tokens"):
        LLM(model, num_blocks=8, max_num_seqs=8, max_num_batched_tokens=4)
    llm = LLM(model, num_blocks=8)
    with pytest.raises(pagedkv.ArgumentError, match="tokenizer"):
        llm.add_request(None, "text without a tokenizer")
    with pytest.raises(pagedkv.ArgumentError, match="vocabulary"):
        llm.add_request(None, [1, 500])
    llm.add_request("x", [1, 2])
    with pytest.raises(pagedkv.ArgumentError, match="exists"):
        llm.add_request("x", [3])


def test_a_bfloat16_model_runs_with_a_bfloat16_pool():
    model = llama(dtype=torch.bfloat16)
    llm = LLM(model, num_blocks=32, block_size=4)
    assert llm.cache.config.dtype == "bfloat16"
    out = llm.generate(random_prompts([9, 4], seed=11), GREEDY)
    assert all(len(o.outputs[0].token_ids) == 10 for o in out)


def test_sampling_params_import_no_torch():
    import subprocess
    import sys

    code = "import sys, pagedkv; pagedkv.SamplingParams(max_tokens=3); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_a_store_serves_a_prefix_to_another_engine(tmp_path):
    """Two engines (as two processes would) over one blocks directory: the second finds the
    first's prompt blocks there and computes only the rest, with the same tokens."""
    from pagedkv.offload.stores import DirectoryStore

    model = llama()
    prompt = random_prompts([22], seed=13)[0]  # 5 whole blocks of 4 before the last token's
    first = LLM(model, num_blocks=32, block_size=4, stores=[DirectoryStore(tmp_path, 1 << 20)])
    a = first.generate(prompt, GREEDY)[0]
    second = LLM(model, num_blocks=32, block_size=4, stores=[DirectoryStore(tmp_path, 1 << 20)])
    b = second.generate(prompt, GREEDY)[0]
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 20
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == alone(model, prompt, 10)


def test_requests_of_other_salts_never_share_blocks():
    model = llama()
    prompt = random_prompts([18], seed=14)[0]
    llm = LLM(model, num_blocks=32, block_size=4)
    outs = {}
    for rid, salt in (("a", "tenant-1"), ("b", "tenant-2"), ("c", "tenant-1")):
        llm.add_request(rid, prompt, GREEDY, cache_salt=salt)
        while llm.has_unfinished_requests():
            for o in llm.step():
                outs[o.request_id] = o
    assert [outs[r].num_cached_tokens for r in "abc"] == [0, 0, 16]
    assert outs["a"].outputs[0].token_ids == outs["b"].outputs[0].token_ids == outs["c"].outputs[0].token_ids


def unit_roundoff(name):
    """The largest relative error of storing a number in format ``name``: half a unit in the last
    place (2^-(mantissa bits + 1)); int8, half a step of absmax / 127 against the absmax."""
    from pagedkv.geometry.formats import get_format

    fmt = get_format(name)
    if fmt.is_float32:
        return 0.0
    return 1 / 254 if fmt.codec is None else 2.0 ** -(fmt.codec.man_bits + 1)


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8"])
def test_every_kv_storage_format_stays_within_its_rounding(kv_dtype):
    """A float32 model over a pool of each narrow format: the first new token's log-probabilities
    (the whole vocabulary) move from the float32 pool's by at most the format's unit roundoff u.
    Stored K and V are each off by at most u relatively; the logits are sums of V rows weighted by
    a softmax whose scores move by about u times their size, so with unit-scale activations the
    log-probabilities move by a fraction of u (0.07-0.25 u measured here, from float16's 3.6e-5 to
    fp8_e5m2's 1.1e-2). Greedy tokens are the float32 pool's here."""
    model = llama()
    prompts = random_prompts([30, 45], seed=20)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=128)
    exact = LLM(model, num_blocks=64, block_size=4).generate(prompts, params)
    narrow = LLM(model, num_blocks=64, block_size=4, kv_dtype=kv_dtype).generate(prompts, params)
    for a, b in zip(narrow, exact, strict=True):
        got, want = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert set(got) == set(want) == set(range(128))
        assert max(abs(got[t] - want[t]) for t in want) <= unit_roundoff(kv_dtype)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_a_bfloat16_model_is_within_bfloat16s_rounding_of_float32():
    """The same weights in bfloat16 (its own bfloat16 pool): the first new token's log-probabilities
    within 2^-7 (two of bfloat16's unit roundoffs: the weights and every layer's activations are
    rounded, not only K and V; 3.0e-3 measured) of the float32 model's."""
    prompts = random_prompts([30, 45], seed=20)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=128)
    exact = LLM(llama(), num_blocks=64, block_size=4).generate(prompts, params)
    bf16 = LLM(llama(dtype=torch.bfloat16), num_blocks=64, block_size=4).generate(prompts, params)
    for a, b in zip(bf16, exact, strict=True):
        got, want = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert max(abs(got[t] - want[t]) for t in want) <= 2.0 ** -7


def test_logprobs_name_the_chosen_token_and_the_most_likely():
    model = llama()
    out = LLM(model, num_blocks=32, block_size=4).generate(
        random_prompts([9], seed=21)[0], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.outputs[0].logprobs) == 4
    for token, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True):
        assert token in lp and len(lp) == 3 and lp[token] == max(lp.values()) <= 0  # greedy: the most likely


def test_a_long_offline_run_shows_progress(capsys):
    model = llama()
    llm = LLM(model, num_blocks=64, block_size=4)
    outs = llm.generate(random_prompts([5, 6, 7], seed=22), GREEDY, use_tqdm=True)
    assert [len(o.outputs[0].token_ids) for o in outs] == [10, 10, 10]
    assert "3/3" in capsys.readouterr().err
    with pytest.raises(pagedkv.ArgumentError, match="no request"):
        next(llm.stream("never-added"))
