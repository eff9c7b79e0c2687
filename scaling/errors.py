"""The error every layer may raise for bad input, and the one way a command reports it.

At the bottom of the package (it imports nothing of it), so that the modules config.py checks
with (distributed, parallel) can raise ConfigError without importing config."""

import os
import sys


class ConfigError(ValueError):
    """A recipe key or command-line value that cannot work; the message names the key."""


def die(message: str, code: int = 2, every_rank: bool = True):
    """One line on stderr and a non-zero exit (2: bad input): what a user sees instead of a traceback.

    every_rank=False is for mistakes every rank finds alike (the recipe, the command line): rank 0
    alone says it, so torchrun's 16 ranks print one line, not 16; every rank still exits. The rank
    is the launcher's RANK, since these come before any process group exists."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
