"""pagedkv verify: anyone's kernel, imported by name, checked by the conformance kit from the command line."""

import textwrap

import pytest

from pagedkv.tools.cli import main

KERNELS = '''
import numpy as np

def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    """vLLM's flash layout: caches [num_blocks, block_size, H, D], written in place."""
    bs = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            key_cache[slot // bs, slot % bs] = key[t]
            value_cache[slot // bs, slot % bs] = value[t]

def forgets_padding(key, value, key_cache, value_cache, slot_mapping):
    """A planted bug: a padding slot (-1) wraps around to the last block."""
    bs = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping):
        key_cache[slot // bs, slot % bs] = key[t]
        value_cache[slot // bs, slot % bs] = value[t]

def attention_without_options(q, key_cache, value_cache, block_tables, context_lens, scale, query_lens=None):
    """Decode attention in vLLM's layout, exact enough in float64; takes no soft cap or window."""
    bs, h = key_cache.shape[1], key_cache.shape[2]
    group = q.shape[1] // h
    out = np.zeros(q.shape, np.float32)
    for b, n in enumerate(context_lens):
        if n == 0:
            continue
        rows = [block_tables[b, p // bs] * bs + p % bs for p in range(n)]
        k = key_cache.reshape(-1, h, key_cache.shape[3])[rows].astype(np.float64)
        v = value_cache.reshape(-1, h, value_cache.shape[3])[rows].astype(np.float64)
        for hq in range(q.shape[1]):
            s = k[:, hq // group] @ q[b, hq].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[b, hq] = w @ v[:, hq // group] / w.sum()
    return out

def torch_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    """The same with torch tensors: index_copy_ on flattened views."""
    keep = slot_mapping >= 0
    for x, cache in ((key, key_cache), (value, value_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping[keep], x[keep])
'''


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    (tmp_path / "userkernels.py").write_text(textwrap.dedent(KERNELS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userkernels"


def test_a_correct_kernel_passes(kernels, capsys):
    args = ["verify", f"{kernels}:reshape_and_cache", "--routine", "write", "--convention", "vllm", "--examples", "15"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"PASS: {kernels}:reshape_and_cache as write (vllm, float32):") and "bit for bit" in out


def test_pagedkvs_own_backends_pass_in_their_convention(capsys):
    assert main(["verify", "pagedkv.backends.reference:gather", "--routine", "gather", "--examples", "10",
                 "--dtype", "bfloat16"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_a_planted_bug_fails_with_the_wrong_element_named(kernels, capsys):
    args = ["verify", f"{kernels}:forgets_padding", "--routine", "write", "--convention", "vllm", "--examples", "30"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "first difference at layer" in out and "slot_mapping" in out


def test_torch_tensors_with_torch(kernels, capsys):
    pytest.importorskip("torch")
    args = ["verify", f"{kernels}:torch_reshape_and_cache", "--routine", "write", "--convention", "vllm",
            "--examples", "15", "--torch"]
    assert main(args) == 0, capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [("nocolon", "MODULE:FUNCTION"), ("no_such_module_x:f", "no_such_module_x"),
                                           ("pagedkv:no_such_function", "no_such_function")])
def test_bad_names_are_clear_errors(spec, message, capsys):
    assert main(["verify", spec, "--routine", "write"]) == 2
    assert message in capsys.readouterr().err


def test_the_command_offers_every_convention_of_the_checkers():
    from pagedkv.testing.checkers import CONVENTIONS
    from pagedkv.tools.cli import VERIFY_CONVENTIONS

    assert sorted(VERIFY_CONVENTIONS) == sorted(CONVENTIONS)


def test_a_kernel_without_the_options_gets_one_line_then_passes_without_them(kernels, capsys):
    args = ["verify", f"{kernels}:attention_without_options", "--routine", "paged_attention", "--convention",
            "vllm", "--examples", "20", "--no-varlen"]
    assert main(args) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("FAIL") and "unexpected keyword argument 'soft_cap'" in out[1]
    assert "paged_attention(q, key_cache, value_cache, block_tables, context_lens, scale" in out[1]
    assert main(args + ["--no-soft-cap", "--no-sliding-window"]) == 0, capsys.readouterr().out
