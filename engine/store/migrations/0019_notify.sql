-- Notifications: the durable outbox, per-user opt-outs by kind, SMS STOP/START by number.

-- One row per message we send on our own. The id says what it is about, so asking twice to
-- notify about one thing stores one row ("voicemail:<RecordingSid>:email",
-- "quota_80:sms:<user>:<period>:sms"). `in_doubt`: an earlier attempt may have reached the
-- provider without our hearing back; it is settled with the provider before any resend.
CREATE TABLE outbox (
  id               TEXT PRIMARY KEY,
  kind             TEXT NOT NULL,              -- welcome | voicemail | quota | payment_failed | billing
  channel          TEXT NOT NULL,              -- sms | email
  user_id          TEXT,
  from_addr        TEXT,
  to_addr          TEXT NOT NULL,
  subject          TEXT,
  body             TEXT NOT NULL,
  html             TEXT,
  status           TEXT NOT NULL DEFAULT 'pending',  -- pending | sending | failed | sent | suppressed | dead
  attempts         INTEGER NOT NULL DEFAULT 0,
  next_attempt_at  INTEGER,
  first_attempt_at INTEGER,
  attempt_at       INTEGER,                    -- start of the latest attempt
  doubt_at         INTEGER,                    -- start of the attempt whose outcome is unknown
  in_doubt         INTEGER NOT NULL DEFAULT 0,
  provider_id      TEXT,                       -- Twilio message sid, SendGrid X-Message-Id
  last_error       TEXT,
  created_at       INTEGER NOT NULL,
  sent_at          INTEGER
);
CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
CREATE INDEX outbox_provider ON outbox(provider_id);

CREATE TABLE notify_optout (
  user_id  TEXT NOT NULL,
  kind     TEXT NOT NULL,
  at       INTEGER NOT NULL,
  PRIMARY KEY (user_id, kind)
);

-- STOP/START as the carriers define them, per number; the newest keyword wins.
CREATE TABLE sms_optout (
  phone      TEXT PRIMARY KEY,                 -- E.164
  opted_out  INTEGER NOT NULL,
  keyword    TEXT NOT NULL,
  at         INTEGER NOT NULL
);
