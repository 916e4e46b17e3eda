"""Workdirs and outputs are local (or mounted) paths: object-store URLs are refused up front.

Checkpoints go through Orbax, but the metrics file, TensorBoard events, the exported Hugging Face folder
(safetensors written through memory maps) and the evaluation reports use plain files. Rather than fail halfway
through a run, every entry point checks its output paths first; mount the bucket instead (e.g. gcsfuse:
`gcsfuse BUCKET /mnt/bucket`, then `--workdir /mnt/bucket/run`).
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class RemotePathError(ValueError):
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
