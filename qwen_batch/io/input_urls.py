"""Where the files a manifest names (edit rows' input images, any row's LoRA adapters) may come from.

An edit row names its input image (and any row its adapters) by URL: a path relative to the manifest, an absolute local path,
`file://...`, `s3://...` or any other fsspec URL. A manifest is data that someone else may have
written, so qwen-batch reads such files only from allowed locations: by default the manifest's own
folder (and below), plus the prefixes the operator allows explicitly (`--allow-inputs`). A row that
names anything else (`file:///etc/passwd` in a manifest on S3, `../../secrets.png`, a symbolic link
out of the manifest's folder, another bucket) is invalid, with the reason, before any model loads.

URLs are compared in a canonical form: local paths absolute, normalised and with symbolic links
resolved; remote URLs as `protocol://bucket/key` with `.` and `..` collapsed.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

LOCAL_PROTOCOLS = ("", "file", "local")


class InputLocationError(ValueError):
    """An input URL that cannot be resolved or is outside the allowed locations."""


def _split(url: str) -> tuple[str, str]:
    protocol, separator, rest = url.partition("://")
    return (protocol.lower(), rest) if separator else ("", url)


def canonical(url: str) -> str:
    """One spelling per location: absolute local paths, `protocol://bucket/key` for the rest."""
    protocol, rest = _split(url)
    if protocol in LOCAL_PROTOCOLS:
        # realpath: a symbolic link inside an allowed folder must not lead out of it.
        return os.path.realpath(os.path.expanduser(rest))
    path = posixpath.normpath("/" + rest).lstrip("/")
    if not path or path == ".":
        raise InputLocationError(f"{url!r} names no object")
    return f"{protocol}://{path}"


def _is_within(candidate: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return candidate == prefix or candidate.startswith(prefix + "/")


def manifest_folder(manifest_url: str) -> str:
    """The folder a manifest lives in, canonical: relative input paths are resolved against it."""
    protocol, rest = _split(manifest_url)
    if protocol in LOCAL_PROTOCOLS:
        return os.path.dirname(canonical(manifest_url))
    return f"{protocol}://{posixpath.dirname(posixpath.normpath('/' + rest).lstrip('/'))}"


@dataclass(frozen=True)
class InputPolicy:
    """The manifest's folder and the extra prefixes input images may be read from."""

    base: str  # the manifest's folder, canonical
    allowed: tuple[str, ...]  # canonical prefixes, the manifest's folder first

    @classmethod
    def for_manifest(cls, manifest_url: str, extra_prefixes: Iterable[str] = ()) -> InputPolicy:
        base = manifest_folder(manifest_url)
        return cls(base=base, allowed=(base, *(canonical(prefix) for prefix in extra_prefixes)))

    def resolve(self, raw: str, what: str = "input image") -> str:
        """The canonical URL of an input (`what`: an input image, an adapter) named in the manifest, or
        `InputLocationError` saying why not."""
        if not raw or not raw.strip():
            raise InputLocationError(f"is empty; give the URL or path of the {what}")
        if "\x00" in raw:
            raise InputLocationError(f"{raw!r} contains a NUL byte")
        protocol, _ = _split(raw)
        if not protocol and not os.path.isabs(os.path.expanduser(raw)):
            base_protocol, base_rest = _split(self.base)
            if base_protocol in LOCAL_PROTOCOLS:
                resolved = canonical(os.path.join(self.base, raw))
            else:
                resolved = canonical(f"{base_protocol}://{posixpath.join(base_rest, raw)}")
        else:
            resolved = canonical(raw)
        if not any(_is_within(resolved, prefix) and _same_kind(resolved, prefix) for prefix in self.allowed):
            places = ", ".join(self.allowed)
            raise InputLocationError(
                f"{raw!r} is outside the allowed input locations ({places}); move the {what} under the "
                "manifest's folder or allow its location with --allow-inputs PREFIX"
            )
        return resolved


def _same_kind(candidate: str, prefix: str) -> bool:
    # A local path never matches a remote prefix that happens to share its spelling, and vice versa.
    return ("://" in candidate) == ("://" in prefix)
