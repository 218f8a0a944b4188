"""The README's and the documentation's Python examples run as written, the README's short
example prints what the README says it prints, the quickstart example runs, and the
documentation site builds in strict mode (broken links and references fail)."""

import importlib.util
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def page_text(name: str) -> str:
    """The text of the README or a documentation page (``"serving.md"``)."""
    return (ROOT / name if name == "README.md" else ROOT / "docs" / name).read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_what_a_block_says_it_prints_is_what_it_prints(page):
    """A Python block followed by "prints" and a text block: run alone, it prints exactly that."""
    block = r"```{}\n((?:(?!```).)*)```"  # one fenced block, never running into the next
    for code, shown in re.findall(block.format("python") + r"\n\nprints\n\n" + block.format("text"), page.read_text(),
                                  re.S):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout == shown


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, capsys):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    has_hf = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None
    for block in blocks:
        if "import transformers" in block and not has_hf:
            continue  # the hf extra's examples, where transformers and torch are installed (CI has them)
        if "from openai import" in block:
            continue  # a client of a running server: tests/test_serve.py runs it against one
        exec(compile(block, page.name, "exec"), {})
    capsys.readouterr()


def test_the_readme_is_read_in_five_minutes_and_links_what_exists():
    text = page_text("README.md")
    assert len(text.splitlines()) <= 200 and "```\n\nprints\n\n```text" in text  # an example that shows its output
    for link in re.findall(r"\]\(([^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "pool identical to the numpy reference: True" in out
    assert "False" not in out


def test_the_documentation_site_builds_strictly(tmp_path):
    """mkdocs build --strict: every link, anchor and API reference resolves, and the pictures are
    drawn by pagedkv (docs/figures.py). CI installs the docs extra (PAGEDKV_REQUIRE_DOCS=1)."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        if os.environ.get("PAGEDKV_REQUIRE_DOCS") == "1":
            pytest.fail("mkdocs is not installed (pip install \".[docs]\")")
        pytest.skip("the docs extra is not installed (pip install \".[docs]\")")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (site / "img" / "copy-on-write.png").exists() and (site / "api" / "index.html").exists()
    shutil.rmtree(site)
