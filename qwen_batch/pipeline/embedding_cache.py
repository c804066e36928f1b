"""The on-disk embedding cache: one safetensors file per distinct text, content-addressed.

Stage 1 writes the text encoder's output for every prompt here; stage 2 reads it back, so the two
big models never share a GPU. 10,000 prompts are several GB of embeddings, so nothing is kept in RAM.

Layout: `<cache>/<namespace>/<key[:2]>/<key>.safetensors`, where the namespace hashes everything that
changes an embedding except the text (the encoder's weights identity, the prompt template, the number
of template tokens dropped, the maximum length and the dtype) and the key hashes the text within it.
A second run over the same manifest finds every text and encodes nothing. Each file holds the
embedding without padding (`[tokens, hidden]`), so its mask is all ones by construction. Safetensors,
never pickle: a cache on shared storage must not be able to run code.

Edit rows cache more than text (see `qwen_batch.pipeline.conditions.edit`): the encoder's output for an instruction *with
its input image*, and the input image's VAE latents, both keyed by the image's content hash, plus a
small JSON note per input URL saying which content that URL had when stage 1 read it, so stage 2 finds
the entries without reading the image again. `key_of` names those entries.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import StorageError
from qwen_batch.io.storage import Folder

if TYPE_CHECKING:
    import torch

_SUFFIX = ".safetensors"
_JSON_SUFFIX = ".json"


def cache_namespace(**identity: Any) -> str:
    """A short hash of what, besides the text, determines an embedding."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def text_key(text: str) -> str:
    """The name of a text's entry within a namespace."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_of(kind: str, **parts: Any) -> str:
    """The name of a non-text entry: a hash of its kind and what determines it."""
    payload = json.dumps({"kind": kind, **parts}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class EmbeddingCache:
    def __init__(self, folder: Folder, namespace: str):
        self.folder = folder
        self.namespace = namespace

    def _relative(self, key: str, suffix: str = _SUFFIX) -> str:
        return posixpath.join(self.namespace, key[:2], key + suffix)

    def present_keys(self) -> set[str]:
        """The keys of every tensor entry: one listing, not one lookup per entry."""
        return {posixpath.basename(name)[: -len(_SUFFIX)] for name in self.folder.list_files(self.namespace, _SUFFIX)}

    def missing(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts (in first-seen order) that have no embedding yet."""
        present = self.present_keys()
        return [text for text in dict.fromkeys(texts) if text_key(text) not in present]

    def put(self, text: str, embedding: torch.Tensor, truncated: bool = False) -> None:
        self.put_embedding(text_key(text), embedding, truncated)

    def get(self, text: str) -> torch.Tensor:
        return self.get_with_metadata(text)[0]

    def get_with_metadata(self, text: str) -> tuple[torch.Tensor, dict[str, str]]:
        tensors, metadata = self.get_tensors(text_key(text))
        return tensors["embedding"], metadata

    def put_embedding(self, key: str, embedding: torch.Tensor, truncated: bool = False) -> None:
        metadata = {"tokens": str(embedding.shape[0]), "truncated": str(truncated).lower()}
        self.put_tensors(key, {"embedding": embedding}, metadata)

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        from safetensors.torch import save

        data = save({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, metadata=metadata)
        self.folder.write_bytes(self._relative(key), data)

    def get_tensors(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        relative = self._relative(key)
        data = self.folder.read_bytes(relative)
        try:
            tensors = load(data)
            metadata = _read_metadata(data)
        except (SafetensorError, ValueError) as error:
            raise StorageError(
                f"{self.folder.display(relative)}: corrupt cache entry ({error}); delete it and run again to re-encode"
            ) from error
        return tensors, metadata

    def put_note(self, key: str, note: dict[str, Any]) -> None:
        """A small JSON entry (never pickle)."""
        self.folder.write_bytes(self._relative(key, _JSON_SUFFIX), json.dumps(note, sort_keys=True).encode())

    def get_note(self, key: str) -> dict[str, Any]:
        relative = self._relative(key, _JSON_SUFFIX)
        data = self.folder.read_bytes(relative)
        try:
            note = json.loads(data)
        except ValueError as error:
            raise StorageError(
                f"{self.folder.display(relative)}: corrupt cache entry ({error}); delete it and run again"
            ) from error
        if not isinstance(note, dict):
            raise StorageError(f"{self.folder.display(relative)}: corrupt cache entry; delete it and run again")
        return note


def _read_metadata(data: bytes) -> dict[str, str]:
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    return header.get("__metadata__", {})
