"""Audio is held from a bound the client cannot forge and settled from the upstream's duration.

The fake upstream hears 16 kHz 16-bit mono PCM: 32,000 bytes a second of upload. At the test
price a transcription costs 1000 msat + 300 msat per (whole) second.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import httpx
import openai
import pytest

from nodeprov.http.audio_routes import MIN_BYTES_PER_SECOND, seconds_bound, wav_byte_rate
from tests.conftest import TokenMaker
from tests.support.fake_upstream import FakeUpstream
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    node_fixture,
    upstream_fixture,
)


def audio_cost(seconds: int) -> int:
    return 1000 + 300 * seconds


def wav(
    seconds: float,
    *,
    rate: int = 16_000,
    channels: int = 1,
    bits: int = 16,
    byte_rate: int | None = None,
    fmt: int = 1,
) -> bytes:
    """A WAV file whose header says what the arguments say (``byte_rate`` may lie)."""
    data = b"\0" * int(32_000 * seconds)
    align = channels * bits // 8
    declared = rate * align if byte_rate is None else byte_rate
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, declared, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_header_is_trusted_only_when_consistent() -> None:
    honest = wav(1.5)
    assert wav_byte_rate(honest) == 32_000
    assert seconds_bound(honest) == 2
    stereo_48k = wav(1, rate=48_000, channels=2)
    assert wav_byte_rate(stereo_48k) == 192_000
    forged = [
        wav(1.5, byte_rate=0xFFFFFFFF),  # the reported attack: 1 s held for any length
        wav(1.5, byte_rate=0),
        wav(1.5, rate=1),  # consistent, but no real audio is sampled at 1 Hz
        wav(1.5, rate=4_000_000),
        wav(1.5, bits=12),
        wav(1.5, fmt=0x55),  # MP3 inside WAV: no fixed sample size
        b"RIFF\0\0\0\0WAVEfmt \x02\0\0\0\x01\0" + b"\0" * (len(honest) - 22),  # cut short
    ]
    for audio in forged:
        assert wav_byte_rate(audio) is None
        assert seconds_bound(audio) == math.ceil(len(audio) / MIN_BYTES_PER_SECOND)


@pytest.mark.parametrize("response_format", [None, "json", "text"])
async def test_forged_wav_header_pays_for_the_duration_the_upstream_reports(
    node: Node, make_token: TokenMaker, upstream: FakeUpstream, response_format: str | None
) -> None:
    """1.8 s of audio under a header whose byte rate claims it lasts a millionth of that."""
    audio = wav(1.8, byte_rate=0xFFFFFFFF)
    # The hold is the floor bitrate's bound (about two minutes): the token must cover it.
    token = await make_token(50)
    fields: dict[str, Any] = {"model": "fake-whisper"}
    if response_format:
        fields["response_format"] = response_format
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post(
            "/audio/transcriptions",
            data=fields,
            files={"file": ("a.wav", audio, "audio/wav")},
            headers={"X-Cashu": token},
        )
    assert r.status_code == 200, r.text
    seconds = math.ceil(len(audio) / 32_000)
    assert int(r.headers["x-cost-msat"]) == audio_cost(seconds)
    assert upstream.last_request.form["response_format"] == "verbose_json"
    if response_format == "text":
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text.startswith("fake transcribe of")
    else:
        assert set(r.json()) <= {"text", "usage"} and r.json()["text"].startswith("fake")
    change = await make_token.redeem(r.headers["x-cashu"])
    assert change == 50 - math.ceil(audio_cost(seconds) / 1000)


async def test_formats_the_node_cannot_convert_pass_through(
    node: Node, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    key_token = await make_token(100)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        key = (await http.post("/wallet/create", json={"cashu_token": key_token})).json()
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key["api_key"], max_retries=0)
    audio = wav(1.5)
    verbose = await client.audio.transcriptions.with_raw_response.create(
        model="fake-whisper", file=("a.wav", io.BytesIO(audio)), response_format="verbose_json"
    )
    assert verbose.parse().duration == pytest.approx(len(audio) / 32_000, abs=0.001)
    assert int(verbose.headers["x-cost-msat"]) == audio_cost(2)
    # srt carries no duration: the hold (the consistent header's length) is the price.
    srt = await client.audio.transcriptions.with_raw_response.create(
        model="fake-whisper", file=("a.wav", io.BytesIO(audio)), response_format="srt"
    )
    assert upstream.last_request.form["response_format"] == "srt"
    assert int(srt.headers["x-cost-msat"]) == audio_cost(seconds_bound(audio))
    plain = await client.audio.translations.create(
        model="fake-whisper", file=("a.wav", io.BytesIO(audio))
    )
    assert plain.text.startswith("fake translate")


async def test_response_format_given_twice_is_400_before_the_hold(
    node: Node, make_token: TokenMaker
) -> None:
    token = await make_token(20)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post(
            "/audio/transcriptions",
            data={"model": "fake-whisper", "response_format": ["json", "text"]},
            files={"file": ("a.wav", wav(1), "audio/wav")},
            headers={"X-Cashu": token},
        )
    assert r.status_code == 400, r.text
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}


@pytest.mark.parametrize("response_format", [None, "text"])
async def test_a_model_that_answers_only_json_is_asked_again_in_the_clients_format(
    node: Node, make_token: TokenMaker, upstream: FakeUpstream, response_format: str | None
) -> None:
    """Some transcription models refuse ``verbose_json``: the node asks again as the client did,
    settling from the duration that answer reports (else the hold) instead of failing."""
    audio = wav(1.5)
    token = await make_token(20)
    fields: dict[str, Any] = {"model": "fake-whisper+jsononly"}
    if response_format:
        fields["response_format"] = response_format
    seen = len(upstream.requests)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post(
            "/audio/transcriptions",
            data=fields,
            files={"file": ("a.wav", audio, "audio/wav")},
            headers={"X-Cashu": token},
        )
    assert r.status_code == 200, r.text
    asked = [rec.form.get("response_format", "json") for rec in upstream.requests[seen:]]
    assert asked == ["verbose_json", response_format or "json"]
    if response_format == "text":
        assert r.text.startswith("fake transcribe of")
        assert int(r.headers["x-cost-msat"]) == audio_cost(seconds_bound(audio))
    else:
        assert r.json()["text"].startswith("fake transcribe of")
        assert int(r.headers["x-cost-msat"]) == audio_cost(2)
    change = await make_token.redeem(r.headers["x-cashu"])
    assert change == 20 - math.ceil(int(r.headers["x-cost-msat"]) / 1000)


# KSDATAFORMAT_SUBTYPE base GUID (xxxxxxxx-0000-0010-8000-00aa00389b71); the first 4 bytes
# are a WAV format tag. 0x0055 is MPEG Layer 3: FFmpeg's riffdec.c parse_waveformatex takes
# the codec from this subformat when the format tag is 0xFFFE, and decodes the data as MP3.
MP3_SUBFORMAT = struct.pack("<I", 0x0055) + bytes.fromhex(
    "000010008000 00aa00389b71".replace(" ", "")
)


def extensible_wav(payload: bytes, subformat: bytes) -> bytes:
    channels, rate, bits = 32, 768_000, 64
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * align, align, bits)
    fmt += struct.pack("<HHI", 22, bits, 0) + subformat  # cbSize, valid bits, mask, GUID
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def test_extensible_wav_with_a_compressed_subformat_is_bounded_at_the_floor() -> None:
    """Decoders take an extensible WAV's codec from its SubFormat GUID: 2 MB of MP3 (about
    500 s of speech) behind a consistent-looking extensible header must not hold 1 s."""
    payload = b"\xff\xfb\x50\xc4" + bytes(2_000_000)  # an MP3 frame header, then data
    audio = extensible_wav(payload, MP3_SUBFORMAT)
    floor = -(-len(audio) // MIN_BYTES_PER_SECOND)
    assert seconds_bound(audio) >= floor, seconds_bound(audio)


def test_extensible_wav_with_a_pcm_subformat_is_trusted() -> None:
    pcm = struct.pack("<I", 1) + MP3_SUBFORMAT[4:]
    audio = extensible_wav(bytes(768_000 * 256 * 2), pcm)
    assert wav_byte_rate(audio) == 768_000 * 256
    assert seconds_bound(audio) == 3
