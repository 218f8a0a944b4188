"""The README's Python examples run as written, and the quickstart example runs."""

import importlib.util
import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    has_hf = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None
    for block in blocks:
        if "import transformers" in block and not has_hf:
            continue  # the hf extra's example, where transformers and torch are installed (CI has them)
        if "from openai import" in block:
            continue  # a client of a running server: tests/test_serve.py runs it against one
        exec(compile(block, "README.md", "exec"), {})


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "pool identical to the numpy reference: True" in out
    assert "False" not in out
