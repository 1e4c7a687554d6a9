"""`python -m krea2_lite SUBCOMMAND …`: the subcommands live in krea2_lite/cli/ (one module each)."""
import sys

from .cli.subcommands import main

if __name__ == "__main__":
    sys.exit(main())
