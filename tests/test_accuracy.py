"""pagedkv accuracy: what each KV storage format costs a model, measured against a float32 pool.

Tiny random models (nothing downloaded): bit-exact formats report KL 0 and top-1 100%, the
others a KL that grows as the format narrows; every pagedkv codec stays within its format's
rounding, and a codec that rounds worse (a planted truncating one, vLLM's fp8 encoder) is
caught by that check.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pagedkv.integrations.accuracy import (  # noqa: E402
    CROSS_ENGINE_CODECS,
    _logits,
    _round_trip_cache,
    accuracy_report,
    format_round_trip,
    truncating_fp8_e4m3,
)
from pagedkv.integrations.transformers import PagedCache  # noqa: E402
from pagedkv.tools.cli import main  # noqa: E402

from .test_transformers import gemma2, llama, save_checkpoint  # noqa: E402


def truncating_bfloat16(x):
    """A planted bug: bfloat16 by cutting the low 16 bits (toward zero) instead of rounding."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


@pytest.fixture(scope="module")
def report():
    return accuracy_report(llama(), num_tokens=96, generate=8,
                           codecs={**CROSS_ENGINE_CODECS, "bfloat16, truncated": ("bfloat16", truncating_bfloat16)})


def rows(report):
    return {r.name: r for r in report.rows}


def test_the_float32_pool_is_the_baseline_and_exact_formats_cost_nothing(report):
    base = report.rows[0]
    assert base.name == "float32" and base.kl_mean == base.kl_max == 0 and base.top1 == 1
    assert base.perplexity == report.perplexity and base.greedy_match == 8
    assert all(e.k_rel_rms == e.v_rel_rms == 0 for e in base.layers) and len(base.layers) == 2
    bf16 = accuracy_report(llama(dtype=torch.bfloat16), num_tokens=64, formats=["bfloat16"], codecs={})
    assert [r.name for r in bf16.rows] == ["float32", "bfloat16"]
    assert bf16.rows[1].kl_max == 0 and bf16.rows[1].top1 == 1  # a bfloat16 model's K/V stored in bfloat16: exact


def test_divergence_grows_as_the_format_narrows(report):
    r = rows(report)
    assert 0 < r["float16"].kl_mean < r["bfloat16"].kl_mean < r["fp8_e4m3"].kl_mean < r["fp8_e5m2"].kl_mean
    assert r["float16"].layers[0].k_rel_rms < r["bfloat16"].layers[0].k_rel_rms < r["fp8_e4m3"].layers[0].k_rel_rms
    assert r["int8"].scales == "per token and head" and r["fp8_e4m3"].scales == "per-tensor 1.0"


def test_every_pagedkv_codec_rounds_to_nearest_and_worse_ones_are_caught(report):
    r = rows(report)
    for name in ("float16", "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8"):
        assert r[name].within_rounding, name
    assert not r["bfloat16, truncated"].within_rounding
    assert r["bfloat16, truncated"].kl_mean > r["bfloat16"].kl_mean
    vllm = r["fp8_e4m3, vLLM's encoder (truncating)"]
    assert not vllm.within_rounding and vllm.layers[0].k_rel_rms > r["fp8_e4m3"].layers[0].k_rel_rms


def test_the_round_trip_cache_with_pagedkvs_codec_gives_the_pools_logits():
    """Codec rows run over a round-trip DynamicCache: with pagedkv's own fp8 codec it gives what the
    pool gives, so a codec row differs from a format row by its codec alone."""
    model = llama()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    pool = _logits(model, ids, PagedCache(model.config, max_tokens=64, block_size=16, dtype="fp8_e4m3"))
    trip = _logits(model, ids, _round_trip_cache(model, format_round_trip("fp8_e4m3")))
    torch.testing.assert_close(trip, pool, rtol=1e-6, atol=1e-6)


def test_vllms_fp8_encoder_truncates_toward_zero():
    x = np.array([1.0, 1.0624, 1.0626, 1.12, -1.2, 500.0, -500.0, 2.0 ** -8 * 1.9, np.nan], np.float32)
    want = np.array([1.0, 1.0, 1.0, 1.0, -1.125, 448.0, -448.0, 3 * 2.0 ** -9, np.nan], np.float32)  # subnormal
    np.testing.assert_array_equal(truncating_fp8_e4m3(x), want)


def test_a_sliding_window_model_reports_every_layer():
    got = accuracy_report(gemma2(window=8), num_tokens=40, formats=["fp8_e4m3"], codecs={})
    assert len(got.rows[1].layers) == 4 and got.rows[1].within_rounding and got.rows[1].kl_mean > 0


def test_the_command_prints_a_table_or_json(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "model")
    assert main(["accuracy", path, "--tokens", "48", "--formats", "bfloat16", "int8", "--generate", "4"]) == 0
    out = capsys.readouterr().out
    assert "float32 pool perplexity" in out and "bfloat16" in out and "int8" in out and "vLLM's encoder" in out
    assert main(["accuracy", path, "--tokens", "48", "--formats", "fp8_e4m3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["rows"]][:2] == ["float32", "fp8_e4m3"] and data["num_tokens"] == 48
    (tmp_path / "text.txt").write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")
    assert main(["accuracy", path, "--text", str(tmp_path / "text.txt"), "--formats", "bfloat16"]) == 0
    assert "the first 12 tokens of" in capsys.readouterr().out
    assert main(["accuracy", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_the_command_draws_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = save_checkpoint(tmp_path / "model")
    assert main(["accuracy", path, "--tokens", "32", "--formats", "bfloat16", "--plot", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").stat().st_size > 0


def test_the_formats_pages_example_output_is_what_the_command_prints(tmp_path, monkeypatch, capsys):
    """The storage formats page's report, of the serve benchmark's model, is the command's output."""
    import pathlib
    import re

    from benchmarks.serve_prefix import build_model

    readme = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "formats.md").read_text()
    command, shown = re.search(r"```text\n\$ pagedkv (accuracy [^\n]*)\n(.*?)```", readme, re.S).groups()
    monkeypatch.chdir(tmp_path)
    build_model("tiny-llama", "float32")
    assert main(command.split()) == 0
    assert capsys.readouterr().out == shown
