"""attn_implementation="pagedkv": pagedkv's kernels as a transformers model's attention, over the pool.

Tiny random models built from configs (nothing downloaded). Attention runs in float32 in
pagedkv's kernels instead of torch's, so these tests ask for transformers' own tokens (greedy
and beam search, against sdpa with the default cache) and logits within 1e-4: the kernels'
sums are reassociated (float32 rounding, a few ulp of values of order 1), which two layers of a
64-wide model keep well below that.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402

import pagedkv  # noqa: E402
from pagedkv.integrations.hf_attention import register  # noqa: E402
from pagedkv.integrations.transformers import PagedCache  # noqa: E402

from .test_transformers import ASSISTED, GROUPS, REPETITIVE, architecture  # noqa: E402

LOGITS_ATOL = 1e-4

register()


def llama(kv_heads=2, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def prompts():
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left-padded rows
    mask[2, :9] = 0
    return ids, mask


def both(model, ids, mask, **kw):
    """transformers' generate (sdpa, default cache) and pagedkv's (its attention over a PagedCache)."""
    kw = {"max_new_tokens": 12, "pad_token_id": 0, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True, **kw}
    model.set_attn_implementation("sdpa")
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    model.set_attn_implementation("pagedkv")
    cache = PagedCache(model.config, block_size=4)
    got = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kw)
    model.set_attn_implementation("sdpa")
    return want, got, cache


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_greedy_tokens_are_transformers_own_and_padding_is_not_stored(kv_heads):
    want, got, cache = both(llama(kv_heads), *prompts())
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(want.logits, got.logits, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=LOGITS_ATOL)
    assert cache.padding == [0, 4, 9]
    lens = [cache.kv.manager.context_len(s) for s in cache.seq_ids]
    assert lens == [11 + 11, 7 + 11, 2 + 11]  # the real tokens only (the last new token is not stored yet)
    memory = cache.memory()
    assert memory["used_bytes"] < memory["dense_bytes"]  # unequal prompts take only the blocks they need
    cache.kv.manager.check()


def test_beam_search_is_transformers_own():
    want, got, cache = both(llama(), *prompts(), num_beams=3, output_logits=False)
    assert got.sequences.tolist() == want.sequences.tolist()
    cache.kv.manager.check()


def test_soft_capping_follows_the_model():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       attn_logit_softcapping=0.05, layer_types=["full_attention"] * 2,
                                       attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids, mask = prompts()
    kw = {"max_new_tokens": 8, "pad_token_id": 0, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True}
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    model.set_attn_implementation("pagedkv")
    got = model.generate(input_ids=ids, attention_mask=mask, cache=PagedCache(model.config), **kw)
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(want.logits, got.logits, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=LOGITS_ATOL)


def test_sliding_windows_follow_the_model_and_free_blocks():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                                       attn_logit_softcapping=0.05, attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config).eval()
    assert "sliding_attention" in config.layer_types
    ids, mask = prompts()
    kw = {"max_new_tokens": 14, "pad_token_id": 0, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True}
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    model.set_attn_implementation("pagedkv")
    cache = PagedCache(model.config, block_size=4)
    got = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kw)
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(want.logits, got.logits, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=LOGITS_ATOL)
    sliding, full = cache.kv.stats()["blocks_per_group"]
    assert sliding < full  # the sliding layers gave back what left their window
    cache.kv.manager.check()


@pytest.mark.parametrize("name", list(GROUPS))
def test_other_families_are_transformers_own(name):
    """Qwen3, Qwen2 with sliding layers and Mistral sliding in every layer (its window passed to the
    kernel by the model's attention): transformers' tokens, logits within 1e-4, and the sliding
    layers' blocks freed as they leave the window."""
    model = architecture(name).eval()
    want, got, cache = both(model, *prompts(), max_new_tokens=20)
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(want.logits, got.logits, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=LOGITS_ATOL)
    assert [(g.sliding_window, g.layers) for g in cache.kv.config.layer_groups] == GROUPS[name]
    if name != "qwen3":
        assert cache.memory()["used_bytes"] < cache.memory()["dense_bytes"]
    for m in cache.kv.managers:
        m.check()


def test_a_second_generate_reuses_the_cached_prefix():
    model = llama()
    first = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(3))
    second = torch.cat([first[:, :16], torch.tensor([[5, 6, 7]])], dim=1)  # shares four blocks of 4
    kw = {"max_new_tokens": 6, "pad_token_id": 0, "do_sample": False}
    want = [model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw).tolist() for x in (first, second)]
    model.set_attn_implementation("pagedkv")
    cache = PagedCache(model.config, block_size=4, prompt_ids=first)
    got = [model.generate(input_ids=first, attention_mask=torch.ones_like(first), cache=cache, **kw)]
    cache.reset()
    reuse = cache.new_cache(second)
    assert reuse.cached_tokens == 16
    got.append(model.generate(input_ids=second, attention_mask=torch.ones_like(second), cache=reuse, **kw))
    assert [g.tolist() for g in got] == want


def test_crop_rolls_back_each_rows_real_tokens():
    model = llama()
    _, _, cache = both(model, *prompts(), max_new_tokens=4, output_logits=False)
    cache.crop(-2)
    assert [cache.kv.manager.context_len(s) for s in cache.seq_ids] == [11 + 3 - 2, 7 + 3 - 2, 2 + 3 - 2]
    assert cache.get_seq_length() == 11 + 3 - 2


@pytest.mark.parametrize("how", list(ASSISTED))
def test_assisted_decoding_gives_transformers_own_tokens(how):
    """Prompt lookup and an assistant model with pagedkv's attention: crop rolls back what the
    model rejected (and crop(0) nothing), so the tokens are those of sdpa with the default cache."""
    kw = ASSISTED[how]()
    ids = torch.tensor(REPETITIVE)
    want, got, cache = both(llama(), ids, torch.ones_like(ids), max_new_tokens=16, output_logits=False,
                            return_dict_in_generate=False, **kw)
    assert got.tolist() == want.tolist()
    cache.kv.manager.check()


def test_what_it_cannot_serve_is_refused_before_anything_is_stored():
    model = llama()
    model.set_attn_implementation("pagedkv")
    ids, mask = prompts()
    with pytest.raises(pagedkv.ConfigError, match="needs a PagedCache"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # gpt-oss's attention sinks
    with pytest.raises(pagedkv.ConfigError, match="sinks"):
        model.generate(input_ids=ids, attention_mask=mask, cache=PagedCache(model.config),
                       max_new_tokens=2, pad_token_id=0)
    del model.model.layers[0].self_attn.sinks
    cache = PagedCache(model.config, prompt_ids=ids)
    with pytest.raises(pagedkv.ConfigError, match="prompt_ids"):
        model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=2, pad_token_id=0)
    assert cache.kv is not None and cache.kv.stats()["blocks_used"] == 0  # refused before a block was taken


def test_a_layer_whose_mask_disagrees_with_the_first_layers_is_refused():
    from pagedkv.integrations.hf_attention import pagedkv_attention_forward

    model = llama()
    model.set_attn_implementation("pagedkv")
    cache, attn = PagedCache(model.config), model.model.layers[0].self_attn
    q, new = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 3, 16)
    causal = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()
    padded = causal.clone()
    padded[1, 0, :, 0] = False  # row 1's first token is padding: no token attends to it, itself included
    k, v = cache.paged_layers[0].update(new, new)
    pagedkv_attention_forward(attn, q, k, v, causal)
    before = cache.kv.pool.data.copy()
    as_float = torch.zeros(padded.shape).masked_fill(~padded, float("-inf"))  # the same mask, additive
    for mask in (padded, as_float, causal[:, :, :2, :2]):
        k, v = cache.paged_layers[1].update(new, new)
        with pytest.raises(pagedkv.PagedKVError, match="padding|mask"):
            pagedkv_attention_forward(attn, q, k, v, mask)
    assert cache.written == {0}
    np.testing.assert_array_equal(cache.kv.pool.data, before)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16, torch.float16])
def test_the_padding_is_read_off_the_masks_diagonal_whatever_its_dtype(dtype):
    from pagedkv.integrations.hf_attention import _real_tokens

    allowed = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril(diagonal=2)  # 3 new tokens after 2 cached ones
    allowed[1, 0, :, 2] = False  # row 1's first new token is padding
    mask = allowed if dtype == torch.bool else torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, -1e4)
    assert _real_tokens(mask, 2, 3).tolist() == [[True] * 3, [False, True, True]]
    assert _real_tokens(mask[:1], 1, 3) is None  # no padding: None, and nothing to pick
    assert _real_tokens(None, 2, 3) is None
    with pytest.raises(pagedkv.ArgumentError, match="mask"):
        _real_tokens(mask, 2, 2)
