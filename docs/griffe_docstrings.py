"""A griffe extension: jaxbn's docstrings, written for Sphinx-style readers, as mkdocs markdown.

The docstrings are Google style, with two reST habits that mkdocstrings shows verbatim:

- roles such as :func:`~jaxbn.batch_norm` or :class:`BatchStats`: a role whose target is a
  documented public name (no part of its path after ``jaxbn`` starts with ``_``, and it
  exists in the loaded package, looked up in the object's module first, then in ``jaxbn``)
  becomes a cross-reference; any other becomes inline code;
- literal blocks introduced by a paragraph ending in ``::``: the ``::`` becomes ``:`` and
  the indented block a fenced one, ``pycon`` when it holds ``>>>`` prompts, else ``text``.

mkdocs.yml loads it with ``extensions: [docs/griffe_docstrings.py]``; tests/test_docs.py
checks the rewriting.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`(~?)([\w.]+)`")


def _target(path: str, module: str, package: griffe.Module) -> str | None:
    """The documented full path that ``path`` names from inside ``module``, or None."""
    candidates = [path] if path.startswith(f"{package.name}.") else [
        f"{module}.{path}", f"{package.name}.{path}"]
    for candidate in candidates:
        parts = candidate.split(".")
        if parts[0] != package.name or any(part.startswith("_") for part in parts[1:]):
            continue
        try:
            package[".".join(parts[1:])]
        except (KeyError, ValueError):
            continue
        return candidate
    return None


def rewrite_roles(text: str, module: str, package: griffe.Module) -> str:
    """``text`` with each Sphinx role a markdown cross-reference or inline code."""

    def replace(match: re.Match[str]) -> str:
        short, path = match.groups()
        shown = path.rsplit(".", 1)[-1] if short else path
        target = _target(path, module, package)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    return ROLE.sub(replace, text)


def fence_literal_blocks(text: str) -> str:
    """``text`` with each reST literal block (``::`` then an indented block) fenced."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-1]
        if head.strip() != ":":
            out.append(head)
        indent = len(line) - len(line.lstrip())
        i += 1
        block: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        while block and not block[0].strip():
            block.pop(0)
        body = [b for b in block if b.strip()]
        if not body:
            continue
        depth = min(len(b) - len(b.lstrip()) for b in body)
        language = "pycon" if body[0].lstrip().startswith(">>>") else "text"
        pad = " " * indent
        out += ["", f"{pad}```{language}",
                *(pad + b[depth:] if b.strip() else "" for b in block), f"{pad}```"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


class SphinxToMarkdown(griffe.Extension):
    """Rewrites every docstring of the loaded package (see the module's docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        def visit(obj: griffe.Object) -> None:
            if obj.docstring is not None:
                module = obj.module.path if not isinstance(obj, griffe.Module) else obj.path
                text = fence_literal_blocks(obj.docstring.value)
                obj.docstring.value = rewrite_roles(text, module, pkg)
            for member in obj.members.values():
                if not member.is_alias and member.parent is obj:
                    visit(member)

        visit(pkg)
