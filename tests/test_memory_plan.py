"""plan_memory and pagedkv plan: every figure equals what a pool of the plan really takes and holds.

For Llama (full layers), Gemma 2 (sliding and full layers alternating) and Mistral (every layer
sliding), in every storage format: the planned pool is allocated and its bytes compared; one
sequence is run to max_model_len through PagedKVCache, its prompt in chunks, and the blocks each
layer group holds are compared with the plan at every step; the engine's own pool for the same
arguments is the plan's; as many sequences as the plan says fit run at once, and one more does not.
"""

import json

import numpy as np
import pytest

from pagedkv import CacheConfig, OutOfBlocksError, PagedKVCache
from pagedkv.geometry.formats import FORMATS
from pagedkv.geometry.memory_plan import blocks_held
from pagedkv.geometry.memory_plan import plan_memory as plan_pool

transformers = pytest.importorskip("transformers")

from pagedkv.integrations.plan import plan_memory  # noqa: E402
from pagedkv.tools.cli import main  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=96)


def configs():
    return {
        "llama": transformers.LlamaConfig(num_hidden_layers=2, **SMALL),
        "gemma2": transformers.Gemma2Config(num_hidden_layers=4, sliding_window=10, **SMALL),
        "mistral": transformers.MistralConfig(num_hidden_layers=2, sliding_window=12, **SMALL),
    }


def run(cache, prompt_len, total, chunk, check):
    """One sequence: its prompt in chunks of ``chunk``, then decode steps to ``total`` tokens;
    ``check(tokens, first_query)`` after every step."""
    seq = cache.add_sequence().seq_id
    done = 0
    while done < total:
        n = min(chunk, prompt_len - done) if done < prompt_len else 1
        cache.begin_step([seq], [n])
        cache.end_step()
        check(done + n, done)
        done += n
    return seq


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral"])
def test_the_plan_is_the_pool(name, dtype):
    config = configs()[name]
    plan = plan_memory(config, kv_dtype=dtype, max_model_len=64, max_num_seqs=3, block_size=4, chunk=16)
    cache = PagedKVCache(plan.config, "numpy")
    pool = cache.pool
    scales = 0 if pool.scales is None else pool.host_scales.nbytes
    tensor_scales = 0 if pool.kv_scales is None else pool.kv_scales.nbytes
    assert plan.pool_bytes == pool.host.nbytes + scales + tensor_scales
    assert plan.bytes_per_block * plan.config.num_blocks + tensor_scales == plan.pool_bytes
    assert plan.config.num_blocks == plan.blocks_needed
    groups = plan.config.layer_groups
    assert [g.layers for g in plan.groups] == [g.layers for g in groups]
    per_group = []

    def check(tokens, first):
        held = cache.stats().get("blocks_per_group", [cache.stats()["blocks_used"]])
        per_group.append(held)
        for g, h in zip(plan.groups, held, strict=True):
            assert h == blocks_held(tokens, first, 4, g.sliding_window)

    run(cache, 40, 64, 16, check)
    assert per_group[-1] == [g.blocks_at_length for g in plan.groups]
    assert all(max(h[i] for h in per_group) <= g.blocks_worst for i, g in enumerate(plan.groups))
    for _ in range(2):  # the plan's three sequences at their worst fit in its pool
        run(cache, 40, 64, 16, lambda tokens, first: None)
    assert cache.stats()["blocks_used"] <= plan.blocks_needed


@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral"])
def test_a_budget_makes_the_engines_pool_and_fits_what_it_says(name):
    torch = pytest.importorskip("torch")
    from pagedkv import LLM

    config = configs()[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    budget = 40_000
    plan = plan_memory(config, kv_dtype="bfloat16", max_model_len=48, block_size=4, kv_cache_bytes=budget, chunk=8)
    llm = LLM(model, kv_dtype="bfloat16", block_size=4, kv_cache_bytes=budget, max_num_seqs=8, max_num_batched_tokens=8)
    assert llm.cache.config == plan.config and plan.pool_bytes <= budget < plan.pool_bytes + plan.bytes_per_block
    cache = PagedKVCache(plan.config, "numpy")
    for _ in range(plan.max_sequences):  # each at its worst: all fit...
        run(cache, 48, 48, 8, lambda tokens, first: None)
    with pytest.raises(OutOfBlocksError):  # ...and one more does not, for full attention
        if name == "mistral":  # a sliding group's worst is its window: blocks come back; fill it to the end
            for _ in range(plan.config.num_blocks):
                run(cache, 48, 48, 8, lambda tokens, first: None)
        run(cache, 48, 48, 8, lambda tokens, first: None)


def test_a_shared_prefix_is_held_once():
    config = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=1, block_size=4)
    alone = plan_pool(config, max_model_len=64, max_num_seqs=8)
    shared = plan_pool(config, max_model_len=64, max_num_seqs=8, shared_prefix=30)
    assert alone.blocks_needed == 8 * 16 and shared.blocks_needed == 8 * 16 - 7 * 7  # 7 full blocks of the 30
    cache = PagedKVCache(shared.config, "numpy")
    prefix = list(range(1, 31))
    for i in range(8):
        prompt = prefix + [100 + i] * 34
        seq = cache.add_sequence(prompt_token_ids=prompt)
        cache.begin_step([seq.seq_id], [64 - seq.num_cached_tokens], token_ids=[prompt[seq.num_cached_tokens:]])
        cache.end_step()
    assert cache.stats()["blocks_used"] == shared.blocks_needed == shared.config.num_blocks
    assert shared.max_sequences_shared == 8 and alone.max_sequences == 8


def test_token_occupancy_against_block_usage():
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=1, block_size=16)
    plan = plan_pool(config, max_model_len=17)
    assert plan.groups[0].blocks_at_length == 2 and np.isclose(plan.token_occupancy, 17 / 32)


def test_the_command_prints_the_plan(tmp_path, capsys):
    configs()["gemma2"].save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--kv-dtype", "int8", "--max-model-len", "64",
                 "--max-num-seqs", "4", "--block-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "sliding window 10" in out and "full attention" in out and "4 sequences at once" in out
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--max-model-len", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["dtype"] == "float32" and len(data["groups"]) == 2
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
    assert "no model config" in capsys.readouterr().err
