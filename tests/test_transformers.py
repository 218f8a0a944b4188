"""pagedkv as the KV cache of transformers models: the tokens generated are transformers' own.

Tiny models with random weights, built from a config (nothing is downloaded); every
test compares ``generate`` with a :class:`PagedCache` against ``generate`` with
transformers' default cache, token for token.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pagedkv  # noqa: E402
from pagedkv.integrations.transformers import PagedCache  # noqa: E402


def llama(kv_heads=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def prompts(rows=3, length=11, seed=1):
    ids = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


def both(model, cache, ids, mask, **kw):
    """(transformers' tokens, the tokens with ``cache``), sampling from the same seed."""
    kw = {"max_new_tokens": 12, "pad_token_id": 0, **kw}
    torch.manual_seed(7)
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    got = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kw)
    return want.tolist(), got.tolist()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_greedy_batched_prompts_are_token_identical(kv_heads):
    model = llama(kv_heads)
    cache = PagedCache(model.config, block_size=4)
    want, got = both(model, cache, *prompts(), do_sample=False)
    assert got == want
    memory = cache.memory()
    assert memory["used_bytes"] >= memory["dense_bytes"] > 0  # whole blocks: at most a block more per row
    cache.kv.manager.check()


def test_sampling_and_several_return_sequences_are_token_identical():
    model = llama()
    assert both(model, PagedCache(model.config), *prompts(), do_sample=True, top_k=20) == \
        both(model, None, *prompts(), do_sample=True, top_k=20)
    want, got = both(model, PagedCache(model.config, block_size=4), *prompts(), do_sample=True,
                     num_return_sequences=3)
    assert got == want


def test_beam_search_forks_instead_of_copying():
    model = llama()
    cache = PagedCache(model.config, block_size=4)
    want, got = both(model, cache, *prompts(), num_beams=4, num_return_sequences=2, do_sample=False)
    assert got == want
    stats = cache.kv.stats()
    rows, length = stats["sequences"], cache.get_seq_length()
    assert rows == 12
    assert stats["blocks_used"] < rows * -(-length // 4)  # beams share their prompt's blocks
    cache.kv.manager.check()


def test_a_bfloat16_model_is_stored_exactly():
    model = llama(dtype=torch.bfloat16)
    cache = PagedCache(model.config)
    want, got = both(model, cache, *prompts(), do_sample=False)
    assert got == want
    assert cache.kv.config.dtype == "bfloat16"


def test_sliding_window_and_soft_capping_follow_the_model():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                       max_position_embeddings=256)
    model = transformers.Gemma2ForCausalLM(config).eval()
    want, got = both(model, PagedCache(model.config, block_size=4), *prompts(), do_sample=False)
    assert got == want


def gemma2(window=8, layers=4):
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       sliding_window=window, max_position_embeddings=256)
    return transformers.Gemma2ForCausalLM(config).eval()


def test_sliding_layers_free_what_leaves_the_window_and_stay_token_identical():
    """Gemma 2 alternates sliding (window 8) and full layers: two layer groups, the sliding one
    handing the model only the blocks its window reaches; greedy, sampled and beam search
    (forks in both groups) give transformers' own tokens."""
    model = gemma2()
    for kw in ({"do_sample": False}, {"do_sample": True, "top_k": 20}, {"num_beams": 3, "do_sample": False}):
        cache = PagedCache(model.config, block_size=4)
        want, got = both(model, cache, *prompts(), max_new_tokens=30, **kw)
        assert got == want, kw
        assert [g.sliding_window for g in cache.kv.config.layer_groups] == [8, None]
        sliding, full = cache.kv.stats()["blocks_per_group"]
        assert sliding < full  # 41 tokens a row: the full layers hold 11 blocks a row, the sliding ones 3
        for m in cache.kv.managers:
            m.check()
    memory = cache.memory()
    assert memory["used_bytes"] < memory["dense_bytes"]  # fewer bytes than a dense cache of every layer


SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


def architecture(name):
    """A tiny random model of another family: Qwen3 (full layers, q/k norms), Qwen2 with its last two
    of four layers sliding (window 8), Mistral with every layer sliding (a ``sliding_window`` and no
    ``layer_types``)."""
    torch.manual_seed(0)
    if name == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_hidden_layers=2, head_dim=16, **SMALL))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2, **SMALL))
    return transformers.MistralForCausalLM(transformers.MistralConfig(num_hidden_layers=2, sliding_window=8, **SMALL))


# the sliding-window groups each family gets: (window, layers) per group
GROUPS = {"qwen3": [(None, (0, 1))], "qwen2": [(8, (2, 3)), (None, (0, 1))], "mistral": [(8, (0, 1))]}


@pytest.mark.parametrize("name", list(GROUPS))
def test_other_families_are_token_identical_and_slide_as_their_configs_say(name):
    """Greedy and beam search give transformers' own tokens. Logits: where the model reads the
    same keys as with the default cache (Qwen3) they are bit for bit; a sliding layer's keys are
    the window's whole blocks here and the window's tokens in transformers' sliding cache, so
    sdpa sums over another number of (masked) keys, and float32 reassociation moves a logit of
    order 0.1-1 by an ulp or two (6e-8 measured): within 1e-6."""
    model = architecture(name).eval()
    ids, mask = prompts()
    for kw in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
        cache = PagedCache(model.config, block_size=4)
        kw = {**kw, "max_new_tokens": 30, "pad_token_id": 0, "output_logits": True, "return_dict_in_generate": True}
        want = model.generate(input_ids=ids, attention_mask=mask, **kw)
        got = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kw)
        assert got.sequences.tolist() == want.sequences.tolist(), kw
        for a, b in zip(want.logits, got.logits, strict=True):
            if name == "qwen3":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        assert [(g.sliding_window, g.layers) for g in cache.kv.config.layer_groups] == GROUPS[name]
        for m in cache.kv.managers:
            m.check()
        memory = cache.memory()
        if name != "qwen3":  # 41 tokens a row: the sliding layers keep 3 blocks of 4 a row
            assert memory["used_bytes"] < memory["dense_bytes"]


def test_a_sliding_model_reuses_a_cached_prefix():
    model = gemma2(window=8)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 128, (1, 40), generator=g)
    first = torch.cat([prefix, torch.randint(0, 128, (1, 7), generator=g)], 1).repeat(2, 1)
    second = torch.cat([prefix, torch.randint(0, 128, (1, 5), generator=g)], 1).repeat(2, 1)
    cache = PagedCache(model.config, block_size=8, prompt_ids=first)
    want, got = both(model, cache, first, torch.ones_like(first), do_sample=False)
    assert got == want
    cache.reset()
    again = cache.new_cache(second)
    assert again.cached_tokens == 40  # the full layers' five blocks; the sliding ones only need the window's
    want, got = both(model, again, second, torch.ones_like(second), do_sample=False)
    assert got == want


def test_a_second_generate_reuses_the_cached_prefix_and_says_so():
    model = llama()
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 128, (1, 40), generator=g)
    first = torch.cat([prefix, torch.randint(0, 128, (1, 7), generator=g)], 1).repeat(2, 1)
    second = torch.cat([prefix, torch.randint(0, 128, (1, 5), generator=g)], 1).repeat(2, 1)
    second[1, -1] = 3
    for kw in ({"do_sample": False}, {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}):
        cache = PagedCache(model.config, block_size=8, prompt_ids=first)
        want, got = both(model, cache, first, torch.ones_like(first), **kw)
        assert got == want
        cache.reset()
        again = cache.new_cache(second)
        assert again.cached_tokens == 40 and again.get_seq_length() == 40  # five whole blocks of the prefix
        want, got = both(model, again, second, torch.ones_like(second), **kw)
        assert got == want
        assert again.kv.stats()["prefix_hits"] > 0
        again.reset()


def test_crop_rolls_every_row_back():
    model = llama()
    cache = PagedCache(model.config, block_size=4)
    both(model, cache, *prompts(), do_sample=False)
    length = cache.get_seq_length()
    cache.crop(-5)
    assert cache.get_seq_length() == length - 5
    assert all(cache.kv.manager.context_len(s) == length - 5 for s in cache.seq_ids)
    cache.kv.manager.check()


def test_crop_follows_transformers_meaning():
    """crop(0) does nothing and a positive count raises, as transformers' own layers (5.24 on). Before,
    crop(0) emptied every row, and prompt lookup (which calls it after each step) gave other tokens."""
    model = llama()
    cache = PagedCache(model.config, block_size=4)
    both(model, cache, *prompts(), do_sample=False)
    length = cache.get_seq_length()
    cache.crop(0)
    assert cache.get_seq_length() == length
    assert all(cache.kv.manager.context_len(s) == length for s in cache.seq_ids)
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(3)
    assert cache.get_seq_length() == length
    dense = transformers.DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="positive value"):  # the same answer as transformers' own cache
        model(input_ids=prompts()[0], cache=dense)
        dense.crop(3)
    cache.crop(-(length + 4))  # more than there is: nothing left, as DynamicCache
    assert cache.get_seq_length() == 0
    cache.kv.manager.check()


ASSISTED = {"prompt lookup 2": lambda: {"prompt_lookup_num_tokens": 2},
            "prompt lookup 4": lambda: {"prompt_lookup_num_tokens": 4},
            "assistant model": lambda: {"assistant_model": llama(seed=3)}}  # generate's arguments, made fresh
REPETITIVE = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 9, 5, 6, 7]]  # prompt lookup finds candidates in it


@pytest.mark.parametrize("how", list(ASSISTED))
def test_assisted_decoding_is_token_identical(how):
    """Prompt lookup (``generate`` crops rejected candidates, and calls crop(0), after each step) and
    an assistant model (a smaller model drafting tokens): the tokens of DynamicCache and of plain
    greedy decoding."""
    model = llama()
    kw = ASSISTED[how]()
    ids = torch.tensor(REPETITIVE)
    cache = PagedCache(model.config, block_size=4)
    want, got = both(model, cache, ids, torch.ones_like(ids), do_sample=False, max_new_tokens=16, **kw)
    assert got == want == both(model, None, ids, torch.ones_like(ids), do_sample=False, max_new_tokens=16)[0]
    cache.kv.manager.check()


def test_bad_input_is_refused_clearly():
    model = llama()
    with pytest.raises(pagedkv.ConfigError, match="num_hidden_layers"):
        PagedCache(object())
    with pytest.raises(pagedkv.ConfigError, match="max_tokens"):
        PagedCache(model.config, max_tokens=0)
    cache = PagedCache(model.config)
    with pytest.raises(pagedkv.ArgumentError, match="generate with it first"):
        cache.new_cache([[1, 2, 3]])
    ids, mask = prompts()
    model(input_ids=ids, attention_mask=mask, cache=cache)
    with pytest.raises(pagedkv.ArgumentError, match="holds 3 sequences"):
        model(input_ids=ids[:2, :1], cache=cache)
    small = PagedCache(model.config, max_tokens=8, block_size=4)
    with pytest.raises(pagedkv.OutOfBlocksError):
        model(input_ids=ids, attention_mask=mask, cache=small)
    assert small.kv.stats()["blocks_used"] == 0  # nothing half-done


@pytest.mark.parametrize("kw, match", [
    ({"block_size": 0}, "block_size"), ({"block_size": "16"}, "block_size"), ({"block_size": True}, "block_size"),
    ({"block_size": -4}, "block_size"), ({"block_size": 2.5}, "block_size"), ({"max_tokens": True}, "max_tokens"),
    ({"dtype": "float64"}, "unknown KV storage format"), ({"backend": "cuda"}, "backend"),
    ({"backend": 3}, "backend"), ({"share": "other"}, "share"),
    ({"stores": [pagedkv.offload.stores.HostStore(1 << 20)], "prompt_ids": [[1, 2]]}, "model_id"),
    ({"stores": [pagedkv.offload.stores.HostStore(1 << 20)], "prompt_ids": [[1, 2]], "model_id": ""}, "model_id"),
    ({"stores": [pagedkv.offload.stores.HostStore(1 << 20)], "model_id": "m"}, "prompt_ids"),
])
def test_every_constructor_argument_is_checked(kw, match):
    """Before, block_size=0 raised ZeroDivisionError, "16" a TypeError, and True was taken as 1."""
    model = llama()
    with pytest.raises(pagedkv.ConfigError, match=match):
        cache = PagedCache(model.config, **kw)
        model(input_ids=prompts()[0], cache=cache)  # a check left for the first update would show here


def test_the_model_id_tells_weights_apart():
    from pagedkv.integrations.transformers import model_id

    base, tuned, again = llama(), llama(seed=1), llama()
    assert model_id(base) == model_id(again) != model_id(tuned)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.copy_(base.model.layers[0].mlp.down_proj.weight)
    assert model_id(tuned) != model_id(base)  # every other tensor still differs


def test_two_models_of_one_geometry_share_a_store_and_get_only_their_own_blocks(tmp_path):
    """A base model and a 'fine-tune' (other weights) over one blocks directory: each loads only the
    prefixes it computed itself, and generates DynamicCache's tokens."""
    store = pagedkv.offload.stores.DirectoryStore(tmp_path, max_bytes=1 << 26)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    kw = {"do_sample": False, "max_new_tokens": 4, "pad_token_id": 0}
    for model in (llama(), llama(seed=1)):
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).tolist()
        for run in range(2):
            cache = PagedCache(model.config, block_size=4, prompt_ids=ids, stores=[store], model_id=model)
            got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **kw).tolist()
            assert got == want
            assert cache.cached_tokens == (16 if run else 0)  # the second run loads its own prefix
            cache.kv.end_step()
            cache.reset()
    model = llama()
    model.config.dtype = torch.bfloat16  # a config that says another dtype than the model runs in
    cache = PagedCache(model.config, block_size=4, prompt_ids=ids, stores=[store], model_id=model)
    with pytest.raises(pagedkv.ArgumentError, match="pass dtype="):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **kw)


def test_layers_pagedkv_does_not_serve_are_refused_before_anything_is_stored():
    """Cross-attention and layer kinds other than full and sliding attention: a ConfigError that
    names what is served, from the constructor."""
    with pytest.raises(pagedkv.ConfigError, match="encoder-decoder"):
        PagedCache(transformers.T5Config(num_layers=2, num_decoder_layers=2))
    config = transformers.LlamaConfig(num_hidden_layers=3)
    config.attention_chunk_size = 8  # and no layer_types: Llama 4's chunked attention in every layer
    with pytest.raises(pagedkv.ConfigError, match="layer 0 is 'chunked_attention'.*full_attention, sliding_attention"):
        PagedCache(config)
    config.attention_chunk_size, config.sliding_window = None, 8
    for kinds, match in ((["full_attention", "chunked_attention", "full_attention"], "layer 1 is 'chunked_attention'"),
                         (["sliding_attention", "full_attention", "linear_attention"], "layer 2 is 'linear_attention'"),
                         (["full_attention"], "1 entries for 3 layers")):
        config.layer_types = kinds
        with pytest.raises(pagedkv.ConfigError, match=match):
            PagedCache(config)
    config.layer_types, config.kv_sharing_modes = ["full_attention"] * 3, [None, None, "reuse"]  # Gemma 4's sharing
    with pytest.raises(pagedkv.ConfigError, match="kv_sharing_modes"):
        PagedCache(config)
    config.kv_sharing_modes = None
    config.sliding_window, config.layer_types = None, ["sliding_attention"] * 3
    with pytest.raises(pagedkv.ConfigError, match="sliding_window is None"):
        PagedCache(config)


def test_import_pagedkv_imports_neither_torch_nor_transformers():
    others = "{'torch', 'transformers', 'fastapi', 'uvicorn', 'openai'}"
    code = f"import sys, pagedkv; print(sorted({others} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def save_checkpoint(path, words=(), chat_template=None) -> str:
    """A tiny Llama and a word-level tokenizer (``[PAD]``, ``[UNK]``, ``[EOS]``, ``words``, then
    ``w0``, ``w1``... up to 64 words) saved as a checkpoint directory at ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]", *words]
    words += [f"w{i}" for i in range(64 - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                     eos_token="[EOS]")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=2, pad_token_id=0, bos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer saved as a checkpoint directory."""
    return save_checkpoint(tmp_path_factory.mktemp("checkpoint"))


def _continuation(checkpoint, prompt, **kw):
    from pagedkv.integrations.generate import load

    tokenizer, model = load(checkpoint)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_the_generate_command_streams_the_models_own_tokens(checkpoint, capsys):
    from pagedkv.tools.cli import main

    assert main(["generate", "--model", checkpoint, "--prompt", "w3 w4 w5", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert _continuation(checkpoint, "w3 w4 w5", max_new_tokens=6).strip() in out
    assert "tokens/s" in out and "a dense cache" in out
    assert main(["generate", "--model", checkpoint, "--prompt", "w3 w4 w5", "--max-new-tokens", "5",
                 "--num-beams", "2"]) == 0
    assert _continuation(checkpoint, "w3 w4 w5", max_new_tokens=5, num_beams=2).strip() in capsys.readouterr().out
    assert main(["generate", "--model", checkpoint, "--prompt", "w3 w4 w5", "--max-new-tokens", "6",
                 "--attention", "pagedkv"]) == 0  # pagedkv's kernels as the attention: the same tokens here
    out = capsys.readouterr().out
    assert _continuation(checkpoint, "w3 w4 w5", max_new_tokens=6).strip() in out and "attention: pagedkv" in out


def test_a_batch_of_prompts_computes_a_shared_prefix_once(checkpoint, tmp_path, capsys):
    from pagedkv.tools.cli import main

    prefix = " ".join(f"w{i}" for i in range(40))
    batch = tmp_path / "prompts.txt"
    batch.write_text(f"{prefix} w1 w2\n\n{prefix} w5\n")
    assert main(["generate", "--model", checkpoint, "--batch", str(batch), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out  # one continuous batch: both prompts start together, each computed
    assert "2 prompts in one continuous batch" in out and "0 prompt tokens not computed" in out
    assert _continuation(checkpoint, f"{prefix} w1 w2", max_new_tokens=4).strip() in out
    assert _continuation(checkpoint, f"{prefix} w5", max_new_tokens=4).strip() in out
    assert main(["generate", "--model", checkpoint, "--batch", str(batch), "--max-new-tokens", "4",
                 "--max-num-seqs", "1"]) == 0  # one at a time: the second finds the first's blocks
    out = capsys.readouterr().out
    assert "32 prompt tokens not computed" in out  # two whole blocks of 16 of the 40 shared tokens
    assert _continuation(checkpoint, f"{prefix} w5", max_new_tokens=4).strip() in out
    assert main(["generate", "--model", checkpoint, "--batch", str(batch), "--max-new-tokens", "2", "--explain"]) == 0
    out = capsys.readouterr().out  # each prompt explained as it is added (nothing cached yet)
    assert "0 of 42 prompt tokens cached" in out and "never_seen" in out and "partial: 6 tokens short" in out
    assert main(["generate", "--model", checkpoint, "--batch", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_generate_command_says_what_is_wrong_without_a_traceback(checkpoint, tmp_path, capsys):
    """Each bad argument: exit 2 and one 'pagedkv: error:' line saying what was wrong. Before,
    a missing directory, a directory without a tokenizer, a batch file that is not UTF-8 and an
    empty prompt each ended in a traceback."""
    from pagedkv.tools.cli import main

    from .test_cli import run

    no_tokenizer = tmp_path / "model-only"
    shutil.copytree(checkpoint, no_tokenizer)
    for name in os.listdir(no_tokenizer):
        if "token" in name or name == "vocab.json":
            os.remove(no_tokenizer / name)
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"w1 w2\n\xff\xfe w3\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for args, words in (
        (["--model", str(tmp_path / "missing"), "--prompt", "w1"], "no checkpoint directory"),
        (["--model", str(no_tokenizer), "--prompt", "w1"], "holds no tokenizer"),
        (["--model", str(empty_dir), "--prompt", "w1"], "holds no tokenizer"),
        (["--model", checkpoint, "--batch", str(binary)], "is not UTF-8"),
        (["--model", checkpoint, "--batch", str(tmp_path / "nope.txt")], "cannot read"),
        (["--model", checkpoint, "--prompt", ""], "empty"),
        (["--model", checkpoint, "--prompt", "w1", "--max-new-tokens", "-3"], "not positive"),
    ):
        with pytest.raises(SystemExit) if "not positive" in words else contextlib.nullcontext():
            assert main(["generate", *args]) == 2, args  # an exception here would be the traceback
        err = capsys.readouterr().err
        assert words in err and re.search(r"^pagedkv( generate)?: error: ", err, re.M), (args, err)
    out = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "w1", timeout=120)  # as a user runs it
    assert out.returncode == 2 and "Traceback" not in out.stderr and "no checkpoint directory" in out.stderr
