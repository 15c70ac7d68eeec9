"""User-facing functions; the CLI only parses arguments and calls these."""

from .compile import compile

__all__ = ["compile"]
