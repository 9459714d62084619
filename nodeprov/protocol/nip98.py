"""NIP-98 HTTP auth: ``Authorization: Nostr <base64 of a signed kind 27235 event>``; sans I/O.

:func:`verify` checks a header's event against the request it came with, in this order, and
raises :class:`Nip98Rejected` (a 401) naming the first check that failed:

1. ``base64``: the credential is base64 (standard or URL-safe, padding optional) of JSON;
2. ``event``: that JSON is a well-formed Nostr event;
3. ``kind``: the kind is 27235;
4. ``signature``: its id is the NIP-01 hash and its BIP-340 signature is valid;
5. ``created_at``: within :data:`WINDOW_SECONDS` of now, either side;
6. ``u``: one ``u`` tag, equal to one of the URLs the request may have been addressed by
   (:func:`request_urls`), query string included;
7. ``method``: one ``method`` tag, equal to the request's method;
8. ``payload``: with a body, a ``payload`` tag equal to the SHA-256 hex of its exact bytes
   (required, so a captured header cannot pay for another body); without one, a ``payload``
   tag present must be the hash of nothing.

What this module cannot check is replay: the caller records each signed event once (its
signature, a unique key in the ledger: :mod:`nodeprov.core.auth_events`) and refuses a
second use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from nodeprov.errors import InvalidEvent, Unauthorized
from nodeprov.protocol.nostr_event import Event, verify_event

KIND = 27235
WINDOW_SECONDS = 60
SCHEME = "Nostr"
# A kind 27235 event with a long URL is well under 2 KiB; the cap bounds the work on junk.
MAX_CREDENTIAL_CHARS = 16 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Nip98Rejected(Unauthorized):
    """A NIP-98 ``Authorization`` header that does not authorize this request (401).

    ``check`` names the failed check (``base64``, ``event``, ``kind``, ``signature``,
    ``created_at``, ``u``, ``method``, ``payload``, ``replayed``).
    """

    code = "invalid_nostr_auth"

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"NIP-98 auth failed ({check}): {message}", check=check)
        self.check = check


@dataclass(frozen=True)
class Authorized:
    """A NIP-98 event that passed every stateless check: who signed it, and its identity."""

    pubkey: str
    event_id: str
    created_at: int
    sig: str


def decode(credential: str) -> Event:
    """The event inside a ``Nostr`` credential (shape only; :func:`verify` checks the rest)."""
    text = credential.strip()
    if not text or len(text) > MAX_CREDENTIAL_CHARS:
        raise Nip98Rejected("base64", f"the credential must be 1 to {MAX_CREDENTIAL_CHARS} chars")
    try:
        raw = text.encode("ascii")
        raw += b"=" * (-len(raw) % 4)
        altchars = b"-_" if b"-" in raw or b"_" in raw else None
        data = base64.b64decode(raw, altchars=altchars, validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise Nip98Rejected("base64", "the credential is not base64") from None
    try:
        return Event.from_json(data)
    except InvalidEvent as exc:
        raise Nip98Rejected("event", exc.message) from None


def payload_hash(body: bytes) -> str:
    """The ``payload`` tag a body needs: SHA-256 of its exact bytes, lowercase hex."""
    return hashlib.sha256(body).hexdigest()


def _one_tag(event: Event, name: str) -> str:
    values = event.tag_values(name)
    if len(values) != 1:
        what = "no" if not values else "more than one"
        raise Nip98Rejected(name, f"the event has {what} '{name}' tag")
    return values[0]


def normalize_url(url: str) -> str | None:
    """``url`` compared as the same resource: scheme and host lowercased, a default port
    dropped, an empty path as ``/``; path and query kept byte for byte. None if not absolute
    http(s)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.fragment:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{parts.path or '/'}{query}"


def _host(url: str) -> str | None:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower() if host else None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return True


def request_urls(
    own_url: str, public_bases: Iterable[str], path: str, query: str, *, listen_host: str = ""
) -> tuple[str, ...]:
    """The URLs a request may have been addressed by, for the ``u`` check.

    ``public_bases`` are the node's configured public URLs (``node.http_url``, ``onion_url``,
    perhaps with a path prefix a reverse proxy strips): each joined with the request's
    ``path`` and ``query``. ``own_url`` is the URL the server saw (scheme from a trusted
    proxy, host from the ``Host`` header). With public URLs configured it counts only when its
    host is one of theirs, the address the node listens on, or an IP address / ``localhost``:
    ``Host`` is the client's to choose, and a header signed for another service at the same
    path must not pay here.
    """
    bases = [b.rstrip("/") for b in public_bases if b]
    suffix = path + (f"?{query}" if query else "")
    urls = [b + suffix for b in bases]
    host = _host(own_url)
    known = {_host(b) for b in bases} | {listen_host.lower()}
    if not bases or (host is not None and (host in known or _is_address(host))):
        urls.append(own_url)
    return tuple(urls)


def verify(
    credential: str,
    *,
    method: str,
    urls: Sequence[str],
    body: bytes,
    now: int,
    window: int = WINDOW_SECONDS,
) -> Authorized:
    """Every stateless check of a ``Nostr`` credential against its request (module doc)."""
    event = decode(credential)
    if event.kind != KIND:
        raise Nip98Rejected("kind", f"the event's kind is {event.kind}, not {KIND}")
    if not verify_event(event):
        raise Nip98Rejected("signature", "the event's id or signature is invalid")
    if abs(now - event.created_at) > window:
        raise Nip98Rejected(
            "created_at",
            f"the event was made at {event.created_at}, more than {window} s from now ({now})",
        )
    signed_url = _one_tag(event, "u")
    wanted = {n for n in (normalize_url(u) for u in urls) if n is not None}
    if normalize_url(signed_url) not in wanted:
        raise Nip98Rejected(
            "u", f"the 'u' tag {signed_url!r} is not this request's URL ({' or '.join(urls)})"
        )
    signed_method = _one_tag(event, "method")
    if signed_method.upper() != method.upper():
        raise Nip98Rejected(
            "method", f"the 'method' tag is {signed_method!r}, the request is {method}"
        )
    payloads = event.tag_values("payload")
    if len(payloads) > 1:
        raise Nip98Rejected("payload", "the event has more than one 'payload' tag")
    if body and not payloads:
        raise Nip98Rejected(
            "payload", "a request with a body needs a 'payload' tag (SHA-256 hex of the body)"
        )
    if payloads and payloads[0].lower() != payload_hash(body):
        raise Nip98Rejected("payload", "the 'payload' tag is not the SHA-256 of this body")
    return Authorized(event.pubkey, event.id, event.created_at, event.sig)
