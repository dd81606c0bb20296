"""Entry point of `python -m samlab`; the parser and subcommands live in samlab.cli.

Once a command has returned, everything it wrote is flushed and the process ends at once
(`os._exit`): Python's own shutdown with torch loaded (tearing down its modules and their
objects) took 0.4-0.8 s on a 2-core machine, a tenth of a Hessian analysis from the CLI. A command
that ends with an exception, a usage error or --help exits the ordinary way."""

from samlab.cli import main
from samlab.quick_exit import exit_now

if __name__ == "__main__":
    exit_now(main())
