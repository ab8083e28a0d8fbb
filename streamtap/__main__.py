"""``python -m streamtap``: the command line, as the ``streamtap`` console script runs it."""

from .cli import main

main()
