"""AI-generated marks: the IPTC XMP packet and C2PA content credentials, read back as a user's tools would."""

from __future__ import annotations

import datetime
import io
import json
import threading
from xml.etree import ElementTree

import c2pa
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from qwen_batch import __version__
from qwen_batch.errors import ConfigError, QwenBatchError
from qwen_batch.outputs.content_credentials import ContentCredentials, read_credentials
from qwen_batch.outputs.images import ImageFormat, encode_image
from qwen_batch.outputs.marks import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    Mark,
    read_extra_json,
    read_source_type,
    xmp_packet,
)

METADATA = {
    "id": "fox",
    "prompt": "a fox",
    "negative_prompt": "",
    "num_inference_steps": 4,
    "true_cfg_scale": 4.0,
    "seed": 1,
    "width": 64,
    "height": 64,
    "model": "Qwen/Qwen-Image",
}


# --- the XMP packet ---


def test_rows_from_a_users_image_are_composites():
    assert Mark.for_row(True, "Qwen/Qwen-Image-Edit").source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    made = Mark.for_row(False, "Qwen/Qwen-Image")
    assert made.source_type == TRAINED_ALGORITHMIC_MEDIA
    assert made.generator == f"qwen-batch {__version__}" and made.model == "Qwen/Qwen-Image"


def test_xmp_packet_is_well_formed_and_escapes_what_it_holds():
    extra = json.dumps({"prompt": 'a <b>"fox"</b> & 狐狸'}, ensure_ascii=False)
    mark = Mark(TRAINED_ALGORITHMIC_MEDIA, model='odd "model" <&>', title="fox & <hound>")
    text = xmp_packet(mark, extra_json=extra).decode("utf-8")
    assert text.startswith("<?xpacket begin=") and text.endswith('<?xpacket end="w"?>')
    root = ElementTree.fromstring(text[text.index("<x:xmpmeta") : text.index("</x:xmpmeta>") + len("</x:xmpmeta>")])
    description = root.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    iptc = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}"
    assert description.get(iptc + "DigitalSourceType") == TRAINED_ALGORITHMIC_MEDIA
    assert description.get(iptc + "AISystemUsed") == 'odd "model" <&>'
    assert description.get("{http://ns.adobe.com/xap/1.0/}CreatorTool") == f"qwen-batch {__version__}"
    assert "fox &amp; &lt;hound&gt;" in text
    assert read_source_type(text) == TRAINED_ALGORITHMIC_MEDIA
    assert read_extra_json(text) == extra
    assert read_extra_json(xmp_packet(mark).decode()) is None


def test_source_type_is_read_from_packets_other_tools_write():
    # exiftool and Adobe write properties as elements, often as rdf:resource.
    packet = """<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
    <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">
    <Iptc4xmpExt:DigitalSourceType rdf:resource="%s"/></rdf:Description></rdf:RDF></x:xmpmeta>"""
    assert (
        read_source_type(packet % COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA) == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    )
    assert read_source_type("<x:xmpmeta broken") is None
    assert read_source_type("") is None


# --- a certificate chain that c2pa reads back as valid apart from trust (outputs.md) ---


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _usage(**flags) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement"]
    names += ["key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def make_chain(leaf_key=None, *, email_protection: bool = True) -> tuple[bytes, bytes]:
    """(leaf PEM + root PEM, leaf key PKCS#8 PEM): a root CA and a leaf that signs, as C2PA wants them."""
    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = leaf_key or ec.generate_private_key(ec.SECP256R1())
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())

    def builder(subject: str, issuer: str, key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )

    root = (
        builder("qwen-batch test root", "qwen-batch test root", root_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA256())
    )
    leaf = (
        builder("qwen-batch test signer", "qwen-batch test root", leaf_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(digital_signature=True), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
    )
    if email_protection:
        leaf = leaf.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    leaf = leaf.sign(root_key, hashes.SHA256())
    chain = leaf.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM)
    key = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key


@pytest.fixture(scope="module")
def chain_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("c2pa")
    chain, key = make_chain()
    (folder / "chain.pem").write_bytes(chain)
    (folder / "key.pem").write_bytes(key)
    return folder / "chain.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def credentials(chain_files):
    return ContentCredentials.from_files(*chain_files)


def _image(fmt: ImageFormat, mark: Mark) -> bytes:
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return encode_image(picture, fmt, METADATA, xmp=xmp_packet(mark))


def _input_png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _active(store: dict) -> dict:
    return store["manifests"][store["active_manifest"]]


def _actions(manifest: dict) -> list[dict]:
    (assertion,) = [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    return assertion["data"]["actions"]


def _assert_valid_but_untrusted(store: dict) -> None:
    # Valid: every hash and the signature check out; the only complaint is that nobody trusts a test root.
    assert store["validation_state"] == "Valid"
    assert [status["code"] for status in store["validation_status"]] == ["signingCredential.untrusted"]


# --- C2PA content credentials ---


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_generated_image_carries_valid_credentials(credentials, fmt):
    mark = Mark.for_row(False, "Qwen/Qwen-Image")
    signed = credentials.sign(_image(fmt, mark), fmt, mark, title=f"fox.{fmt.extension}")
    store = read_credentials(signed, fmt)
    _assert_valid_but_untrusted(store)
    manifest = _active(store)
    assert manifest["title"] == f"fox.{fmt.extension}"
    assert manifest["claim_generator_info"][0]["name"] == "qwen-batch"
    assert manifest["claim_generator_info"][0]["version"] == __version__
    (action,) = _actions(manifest)
    assert action["action"] == "c2pa.created"
    assert action["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert action["softwareAgent"]["name"] == "Qwen/Qwen-Image"
    assert manifest["signature_info"]["common_name"] == "qwen-batch test signer"
    assert not manifest.get("ingredients")
    # The picture and the XMP mark are still there for readers that know nothing of C2PA.
    with Image.open(io.BytesIO(signed)) as image:
        assert image.size == (64, 64)
        xmp = image.info["xmp"]
    assert read_source_type(xmp.decode() if isinstance(xmp, bytes) else xmp) == TRAINED_ALGORITHMIC_MEDIA


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_edited_image_names_its_inputs(credentials, fmt):
    mark = Mark.for_row(True, "Qwen/Qwen-Image-Edit-2511")
    inputs = [(_input_png((200, 0, 0)), "image/png", "cat.png"), (_input_png((0, 0, 200)), "image/png", "hat.png")]
    signed = credentials.sign(_image(fmt, mark), fmt, mark, title="cat-in-hat", ingredients=inputs)
    store = read_credentials(signed, fmt)
    _assert_valid_but_untrusted(store)
    manifest = _active(store)
    assert [(i["title"], i["relationship"]) for i in manifest["ingredients"]] == [
        ("cat.png", "parentOf"),
        ("hat.png", "componentOf"),
    ]
    actions = _actions(manifest)
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.placed", "c2pa.edited"]
    assert actions[-1]["digitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA


def test_two_writer_threads_can_sign_at_once(credentials):
    mark = Mark.for_row(False, "Qwen/Qwen-Image")
    results, errors = [], []

    def write(fmt: ImageFormat) -> None:
        try:
            for _ in range(3):
                results.append((fmt, credentials.sign(_image(fmt, mark), fmt, mark, title="t")))
        except Exception as error:  # surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(fmt,)) for fmt in (ImageFormat.PNG, ImageFormat.JPEG)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 6
    for fmt, signed in results:
        _assert_valid_but_untrusted(read_credentials(signed, fmt))


@pytest.mark.parametrize(
    ("key", "alg"),
    [(ec.generate_private_key(ec.SECP384R1()), "es384"), (ed25519.Ed25519PrivateKey.generate(), "ed25519")],
)
def test_the_algorithm_follows_the_key(key, alg):
    credentials = ContentCredentials.from_pem(*make_chain(key))
    assert f"alg='{alg}'" in repr(credentials)
    fmt, mark = ImageFormat.JPEG, Mark.for_row(False, "Qwen/Qwen-Image")
    _assert_valid_but_untrusted(read_credentials(credentials.sign(_image(fmt, mark), fmt, mark, title="t"), fmt))


# --- what goes wrong fails up front, and the key never shows ---


@pytest.fixture
def no_signing(monkeypatch):
    """Fails the test if c2pa is asked to make a signer: the error must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a signer was made")

    monkeypatch.setattr(c2pa.Signer, "from_info", refuse)


def _key_lines(key: bytes) -> list[str]:
    return [line for line in key.decode().splitlines() if "-----" not in line]


def _assert_no_key(text: str, key: bytes) -> None:
    for line in _key_lines(key):
        assert line not in text


def test_a_key_of_another_certificate_is_refused(tmp_path, chain_files, no_signing):
    _, other_key = make_chain()
    (tmp_path / "other.pem").write_bytes(other_key)
    with pytest.raises(ConfigError) as error:
        ContentCredentials.from_files(chain_files[0], tmp_path / "other.pem")
    assert "does not match" in str(error.value) and "qwen-batch test signer" in str(error.value)
    _assert_no_key(str(error.value) + repr(error.value), other_key)


def test_a_garbage_certificate_file_is_refused(tmp_path, chain_files, no_signing):
    (tmp_path / "garbage.pem").write_bytes(b"this is not a certificate\n")
    with pytest.raises(ConfigError, match=r"garbage\.pem is not a PEM certificate chain"):
        ContentCredentials.from_files(tmp_path / "garbage.pem", chain_files[1])
    (tmp_path / "garbage.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"garbage\.key is not a PEM private key"):
        ContentCredentials.from_files(chain_files[0], tmp_path / "garbage.key")


def test_a_missing_file_is_named(tmp_path, chain_files, no_signing):
    with pytest.raises(ConfigError, match=r"cannot read --c2pa-cert .*missing\.pem"):
        ContentCredentials.from_files(tmp_path / "missing.pem", chain_files[1])
    with pytest.raises(ConfigError, match=r"cannot read --c2pa-key .*missing\.key"):
        ContentCredentials.from_files(chain_files[0], tmp_path / "missing.key")


def test_a_chain_c2pa_refuses_fails_up_front_with_c2pas_reason():
    # No emailProtection (or other C2PA) extended key usage: cryptography parses it, c2pa will not sign with it.
    chain, key = make_chain(email_protection=False)
    with pytest.raises(ConfigError, match="C2PA cannot sign with --c2pa-cert and --c2pa-key") as error:
        ContentCredentials.from_pem(chain, key)
    _assert_no_key(str(error.value) + repr(error.value), key)


def test_the_key_never_shows(chain_files, credentials):
    key = chain_files[1].read_bytes()
    assert "qwen-batch test signer" in repr(credentials)
    for text in (repr(credentials), str(credentials), f"{credentials}", repr(vars(credentials).get("subject"))):
        _assert_no_key(text, key)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(credentials)


def test_a_signing_failure_names_the_image(credentials):
    mark = Mark.for_row(False, "Qwen/Qwen-Image")
    with pytest.raises(QwenBatchError, match="C2PA could not sign broken"):
        credentials.sign(b"not an image", ImageFormat.PNG, mark, title="broken")
