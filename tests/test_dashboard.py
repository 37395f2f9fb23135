"""The browser dashboard on the supervisor port, in a real headless Chromium (Playwright).

Everything here is real: the Runtime with the echo model and the 80 ms scheduler, the Twilio
bridge with calls from engine/bridge/simulator.py (20 ms mu-law chunks at real-time pace), the
supervisor server, and the system's Chromium, whose fake microphone plays a WAV we write. What
the caller hears during a takeover is compared with that WAV by cross-correlation.

One screenshot per state, at 1280x800 and at 390x844 (a phone), is kept under
``$XSWARM_TEST_ARTEFACTS/dashboard`` (default ``<tmp>/xswarm-artefacts/dashboard``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser_support import MIC_RATE, chromium_path, launch_args, mic_signal, strongest_match, write_wav
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from engine.audio import mulaw
from engine.audio.resample import resample_to
from engine.bridge.simulator import StreamTarget, stream_call
from engine.config import ConfigError, default_toml, load_settings
from engine.runtime import Runtime
from engine.supervisor import origin, tokens
from engine.supervisor.auth import fingerprint, load_tokens

OPERATOR = "operator-token-0123456789abcdef"
MONITOR = "monitor-token-0123456789abcdef"
PROXY_ORIGIN = "https://console.example.com"
ARTEFACTS = (
    Path(os.environ.get("XSWARM_TEST_ARTEFACTS") or Path(tempfile.gettempdir()) / "xswarm-artefacts") / "dashboard"
)
VIEWPORTS = ((1280, 800), (390, 844))
CHUNK = 160
SILENCE = bytes(mulaw.encode(np.zeros(CHUNK, np.float32)))
TONE = bytes(mulaw.encode((0.5 * np.sin(2 * np.pi * 440 * np.arange(CHUNK) / 8000)).astype(np.float32)))
COLLECT_PLAYED = """
window.__played = [];
document.addEventListener("xswarm-audio", (e) => window.__played.push(e.detail));
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_runtime(supervisor: dict[str, Any]) -> Runtime:
    settings = load_settings(supervisor=supervisor, model={"name": "echo", "slots": 4})
    rt = Runtime(settings, model_spec="echo", bridge_port=free_port(), supervisor_port=free_port(), webhooks_port=0)
    rt.start()
    deadline = time.monotonic() + 20
    while rt.model is None:
        assert time.monotonic() < deadline, "echo model did not load"
        time.sleep(0.02)
    return rt


@pytest.fixture
def runtime(xswarm_home):
    rt = start_runtime({"token": OPERATOR, "monitor_token": MONITOR, "allowed_origins": [PROXY_ORIGIN]})
    try:
        yield rt
    finally:
        rt.stop()


@pytest.fixture
def runtime_with_token_file(xswarm_home):
    """Tokens from ``<config>/supervisor-tokens.json``, which ``xswarm supervisor token`` rotates."""
    rt = start_runtime({})
    try:
        yield rt
    finally:
        rt.stop()


@pytest.fixture
async def browser(tmp_path: Path):
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("Playwright is missing: run `bash .ci/setup --dev` (it is in the dev extra)")
    executable = chromium_path()
    if executable is None:
        pytest.fail("no Chromium found: run `bash .ci/setup --dev` (apt-get install chromium) or set XSWARM_CHROMIUM")
    wav = write_wav(tmp_path / "mic.wav", mic_signal())
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=executable, args=launch_args(wav))
        try:
            yield chromium
        finally:
            await chromium.close()


def page_url(rt: Runtime) -> str:
    return f"http://127.0.0.1:{rt.supervisor_port}/"


async def open_page(browser: Any, rt: Runtime) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    await page.add_init_script(COLLECT_PLAYED)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.errors = errors
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.requests = requests
    await page.goto(page_url(rt))
    return page


async def log_in(page: Any, token: str, name: str = "") -> None:
    await page.fill("input[name=token]", token)
    if name:
        await page.fill("input[name=name]", name)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#who:not(:empty)")


async def shoot(page: Any, state: str) -> None:
    """One screenshot of the page per viewport, for a person to look at."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    for width, height in VIEWPORTS:
        await page.set_viewport_size({"width": width, "height": height})
        await page.wait_for_timeout(150)
        await page.screenshot(path=str(ARTEFACTS / f"{state}-{width}x{height}.png"))
    await page.set_viewport_size({"width": VIEWPORTS[0][0], "height": VIEWPORTS[0][1]})


def assert_no_page_errors(page: Any, allowed: str | None = None) -> None:
    errors = [e for e in page.errors if not (allowed and re.search(allowed, e))]
    assert errors == [], errors


class PhoneCall:
    """A simulated Twilio call in the background that records what the caller hears."""

    def __init__(self, rt: Runtime, call_sid: str, seconds: float = 60.0) -> None:
        every = 20  # a 20 ms tone burst every 400 ms: the caller's side of a listen is audible
        audio = b"".join(TONE if k % every == 0 else SILENCE for k in range(int(seconds / 0.02)))
        self.call_sid = call_sid
        self.heard: list[tuple[float, bytes]] = []
        self.task = asyncio.get_running_loop().create_task(
            stream_call(
                StreamTarget(f"ws://127.0.0.1:{rt.bridge_port}/twilio", {"caller": "+15550001234"}),
                audio,
                call_sid=call_sid,
                on_media=lambda _t, payload: self.heard.append((time.time(), payload)),
            )
        )

    def audio_between(self, t0: float, t1: float) -> np.ndarray:
        """What the caller heard between two wall-clock times, as float samples at 8 kHz."""
        return mulaw.decode(b"".join(p for at, p in list(self.heard) if t0 <= at < t1))

    async def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


async def wait_for_call(rt: Runtime, call_sid: str) -> None:
    deadline = time.monotonic() + 10
    while rt.calls.get(call_sid) is None:
        assert time.monotonic() < deadline, f"call {call_sid} was not admitted"
        await asyncio.sleep(0.02)


def http_get(url: str, origin: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Origin": origin} if origin else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


# --------------------------------------------------------------------------------- HTTP side


async def test_the_page_is_served_with_a_strict_policy_and_only_its_own_files(runtime: Runtime) -> None:
    status, headers, body = await asyncio.to_thread(http_get, page_url(runtime))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    policy = headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    host = f"127.0.0.1:{runtime.supervisor_port}"
    assert f"connect-src 'self' ws://{host} wss://{host}" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    html = body.decode()
    assert re.search(r'<input name="token"', html)
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert references and all(ref.startswith("/static/") for ref in references), references
    assert "<script>" not in html and "style=" not in html  # nothing inline: the CSP would block it
    for ref in references + ["/static/connection.js", "/static/player-worklet.js", "/static/mic-worklet.js"]:
        status, headers, _ = await asyncio.to_thread(http_get, page_url(runtime).rstrip("/") + ref)
        assert status == 200, ref
        assert headers["X-Content-Type-Options"] == "nosniff" and "Content-Security-Policy" in headers
    for bad in ("/static/../auth.py", "/static/nope.js", "/static/index.html", "/static/", "/elsewhere"):
        status, _, _ = await asyncio.to_thread(http_get, page_url(runtime).rstrip("/") + bad)
        assert status == 404, bad
    status, _, body = await asyncio.to_thread(http_get, page_url(runtime) + "health")
    assert status == 200 and json.loads(body)["status"] == "ok"


async def test_the_socket_refuses_pages_from_other_origins(runtime: Runtime) -> None:
    port = runtime.supervisor_port
    assert port is not None
    url = f"ws://127.0.0.1:{port}/"
    for foreign in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, origin=Origin(foreign))
        assert refused.value.response.status_code == 403, foreign
    own = f"http://127.0.0.1:{port}"
    for allowed in (Origin(own), Origin(PROXY_ORIGIN), None):  # the page's own, the configured proxy, a program
        async with connect(url, origin=allowed) as ws:
            await ws.send(json.dumps({"v": 1, "type": "auth", "token": MONITOR}))
            assert json.loads(await ws.recv())["type"] == "snapshot", allowed


def test_origin_rules() -> None:
    assert origin.normalize("HTTPS://Console.Example.com:443/") == "https://console.example.com"
    assert origin.normalize("http://[::1]:9999") == "http://[::1]:9999"
    for bad in ("https://x.example/path", "ftp://x.example", "null", "https://user@x.example", "x.example"):
        with pytest.raises(origin.OriginError):
            origin.normalize(bad)
    assert origin.allowed("http://127.0.0.1:9999", "127.0.0.1:9999")
    assert origin.allowed("https://console.example.com", "console.example.com")  # a proxy that keeps Host
    assert origin.allowed("http://localhost", "localhost:80")
    assert not origin.allowed("http://127.0.0.1:9998", "127.0.0.1:9999")
    assert not origin.allowed("https://console.example.com", "console.example.com:8443")  # 443 is not 8443
    assert not origin.allowed("http://evil.example", "127.0.0.1:9999")
    assert not origin.allowed("http://evil.example", None)
    assert origin.allowed("https://console.example.com", "127.0.0.1:9999", frozenset({"https://console.example.com"}))
    assert origin.allowed(None, "127.0.0.1:9999")  # a program, not a page


def test_allowed_origins_setting_is_checked_at_load() -> None:
    settings = load_settings(supervisor={"allowed_origins": ["HTTPS://Console.Example.com"]})
    assert settings.supervisor.allowed_origins == ["https://console.example.com"]
    with pytest.raises(ConfigError, match="allowed_origins"):
        load_settings(supervisor={"allowed_origins": ["https://console.example.com/dashboard"]})
    # `xswarm config init` writes it as a TOML list, so uncommenting the line keeps it valid
    line = next(x for x in default_toml().splitlines() if x.startswith("# allowed_origins"))
    assert tomllib.loads(line.removeprefix("# ")) == {"allowed_origins": []}


# ------------------------------------------------------------------------------ in a browser


async def test_operator_listens_takes_over_with_the_microphone_hands_back_and_hangs_up(
    runtime: Runtime, browser: Any
) -> None:
    page = await open_page(browser, runtime)
    await shoot(page, "01-login")
    await log_in(page, OPERATOR, name="alice")
    actor = (await page.text_content("#who") or "").split(" ")[0]
    assert actor.startswith("alice#")
    assert await page.evaluate("sessionStorage.getItem('xswarm.token')") == OPERATOR
    call = PhoneCall(runtime, "CA0000000000000000000000000000web1")
    try:
        await wait_for_call(runtime, call.call_sid)
        row = page.locator(f"tr[data-call-sid='{call.call_sid}']")
        await row.wait_for()
        assert "AI" in await row.locator(".c-mode").inner_text()
        await page.wait_for_function(
            "() => document.querySelector('#spark polyline').getAttribute('points').length > 0"
        )
        await page.wait_for_timeout(1000)  # a few samples into the row and the sparkline
        await shoot(page, "02-call-live")

        # listen: both directions reach the page's audio graph
        await row.click()
        await page.click("[data-action=listen]")
        await page.wait_for_function(
            "() => ['caller', 'ai'].every(d => window.__played.some(p => p.direction === d && p.rms > 0.05))",
            timeout=10000,
        )
        played = await page.evaluate("window.__played")
        assert {p["callId"] for p in played} == {call.call_sid}
        behind = [p["playedAt"] - p["capturedAt"] for p in played]
        assert 0 < float(np.median(behind)) < 1.0, behind
        await page.wait_for_selector("#listen-delay:not(:empty)")
        await shoot(page, "03-listening")

        # take over with the browser's (fake) microphone: push-to-talk first, nothing while released
        await page.click("[data-action=takeover]")
        await page.wait_for_selector(f"tr[data-call-sid='{call.call_sid}'][data-mode=operator]")
        assert runtime.calls.get(call.call_sid).operator == actor  # type: ignore[union-attr]
        await page.wait_for_selector("#talk:not([hidden])")
        await page.wait_for_timeout(800)
        quiet_from = time.time()
        await page.wait_for_timeout(700)
        released = call.audio_between(quiet_from, time.time())
        await page.locator("#whisper input").focus()  # Space must reach the page, not a text box
        await page.locator("#whisper input").blur()
        await page.keyboard.down("Space")
        await page.wait_for_selector("#mic-state.on")
        await page.wait_for_timeout(600)  # the mic's first frames through the 80 ms tick
        talk_from = time.time()
        await page.wait_for_timeout(1600)
        pushed = call.audio_between(talk_from, time.time())
        await shoot(page, "04-taken-over-talking")
        await page.keyboard.up("Space")
        await page.check("#always-on")
        await page.wait_for_timeout(600)
        always_from = time.time()
        await page.wait_for_timeout(1200)
        always = call.audio_between(always_from, time.time())

        reference = resample_to(mic_signal(), MIC_RATE, 8000)
        assert len(pushed) > 8000 and len(always) > 6000
        match_pushed, match_always = strongest_match(pushed, reference), strongest_match(always, reference)
        print(
            f"caller hears the browser mic: correlation {match_pushed:.2f} push-to-talk, {match_always:.2f} always on"
        )
        assert match_pushed > 0.5 and match_always > 0.5
        assert float(np.sqrt(np.mean(released**2))) < 0.01  # push-to-talk released: nothing sent

        # hand back: the caller hears the AI again (the echo of its own bursts), not the microphone
        await page.click("[data-action=handback]")
        await page.wait_for_selector(f"tr[data-call-sid='{call.call_sid}'][data-mode=ai]")
        await page.wait_for_timeout(500)
        back_from = time.time()
        await page.wait_for_timeout(1200)
        back = call.audio_between(back_from, time.time())
        assert len(back) > 4000, "the caller heard nothing after the hand-back"
        assert strongest_match(back, reference) < 0.3
        assert await page.locator("#talk").is_hidden()
        await shoot(page, "05-handed-back")

        # mute and unmute the AI, whisper to it; transfer is refused here (no transfer number)
        await page.click("[data-action=mute]")
        await page.wait_for_selector(f"tr[data-call-sid='{call.call_sid}'][data-mode=muted]")
        await page.click("[data-action=unmute]")
        await page.wait_for_selector(f"tr[data-call-sid='{call.call_sid}'][data-mode=ai]")
        await page.fill("#whisper input", "offer the refund")
        await page.click("#whisper button")
        await page.wait_for_selector("#feed li:has-text('whisper → ok')")
        assert await page.input_value("#whisper input") == ""
        await page.wait_for_selector("#detail-transcript:has-text('offer the refund')")  # the echo model says it
        await page.click("[data-action=transfer]")
        await page.fill("#confirm-to input", "555-0100")  # a number the node refuses: not E.164
        await page.click("#confirm-ok")
        await page.wait_for_selector("#toast:has-text('E.164')")
        await page.click("[data-action=transfer]")
        assert await page.input_value("#confirm-to input") == ""
        await page.click("#confirm-ok")  # blank: the node's transfer number, which is not set here
        await page.wait_for_selector("#toast:has-text('unavailable')")

        # hang up, after a confirmation
        await page.click("[data-action=hangup]")
        await page.wait_for_selector("#confirm[open]")
        await shoot(page, "06-confirm-hangup")
        await page.click("#confirm-ok")
        await row.wait_for(state="detached")
        await asyncio.wait_for(asyncio.shield(call.task), 5)
        assert runtime.calls.get(call.call_sid) is None
        await page.wait_for_selector("#feed li:has-text('ended')")
        await shoot(page, "07-hung-up")
    finally:
        await call.stop()
    assert_no_page_errors(page)
    own = page_url(runtime).rstrip("/")
    assert page.requests and all(
        url.startswith((own + "/", f"ws://127.0.0.1:{runtime.supervisor_port}/")) for url in page.requests
    ), page.requests


async def test_a_monitor_gets_a_read_only_page_and_its_forged_actions_are_refused(
    runtime: Runtime, browser: Any
) -> None:
    call = PhoneCall(runtime, "CA0000000000000000000000000000web2")
    try:
        await wait_for_call(runtime, call.call_sid)
        page = await open_page(browser, runtime)
        await log_in(page, MONITOR, name="eve")
        assert (await page.text_content("#who") or "").endswith("monitor")
        row = page.locator(f"tr[data-call-sid='{call.call_sid}']")
        await row.click()
        await page.wait_for_selector("#detail:not([hidden])")
        assert await row.locator(".c-caller").inner_text() == "+1•••••••234"
        actions = await page.eval_on_selector_all("button[data-action]", "bs => bs.map(b => b.dataset.action)")
        assert set(actions) <= {"listen", "unlisten"}, actions
        assert await page.locator("#whisper, #talk, #reveal, #drain, #resume").count() == 0
        await page.click("[data-action=listen]")
        await page.wait_for_function("() => window.__played.some(p => p.rms > 0.05)", timeout=10000)
        await shoot(page, "08-monitor")

        # what a monitor could still try by hand, from the page's own origin and token
        answers = await page.evaluate(
            """(callSid) => new Promise((resolve, reject) => {
                const ws = new WebSocket(`ws://${location.host}/`);
                const answers = [];
                const token = sessionStorage.getItem("xswarm.token");
                ws.onopen = () => ws.send(JSON.stringify({v: 1, type: "auth", token}));
                ws.onmessage = (ev) => {
                    const msg = JSON.parse(ev.data);
                    if (msg.type === "snapshot") {
                        for (const type of ["TakeOver", "HangUp", "Whisper"]) {
                            const extra = type === "Whisper" ? {text: "say yes"} : {};
                            ws.send(JSON.stringify({v: 1, type, id: type, call_id: callSid, ...extra}));
                        }
                    } else if (msg.id === "TakeOver" || msg.id === "HangUp" || msg.id === "Whisper") {
                        answers.push(msg);
                        if (answers.length === 3) { ws.close(); resolve(answers); }
                    }
                };
                setTimeout(() => reject(new Error("no answers")), 5000);
            })""",
            call.call_sid,
        )
        assert [(a["type"], a["code"]) for a in answers] == [("error", "forbidden")] * 3
        live = runtime.calls.get(call.call_sid)
        assert live is not None and live.mode == "ai"
    finally:
        await call.stop()
    # the browser's own refusal of a binary frame (WebSocket closed before answers) is no error here
    assert_no_page_errors(page)


RESAMPLE_IN_PAGE = """async ([rate, hz]) => {
    const ctx = new OfflineAudioContext(1, rate, rate);  // one second at the device's rate
    await ctx.audioWorklet.addModule("/static/mic-worklet.js");
    const osc = ctx.createOscillator();
    osc.frequency.value = hz;
    const gain = ctx.createGain();
    gain.gain.value = 0.5;
    const node = new AudioWorkletNode(ctx, "xswarm-mic", {numberOfOutputs: 1, outputChannelCount: [1]});
    const frames = [];
    node.port.onmessage = (e) => frames.push(Array.from(e.data.pcm));
    osc.connect(gain).connect(node).connect(ctx.destination);
    osc.start();
    await ctx.startRendering();
    await new Promise((r) => setTimeout(r, 300));
    return frames;
}"""


async def test_the_microphone_is_resampled_to_24khz_pcm16_frames(runtime: Runtime, browser: Any) -> None:
    """The page's capture worklet turns any device rate into the protocol's 80 ms frames of
    24 kHz PCM16: a tone keeps its pitch and level, and one above 12 kHz does not fold back."""
    page = await open_page(browser, runtime)

    async def through_worklet(rate: int, hz: int) -> np.ndarray:
        frames = await page.evaluate(RESAMPLE_IN_PAGE, [rate, hz])
        assert frames and all(len(f) == 1920 for f in frames), rate
        return np.concatenate([np.asarray(f, np.float64) for f in frames])[2400:] / 32768  # past the start

    for rate in (48000, 44100, 16000):
        pcm = await through_worklet(rate, 1000)
        assert len(pcm) > 12000
        spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
        peak_hz = np.argmax(spectrum) * 24000 / len(pcm)
        assert abs(peak_hz - 1000) < 5, (rate, peak_hz)
        assert 0.3 < float(np.sqrt(np.mean(pcm**2))) * np.sqrt(2) < 0.6, rate  # amplitude 0.5, kept
        if rate > 24000:
            folded = await through_worklet(rate, 15000)  # above the 12 kHz Nyquist
            assert float(np.sqrt(np.mean(folded**2))) < 0.01, rate  # filtered out, not aliased to 9 kHz
    assert_no_page_errors(page)


CADDYFILE = """{{
	admin off
	auto_https disable_redirects
	skip_install_trust
	http_port {http_port}
	https_port {https_port}
	storage file_system {storage}
}}

https://127.0.0.1:{https_port} {{
	tls internal
	reverse_proxy 127.0.0.1:{upstream}
}}
"""
"""The README's TLS proxy (Caddy, which keeps Host as is) on free ports, with its own local CA."""


@pytest.fixture
def caddy(runtime: Runtime, tmp_path: Path):
    executable = shutil.which("caddy")
    if executable is None:
        pytest.fail("no caddy: run `bash .ci/setup --dev` (apt-get install caddy)")
    https_port = free_port()
    config = tmp_path / "Caddyfile"
    config.write_text(
        CADDYFILE.format(
            http_port=free_port(), https_port=https_port, storage=tmp_path / "caddy", upstream=runtime.supervisor_port
        )
    )
    log = (tmp_path / "caddy.log").open("wb")
    proc = subprocess.Popen(
        [executable, "run", "--adapter", "caddyfile", "--config", str(config)],
        env={**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "caddy.log").read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "caddy did not start"
                time.sleep(0.1)
        yield f"https://127.0.0.1:{https_port}/"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def test_the_page_works_through_the_tls_proxy_over_wss(runtime: Runtime, browser: Any, caddy: str) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, ignore_https_errors=True)
    page = await context.new_page()
    await page.add_init_script(COLLECT_PLAYED)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(caddy)
    call = PhoneCall(runtime, "CA0000000000000000000000000000web4")
    try:
        await log_in(page, OPERATOR)
        await wait_for_call(runtime, call.call_sid)
        await page.click(f"tr[data-call-sid='{call.call_sid}']")
        await page.click("[data-action=listen]")
        await page.wait_for_function("() => window.__played.some(p => p.rms > 0.05)", timeout=10000)
    finally:
        await call.stop()
    assert sockets == [caddy.replace("https://", "wss://")]  # the page chose wss by itself
    assert await page.evaluate("() => window.isSecureContext")  # so the microphone may be used


async def test_wrong_token_logout_and_reconnect(runtime: Runtime, browser: Any) -> None:
    page = await open_page(browser, runtime)
    await page.fill("input[name=token]", "not-the-token-0123456789")
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#login-error:has-text('refused')")
    assert await page.evaluate("sessionStorage.getItem('xswarm.token')") is None
    assert page.url == page_url(runtime)  # the token never went into the URL

    await log_in(page, OPERATOR)
    call = PhoneCall(runtime, "CA0000000000000000000000000000web3")
    try:
        await wait_for_call(runtime, call.call_sid)
        await page.click(f"tr[data-call-sid='{call.call_sid}']")
        await page.click("[data-action=listen]")
        await page.wait_for_function("() => window.__played.length > 0", timeout=10000)
        # the node goes away: the page says so and keeps trying; it comes back on the same port
        runtime.call_soon(runtime.supervisor.stop()).result(10)
        await page.wait_for_selector("#link:has-text('disconnected, retrying')")
        await shoot(page, "09-disconnected")
        played_before = await page.evaluate("() => window.__played.length")
        runtime.call_soon(runtime.supervisor.start("127.0.0.1", runtime.supervisor_port)).result(10)
        await page.wait_for_selector("#link", state="hidden", timeout=15000)
        await page.wait_for_selector(f"tr[data-call-sid='{call.call_sid}']")
        # it listens again by itself: audio of the call flows into the page once more
        await page.wait_for_function(f"() => window.__played.length > {played_before} + 5", timeout=10000)
        assert await page.is_visible("[data-action=unlisten]")
    finally:
        await call.stop()

    await page.click("#logout")
    await page.wait_for_selector("#login-view:not([hidden])")
    assert await page.evaluate("sessionStorage.length") == 0
    # the refused login and the dropped socket are expected console errors; nothing else is
    assert_no_page_errors(page, allowed=r"WebSocket|ERR_CONNECTION_REFUSED|status of 4\d\d")


async def test_a_token_refused_mid_session_returns_to_login_and_the_new_role_gets_its_page(
    runtime: Runtime, browser: Any
) -> None:
    """The node restarts with new tokens (rotated): the open monitor page is refused on its next
    connect and asks for a token again; the operator token then gets the full page back."""
    page = await open_page(browser, runtime)
    await log_in(page, MONITOR)
    assert await page.locator("[data-operator]").count() == 0
    runtime.call_soon(runtime.supervisor.stop()).result(10)
    new_operator, new_monitor = "rotated-operator-token-0123456789", "rotated-monitor-token-0123456789"
    runtime.settings = load_settings(
        supervisor={"token": new_operator, "monitor_token": new_monitor}, model={"name": "echo", "slots": 4}
    )
    runtime.call_soon(runtime.supervisor.start("127.0.0.1", runtime.supervisor_port)).result(10)
    await page.wait_for_selector("#login-error:has-text('refused')", timeout=15000)
    assert await page.evaluate("() => sessionStorage.getItem('xswarm.token')") is None
    await log_in(page, new_operator)
    await page.wait_for_selector("#who:has-text('operator')")
    assert await page.locator("#detail [data-action=takeover]").count() == 1
    assert_no_page_errors(page, allowed=r"WebSocket|ERR_CONNECTION_REFUSED")


async def test_an_operator_drains_the_node_and_resumes_it(runtime: Runtime, browser: Any) -> None:
    page = await open_page(browser, runtime)
    await log_in(page, OPERATOR)
    await page.wait_for_selector("#system dd:has-text('ready: takes calls')")
    await page.click("#drain")
    await page.click("#confirm-ok")
    await page.wait_for_selector("#system dd:has-text('draining: no new calls')")
    assert runtime.node_state == "draining"
    await page.wait_for_selector("#feed li:has-text('draining')")
    await shoot(page, "11-node-draining")
    await page.click("#resume")
    await page.wait_for_selector("#system dd:has-text('ready: takes calls')")
    assert runtime.node_state == "ready"
    assert_no_page_errors(page)


async def test_a_retired_token_sends_the_page_back_to_login(runtime_with_token_file: Runtime, browser: Any) -> None:
    """Rotation (engine/supervisor/tokens.py): a page logged in with a token that is then
    retired is closed (4401), says why, and the new token logs in."""
    rt = runtime_with_token_file
    old = load_tokens(rt.settings).operator
    new = tokens.add(rt.settings, "operator")
    page = await open_page(browser, rt)
    await log_in(page, old)
    tokens.retire(rt.settings, fingerprint(old))
    await page.wait_for_selector("#login-error:has-text('token retired')", timeout=15000)
    assert await page.evaluate("() => sessionStorage.getItem('xswarm.token')") is None
    await log_in(page, new)
    assert (await page.text_content("#who") or "").endswith("operator")
    assert_no_page_errors(page)
