"""C2PA content credentials: a signed manifest in each image saying a model made it (or changed a user's image).

Built once per run from the user's certificate chain and private key (--c2pa-cert, --c2pa-key) and checked then,
before any model loads: a key that does not match, a chain c2pa refuses, an unreadable file fail the run up
front instead of at the first image. The key stays in this object: never in its repr, its errors or the logs.
"""

from __future__ import annotations

import io
import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_batch import __version__
from qwen_batch.errors import ConfigError, QwenBatchError
from qwen_batch.outputs.images import ImageFormat
from qwen_batch.outputs.marks import TRAINED_ALGORITHMIC_MEDIA, Mark

if TYPE_CHECKING:
    import c2pa

# No thumbnail in the manifest: c2pa makes one by default, which took 0.15-0.3 s per 1024x1024 image and added
# 0.7-2.8 MB (a copy of the picture the file already is); without it signing takes 5-25 ms.
_C2PA_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}


class ContentCredentials:
    """Signs images with a C2PA manifest. Safe to share between writer threads: c2pa's native signer is not
    documented as thread-safe, so one lock serialises the c2pa calls (5-25 ms an image, measured)."""

    def __init__(self, cert_chain: bytes, key: bytes, *, cert_name: str = "--c2pa-cert", key_name: str = "--c2pa-key"):
        self._alg, self._chain, self.__key, self.subject = _check_pair(cert_chain, key, cert_name, key_name)
        self._lock = threading.Lock()
        self._context: c2pa.Context | None = None
        self._signer: c2pa.Signer | None = None
        try:
            self._open()
            # One signature now on a tiny image: a chain c2pa cannot use fails here, before any model loads.
            self._sign(_tiny_png(), ImageFormat.PNG, Mark(TRAINED_ALGORITHMIC_MEDIA, model="check"), "check", [])
        except Exception as error:
            raise ConfigError(
                f"C2PA cannot sign with {cert_name} and {key_name}: {self._scrub(error)} (C2PA wants the signer's "
                "certificate first, with the digitalSignature key usage and an extended key usage it accepts such "
                "as emailProtection, then the CA certificates that issued it)"
            ) from None

    @classmethod
    def from_pem(cls, cert_chain: bytes, key: bytes) -> ContentCredentials:
        return cls(cert_chain, key)

    @classmethod
    def from_files(cls, cert_path: str | Path, key_path: str | Path) -> ContentCredentials:
        chain = _read(cert_path, "--c2pa-cert")
        key = _read(key_path, "--c2pa-key")
        return cls(chain, key, cert_name=f"--c2pa-cert {cert_path}", key_name=f"--c2pa-key {key_path}")

    def __repr__(self) -> str:
        return f"ContentCredentials(subject={self.subject!r}, alg={self._alg!r})"

    __str__ = __repr__

    def __reduce__(self):  # pickling would carry the key to wherever the pickle goes
        raise TypeError("ContentCredentials cannot be pickled: build it where it signs, from the files")

    def _open(self) -> None:
        import c2pa

        info = c2pa.C2paSignerInfo(alg=self._alg.encode(), sign_cert=self._chain, private_key=self.__key, ta_url=None)
        self._signer = c2pa.Signer.from_info(info)
        self._context = c2pa.Context(c2pa.Settings.from_dict(_C2PA_SETTINGS))

    def _scrub(self, error: BaseException) -> str:
        # c2pa's messages are about the chain or the asset; this makes sure no text of the key rides along.
        message = str(error)
        for line in self.__key.decode("ascii", errors="replace").splitlines():
            if len(line) > 16 and "-----" not in line:
                message = message.replace(line, "[key]")
        return message

    def sign(
        self,
        data: bytes,
        fmt: ImageFormat,
        mark: Mark,
        *,
        title: str,
        ingredients: list[tuple[bytes, str, str]] | None = None,
    ) -> bytes:
        """`data` (an encoded image of `fmt`) with a signed manifest embedded. `ingredients`: (bytes, mime, title) of
        the user's input images; the first is the image the edit opened (parentOf), the others were placed in it.
        A failure is a QwenBatchError with c2pa's reason."""
        import c2pa

        try:
            return self._sign(data, ImageFormat(fmt), mark, title, ingredients or [])
        except c2pa.C2paError as error:
            raise QwenBatchError(f"C2PA could not sign {title}: {self._scrub(error)}") from None

    def _sign(
        self, data: bytes, fmt: ImageFormat, mark: Mark, title: str, ingredients: list[tuple[bytes, str, str]]
    ) -> bytes:
        import c2pa

        manifest = _manifest(mark, title, len(ingredients))
        out = io.BytesIO()
        with self._lock:
            builder = c2pa.Builder(json.dumps(manifest), self._context)
            for index, (image, mime, ingredient_title) in enumerate(ingredients):
                relationship = "parentOf" if index == 0 else "componentOf"
                definition = {"title": ingredient_title, "relationship": relationship, "label": f"input{index}"}
                builder.add_ingredient(json.dumps(definition), mime, io.BytesIO(image))
            builder.sign(self._signer, fmt.mime, io.BytesIO(data), out)
        return out.getvalue()


def _manifest(mark: Mark, title: str, ingredients: int) -> dict[str, Any]:
    if ingredients:
        # C2PA requires the first action to be created or opened; the opened/placed actions name the ingredients
        # (by the labels given in `sign`), then the model's change, marked as a composite.
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["input0"]}}]
        actions += [
            {"action": "c2pa.placed", "parameters": {"ingredientIds": [f"input{i}"]}} for i in range(1, ingredients)
        ]
        actions.append({"action": "c2pa.edited", "digitalSourceType": mark.source_type, **_agent(mark)})
    else:
        actions = [{"action": "c2pa.created", "digitalSourceType": mark.source_type, **_agent(mark)}]
    return {
        "claim_generator_info": [{"name": "qwen-batch", "version": __version__}],
        "title": title,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
    }


def _agent(mark: Mark) -> dict[str, Any]:
    # The model that made the change: C2PA 2.x actions name the software that did it in softwareAgent.
    return {"softwareAgent": {"name": mark.model}}


def read_credentials(data: bytes, fmt: ImageFormat) -> dict[str, Any]:
    """The C2PA manifest store of an image as c2pa's Reader gives it (validation_state, manifests,
    active_manifest, validation_status)."""
    import c2pa

    return json.loads(c2pa.Reader(ImageFormat(fmt).mime, io.BytesIO(data)).json())


def _read(path: str | Path, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {option} {path}: {error.strerror or error}") from None


def _check_pair(chain: bytes, key: bytes, cert_name: str, key_name: str) -> tuple[str, bytes, bytes, str]:
    """(c2pa algorithm, chain PEM, key as unencrypted PKCS#8 PEM, leaf subject), or ConfigError."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError:
        raise ConfigError(
            f"{cert_name} is not a PEM certificate chain (-----BEGIN CERTIFICATE----- blocks, signer first)"
        ) from None
    leaf = certificates[0]
    subject = leaf.subject.rfc4514_string()
    if leaf.not_valid_after_utc < datetime.now(timezone.utc):
        raise ConfigError(f"{cert_name}: its certificate ({subject}) expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:  # encrypted: c2pa takes the key as plain PEM
        raise ConfigError(f"{key_name} is encrypted: give an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm):  # the message would not help and must not echo the key
        raise ConfigError(f"{key_name} is not a PEM private key") from None

    def spki(public) -> bytes:
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    if spki(private.public_key()) != spki(leaf.public_key()):
        raise ConfigError(
            f"{key_name} does not match {cert_name}'s certificate ({subject}): the first certificate of the chain "
            "must be the one the key signs for"
        )
    if isinstance(private, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(private.curve.name)
        if alg is None:
            raise ConfigError(f"{key_name}: C2PA signs with EC keys on P-256, P-384 or P-521, not {private.curve.name}")
    elif isinstance(private, rsa.RSAPrivateKey):
        alg = "ps256"  # C2PA allows RSA only with PSS padding
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        alg = "ed25519"
    else:
        raise ConfigError(f"{key_name}: C2PA signs with EC (P-256/384/521), RSA or Ed25519 keys")
    pkcs8 = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    return alg, pem_chain, pkcs8, subject


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()
