"""Entry point of `python -m samlab`; the parser and subcommands live in samlab.cli.

Once a command has returned, everything it wrote is flushed and the process ends at once
(`os._exit`): Python's own shutdown with torch loaded (tearing down its modules and their
objects) took 0.4-0.8 s on a 2-core machine, a tenth of a Hessian analysis from the CLI. A command
that ends with an exception, a usage error or --help exits the ordinary way."""

import os
import sys

from samlab.cli import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
