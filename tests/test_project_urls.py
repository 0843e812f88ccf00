"""The package's [project.urls] point where the documentation site says it lives."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_project_urls_agree_with_the_docs_site() -> None:
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Issues"}
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    site = re.search(r"^site_url: (\S+)$", mkdocs, re.M)
    repo = re.search(r"^repo_url: (\S+)$", mkdocs, re.M)
    assert site is not None and repo is not None
    assert urls["Documentation"] == site[1]
    assert urls["Homepage"] == repo[1]
    assert urls["Issues"] == f"{repo[1]}/issues"
    assert (
        urls["Changelog"].startswith(f"{repo[1]}/blob/main/") and (ROOT / "CHANGELOG.md").exists()
    )
