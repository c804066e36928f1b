"""The IPTC "made by AI" mark in an image's XMP packet, as the IPTC recommends for generated images.

`Iptc4xmpExt:DigitalSourceType` says a model made the picture (trainedAlgorithmicMedia) or changed a person's
image (compositeWithTrainedAlgorithmicMedia); it is what platforms (Meta, Google, the EU AI Act's machine-readable
marking) read. `Iptc4xmpExt:AISystemUsed` (IPTC Photo Metadata 2025.1) names the model and `xmp:CreatorTool` the
program. Re-encoding an image strips the packet: the C2PA credentials (content_credentials.py) are the signed
version of the same statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

from qwen_batch import __version__

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)

IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_NS = "http://ns.adobe.com/xap/1.0/"
DC_NS = "http://purl.org/dc/elements/1.1/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
# Our own properties (the row's JSON): a URN, as no web address is ours to name; readers such as exiftool show
# properties of namespaces they do not know under the prefix.
QWEN_BATCH_NS = "urn:qwen-batch:xmp:1.0/"


@dataclass(frozen=True)
class Mark:
    source_type: str
    model: str
    generator: str = field(default=f"qwen-batch {__version__}")
    title: str | None = None

    @classmethod
    def for_row(cls, starts_from_image: bool, model: str, *, title: str | None = None) -> Mark:
        """Rows that start from a user's image (edit, image-to-image, inpainting) are composites; the rest were
        made by the model alone."""
        source = COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA if starts_from_image else TRAINED_ALGORITHMIC_MEDIA
        return cls(source_type=source, model=model, title=title)


def xmp_packet(mark: Mark, extra_json: str | None = None) -> bytes:
    """A complete XMP packet (UTF-8) with the mark, and `extra_json` (the row's JSON) when given."""
    title = ""
    if mark.title:
        title = (
            f'\n   <dc:title><rdf:Alt><rdf:li xml:lang="x-default">{escape(mark.title)}</rdf:li></rdf:Alt></dc:title>'
        )
    extra = "" if extra_json is None else f"\n   <qwenbatch:Metadata>{escape(extra_json)}</qwenbatch:Metadata>"
    # The packet wrapper the XMP spec defines (its BOM and id); end="w": editors may rewrite it in place.
    packet = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="{RDF_NS}">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="{IPTC_EXT_NS}"
    xmlns:xmp="{XMP_NS}"
    xmlns:dc="{DC_NS}"
    xmlns:qwenbatch="{QWEN_BATCH_NS}"
    Iptc4xmpExt:DigitalSourceType={quoteattr(mark.source_type)}
    Iptc4xmpExt:AISystemUsed={quoteattr(mark.model)}
    xmp:CreatorTool={quoteattr(mark.generator)}>{title}{extra}
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
    return packet.encode("utf-8")


def _descriptions(xmp_text: str) -> list[ElementTree.Element]:
    # Only the x:xmpmeta element: the packet wrapper's processing instructions are not part of the XML tree.
    match = re.search(r"<x:xmpmeta.*</x:xmpmeta>", xmp_text, re.DOTALL)
    if match is None:
        return []
    try:
        root = ElementTree.fromstring(match.group(0))
    except ElementTree.ParseError:
        return []
    return root.findall(f".//{{{RDF_NS}}}Description")


def _property(xmp_text: str, namespace: str, name: str) -> str | None:
    # An XMP property is an attribute of rdf:Description (as written above) or its child element (as other
    # tools, exiftool among them, often write it).
    for description in _descriptions(xmp_text):
        value = description.get(f"{{{namespace}}}{name}")
        if value is not None:
            return value
        child = description.find(f"{{{namespace}}}{name}")
        if child is not None:
            resource = child.get(f"{{{RDF_NS}}}resource")
            return resource if resource is not None else (child.text or "")
    return None


def read_source_type(xmp_text: str) -> str | None:
    """The IPTC digital source type of an XMP packet, None when it has none."""
    return _property(xmp_text, IPTC_EXT_NS, "DigitalSourceType")


def read_extra_json(xmp_text: str) -> str | None:
    """The row's JSON that `xmp_packet(..., extra_json=...)` put in the packet, None when it has none."""
    return _property(xmp_text, QWEN_BATCH_NS, "Metadata")
