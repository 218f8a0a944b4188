"""MkDocs hooks: draw the pictures with pagedkv before the pages are read (``docs/figures.py``)."""

import pathlib
import runpy


def on_pre_build(config, **kwargs):
    figures = runpy.run_path(str(pathlib.Path(__file__).parent / "figures.py"))
    figures["draw"](pathlib.Path(config["docs_dir"]) / "img")
