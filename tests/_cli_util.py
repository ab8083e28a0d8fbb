"""Running the command line in-process (click's CliRunner) and reading what it prints."""

from __future__ import annotations

import re

from click.testing import CliRunner

from streamtap.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fields(output: str) -> dict[str, str]:
    """The aligned ``key  value`` lines the commands print, as a dict."""
    out = {}
    for line in output.splitlines():
        match = re.match(r"\s*(\S.*?)\s{2,}(\S.*)$", line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def error_line(result) -> str:
    """The one line an error leaves on stderr (after whatever progress bar was drawn)."""
    return result.stderr.strip().splitlines()[-1]


def number(text: str) -> int:
    return int(text.split()[0].replace(",", ""))
