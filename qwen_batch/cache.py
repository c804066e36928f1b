"""The on-disk embedding cache: one safetensors file per distinct text, content-addressed.

Stage 1 writes the text encoder's output for every prompt here; stage 2 reads it back, so the two
big models never share a GPU. 10,000 prompts are several GB of embeddings, so nothing is kept in RAM.

Layout: `<cache>/<namespace>/<key[:2]>/<key>.safetensors`, where the namespace hashes everything that
changes an embedding except the text (the encoder's weights identity, the prompt template, the number
of template tokens dropped, the maximum length and the dtype) and the key hashes the text within it.
A second run over the same manifest finds every text and encodes nothing. Each file holds the
embedding without padding (`[tokens, hidden]`), so its mask is all ones by construction. Safetensors,
never pickle: a cache on shared storage must not be able to run code.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import StorageError
from qwen_batch.storage import Folder

if TYPE_CHECKING:
    import torch

_SUFFIX = ".safetensors"


def cache_namespace(**identity: Any) -> str:
    """A short hash of what, besides the text, determines an embedding."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def text_key(text: str) -> str:
    """The name of a text's entry within a namespace."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    def __init__(self, folder: Folder, namespace: str):
        self.folder = folder
        self.namespace = namespace

    def _relative(self, text: str) -> str:
        key = text_key(text)
        return posixpath.join(self.namespace, key[:2], key + _SUFFIX)

    def missing(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts (in first-seen order) that have no embedding yet; one listing, not N lookups."""
        present = {
            posixpath.basename(name)[: -len(_SUFFIX)] for name in self.folder.list_files(self.namespace, _SUFFIX)
        }
        return [text for text in dict.fromkeys(texts) if text_key(text) not in present]

    def put(self, text: str, embedding: torch.Tensor, truncated: bool = False) -> None:
        from safetensors.torch import save

        metadata = {"tokens": str(embedding.shape[0]), "truncated": str(truncated).lower()}
        data = save({"embedding": embedding.detach().contiguous().cpu()}, metadata=metadata)
        self.folder.write_bytes(self._relative(text), data)

    def get(self, text: str) -> torch.Tensor:
        return self.get_with_metadata(text)[0]

    def get_with_metadata(self, text: str) -> tuple[torch.Tensor, dict[str, str]]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        relative = self._relative(text)
        data = self.folder.read_bytes(relative)
        try:
            tensors = load(data)
            metadata = _read_metadata(data)
        except (SafetensorError, ValueError) as error:
            raise StorageError(
                f"{self.folder.display(relative)}: corrupt cache entry ({error}); delete it and run again to re-encode"
            ) from error
        return tensors["embedding"], metadata


def _read_metadata(data: bytes) -> dict[str, str]:
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    return header.get("__metadata__", {})
