"""The error every layer may raise for bad input, and the one way a command reports it.

At the bottom of the package (it imports nothing of it), so that the modules config.py checks
with (distributed, parallel) can raise ConfigError without importing config."""

import sys


class ConfigError(ValueError):
    """A recipe key or command-line value that cannot work; the message names the key."""


def die(message: str, code: int = 2):
    """One line on stderr and a non-zero exit (2: bad input): what a user sees instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
