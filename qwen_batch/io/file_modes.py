"""The files qwen-batch writes get the modes the user's umask gives any new file.

safetensors writes through a private temporary file, so its files come out 0600 whatever the umask, and
`tempfile.mkdtemp` makes 0700 folders. Without this, a tiny model built into a shared cache, or an adapter
written into a repository and copied into the worker image, is unreadable to every other user: the image's
user got "permission denied" on the demo's adapters.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it back
    would race with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, *, folder_itself: bool = True) -> Path:
    """Give `path`, and everything in it when it is a folder, the mode a new file or folder would have;
    `folder_itself=False` leaves the folder's own mode as it is (one the user made and named)."""
    path = Path(path)
    mask = current_umask()
    items = [*([path] if folder_itself else []), *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
    return path
