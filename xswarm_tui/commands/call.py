"""``xswarm call``: place simulated Twilio calls into a bridge (optionally through the voice webhook)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, EXIT_FAILED, fail, load


def register(app: typer.Typer) -> None:
    app.command("call")(call)


def call(
    wav: Path = typer.Argument(
        None, help="WAV file to play (any rate, mono or stereo). Default: 3 s of test speech-band audio."
    ),
    bridge: str = typer.Option(
        None,
        "--bridge",
        help="Bridge URL to connect to (default ws://<server.host>:<server.bridge_port>/twilio). The upgrade is "
        "signed for server.bridge_public_url (XSWARM_BRIDGE_PUBLIC_URL) when that is set, as Twilio would sign it.",
    ),
    webhooks: str = typer.Option(
        None,
        "--webhooks",
        help="Webhooks base URL: POST a signed voice webhook first and follow its TwiML. Read from the settings: "
        "the request is signed for server.public_url (XSWARM_PUBLIC_URL) when set, and a stream TwiML sends to "
        "server.bridge_public_url is opened on --bridge (default: the local bridge) instead, so a node behind a "
        "proxy is reachable from the node itself.",
    ),
    auth_token: str = typer.Option(
        None, "--auth-token", help="Twilio auth token for signatures (default: TWILIO_AUTH_TOKEN)."
    ),
    caller: str = typer.Option(
        "+15005550006", "--from", help="Caller number (sent to the voice webhook, or put in the minted call token)."
    ),
    param: list[str] = typer.Option(
        [],
        "--param",
        help="Extra <Parameter> name=value for a direct bridge call (repeatable); user_id, caller and theme "
        "go into the minted call token, the only place the bridge reads them from.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Write the reply to this WAV (8 kHz; several calls get -1, -2, ... suffixes)."
    ),
    calls: int = typer.Option(1, "--calls", help="Concurrent calls."),
    stagger: float = typer.Option(0.1, "--stagger", help="Seconds between call starts."),
    tail: float = typer.Option(0.5, "--tail", help="Seconds of silence after the audio, to hear the end of the reply."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Play audio into the bridge as Twilio would and report what came back."""
    import asyncio
    import json

    from engine.bridge import simulator
    from engine.config import secret
    from engine.telephony.calltoken import Claims, mint

    if not 1 <= calls <= 1000:
        fail("--calls must be between 1 and 1000", EXIT_BAD_INPUT)
    if stagger < 0 or tail < 0:
        fail("--stagger and --tail must be 0 or more", EXIT_BAD_INPUT)
    extra: dict[str, str] = {}
    for item in param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"--param expects name=value, got {item!r}", EXIT_BAD_INPUT)
        extra[name] = value
    settings = load()
    token = auth_token or secret(settings.twilio.auth_token)
    if webhooks and not token:
        fail(
            "--webhooks needs the Twilio auth token to sign the request (--auth-token or TWILIO_AUTH_TOKEN)",
            EXIT_BAD_INPUT,
        )
    audio = _read_audio(wav) if wav is not None else _test_audio()
    bridge_url = simulator.websocket_url(bridge or f"ws://{settings.server.host}:{settings.server.bridge_port}")
    public_bridge = settings.server.bridge_public_url
    public_stream = simulator.websocket_url(public_bridge) if public_bridge else None
    token_secret = secret(settings.telephony.call_token_secret)

    def reachable(target: simulator.StreamTarget) -> simulator.StreamTarget:
        """A stream TwiML sent to this node's public bridge URL: open it on ``bridge_url``,
        signed for the public URL (the address Twilio would have dialled)."""
        if public_stream and target.url == public_stream:
            return replace(target, url=bridge_url, signed_url=public_stream)
        return target

    async def one(k: int) -> simulator.CallReport:
        await asyncio.sleep(k * stagger)
        call_sid = simulator.new_sid("CA")
        if webhooks and token:  # a missing token was refused above
            target = await simulator.voice_webhook(
                webhooks,
                token or "",  # checked above: --webhooks needs it
                call_sid=call_sid,
                account_sid=settings.twilio.account_sid or "AC" + "0" * 32,
                caller=caller,
                public_url=settings.server.public_url,
            )
            target = reachable(target)
        else:
            params = dict(extra)
            if token_secret and "token" not in params:  # what the voice webhook would have minted
                claims = Claims(extra.get("user_id"), extra.get("caller", caller), extra.get("theme"))
                params["token"] = mint(token_secret, call_sid, settings.telephony.call_token_ttl_s, claims=claims)
            target = simulator.StreamTarget(bridge_url, params, signed_url=public_stream)
        return await simulator.stream_call(target, audio, auth_token=token, call_sid=call_sid, tail_s=tail)

    async def run_all() -> list[simulator.CallReport | BaseException]:
        return await asyncio.gather(*(one(k) for k in range(calls)), return_exceptions=True)

    where = f"the voice webhook at {webhooks}" if webhooks else bridge_url
    seconds = len(audio) / 8000  # μ-law, 8 kHz: one byte a sample
    if not as_json:  # people see it start at once; --json output stays one document
        typer.echo(f"calling {where}: {calls} call(s), {seconds:.1f} s of audio each (+{tail:.1f} s tail)…", err=True)
    results = asyncio.run(run_all())
    failures = 0
    rows = []
    for k, result in enumerate(results):
        if isinstance(result, BaseException):
            failures += 1
            rows.append({"error": str(result) if isinstance(result, simulator.SimulationError) else repr(result)})
            continue
        if out is not None:
            path = out if calls == 1 else out.with_name(f"{out.stem}-{k + 1}{out.suffix or '.wav'}")
            _write_wav(path, result.reply)
        if result.close_code not in (1000, None):
            failures += 1
        rows.append(result.to_json())
    if as_json:
        typer.echo(json.dumps(rows if calls > 1 else rows[0], indent=2))
    else:
        for row in rows:
            typer.echo(_describe(row))
    if failures:
        raise typer.Exit(EXIT_FAILED)


def _describe(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"call failed: {row['error']}"
    lag = row["playout_lag_ms"].get("p50")
    gap = row["gap_ms"]
    return (
        f"{row['call_sid']}: sent {row['chunks_sent']} chunks, got {row['chunks_received']} "
        f"({row['reply_seconds']} s), first audio {row['first_audio_ms']} ms, "
        f"echo delay {row['echo_delay_ms']} ms, frame spacing p50/p99 {gap.get('p50')}/{gap.get('p99')} ms, "
        f"playout lag p50 {lag} ms, closed {row['close_code']} {row['close_reason']!r}"
    )


def _read_audio(path: Path) -> bytes:
    """Any PCM WAV -> 8 kHz mu-law bytes."""
    import wave

    import numpy as np

    from engine.audio import mulaw
    from engine.audio.resample import resample_to

    try:
        with wave.open(str(path), "rb") as wf:
            rate, width, channels = wf.getframerate(), wf.getsampwidth(), wf.getnchannels()
            raw = wf.readframes(wf.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        fail(f"cannot read {path}: {exc}", EXIT_BAD_INPUT)
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        samples = (((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 8).astype(np.float32) / 8388608
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    else:
        fail(f"{path}: unsupported sample width {width}", EXIT_BAD_INPUT)
    mono = samples.reshape(-1, channels).mean(axis=1)
    if mono.size == 0:
        fail(f"{path} holds no audio", EXIT_BAD_INPUT)
    return mulaw.encode(resample_to(mono, rate, 8000)).tobytes()


def _test_audio(seconds: float = 3.0) -> bytes:
    """Speech-band noise in syllable-like bursts: easy to find again by cross-correlation."""
    from engine.audio.testsignal import speech_band_ulaw

    return speech_band_ulaw(seconds, seed=2026, level=0.5, syllables_hz=4.0)


def _write_wav(path: Path, ulaw: bytes) -> None:
    import wave

    from engine.audio import mulaw

    try:
        with wave.open(str(path), "wb") as wf:
            wf.setnchannels(1)
            wf.setsampwidth(2)
            wf.setframerate(8000)
            wf.writeframes(mulaw.decode_int16(ulaw).astype("<i2").tobytes())
    except OSError as exc:
        fail(f"cannot write {path}: {exc}")
