"""User-facing functions; the CLI only parses arguments and calls these."""

from .compiler import compile

__all__ = ["compile"]
