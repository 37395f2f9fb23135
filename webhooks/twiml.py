"""TwiML answers. Voice uses the twilio SDK's builders; the SMS answer is one fixed shape on
the hot path, so it is written directly (escaped exactly as the SDK's XML writer would)."""

from __future__ import annotations

from xml.sax.saxutils import escape

from aiohttp import web
from twilio.twiml.voice_response import VoiceResponse

_XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>'
EMPTY = _XML_HEAD + "<Response />"


def response(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/xml")


def sms(text: str | None) -> str:
    """``<Response><Message>text</Message></Response>``, or an empty answer."""
    if not text:
        return EMPTY
    return f"{_XML_HEAD}<Response><Message>{escape(text)}</Message></Response>"


def stream(url: str, parameters: dict[str, str], *, status_action: str | None = None, say: str | None = None) -> str:
    """Hand the call to a bridge: ``<Connect><Stream url=…>`` with per-call ``<Parameter>``s
    (never query strings: Twilio drops them from the stream URL), after ``say`` if given.
    ``status_action``: where Twilio asks what next when the stream ends."""
    vr = VoiceResponse()
    if say:
        vr.say(say)
    connect = vr.connect(action=status_action) if status_action else vr.connect()
    st = connect.stream(url=url)
    for name, value in parameters.items():
        st.parameter(name=name, value=value)
    return str(vr)


def voicemail(apology: str, action: str, *, max_length_s: int = 120, transcribe_callback: str | None = None) -> str:
    """Apologise, then record a voicemail whose result Twilio posts to ``action`` (and its
    transcript, when asked, to ``transcribe_callback``)."""
    vr = VoiceResponse()
    vr.say(apology)
    transcription = {"transcribe": True, "transcribe_callback": transcribe_callback} if transcribe_callback else {}
    vr.record(action=action, method="POST", max_length=max_length_s, play_beep=True, timeout=5, **transcription)
    vr.say("We did not get a recording. Goodbye.")
    vr.hangup()
    return str(vr)


def hang_up() -> str:
    vr = VoiceResponse()
    vr.hangup()
    return str(vr)


def say_and_hang_up(text: str) -> str:
    vr = VoiceResponse()
    vr.say(text)
    vr.hangup()
    return str(vr)
