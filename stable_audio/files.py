"""Writing files so that nothing is lost, spliced or stranded. Every file appears whole
or not at all: it is written under a temporary name of its own, in its folder (so that
two writers of one name never share it), then renamed. Files and folders are made as
the umask allows, as any program's are. A write that fails for want of space says so
and names the file."""

import errno
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import, before any thread could race the read
FULL = 1 << 20  # bytes: a write that fails with less free space ran out of it


def temporary(path, folder: bool = False) -> Path:
    """A new empty file (or folder) beside `path`, named for it, that no other writer
    uses, ending as `path` ends (mx.save_safetensors insists); an OSError that names
    `path` if its folder cannot take it."""
    path = Path(path)
    prefix, suffix = f".{path.stem}.", f".partial{path.suffix}"
    try:
        if folder:
            made = tempfile.mkdtemp(suffix, prefix, path.parent)
        else:
            fd, made = tempfile.mkstemp(suffix, prefix, path.parent)
            os.close(fd)
    except OSError as e:
        raise OSError(f"Cannot write {path}: {e.strerror or e}.") from None
    os.chmod(made, (0o777 if folder else 0o666) & ~UMASK)  # mkstemp makes 0600/0700
    return Path(made)


def check_writable(path):
    """Refuse, before any work, an output that could not be written: a folder, a name
    too long, a folder missing or read-only (by making and removing its temporary
    file)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"The output {path} is a folder.")
    if not path.parent.is_dir():
        raise ValueError(f"The folder of {path} does not exist.")
    try:
        temporary(path).unlink()
    except OSError as e:
        raise ValueError(str(e)) from None


def same_file(a, b) -> bool:
    """Whether paths `a` and `b` name one file (through links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is missing: compare where they would be
        return Path(a).resolve() == Path(b).resolve()


def full_disk(path, error: BaseException, written: Path = None) -> OSError:
    """The one-line OSError for a write of `path` that failed with `error` because the
    disk is full, or None if it did not. Libraries' own errors ("System error") are
    told apart by the free space left, measured while `written` (the partial file)
    still holds it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        full = True
    elif isinstance(error, (OSError, RuntimeError)):
        try:
            full = shutil.disk_usage((written or Path(path)).parent).free < FULL
        except OSError:
            full = False
    else:
        full = False
    if not full:
        return None
    return OSError(f"Cannot write {path}: the disk is full. Free some space and retry.")


@contextmanager
def written(path):
    """Yields a temporary file to write `path`'s content to; when the block ends, it is
    renamed to `path`, and on any failure removed."""
    path, tmp = Path(path), None
    try:
        with deferred_interrupts():  # the file made and its name known, as one step
            tmp = temporary(path)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        failure = full_disk(path, e, tmp)
        if tmp is not None:
            remove(tmp)
        if failure is not None:
            raise failure from None
        raise


def remove(path: Path):
    """Remove a file or a folder, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def deferred_interrupts():
    """Ctrl-C, SIGTERM and SIGHUP wait for the block to end, then interrupt: what it
    makes is never left half-made. In the main thread only, where Python runs signal
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = [signal.signal(s, lambda n, _: received.append(n)) for s in signals]
    try:
        yield
    finally:
        for s, handler in zip(signals, before):
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def interruptible():
    """SIGTERM and SIGHUP (a closed terminal) interrupt as Ctrl-C does, so that what
    cleans up after Ctrl-C cleans up after them too; in the main thread only, where
    Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGHUP)
    before = [signal.signal(s, _interrupt) for s in signals]
    try:
        yield
    finally:
        for s, handler in zip(signals, before):
            signal.signal(s, handler)
