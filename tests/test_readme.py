"""The README's Python examples run as written, and the quickstart example runs."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "pool identical to the numpy reference: True" in out
    assert "False" not in out
