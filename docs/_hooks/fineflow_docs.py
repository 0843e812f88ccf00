"""MkDocs hooks for fineflow's site (mkdocs.yml, ``hooks:``).

* ``<!-- cli-help: ARGS -->`` in a page becomes the output of ``fineflow ARGS --help``, so the
  CLI page shows the options of the installed code, not a copy of them.
* After the build, every name in ``fineflow.__all__`` must appear as ``::: fineflow.NAME`` on a
  reference page; a missing one is a warning, which ``mkdocs build --strict`` turns into a
  failure, so a new public name cannot go undocumented.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.fineflow")

_CLI = re.compile(r"<!-- cli-help:(?P<args>[^>]*)-->")
_DIRECTIVE = re.compile(r"^::: *(?P<path>[\w.]+)", re.MULTILINE)
_documented: set[str] = set()


def _help(args: str) -> str:
    command = [sys.executable, "-m", "fineflow", *args.split(), "--help"]
    env = {**os.environ, "COLUMNS": "100"}  # argparse wraps to the terminal's width
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60, env=env)
    if done.returncode != 0:
        log.warning("`fineflow%s --help` failed: %s", args, done.stderr.strip())
    shown = " ".join(["fineflow", *args.split(), "--help"])
    return f"```text\n$ {shown}\n{done.stdout.rstrip()}\n```"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    _documented.update(m["path"] for m in _DIRECTIVE.finditer(markdown))
    return _CLI.sub(lambda m: _help(m["args"]), markdown)


def on_post_build(config: Any, **kwargs: Any) -> None:
    import fineflow

    missing = [
        name
        for name in fineflow.__all__
        if not name.startswith("__") and f"fineflow.{name}" not in _documented
    ]
    for name in missing:
        log.warning(
            "fineflow.%s is in fineflow.__all__ but on no API reference page: "
            "add `::: fineflow.%s` to a page under %s",
            name,
            name,
            Path(config["docs_dir"]) / "reference",
        )
    _documented.clear()
