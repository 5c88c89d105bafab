"""Command-line plumbing shared by train.py, render.py and convert.py.

Flags can also come from a YAML file (parse_with_config: `--config run.yaml`, command line
wins). Every input problem a script reports -- a bad flag, a missing or corrupt file, an output it
refuses to write -- is one line ``prog: error: message`` on stderr and exit status 2, never a
traceback. That rule lives here: ``ArgumentParser.error`` is the one way to say it, and the
argument types below reject bad values while the flags are parsed, before any work starts.
"""
import argparse
import math


def one_line(error) -> str:
    """An exception or message as one line: its first paragraph, its lines joined (library
    messages wrap, and some add paragraphs of advice). The one way every module says it."""
    text = " ".join(str(error).strip().split("\n\n")[0].split())
    return text or type(error).__name__


class UsageError(Exception):
    """A command-line problem found after parsing (a file, a flag that does not fit the data):
    the script's main passes it to ArgumentParser.error."""


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


def resolution(text: str):
    """--finest_resolution: "N" (both axes) or "X,Y"."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or X,Y (positive ints), got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def devices(text: str):
    """--devices: "auto", a count ("2") or GPU indices ("0,1")."""
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(p) for p in text.split(",") if p]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, N or i,j,..., got {text!r}") from None


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f"{low:g}..{high:g}"
    return f">= {low:g}" if low is not None else f"<= {high:g}"


def parse_with_config(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """`parser.parse_args(argv)` on top of the flags in the YAML file that `argv`'s --config
    names (a `parser` flag; None: no file). Each `key: value` there is handed to the parser
    as `--key value` before `argv`, so it is checked as the flag would be and the command line
    wins; a list is comma-separated, a boolean is --key or --no-key (BooleanOptionalAction),
    a null or default value is left out. An unknown key, or a file that is not `key: value`
    lines, is one line and exit status 2."""
    import yaml                   # here: the modules that only need one_line need no yaml
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    try:
        with open(args.config) as f:
            values = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {args.config}: {getattr(exc, 'strerror', None) or exc}")
    values = {} if values is None else values
    if not isinstance(values, dict):
        parser.error(f"--config {args.config}: expected flag: value lines, got a "
                     f"{type(values).__name__}")
    defaults = vars(parser.parse_args([]))
    for key, value in values.items():
        if key not in defaults or key == "config":
            parser.error(f"--config {args.config}: unknown key {key!r} (not a {parser.prog} "
                         "flag)")
    tokens = []
    for key, value in values.items():
        if value is None or value == defaults[key]:
            continue                                          # the default anyway
        if isinstance(value, bool):
            tokens.append(f"--{key}" if value else f"--no-{key}")
        else:
            tokens += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list)
                       else str(value)]
    return parser.parse_args(tokens + argv)
