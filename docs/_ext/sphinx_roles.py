"""Griffe extension for the API pages: the docstrings' Sphinx roles become links.

The docstrings name other objects the Sphinx way (``:class:`~bnlstm_lit.nn.BNLSTM```, ``:meth:`skip```). Markdown has
no such roles, so each one is rewritten into an optional cross-reference: the name is resolved in the scope of the
object whose docstring it is (its members, its module's names and imports), linked where that object has a section in
the API pages, and left as plain code where it has none (a private module, the standard library).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|mod|func|meth|data|attr|obj|exc):`(?P<tilde>~?)(?P<name>[\w.]+)(?P<call>\(\))?`")


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` seen from ``obj`` (then from its parents), or ``name`` where it does not resolve."""
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            return scope.resolve(name)
        except (griffe.NameResolutionError, ValueError, KeyError, AttributeError):
            scope = scope.parent
    return name


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None or ":`" not in obj.docstring.value:
            return

        def link(match: re.Match[str]) -> str:
            name = match["name"]
            title = (name.rsplit(".", 1)[-1] if match["tilde"] else name) + (match["call"] or "")
            identifier = html.escape(_resolve(obj, name))
            return f'<autoref identifier="{identifier}" optional><code>{html.escape(title)}</code></autoref>'

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
