"""Request ids: vLLM's engine ids, bounded for the channel, and the ids clients know them by.

vLLM's engine id is ``{external}-{8 random hex}``; the external id is ``cmpl-{X}-{prompt
index}`` (``/v1/completions``) or ``chatcmpl-{X}`` (chat), where X is the client's
``X-Request-Id`` header, else the body's ``request_id``, else a random uuid. The response id
is ``cmpl-{X}`` / ``chatcmpl-{X}``.

X is the client's to choose: vLLM's HTTP server takes headers up to 4 MB and any latin-1
text (a body ``request_id`` any JSON string). The channel carries ids of at most
``MAX_ID_CHARS``, so the hook sends each engine id with X in bounded form
(:func:`bounded_engine_id`): X itself when it is plain (printable ASCII, at most
``PLAIN_MAX`` characters), else a recognisable prefix plus a digest of all of it,
``{prefix}~h{32 hex}``. Nothing else travels: the sidecar bounds a long or odd id it is
asked by the same way (:func:`lookup_forms`), so the full id still finds its request. One
request's odd id thus costs nothing to the requests that share its steps.

The annotating middleware (``detector.serving.openai_middleware``) makes each annotated request's id
its own by appending a tag, ``~ld{16 hex}``, to X; bounding keeps the tag, and the ids
without it stay aliases (:func:`request_aliases`), so the client's own X still finds it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["MAX_ID_CHARS", "ClientIds", "bounded", "bounded_engine_id", "client_ids",
           "lookup_forms", "request_aliases", "split_tag"]

# The longest id the channel carries (``RequestRows.req_id``).
MAX_ID_CHARS = 512
# The longest X sent as it is; longer (or odd) ones go as prefix + digest.
PLAIN_MAX = 200
PREFIX_CHARS = 48
_PLAIN = re.compile(r"[\x20-\x7e]*")
_ODD = re.compile(r"[^\x21-\x7e]")
_DIGEST_HEX = 32
TAG_RE = re.compile(r"~ld[0-9a-f]{16}\Z")
_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}\Z")
_PROMPT_INDEX = re.compile(r"\A(cmpl-.*)-([0-9]+)\Z", re.DOTALL)
_KINDS = ("cmpl-", "chatcmpl-")


def split_tag(x: str) -> tuple[str, str]:
    """``X~ld0123456789abcdef`` -> (``X``, ``~ld0123456789abcdef``); no tag: (x, "")."""
    m = TAG_RE.search(x)
    return (x[:m.start()], m.group(0)) if m else (x, "")


def bounded(x: str) -> str:
    """X as the channel carries it: X when plain, else ``{prefix}~h{digest}`` (prefix: its
    first characters, odd ones as ``_``; digest: SHA-256 of all of it, as UTF-8). A
    middleware tag is kept after it."""
    base, tag = split_tag(x)
    if len(base) <= PLAIN_MAX and _PLAIN.fullmatch(base):
        return x
    prefix = _ODD.sub("_", base[:PREFIX_CHARS])
    digest = hashlib.sha256(base.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_HEX]
    return f"{prefix}~h{digest}{tag}"


def _parts(engine_id: str) -> tuple[str, str, str, str]:
    """(kind, X, ``-{prompt index}`` or "", ``-{8 hex}`` or "") of an engine id."""
    m = _INTERNAL_SUFFIX.search(engine_id)
    suffix = m.group(0) if m else ""
    external = engine_id[:len(engine_id) - len(suffix)]
    p = _PROMPT_INDEX.match(external)
    if p:
        return "cmpl-", p.group(1)[len("cmpl-"):], f"-{p.group(2)}", suffix
    if external.startswith("chatcmpl-"):
        return "chatcmpl-", external[len("chatcmpl-"):], "", suffix
    return "", external, "", suffix


def bounded_engine_id(engine_id: str) -> str:
    """The engine id with its X bounded (:func:`bounded`): what the hook sends. At most
    ``MAX_ID_CHARS`` for any id vLLM makes; plain ids are returned as they are."""
    if len(engine_id) <= PLAIN_MAX and _PLAIN.fullmatch(engine_id):
        return engine_id
    kind, x, index, suffix = _parts(engine_id)
    return f"{kind}{bounded(x)}{index}{suffix}"


def lookup_forms(request_id: str) -> list[str]:
    """The forms to look a client's id up by, first the id itself: a long or odd id (an
    X-Request-Id, a response id, an engine id) in the bounded form the hook sent. A
    non-ASCII id is also read as vLLM reads header bytes (latin-1), in case it was sent
    as UTF-8."""
    forms = [request_id]
    if len(request_id) <= PLAIN_MAX and _PLAIN.fullmatch(request_id):
        return forms
    variants = [request_id]
    if not request_id.isascii():
        try:
            variants.append(request_id.encode("utf-8").decode("latin-1"))
        except UnicodeEncodeError:  # lone surrogates: not from a header
            pass
    for v in variants:
        forms += [bounded_engine_id(v), bounded(v)]
        forms += [kind + bounded(v[len(kind):]) for kind in _KINDS if v.startswith(kind)]
    return list(dict.fromkeys(forms))


def request_aliases(req_id: str) -> list[str]:
    """Every id an API client may know a request by, most specific first: its engine id,
    external id, response id and X (and each without a middleware tag)."""
    aliases = [req_id]
    external = _INTERNAL_SUFFIX.sub("", req_id)
    if external != req_id:
        aliases.append(external)
    m = _PROMPT_INDEX.match(external)
    xs: list[str] = []
    if m:  # /v1/completions: cmpl-{X}-{prompt index}; the response id is cmpl-{X}
        response_id, index = m.group(1), m.group(2)
        if index == "0":
            aliases.append(response_id)
        xs.append(response_id[len("cmpl-"):] + ("" if index == "0" else f"-{index}"))
        untagged = split_tag(response_id)[0]
        if untagged != response_id:
            aliases += [f"{untagged}-{index}"] + ([untagged] if index == "0" else [])
            xs.append(untagged[len("cmpl-"):] + ("" if index == "0" else f"-{index}"))
    elif external.startswith("chatcmpl-"):
        xs.append(external[len("chatcmpl-"):])
        untagged = split_tag(external)[0]
        if untagged != external:
            aliases.append(untagged)
            xs.append(untagged[len("chatcmpl-"):])
    return list(dict.fromkeys(a for a in aliases + xs if a))


@dataclass(frozen=True, slots=True)
class ClientIds:
    """The ids an API client knows a request by, read from the engine's id."""

    response_id: str
    x_request_id: str | None
    prompt_index: int | None


def client_ids(engine_id: str) -> ClientIds:
    """``cmpl-X-0-1a2b3c4d`` -> response ``cmpl-X``, X-Request-Id ``X``, prompt 0;
    ``chatcmpl-X-1a2b3c4d`` -> ``chatcmpl-X``, ``X``. A middleware tag is not part of
    them: the client never saw it."""
    kind, x, index, _ = _parts(engine_id)
    x = split_tag(x)[0]
    if kind == "cmpl-":
        return ClientIds(f"cmpl-{x}", x, int(index[1:]))
    if kind == "chatcmpl-" and x:
        return ClientIds(f"chatcmpl-{x}", x, None)
    return ClientIds(kind + x, None, None)
