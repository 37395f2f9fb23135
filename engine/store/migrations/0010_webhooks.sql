-- Webhooks: idempotent usage counting and out-of-order-safe subscription state.

-- One row per counted thing (an SMS, an email, a finished call). Usage is incremented in the
-- same transaction only when the ledger row is new, so a retried event never counts twice.
CREATE TABLE usage_ledger (
  key      TEXT PRIMARY KEY,                  -- "sms:<MessageSid>", "call:<CallSid>", "email:<Message-ID>"
  user_id  TEXT NOT NULL,
  period   TEXT NOT NULL,                     -- "YYYY-MM", as in usage.period
  at       INTEGER NOT NULL
);

-- Stripe's `created` has one-second resolution; when two events of one subscription share a
-- second, the type decides (created < updated < deleted) so a late `created` never wins.
ALTER TABLE subscriptions ADD COLUMN event_rank INTEGER NOT NULL DEFAULT 0;
