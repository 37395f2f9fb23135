"""Settings: a TOML file, ``XSWARM_*`` environment variables, and the providers' usual names.

Precedence, highest first: values passed in code, ``XSWARM_SECTION__FIELD`` variables (nested
with ``__``), the flat names operators already know (``TWILIO_AUTH_TOKEN``,
``XSWARM_S3_BUCKET``, … see ``ALIASES``), then the TOML file at ``Paths.config_file``.

Every secret is a ``SecretStr``: it never appears in ``repr``, logs or ``xswarm config show``.
A broken file raises ``ConfigError`` whose message names the key and, where it can, the line;
the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

from engine.paths import Paths, resolve_paths
from engine.phone import validate_phone


class ConfigError(Exception):
    """The configuration cannot be used; the message is meant for the operator as is."""


class _Section(BaseModel):
    """A ``[section]`` of the file: unknown keys are errors (a typo must not pass silently),
    and each field's docstring becomes its comment in ``xswarm config init``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    """Address every server binds to. Public exposure belongs behind a TLS proxy."""
    bridge_port: int = Field(9998, ge=0, le=65535)
    """Twilio Media Streams WebSocket (0 turns the bridge off)."""
    supervisor_port: int = Field(9999, ge=0, le=65535)
    """Supervisor WebSocket, /health and /metrics (0 turns it off)."""
    webhooks_port: int = Field(8787, ge=0, le=65535)
    """Webhooks HTTP server inside `xswarm`/`xswarm serve` (0 turns it off)."""
    webhooks_enabled: bool = False
    """Embed the webhooks app in the runtime (it is always available as `xswarm webhooks serve`)."""
    public_url: str | None = None
    """Public https base URL Twilio calls for webhooks; signatures are checked against it."""
    bridge_public_url: str | None = None
    """Public wss base URL of this node's bridge (TwiML uses `<base>/twilio`)."""
    supervisor_public_url: str | None = None
    """ws(s) URL other machines reach this node's supervisor at (`xswarm attach --fleet`)."""
    node_id: str | None = None
    """Name of this node in the `nodes` table (default: the host name)."""

    @field_validator("bridge_public_url", "supervisor_public_url")
    @classmethod
    def _ws_url(cls, value: str | None) -> str | None:
        """Checked at load: the voice webhook puts the bridge URL into TwiML as is."""
        if value is None or not value.strip():
            return None
        if not re.fullmatch(r"wss?://[A-Za-z0-9\[][^\s\"'<>\\^`{|}]*", value.strip()):
            raise ValueError("must be a ws:// or wss:// URL with a host, e.g. wss://node1.example.com")
        return value.strip().rstrip("/")


class ModelSettings(_Section):
    name: str = "auto"
    """auto | moshi | moshi-mlx | synthetic:tiny | synthetic:7b | echo."""
    variant: Literal["moshiko", "moshika"] = "moshiko"
    """Which released voice: Moshiko (male) or Moshika (female)."""
    dtype: Literal["bf16", "int8"] = "bf16"
    """Older name for the LM's weights: int8 here means weights = "int8"."""
    weights: Literal["bf16", "int8", "int4"] = "bf16"
    """LM weights: bf16, int8 (Kyutai's q8 checkpoint, or bf16 quantized on load) or int4
    (CUDA only). Mimi stays bf16. See `xswarm capacity` for calls per GPU."""
    kv_cache: Literal["bf16", "int8", "fp8"] = "bf16"
    """KV cache storage per call: bf16, or int8 / fp8 (half the memory per call)."""
    device: str = "auto"
    """auto (CUDA, else CPU with a warning), cuda, cuda:N or cpu."""
    context: int = Field(3000, ge=50, le=3000)
    """Attention window in 80 ms steps (3000 = 240 s, what MOSHI was trained with): a call
    remembers this much of the conversation; memory per call grows in proportion."""
    slots: int = Field(0, ge=0, le=256)
    """Concurrent calls (batch size). 0 picks a size from the model and the hardware."""
    weights_path: Path | None = None
    """A local folder holding the checkpoint; otherwise the Hugging Face cache is used."""
    hf_repo: str | None = None
    """Override the Hugging Face repository to load from."""
    seed: int | None = None
    """Fix the sampling seed (tests and benchmarks)."""

    @model_validator(mode="after")
    def _dtype_means_weights(self) -> ModelSettings:
        if self.dtype == "int8" and self.weights == "bf16":
            self.weights = "int8"
        return self


class TwilioSettings(_Section):
    account_sid: str | None = None
    auth_token: SecretStr | None = None
    from_number: str | None = None
    """Our Twilio number, used when a reply has to go out through the REST API."""
    transfer_number: str | None = None
    """E.164 number a supervisor's `transfer` dials."""
    api_base: str = Field("https://api.twilio.com", validation_alias=AliasChoices("api_base", "api_base_url"))
    """Twilio's REST base URL (tests point it at a local fake; `api_base_url` is read too)."""

    @field_validator("from_number", "transfer_number")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        """Checked at load, not when the first SMS reply or transfer fails mid-call."""
        if value is None or not value.strip():
            return None
        return validate_phone(value)


class StripeSettings(_Section):
    api_key: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    price_tiers: dict[str, str] = Field(default_factory=dict)
    """Stripe price id -> xswarm tier, e.g. {"price_123" = "personal"}. `xswarm billing link` sells
    a tier at the first price mapped to it."""
    api_base: str = "https://api.stripe.com"
    """Stripe's API base URL (tests point it at a local fake)."""
    return_url: str | None = None
    """Where Checkout and the Customer Portal send the customer back (default: server.public_url)."""


class SendGridSettings(_Section):
    api_key: SecretStr | None = None
    webhook_public_key: str | None = None
    """Base64 DER public key from SendGrid's signed Event Webhook settings."""
    from_email: str | None = None
    api_base: str = Field("https://api.sendgrid.com", validation_alias=AliasChoices("api_base", "api_base_url"))
    """SendGrid's API base URL (tests point it at a local fake; `api_base_url` is read too)."""


class NotifySettings(_Section):
    operator_email: str | None = None
    """Where voicemails from callers who are not users (or have no email) are sent."""
    link_secret: SecretStr | None = None
    """HMAC key of the links in our messages (one-click unsubscribe, listen to a voicemail);
    without it (or without server.public_url) emails offer a mailto unsubscribe and voicemail
    notices link to Twilio's recording URL."""
    lease_s: float = Field(60.0, gt=0)
    """How long one send attempt may take (it is cut off at 80 %); a row still being sent after
    that is in doubt, and the next attempt checks with the provider before sending again."""
    email_confirm_wait_s: float = Field(600.0, ge=0)
    """SendGrid has no idempotency key: an email whose send is in doubt waits this long for
    SendGrid's signed `processed` event before it is sent again."""
    max_attempts: int = Field(8, ge=1)
    """Attempts before a message is dead (kept, listed by `xswarm notify list --status dead`)."""
    voicemail_transcript_wait_s: float = Field(180.0, ge=0)
    """Voicemails are transcribed by Twilio (English, up to 2 minutes; billed by Twilio); the
    notice waits this long for the transcript, then goes out without it. 0: no transcription."""


class DatabaseSettings(_Section):
    url: str | None = None
    """Remote libSQL/Turso URL; unset means the embedded file under the data folder."""
    auth_token: SecretStr | None = None
    path: Path | None = None
    """Embedded database file (default: <data>/xswarm.db)."""
    batch_max_rows: int = Field(2000, ge=1)
    """Most rows one group commit carries."""
    batch_max_wait_ms: float = Field(1.0, ge=0)
    """How long the writer waits to fill a batch before committing what it has. Every
    acknowledged write waits this long, and batches also grow by themselves while a commit
    runs, so it stays short."""


class S3Settings(_Section):
    endpoint_url: str | None = None
    bucket: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    region: str = "auto"
    prefix: str = ""
    """Key prefix inside the bucket, so several deployments can share one."""


class LlmSettings(_Section):
    provider: Literal["auto", "anthropic", "openai", "none"] = "auto"
    anthropic_api_key: SecretStr | None = None
    openai_api_key: SecretStr | None = None
    anthropic_model: str = "claude-3-5-haiku-latest"
    openai_model: str = "gpt-4o-mini"
    anthropic_base_url: str = "https://api.anthropic.com"
    openai_base_url: str = "https://api.openai.com"
    timeout_s: float = Field(20.0, gt=0)
    """Give up on the provider after this long; a canned reply goes out instead."""
    sms_budget_s: float = Field(5.0, gt=0)
    """Answer Twilio inline if the reply is ready within this; else reply later via REST."""
    max_tokens_sms: int = 300
    max_tokens_email: int = 1500


MIN_SUPERVISOR_TOKEN = 16
"""Shorter supervisor tokens are refused: they could be guessed despite the rate limit."""


class SupervisorSettings(_Section):
    token: SecretStr | None = None
    """Operator token (may act). Generated at first start when unset."""
    monitor_token: SecretStr | None = None
    """Read-only token. Generated at first start when unset."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Web origins besides the dashboard's own that may open the socket, e.g.
    ["https://console.example.com"] behind a proxy that rewrites Host."""

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        from engine.supervisor.origin import normalize

        return [normalize(o) for o in value]

    @field_validator("token", "monitor_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        """Checked at load (one line, exit 2), not as a traceback when the server starts."""
        if value is not None and value.get_secret_value() and len(value.get_secret_value()) < MIN_SUPERVISOR_TOKEN:
            raise ValueError(f"must be at least {MIN_SUPERVISOR_TOKEN} characters (a shorter one could be guessed)")
        return value


class TelephonySettings(_Section):
    call_token_secret: SecretStr | None = None
    """HMAC key for one-time call tokens shared by the voice webhook and the bridge."""
    call_token_ttl_s: int = Field(60, ge=1, le=600)
    unknown_callers: Literal["refuse", "guest"] = "refuse"
    start_timeout_s: float = Field(5.0, gt=0)
    """Close a stream whose `start` has not arrived by then."""
    greet: bool = True
    """Speak the persona's greeting (the call's theme) as a call starts; off, the AI waits for the caller."""


class RecordingSettings(_Section):
    enabled: bool = False
    """Record calls (stereo WAV + transcript) for users who consented."""
    retention_days: int = Field(30, ge=1)


class BackupSettings(_Section):
    retention_days: int = Field(30, ge=1)
    daily: bool = True
    """Take one backup a day inside the runtime."""


class UiSettings(_Section):
    theme: str = "xswarm"
    """Theme file name under themes/ (palette and persona)."""
    reveal_callers: bool = False
    """Show full phone numbers on the calls board (masked by default)."""
    poll_interval_s: float = Field(1.0, gt=0)


class Settings(BaseSettings):
    """All of xswarm's settings. Build with ``load_settings()`` so errors become ``ConfigError``."""

    model_config = SettingsConfigDict(
        env_prefix="XSWARM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    twilio: TwilioSettings = Field(default_factory=TwilioSettings)
    stripe: StripeSettings = Field(default_factory=StripeSettings)
    sendgrid: SendGridSettings = Field(default_factory=SendGridSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    telephony: TelephonySettings = Field(default_factory=TelephonySettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    backup: BackupSettings = Field(default_factory=BackupSettings)
    ui: UiSettings = Field(default_factory=UiSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _NestedEnvSource(settings_cls),
            _AliasSource(settings_cls),
            _TomlSource(settings_cls, _CURRENT_FILE.get()),
        )


# Flat environment names (the names the providers' own tools use) -> nested field.
ALIASES: dict[str, tuple[str, str]] = {
    "TWILIO_ACCOUNT_SID": ("twilio", "account_sid"),
    "TWILIO_AUTH_TOKEN": ("twilio", "auth_token"),
    "TWILIO_FROM_NUMBER": ("twilio", "from_number"),
    "STRIPE_API_KEY": ("stripe", "api_key"),
    "STRIPE_WEBHOOK_SECRET": ("stripe", "webhook_secret"),
    "SENDGRID_API_KEY": ("sendgrid", "api_key"),
    "SENDGRID_WEBHOOK_PUBLIC_KEY": ("sendgrid", "webhook_public_key"),
    "SENDGRID_FROM_EMAIL": ("sendgrid", "from_email"),
    "TURSO_DATABASE_URL": ("database", "url"),
    "TURSO_AUTH_TOKEN": ("database", "auth_token"),
    "ANTHROPIC_API_KEY": ("llm", "anthropic_api_key"),
    "OPENAI_API_KEY": ("llm", "openai_api_key"),
    "XSWARM_PUBLIC_URL": ("server", "public_url"),
    "XSWARM_BRIDGE_PUBLIC_URL": ("server", "bridge_public_url"),
    "XSWARM_NODE_ID": ("server", "node_id"),
    "XSWARM_SUPERVISOR_PUBLIC_URL": ("server", "supervisor_public_url"),
    "XSWARM_CALL_TOKEN_SECRET": ("telephony", "call_token_secret"),
    "XSWARM_SUPERVISOR_TOKEN": ("supervisor", "token"),
    "XSWARM_SUPERVISOR_MONITOR_TOKEN": ("supervisor", "monitor_token"),
    "XSWARM_S3_ENDPOINT_URL": ("s3", "endpoint_url"),
    "XSWARM_S3_BUCKET": ("s3", "bucket"),
    "XSWARM_S3_ACCESS_KEY_ID": ("s3", "access_key_id"),
    "XSWARM_S3_SECRET_ACCESS_KEY": ("s3", "secret_access_key"),
    "XSWARM_S3_REGION": ("s3", "region"),
    "XSWARM_MODEL": ("model", "name"),
}


class _NestedEnvSource(EnvSettingsSource):
    """``XSWARM_SECTION__FIELD`` variables. The flat names in ``ALIASES`` are left to
    ``_AliasSource``: ``XSWARM_MODEL`` (a model name) would otherwise be read as the whole
    ``model`` section."""

    def _load_env_vars(self) -> Any:
        return {k: v for k, v in super()._load_env_vars().items() if k.upper() not in ALIASES}


class _AliasSource(PydanticBaseSettingsSource):
    """Reads the flat names in ``ALIASES`` into their nested places."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ does all the work

    def __call__(self) -> dict[str, Any]:
        out: dict[str, dict[str, str]] = {}
        for env_name, (section, key) in ALIASES.items():
            value = os.environ.get(env_name)
            if value not in (None, ""):
                out.setdefault(section, {})[key] = value
        return out


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file; a syntax error is reported with its line by ``tomllib``."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            return tomllib.loads(self.path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.path}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: cannot read: {exc}") from None


# pydantic-settings builds sources from the class, so the file path reaches them this way.
_CURRENT_FILE: ContextVar[Path | None] = ContextVar("xswarm_config_file", default=None)


def load_settings(paths: Paths | None = None, **overrides: Any) -> Settings:
    """Build the settings from file and environment, or raise one clear ``ConfigError``."""
    paths = paths or resolve_paths()
    config_file = paths.config_file
    token = _CURRENT_FILE.set(config_file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    except SettingsError as exc:  # e.g. XSWARM_STRIPE__PRICE_TIERS that is not JSON
        raise ConfigError(f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)) from None
    finally:
        _CURRENT_FILE.reset(token)


def _describe(exc: ValidationError, config_file: Path) -> str:
    """One message per problem, naming the dotted key and, when it is in the file, its line."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        where = _line_of(config_file, err["loc"])
        env = _env_name_of(err["loc"])
        location = f" (environment variable {env})" if env else f" ({config_file}:{where})" if where else ""
        lines.append(f"config key '{key}'{location}: {err['msg']}")
    return "; ".join(lines)


def _env_name_of(loc: tuple[Any, ...]) -> str | None:
    """The environment variable that supplied the value at ``loc``, if one is set."""
    if len(loc) < 2:
        return None
    candidates = [f"XSWARM_{loc[0]}__{loc[1]}".upper()]
    candidates += [name for name, place in ALIASES.items() if place == (str(loc[0]), str(loc[1]))]
    return next((name for name in candidates if os.environ.get(name)), None)


def _line_of(config_file: Path, loc: tuple[Any, ...]) -> int | None:
    """Find the line of ``[section] key = …`` in the TOML file, if the key came from there."""
    if not config_file.exists() or not loc:
        return None
    try:
        text = config_file.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    section = str(loc[0]) if len(loc) > 1 else None
    key = str(loc[1] if len(loc) > 1 else loc[0])
    current: str | None = None
    for number, line in enumerate(text, start=1):
        stripped = line.strip()
        header = re.match(r"^\[([^\]]+)\]$", stripped)
        if header:
            current = header.group(1).strip()
            if len(loc) == 1 and current == key:
                return number
            continue
        if re.match(rf"^{re.escape(key)}\s*=", stripped) and (section is None or current == section):
            return number
        if section and current is None and re.match(rf"^{re.escape(section)}\.{re.escape(key)}\s*=", stripped):
            return number
    return None


def secret(value: SecretStr | None) -> str | None:
    """The plain value of an optional secret, for the one place that needs it."""
    return value.get_secret_value() if value is not None else None


# ------------------------------------------------------------------------ operator views

MASK = "********"


def public_view(settings: Settings) -> dict[str, dict[str, Any]]:
    """The settings as plain data for ``xswarm config show``: every secret that is set
    becomes ``MASK`` (an unset one stays None), so the output is safe to paste anywhere."""
    view: dict[str, dict[str, Any]] = {}
    for section_name in Settings.model_fields:
        section = getattr(settings, section_name)
        values: dict[str, Any] = {}
        for key in type(section).model_fields:
            value = getattr(section, key)
            if isinstance(value, SecretStr):
                value = MASK
            elif isinstance(value, Path):
                value = str(value)
            values[key] = value
        view[section_name] = values
    return view


def default_toml() -> str:
    """A complete settings file with every key commented out at its default, each with the
    field's own documentation, for ``xswarm config init``. Uncommenting a line sets it."""
    aliases = {place: name for name, place in ALIASES.items()}
    lines = [
        "# xswarm settings. Every key below is commented out at its default; uncomment to change it.",
        "# Environment variables win over this file: XSWARM_<SECTION>__<KEY> (e.g. XSWARM_SERVER__BRIDGE_PORT)",
        "# and the providers' usual names noted beside their keys (e.g. TWILIO_AUTH_TOKEN).",
        "# Prefer environment variables for secrets; if you keep them here, make this file private (chmod 600).",
    ]
    for section_name, section_field in Settings.model_fields.items():
        section_cls = section_field.annotation
        assert isinstance(section_cls, type) and issubclass(section_cls, BaseModel)
        lines += ["", f"[{section_name}]"]
        for key, field in section_cls.model_fields.items():
            doc = " ".join((field.description or "").split())
            env = aliases.get((section_name, key))
            notes = [part for part in (doc, f"env: {env}" if env else "") if part]
            if notes:
                lines.append("# " + " | ".join(notes))
            lines.append(f"# {key} = {toml_value(field.get_default(call_default_factory=True))}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """One value in TOML syntax (None and secrets as an empty string: never the secret)."""
    if value is None or isinstance(value, SecretStr):
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
