"""The help format of every ``expertplane`` command: descriptions as written (line breaks kept,
docstring markup ````x```` shown as ``x``), and each option's default appended once, only when
it has one and its help does not already give it."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("``", ""))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace("``", "")
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or action.required):
            return text
        return f"{text} (default: %(default)s)"


def apply(parser: argparse.ArgumentParser) -> None:
    """Use ``HelpFormatter`` on ``parser`` and every subcommand parser below it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                apply(child)
