"""What every long output shares: progress bars, a clean stop on SIGINT / SIGTERM (one
`Stopped`), all-or-nothing files, the manifests that resumable outputs keep, and the check
that an output can be written before the work starts.

    with stop_on_signals("render.py", "out.png was not written"):   # one line, 128 + N
        with atomic_output("out.png") as partial:                    # renamed on success
            write(partial)

Needs only the standard library and tqdm; images.py (image files) and every script build on it.
"""
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading

from tqdm import tqdm

# Seconds a phase runs before its progress bar appears: quick phases stay silent.
PROGRESS_DELAY = 2.0


# ----------------------------------------------------------------------------- long phases

def progress_bar(total, desc, unit="px", progress=None, **options):
    """A tqdm bar with an ETA on stderr for a phase of `total` units. progress: True (shown at
    once), False (never), or None: shown when the phase runs past PROGRESS_DELAY seconds."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit in ("px", "B"), leave=False,
                disable=progress is False, delay=PROGRESS_DELAY if progress is None else 0,
                dynamic_ncols=True, **options)


class Stopped(BaseException):
    """A signal stopped the work: exit status 128 + its number. Not an Exception, so nothing on
    the way (Lightning included) swallows it or turns it into another status; it unwinds like
    Ctrl-C, and every atomic_output on the way removes its temporary file. The message says
    what became of the work; `left`: what a resumable writer kept (it fills it in on the way
    out, for stop_on_signals to print), else None."""

    def __init__(self, signum, message=""):
        super().__init__(message)
        self.signum, self.status, self.left = signum, 128 + signum, None


@contextlib.contextmanager
def signals_handled(handler, signums=(signal.SIGINT, signal.SIGTERM)):
    """`handler(signum, frame)` answers `signums` inside the block; the previous handlers are
    back after it. Outside the main thread (Python takes no handlers there) the block runs
    unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, was in previous.items():
            signal.signal(signum, was)


@contextlib.contextmanager
def stop_on_signals(prog, not_written):
    """Run a long output so that SIGINT / SIGTERM stop it cleanly: the signal raises Stopped
    where the work is, the temporaries go on the way out, and the process prints one line
    `prog: stopped by SIGTERM; <not_written, or what a resumable writer left>` and exits with
    128 + the signal's number. Further signals during that clean-up are ignored. Outside the
    main thread (no signal handlers there) the block runs unchanged."""
    stopping = []

    def handler(signum, frame):
        if not stopping:               # once: a second signal must not cut the clean-up short
            stopping.append(signum)
            raise Stopped(signum)
    try:
        with signals_handled(handler):
            yield
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        sys.stderr.write(f"\n{prog}: stopped by {name}; {stop.left or not_written}\n")
        sys.stderr.flush()
        raise SystemExit(stop.status) from None


def save_manifest(path, manifest):
    """Write a small JSON file all or nothing (what a resumable output is a part of)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)


def check_manifest(path, wanted, what, ignore=()):
    """The manifest (a dict) at `path` when it equals `wanted` but for the keys in `ignore`,
    None when there is none; ValueError when it describes something else, naming up to 3
    differences and `what` to delete."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        found = None
    wanted = json.loads(json.dumps(wanted))          # tuples -> lists, as read back
    if isinstance(found, dict):
        keys = (set(found) | set(wanted)) - set(ignore)
        diffs = [f"{key} {found.get(key)!r} vs {wanted.get(key)!r}"
                 for key in sorted(keys) if found.get(key) != wanted.get(key)]
        if not diffs:
            return found
        reason = "another output (" + ", ".join(diffs[:3]) + ")"
    else:
        reason = f"an unreadable {os.path.basename(path)}"
    raise ValueError(f"{what} holds {reason}; delete it or pick another output name")



# ----------------------------------------------------------------------------- output files

@contextlib.contextmanager
def atomic_output(path):
    """Write a file all or nothing: yields a temporary name in `path`'s folder (same
    extension, so writers pick the same format), flushed to disk and renamed onto `path` when
    the block succeeds, removed when it fails or is interrupted. A crash, Ctrl-C or a full
    disk therefore never leaves a partial file under the real name, nor destroys the
    previous one. Creates the folder. Two processes writing one path each use their own
    temporary name; the last rename wins with a complete file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    root, ext = os.path.splitext(os.path.basename(path))
    partial = os.path.join(folder, f".{root}.{os.getpid()}-{os.urandom(3).hex()}.partial{ext}")
    try:
        yield partial
        with open(partial, "rb+") as f:   # data on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as exc:                # e.g. a full disk: same errno (and subclass)
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, path) from None
    except Exception as exc:              # errors name the file asked for, not the temporary
        exc.args = tuple(a.replace(partial, path) if isinstance(a, str) else a for a in exc.args)
        raise
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def shown_name(path):
    """The file name a user asked for: atomic_output's temporary name -> the real one."""
    name = os.path.basename(os.fspath(path))
    match = re.fullmatch(r"\.(.+)\.\d+-[0-9a-f]{6}\.partial(\.[^.]*)?", name)
    return match[1] + (match[2] or "") if match else name


def same_file(a, b):
    """Whether two paths name one file (also through symbolic or hard links); either may not
    exist yet. Outputs use it to refuse to replace their input."""
    return os.path.realpath(a) == os.path.realpath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_output(path, source):
    """ValueError (one line naming `path`), before any work, for an output that could not be
    written at the end: a folder, the `source` it is made from (also through a link), or a
    place where no file can be made (its folder is made when missing)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder")
    if same_file(path, source):
        raise ValueError(f"{path}: would overwrite the input; choose another name")
    folder = os.path.dirname(os.path.abspath(path))
    try:                              # now, not hours later
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{path}: cannot write there ({exc.strerror or exc})") from None
