-- Call tokens already used, kept until they expire: a token replayed after a restart, or to
-- another node sharing this database, is refused (engine.store.calltokens).
CREATE TABLE used_call_tokens (
  nonce       TEXT PRIMARY KEY,
  expires_at  INTEGER NOT NULL                 -- unix seconds, as in the token
);
CREATE INDEX used_call_tokens_expiry ON used_call_tokens (expires_at);
