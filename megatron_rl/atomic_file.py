"""Writing a file so that readers, and a crash, see the old content or the new one, never a torn file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO


@contextmanager
def atomic_text_file(path: str | Path) -> Iterator[TextIO]:
    """A text file (UTF-8) to write; on a clean exit it is fsynced and renamed over `path`, on an error it is
    deleted and a file already at `path` stays as it was. Created with mode 0644 like any data file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Next to the target, so that the rename stays on one filesystem (atomic).
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o644)  # mkstemp's 0600 would make the file private to its writer
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def fsync_directory(directory: str | Path) -> None:
    """Make renames in `directory` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
