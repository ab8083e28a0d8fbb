"""``python -m streamtap.cli``: the command line, as the ``streamtap`` console script runs it."""

from . import main

main()
