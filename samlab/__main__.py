"""Entry point of `python -m samlab`; the parser and subcommands live in samlab.cli."""

import sys

from samlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
