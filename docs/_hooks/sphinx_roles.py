"""A griffe extension (mkdocs.yml, mkdocstrings ``extensions:``): Sphinx roles to Markdown.

fineflow's docstrings use Google sections and reST inline markup (``:class:`X```,
double-backtick literals, ``::`` before a code block). The double backticks are already code
in Markdown; this turns each role into an optional cross-reference (a link when the target is
on a reference page, plain code otherwise, never a warning) and ``::`` into ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj|const):`(?P<target>[^`]+)`")
_LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)
_BARE_LITERAL_BLOCK = re.compile(r"^(\s*)::$", re.MULTILINE)


class SphinxRoles(griffe.Extension):
    """Rewrite reST roles and literal-block markers in every docstring."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    # The same hook under its griffe 1.x name (converting twice changes nothing).
    on_package_loaded = on_package

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._convert(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]

    def _convert(self, obj: griffe.Object, text: str) -> str:
        def role(match: re.Match[str]) -> str:
            target = match["target"]
            short = target.startswith("~")
            target = target.lstrip("~.")
            title = target.rsplit(".", 1)[-1] if short else target
            path = self._resolve(obj, target)
            return f'<autoref optional identifier="{path}"><code>{title}</code></autoref>'

        text = _ROLE.sub(role, text)
        text = _BARE_LITERAL_BLOCK.sub("", text)
        return _LITERAL_BLOCK.sub(":", text)

    @staticmethod
    def _resolve(obj: griffe.Object, target: str) -> str:
        if target.startswith("fineflow."):
            return target
        scope = obj if obj.is_class or obj.is_module else obj.parent
        head, _, rest = target.partition(".")
        while scope is not None:
            try:
                found = scope.resolve(head)
            except (griffe.NameResolutionError, AttributeError):
                scope = scope.parent
                continue
            return f"{found}.{rest}" if rest else found
        return target
