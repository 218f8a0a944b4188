"""The pagedkv command, run as a user would, in a subprocess."""

import os
import re
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, "-m", "pagedkv", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_runs_to_its_summary_and_agrees():
    out = run("demo", "--requests", "8", "--backend", "numba")
    assert out.returncode == 0, out.stderr
    for words in ("summary", "tokens generated", "prefix cache", "memory saved at the peak",
                  "paged == dense generation            yes", "pool at the peak"):
        assert words in out.stdout


def test_demo_of_a_gemma_like_model_frees_what_leaves_the_window():
    out = run("demo", "--requests", "12", "--model", "gemma-like")
    assert out.returncode == 0, out.stderr
    assert "gemma-like model" in out.stdout
    line = next(x for x in out.stdout.splitlines() if "KV memory at the peak" in x)
    freeing, kept = map(int, re.search(r"; (\d+) blocks against (\d+)\)", line).groups())
    assert 0 < freeing < kept, line  # the sliding layers hold fewer blocks than the full ones
    assert re.search(r"paged == dense generation +yes", out.stdout)


def test_demo_in_a_narrow_format_compares_with_float32():
    out = run("demo", "--requests", "4", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    assert "K/V stored as bfloat16" in out.stdout
    assert "in bfloat16, 50% of float32's" in out.stdout
    assert "bfloat16 against float32" in out.stdout and "requests generate the same tokens" in out.stdout


def test_demo_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "memory.png"
    out = run("demo", "--requests", "4", "--no-check", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_with_a_pool_too_small_fails_clearly():
    out = run("demo", "--blocks", "2", "--no-check")
    assert out.returncode == 2
    assert "use more --blocks" in out.stderr


def test_bad_arguments():
    out = run("demo", "--requests", "0")
    assert out.returncode == 2 and "not positive" in out.stderr
    out = run("explode")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = run("demo", "--help")
    assert out.returncode == 0 and "--plot" in out.stdout and "--backend" in out.stdout


def test_info():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "backend numpy  available" in out.stdout
    assert "threading layer" in out.stdout and "GPU:" in out.stdout
    assert "storage formats: float32, float16, bfloat16, fp8_e4m3, fp8_e5m2, int8" in out.stdout


def test_bench_decode():
    out = run("bench", "--shape", "decode")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "copy limit" in lines[1]
    assert [line.split()[0] for line in lines[3:]] == ["write", "gather", "copy_blocks"]


@pytest.mark.parametrize("args, words", [
    (["demo", "--store", "redis://h:notaport", "--requests", "1"], "cannot use the URL"),
    (["demo", "--store", "/proc/nope", "--requests", "1"], "cannot use '/proc/nope'"),
    (["demo", "--store", "/etc/passwd", "--requests", "1"], "cannot use '/etc/passwd'"),
    (["demo", "--seed", "-1"], "is negative"),
    (["demo", "--seed", "x"], "not an integer"),
    (["demo", "--blocks", "-5"], "not positive"),
    (["bench", "--shape", "huge"], "invalid choice"),
    (["verify", "nomodule:nofunction", "--routine", "write", "--examples", "1"], "nomodule"),
])
def test_bad_arguments_say_what_is_wrong_without_a_traceback(args, words):
    """Before, the store, seed and verify cases ended in a Python traceback with exit 1."""
    out = run(*args, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and re.search(r"^pagedkv( \w+)?: error: ", out.stderr, re.M), out.stderr
    assert words in out.stderr, out.stderr


def test_warmup_compiles_ahead_and_says_so(capsys):
    from pagedkv.tools.cli import main

    assert main(["warmup", "--backend", "numpy", "--dtype", "float32", "int8"]) == 0
    assert "kernels for float32, int8 (NHD) ready on the numpy backend" in capsys.readouterr().out


def test_a_kernel_compiling_is_announced_with_its_time(capsys, monkeypatch):
    """The first compile of a pagedkv kernel in a process says so on standard error (loading one
    from numba's disk cache fires no compile event, so a warm start says nothing)."""
    import numba

    from pagedkv.backends.numba.notice import NOTICE

    monkeypatch.delenv("PAGEDKV_QUIET", raising=False)
    monkeypatch.setattr(NOTICE, "said", False)

    def kernel_for_the_notice(x):
        return x + 1

    kernel_for_the_notice.__module__ = "pagedkv.backends.numba.example"
    before = NOTICE.seconds
    assert numba.njit(kernel_for_the_notice)(1) == 2
    err = capsys.readouterr().err
    assert "compiling numba kernels on first use" in err and "kernel_for_the_notice:" in err
    assert NOTICE.seconds > before
    monkeypatch.setenv("PAGEDKV_QUIET", "1")
    numba.njit(kernel_for_the_notice)(2)
    assert capsys.readouterr().err == ""
