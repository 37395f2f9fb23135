-- xswarm core schema. Times are unix milliseconds (INTEGER) unless a column says otherwise.
CREATE TABLE users (
  id                 TEXT PRIMARY KEY,
  name               TEXT NOT NULL,
  phone              TEXT UNIQUE,             -- E.164
  email              TEXT UNIQUE COLLATE NOCASE,
  tier               TEXT NOT NULL DEFAULT 'free',
  theme              TEXT NOT NULL DEFAULT 'xswarm',
  stripe_customer_id TEXT UNIQUE,
  recording_consent  INTEGER NOT NULL DEFAULT 0,
  created_at         INTEGER NOT NULL,
  updated_at         INTEGER NOT NULL
);

CREATE TABLE api_keys (
  id           TEXT PRIMARY KEY,
  user_id      TEXT NOT NULL REFERENCES users(id),
  prefix       TEXT NOT NULL,                 -- short visible part, e.g. "xsk_3f9c"
  hash         TEXT NOT NULL UNIQUE,          -- sha256 of the whole key; the key itself is never stored
  created_at   INTEGER NOT NULL,
  revoked_at   INTEGER,
  last_used_at INTEGER
);
CREATE INDEX api_keys_user ON api_keys(user_id);

CREATE TABLE calls (
  id                  TEXT PRIMARY KEY,       -- Twilio CallSid, or "local-…"
  stream_sid          TEXT,
  user_id             TEXT,
  caller              TEXT,
  source              TEXT NOT NULL DEFAULT 'twilio',
  node_id             TEXT,
  slot                INTEGER,
  theme               TEXT,
  status              TEXT NOT NULL DEFAULT 'ringing',   -- ringing | live | ended
  started_at          INTEGER NOT NULL,
  ended_at            INTEGER,
  end_reason          TEXT,
  duration_s          REAL,
  bal_p50_ms          REAL,
  bal_p99_ms          REAL,
  step_p50_ms         REAL,
  playout_lag_p50_ms  REAL,
  late_frames         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX calls_user_started ON calls(user_id, started_at);
CREATE INDEX calls_started ON calls(started_at);

CREATE TABLE messages (
  id           TEXT PRIMARY KEY,
  user_id      TEXT,
  channel      TEXT NOT NULL,                 -- sms | email | voicemail
  direction    TEXT NOT NULL,                 -- in | out
  provider_id  TEXT UNIQUE,                   -- MessageSid, Message-ID, sg_message_id …
  from_addr    TEXT,
  to_addr      TEXT,
  subject      TEXT,
  body         TEXT,
  status       TEXT,
  meta         TEXT,                          -- JSON
  created_at   INTEGER NOT NULL,
  updated_at   INTEGER NOT NULL
);
CREATE INDEX messages_user_created ON messages(user_id, created_at);

CREATE TABLE webhook_inbox (
  provider        TEXT    NOT NULL,
  event_id        TEXT    NOT NULL,
  event_type      TEXT,
  received_at     INTEGER NOT NULL,
  payload         TEXT    NOT NULL,
  status          TEXT    NOT NULL DEFAULT 'pending',   -- pending | done | failed | dead
  attempts        INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER,
  last_error      TEXT,
  PRIMARY KEY (provider, event_id)
);
CREATE INDEX webhook_inbox_due ON webhook_inbox(status, next_attempt_at);

CREATE TABLE subscriptions (
  id                   TEXT PRIMARY KEY,      -- Stripe subscription id
  user_id              TEXT,
  customer_id          TEXT,
  status               TEXT NOT NULL,
  price_id             TEXT,
  tier                 TEXT,
  current_period_end   INTEGER,
  cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
  event_created        INTEGER NOT NULL,      -- Stripe `created` of the event that wrote this state
  updated_at           INTEGER NOT NULL
);
CREATE INDEX subscriptions_user ON subscriptions(user_id);

CREATE TABLE billing_events (
  id         TEXT PRIMARY KEY,                -- Stripe event id
  user_id    TEXT,
  type       TEXT NOT NULL,
  amount     INTEGER,
  currency   TEXT,
  created    INTEGER NOT NULL,
  summary    TEXT
);

CREATE TABLE usage (
  user_id       TEXT NOT NULL,
  period        TEXT NOT NULL,                -- "YYYY-MM"
  voice_seconds REAL NOT NULL DEFAULT 0,
  sms_count     INTEGER NOT NULL DEFAULT 0,
  email_count   INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (user_id, period)
);

CREATE TABLE audit_log (
  id       INTEGER PRIMARY KEY AUTOINCREMENT,
  at       INTEGER NOT NULL,
  actor    TEXT NOT NULL,
  role     TEXT,
  action   TEXT NOT NULL,
  call_id  TEXT,
  detail   TEXT,
  result   TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log(at);

CREATE TABLE nodes (
  id            TEXT PRIMARY KEY,
  bridge_url    TEXT,
  model         TEXT,
  slots_total   INTEGER NOT NULL,
  slots_free    INTEGER NOT NULL,
  step_ms_p99   REAL,
  started_at    INTEGER NOT NULL,
  heartbeat_at  INTEGER NOT NULL
);

CREATE TABLE events (
  id       INTEGER PRIMARY KEY AUTOINCREMENT,
  at       INTEGER NOT NULL,
  type     TEXT NOT NULL,
  call_id  TEXT,
  user_id  TEXT,
  summary  TEXT,
  payload  TEXT
);
CREATE INDEX events_at ON events(at);
