"""Transcription and translation (multipart uploads), priced per second of audio.

Priced by ``core.pricing``'s "audio" endpoint: ``ceil(fee * (request + audio_per_second *
seconds))``, seconds rounded up to whole seconds.
The hold bounds the duration from the upload (WAV: from its byte rate; other formats at no
less than :data:`MIN_BYTES_PER_SECOND`); settlement uses the upstream's reported duration
(``usage.seconds`` or ``duration``); without one (e.g. ``response_format=text``) the hold.
"""

from __future__ import annotations

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


def seconds_bound(audio: bytes) -> int:
    """Whole seconds the upload can last at most (WAV exactly from its header)."""
    if len(audio) >= 44 and audio[:4] == b"RIFF" and audio[8:12] == b"WAVE":
        byte_rate = struct.unpack_from("<I", audio, 28)[0]
        if byte_rate > 0:
            return max(1, math.ceil(len(audio) / int(byte_rate)))
    return max(1, math.ceil(len(audio) / MIN_BYTES_PER_SECOND))


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
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + kind.encode("latin-1") + b"\r\n\r\n" + raw
    )
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
        elif name in fields:
            previous = fields[name]
            fields[name] = (
                [*previous, payload.decode()]
                if isinstance(previous, list)
                else [
                    previous,
                    payload.decode(),
                ]
            )
        else:
            fields[name] = payload.decode("utf-8", "replace")
    if upload is None or not upload[1]:
        raise InvalidRequest("'file' is required")
    return fields, upload


async def audio_job(request: Request) -> Response:
    ctx = context(request)
    fields, upload = await read_form(request)
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string")
    route: Route = ctx.upstreams.route(model)
    hold_body = {"model": route.model, "seconds": seconds_bound(upload[1])}
    path = request.url.path.removeprefix("/v1/")
    async with paid_job(ctx, request, route.model, hold_body, AUDIO) as job:
        response = await send(ctx, route, path, request, data=fields, files={"file": upload})
        try:
            json_answer = "json" in response.headers.get("content-type", "")
            data: Any = response.json() if json_answer else None
        except ValueError:
            raise UpstreamError("the upstream sent an unreadable answer") from None
        seconds = reported_seconds(data)
        settled = await job.settle({"seconds": seconds} if seconds is not None else None)
    media = response.headers.get("content-type", "application/json")
    return Response(response.content, headers=cost_headers(settled), media_type=media)


ROUTES = [
    HttpRoute("/v1/audio/transcriptions", audio_job, methods=["POST"]),
    HttpRoute("/v1/audio/translations", audio_job, methods=["POST"]),
]
