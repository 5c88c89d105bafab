"""Command-line plumbing shared by train.py, render.py and convert.py.

Every input problem a script reports -- a bad flag, a missing or corrupt file, an output it
refuses to write -- is one line ``prog: error: message`` on stderr and exit status 2, never a
traceback. That rule lives here: ``ArgumentParser.error`` is the one way to say it, and the
argument types below reject bad values while the flags are parsed, before any work starts.
"""
import argparse
import math


def one_line(error) -> str:
    """An exception or message as one line (library messages may span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with every error as one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def integer(low=None, high=None):
    """Argument type: an int in [low, high] (either bound may be None)."""
    def parse(text):
        value = int(text)   # a ValueError becomes argparse's "invalid integer value: ..."
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds(low, high)}, "
                                             f"got {value}")
        return value
    parse.__name__ = "integer"   # argparse names the type in its own messages
    return parse


def number(low=None, high=None, *, above=None):
    """Argument type: a finite float in [low, high], or > above (bounds may be None)."""
    def parse(text):
        value = float(text)   # a ValueError becomes argparse's "invalid float value: ..."
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if ((low is not None and value < low) or (high is not None and value > high)
                or (above is not None and value <= above)):
            bounds = f"> {above:g}" if above is not None else _bounds(low, high)
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {value:g}")
        return value
    parse.__name__ = "float"
    return parse


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f"{low:g}..{high:g}"
    return f">= {low:g}" if low is not None else f"<= {high:g}"
