"""Transcription and translation (multipart uploads), priced per second of audio.

Priced by ``core.pricing``'s "audio" endpoint: ``ceil(fee * (request + audio_per_second *
seconds))``, seconds rounded up to whole seconds.

The hold bounds the duration from the upload, never from what the client claims: a WAV
header is trusted only when it is self-consistent PCM (``byte_rate == sample_rate x
block_align``, plausible rates, channels and sample sizes), since that is how a decoder
reads the samples too; any other upload is bounded at :data:`MIN_BYTES_PER_SECOND`.
Settlement uses the duration the upstream reports (``usage.seconds`` or ``duration``). To
get one, a request for ``json`` or ``text`` (the default is ``json``) is forwarded as
``verbose_json`` and the answer converted back to the format asked for (a model that
refuses ``verbose_json`` with a 400 is asked again in the client's format); ``srt`` and
``vtt`` carry no duration and settle at the hold, like an answer that reports none.
"""

from __future__ import annotations

import json
import math
import struct
from decimal import Decimal, InvalidOperation
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from nodeprov.core.pricing import Endpoint
from nodeprov.errors import InvalidRequest, UpstreamError
from nodeprov.http.billing import cost_headers
from nodeprov.http.context import UnsupportedMediaType, context
from nodeprov.http.openai_routes import paid_job, send
from nodeprov.upstream import Route

AUDIO: Endpoint = "audio"
# 4 kbit/s: below any codec usable for speech, so the bound is never short.
MIN_BYTES_PER_SECOND = 500
# WAV formats whose samples are fixed-size: PCM, IEEE float, A-law, mu-law.
_FIXED_SIZE_FORMATS = frozenset({1, 3, 6, 7})
# WAVE_FORMAT_EXTENSIBLE names its codec in a SubFormat GUID (decoders read that, not the
# tag): trusted only when the GUID names one of the fixed-size formats above.
_EXTENSIBLE = 0xFFFE
_GUID_TAIL = bytes.fromhex("00001000800000aa00389b71")
_WAV_HEADER = struct.Struct("<HHIIHH")  # format, channels, sample rate, byte rate, align, bits
# Formats the node converts back from ``verbose_json`` (which reports the duration).
_CONVERTED_FORMATS = frozenset({"json", "text"})


def wav_byte_rate(audio: bytes) -> int | None:
    """Bytes per second of a WAV upload, if its ``fmt`` chunk describes plausible fixed-size
    samples consistently; None otherwise (not WAV, compressed, or a forged header)."""
    if len(audio) < 12 or audio[:4] != b"RIFF" or audio[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(audio):
        chunk, size = audio[offset : offset + 4], struct.unpack_from("<I", audio, offset + 4)[0]
        if chunk == b"fmt ":
            if size < _WAV_HEADER.size or offset + 8 + _WAV_HEADER.size > len(audio):
                return None
            fmt, channels, rate, byte_rate, align, bits = _WAV_HEADER.unpack_from(audio, offset + 8)
            if fmt == _EXTENSIBLE:
                fmt = _extensible_format(audio, offset + 8, size)
            plausible = (
                fmt in _FIXED_SIZE_FORMATS
                and 1 <= channels <= 32
                and 1_000 <= rate <= 768_000
                and bits in (8, 16, 24, 32, 64)
                and align == channels * bits // 8
                and byte_rate == rate * align
            )
            return byte_rate if plausible else None
        offset += 8 + size + (size & 1)  # chunks are padded to even sizes
    return None


def _extensible_format(audio: bytes, start: int, size: int) -> int | None:
    """The format tag in a WAVE_FORMAT_EXTENSIBLE ``fmt`` chunk's SubFormat GUID, if well formed.

    Layout after the 16 basic bytes: cbSize (>= 22), valid bits, channel mask, then the GUID
    ``<tag>-0000-0010-8000-00aa00389b71``.
    """
    guid_at = start + 24
    if size < 40 or guid_at + 16 > len(audio):
        return None
    if struct.unpack_from("<H", audio, start + 16)[0] < 22:
        return None
    tag, tail = struct.unpack_from("<I", audio, guid_at)[0], audio[guid_at + 4 : guid_at + 16]
    return tag if tail == _GUID_TAIL else None


def seconds_bound(audio: bytes) -> int:
    """Whole seconds the upload can last at most (a consistent WAV exactly from its header)."""
    byte_rate = wav_byte_rate(audio) or MIN_BYTES_PER_SECOND
    return max(1, math.ceil(len(audio) / byte_rate))


def upstream_fields(fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The form fields to forward (asking for ``verbose_json`` where the node can convert the
    answer back) and the response format the client asked for."""
    wanted = fields.get("response_format") or "json"
    if not isinstance(wanted, str):
        raise InvalidRequest("'response_format' must be given once")
    if wanted not in _CONVERTED_FORMATS:
        return fields, wanted
    return {**fields, "response_format": "verbose_json"}, wanted


def client_answer(data: Any, content: bytes, media: str, wanted: str) -> tuple[bytes, str]:
    """The upstream's answer in the format the client asked for (body, media type)."""
    if wanted not in _CONVERTED_FORMATS or not isinstance(data, dict):
        return content, media
    text = data.get("text")
    if not isinstance(text, str):
        return content, media
    if wanted == "text":
        return text.encode("utf-8"), "text/plain; charset=utf-8"
    answer: dict[str, Any] = {"text": text}
    if isinstance(data.get("usage"), dict):
        answer["usage"] = data["usage"]
    return json.dumps(answer, ensure_ascii=False).encode("utf-8"), "application/json"


def reported_seconds(data: Any) -> int | None:
    """The duration the upstream reports, rounded up to whole seconds."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    value = usage.get("seconds") if isinstance(usage, dict) else None
    value = data.get("duration") if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        exact = Decimal(str(value))
    except InvalidOperation:
        return None
    return math.ceil(exact) if exact.is_finite() and exact >= 0 else None


async def read_form(request: Request) -> tuple[dict[str, Any], tuple[str, bytes, str]]:
    """The text fields and the ``file`` part of a multipart/form-data body."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("expected Content-Type multipart/form-data")
    raw = await request.body()
    try:
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + kind.encode("latin-1") + b"\r\n\r\n" + raw
        )
    except RecursionError:  # multipart nested in multipart, a thousand levels deep
        raise InvalidRequest("the multipart body is nested too deeply") from None
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise InvalidRequest("the multipart body is malformed")
    fields: dict[str, Any] = {}
    upload: tuple[str, bytes, str] | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if name == "file":
            upload = (part.get_filename() or "audio", payload, part.get_content_type())
        else:
            text = payload.decode("utf-8", "replace")  # a field is text; undecodable bytes too
            previous = fields.get(name)
            if previous is None:
                fields[name] = text
            else:  # a repeated field (e.g. timestamp_granularities[]) becomes a list
                fields[name] = [*previous, text] if isinstance(previous, list) else [previous, text]
    if upload is None or not upload[1]:
        raise InvalidRequest("'file' is required")
    return fields, upload


async def audio_job(request: Request) -> Response:
    ctx = context(request)
    fields, upload = await read_form(request)
    forward, wanted = upstream_fields(fields)
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string")
    route: Route = ctx.upstreams.route(model)
    hold_body = {"model": route.model, "seconds": seconds_bound(upload[1])}
    path = request.url.path.removeprefix("/v1/")
    async with await paid_job(ctx, request, route.model, hold_body, AUDIO) as job:
        try:
            response = await send(ctx, route, path, request, data=forward, files={"file": upload})
        except InvalidRequest as exc:
            if forward is fields or exc.details.get("upstream_status") != 400:
                raise
            # Some models answer only json/text (no duration): ask again as the client did.
            response = await send(ctx, route, path, request, data=fields, files={"file": upload})
        try:
            json_answer = "json" in response.headers.get("content-type", "")
            data: Any = response.json() if json_answer else None
        except ValueError:
            raise UpstreamError("the upstream sent an unreadable answer") from None
        seconds = reported_seconds(data)
        settled = await job.settle({"seconds": seconds} if seconds is not None else None)
    media = response.headers.get("content-type", "application/json")
    content, media = client_answer(data, response.content, media, wanted)
    return Response(content, headers=cost_headers(settled), media_type=media)


ROUTES = [
    HttpRoute("/v1/audio/transcriptions", audio_job, methods=["POST"]),
    HttpRoute("/v1/audio/translations", audio_job, methods=["POST"]),
]
