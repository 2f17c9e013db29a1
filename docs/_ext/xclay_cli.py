"""``{xclay-cli}``: the command line's help, rendered from the parser itself, so the CLI
page never drifts from the code."""

from __future__ import annotations

import argparse
from typing import Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class XClayCli(SphinxDirective):
    """One section per command: its description and ``--help`` text."""

    def run(self) -> list[nodes.Node]:
        from xclay.cli import _parser

        parser = _parser()
        out: list[nodes.Node] = [nodes.literal_block(text=parser.format_help())]
        for name, sub in _subcommands(parser).items():
            section = nodes.section(ids=[f"xclay-{name}"])
            section += nodes.title(text=f"xclay {name}")
            section += nodes.literal_block(text=sub.format_help())
            out.append(section)
        return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("xclay-cli", XClayCli)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
