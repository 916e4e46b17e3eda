"""Workdirs and outputs are local (or mounted) paths: object-store URLs are refused up front.

Checkpoints go through Orbax, but the metrics file, TensorBoard events, the exported Hugging Face folder
(safetensors written through memory maps) and the evaluation reports use plain files. Rather than fail halfway
through a run, every entry point checks its output paths first; mount the bucket instead (e.g. gcsfuse:
`gcsfuse BUCKET /mnt/bucket`, then `--workdir /mnt/bucket/run`).

The same checks for files the user names: `input_file_problem` says why an input cannot be read (missing, a
directory, unreadable; pipes accepted where the input is read once) and `same_file` tells whether two paths name one
file (symbolic links and hard links included), so an output or its `.partial` file never lands on an input.
"""

from __future__ import annotations

import os
import re
import stat

from memagent_jax.errors import UserError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class RemotePathError(UserError):
    """An output path is an object-store URL (gs://, s3://, ...); the message names the flag."""


def check_local_path(path, field: str) -> None:
    """Raises RemotePathError naming `field` when `path` is a URL such as gs://bucket/run."""
    match = _URL.match(os.fspath(path)) if path else None
    if match:
        raise RemotePathError(
            f"{field}: {os.fspath(path)!r} is a {match.group(1)}:// URL; memagent-jax writes metrics, exports and "
            f"reports with plain files, so workdirs must be local or mounted paths (mount the bucket, e.g. "
            f"`gcsfuse BUCKET /mnt/BUCKET`, and pass /mnt/BUCKET/...)"
        )


def input_file_problem(path, *, pipes: bool = True) -> str | None:
    """Why `path` cannot be read as an input file, as the end of a sentence naming it, or None when it can.

    'does not exist', 'is a directory, not a file', 'cannot be read (permission denied)', ... Pipes, FIFOs and
    character devices (`/dev/stdin`, `<(cmd)`) are accepted with `pipes=True`, for inputs read once from start to
    end; readers that seek or memory-map (tables) pass `pipes=False`."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of the path is a file, not a directory)"
    except OSError as e:
        return f"cannot be read ({(e.strerror or str(e)).lower()})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
        if not pipes:
            return "is a pipe or device, not a regular file; this input is read more than once: save it to a file"
    elif not stat.S_ISREG(mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def same_file(a, b) -> bool:
    """True when paths `a` and `b` name one file: equal after resolving symbolic links (either may not exist
    yet), or the same inode (hard links, case-insensitive file systems)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def partial_path(path) -> str:
    """The temporary file an output is written to before it is renamed into place: `<path>.partial`."""
    return os.fspath(path) + ".partial"
