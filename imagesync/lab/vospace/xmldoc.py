"""The lab VOSpace service's XML: capabilities, node documents, transfer documents, parsing.

Written by hand rather than through ElementTree because CADC's client compares some of it as
strings: ``xsi:type`` must be literally ``vos:ContainerNode`` / ``vos:DataNode`` /
``vos:LinkNode``, and the capability elements must be unqualified (no namespace). Node
listings are produced as iterators of text, one child at a time, so a big container is never
rendered whole in memory. Incoming documents (node XML, transfer requests) are small and parsed
with ElementTree, by local names: the client writes them with any prefix (``ns1:``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

VOS_NS = "http://www.ivoa.net/xml/VOSpace/v2.0"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
CORE = "ivo://ivoa.net/vospace/core#"
PROP_LENGTH = CORE + "length"
PROP_MD5 = CORE + "MD5"
PROP_DATE = CORE + "date"
PROP_CTIME = CORE + "ctime"
PROP_MTIME = CORE + "mtime"
#: properties the service computes; a client posting them back (CADC's does) changes nothing
IMMUTABLE = frozenset({PROP_LENGTH, PROP_MD5, PROP_DATE, PROP_CTIME, PROP_MTIME})

NODE_TYPES = ("ContainerNode", "DataNode", "LinkNode")

# VOSI standard IDs. The first four are the ones CADC's client cannot work without.
STD_AVAILABILITY = "ivo://ivoa.net/std/VOSI#availability"
STD_CAPABILITIES = "ivo://ivoa.net/std/VOSI#capabilities"
STD_NODES = "ivo://ivoa.net/std/VOSpace/v2.0#nodes"
STD_SYNC = "ivo://ivoa.net/std/VOSpace#sync-2.1"
STD_FILES = "ivo://ivoa.net/std/VOSpace#files-proto"
STD_TRANSFERS = "ivo://ivoa.net/std/VOSpace/v2.0#transfers"

SSO_TOKEN = "ivo://ivoa.net/sso#token"
SSO_CERT = "ivo://ivoa.net/sso#tls-with-certificate"
# CADC's client adds this one to transfer documents when it holds a token
CADC_TOKEN = "vos://cadc.nrc.ca~vospace/CADC/std/Auth#token-1.0"

PROTO_GET = "ivo://ivoa.net/vospace/core#httpget"
PROTO_PUT = "ivo://ivoa.net/vospace/core#httpput"
PROTO_SGET = "ivo://ivoa.net/vospace/core#httpsget"
PROTO_SPUT = "ivo://ivoa.net/vospace/core#httpsput"

PUSH = "pushToVoSpace"
PULL = "pullFromVoSpace"

_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
_NS_ATTRS = f'xmlns:vos="{VOS_NS}" xmlns:xsi="{XSI_NS}"'


class XMLError(ValueError):
    """An incoming document the service cannot read (the reply is 400)."""


# --------------------------------------------------------------------------- capabilities


def capabilities(base: str, *, transfers: bool) -> str:
    """The VOSI capabilities document for a service whose endpoints live under ``base``."""

    def cap(std: str, url: str) -> str:
        # Every interface offers anonymous, token and certificate access: the client picks the
        # one matching what it holds (the service decides whether anonymous is enough).
        return (
            f'  <capability standardID="{std}">\n'
            f'    <interface xsi:type="vs:ParamHTTP" role="std" version="2.1">\n'
            f'      <accessURL use="base">{escape(url)}</accessURL>\n'
            "      <securityMethod/>\n"
            f'      <securityMethod standardID="{SSO_TOKEN}"/>\n'
            f'      <securityMethod standardID="{SSO_CERT}"/>\n'
            "    </interface>\n"
            "  </capability>\n"
        )

    caps = [
        cap(STD_CAPABILITIES, f"{base}/capabilities"),
        cap(STD_AVAILABILITY, f"{base}/availability"),
        cap(STD_NODES, f"{base}/nodes"),
        cap(STD_SYNC, f"{base}/sync"),
        cap(STD_FILES, f"{base}/files"),
    ]
    if transfers:
        caps.append(cap(STD_TRANSFERS, f"{base}/transfers"))
    return (
        _HEAD + '<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0" '
        f'xmlns:xsi="{XSI_NS}" xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1">\n'
        + "".join(caps)
        + "</vosi:capabilities>\n"
    )


def availability() -> str:
    return (
        _HEAD + '<vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">\n'
        "  <vosi:available>true</vosi:available>\n"
        "  <vosi:note>the imagesync lab VOSpace service is accepting queries</vosi:note>\n"
        "</vosi:availability>\n"
    )


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class NodeView:
    """What a node document shows of one node."""

    uri: str
    type: str  # one of NODE_TYPES
    properties: Mapping[str, str]
    busy: bool = False
    target: str | None = None  # LinkNode


def _properties(props: Mapping[str, str], indent: str) -> str:
    lines = [f"{indent}<vos:properties>\n"]
    for uri in sorted(props):
        lines.append(
            f"{indent}  <vos:property uri={quoteattr(uri)}>{escape(props[uri])}</vos:property>\n"
        )
    lines.append(f"{indent}</vos:properties>\n")
    return "".join(lines)


def _open_node(node: NodeView, indent: str, ns: bool) -> str:
    attrs = f" {_NS_ATTRS}" if ns else ""
    busy = f' busy="{str(node.busy).lower()}"' if node.type == "DataNode" else ""
    return (
        f"{indent}<vos:node{attrs} uri={quoteattr(node.uri)} "
        f'xsi:type="vos:{node.type}"{busy}>\n' + _properties(node.properties, indent + "  ")
    )


def _node_tail(node: NodeView, indent: str) -> str:
    if node.type == "LinkNode":
        return f"{indent}  <vos:target>{escape(node.target or '')}</vos:target>\n"
    if node.type == "DataNode":
        return f"{indent}  <vos:accepts/>\n{indent}  <vos:provides/>\n"
    return ""


def node_document(node: NodeView, children: Iterable[NodeView] | None = None) -> Iterator[str]:
    """A node document, as pieces of text; a container's children (if given) in order."""
    yield _HEAD + _open_node(node, "", ns=True) + _node_tail(node, "")
    if node.type == "ContainerNode":
        yield "  <vos:accepts/>\n  <vos:provides/>\n  <vos:capabilities/>\n  <vos:nodes>\n"
        for child in children or ():
            yield (
                _open_node(child, "    ", ns=False)
                + _node_tail(child, "    ")
                + ("      <vos:nodes/>\n" if child.type == "ContainerNode" else "")
                + "    </vos:node>\n"
            )
        yield "  </vos:nodes>\n"
    yield "</vos:node>\n"


@dataclass
class ParsedNode:
    """A node document a client sent (PUT creates, POST sets properties)."""

    uri: str
    type: str
    properties: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)  # xsi:nil="true"
    target: str | None = None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse(body: bytes) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise XMLError(f"not well-formed XML: {exc}") from None


def parse_node(body: bytes) -> ParsedNode:
    root = _parse(body)
    if _local(root.tag) != "node":
        raise XMLError(f"expected a node document, got <{_local(root.tag)}>")
    uri = root.get("uri")
    if not uri:
        raise XMLError("the node has no uri attribute")
    xsi_type = root.get(f"{{{XSI_NS}}}type", "vos:DataNode")
    kind = xsi_type.rsplit(":", 1)[-1]
    if kind not in NODE_TYPES:
        raise XMLError(f"unsupported node type {xsi_type!r}")
    parsed = ParsedNode(uri=uri, type=kind)
    for el in root.iter():
        name = _local(el.tag)
        if name == "property":
            puri = el.get("uri")
            if not puri:
                raise XMLError("a property has no uri attribute")
            if el.get(f"{{{XSI_NS}}}nil", "false").lower() == "true":
                parsed.deleted.add(puri)
            else:
                parsed.properties[puri] = el.text or ""
        elif name == "target" and el is not root:
            parsed.target = (el.text or "").strip()
    return parsed


# --------------------------------------------------------------------------- transfers


@dataclass(frozen=True)
class Transfer:
    """A transfer request: what, which way, over which protocols (in the client's order)."""

    target: str
    direction: str
    protocols: tuple[str, ...]
    keep_bytes: bool = True


def parse_transfer(body: bytes) -> Transfer:
    root = _parse(body)
    if _local(root.tag) != "transfer":
        raise XMLError(f"expected a transfer document, got <{_local(root.tag)}>")
    target = direction = ""
    keep = True
    protocols: list[str] = []
    for el in root:
        name = _local(el.tag)
        if name == "target":
            target = (el.text or "").strip()
        elif name == "direction":
            direction = (el.text or "").strip()
        elif name == "protocol" and el.get("uri"):
            protocols.append(el.get("uri", ""))
        elif name == "keepBytes":
            keep = (el.text or "").strip().lower() != "false"
    if not target or not direction:
        raise XMLError("a transfer needs a target and a direction")
    return Transfer(target, direction, tuple(dict.fromkeys(protocols)), keep)


def transfer_document(transfer: Transfer, endpoints: Iterable[tuple[str, str]]) -> str:
    """The negotiated transfer: target, direction, and one protocol per (protocol, URL)."""
    parts = [
        _HEAD,
        f'<vos:transfer xmlns:vos="{VOS_NS}" version="2.1">\n',
        f"  <vos:target>{escape(transfer.target)}</vos:target>\n",
        f"  <vos:direction>{escape(transfer.direction)}</vos:direction>\n",
    ]
    for proto, url in endpoints:
        parts.append(
            f"  <vos:protocol uri={quoteattr(proto)}>\n"
            f"    <vos:endpoint>{escape(url)}</vos:endpoint>\n"
            "  </vos:protocol>\n"
        )
    parts.append("</vos:transfer>\n")
    return "".join(parts)


def job_document(job_id: str, phase: str, error: str | None) -> str:
    """A UWS job (what GET {transfers}/{id} answers)."""
    err = (
        f'  <uws:errorSummary type="fatal"><uws:message>{escape(error)}</uws:message>'
        "</uws:errorSummary>\n"
        if error
        else ""
    )
    return (
        _HEAD + '<uws:job xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0">\n'
        f"  <uws:jobId>{escape(job_id)}</uws:jobId>\n"
        f"  <uws:phase>{escape(phase)}</uws:phase>\n" + err + "</uws:job>\n"
    )
