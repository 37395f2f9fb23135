"""Who does not want which messages: per-user opt-outs by kind, and SMS STOP/START by number.

SMS opt-out follows the carriers' keywords (CTIA; what Twilio's default handling uses):
STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, OPTOUT, REVOKE opt out; START, YES, UNSTOP, OPTIN
opt back in (YES only from a number that is opted out: to an assistant, "yes" is mostly an
answer); HELP and INFO always get an answer. It is kept per phone number, not per user:
a carrier's STOP covers every message to that number, whoever it belongs to. The newest
keyword wins, so a replayed old STOP never undoes a later START.
"""

from __future__ import annotations

import time

from engine.store.db import Database, Statement

STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"})
START_WORDS = frozenset({"START", "YES", "UNSTOP", "OPTIN"})
ONLY_WHEN_OPTED_OUT = frozenset({"YES"})
HELP_WORDS = frozenset({"HELP", "INFO"})


def keyword(body: str) -> str:
    """The message as a keyword: a single word, upper case, trailing punctuation dropped."""
    return body.strip().rstrip("!.?").strip().upper()


def sms_statement(phone: str, word: str, at_ms: int) -> Statement | None:
    """The opt-out change a keyword makes (None for any other text)."""
    if word not in STOP_WORDS and word not in START_WORDS:
        return None
    if word in ONLY_WHEN_OPTED_OUT:
        return (
            "UPDATE sms_optout SET opted_out = 0, keyword = ?, at = ? WHERE phone = ? AND opted_out = 1 AND at <= ?",
            (word, at_ms, phone, at_ms),
        )
    return (
        "INSERT INTO sms_optout (phone, opted_out, keyword, at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(phone) DO UPDATE SET opted_out = excluded.opted_out, keyword = excluded.keyword,"
        " at = excluded.at WHERE excluded.at >= sms_optout.at",
        (phone, int(word in STOP_WORDS), word, at_ms),
    )


def sms_opted_out(db: Database, phone: str | None) -> bool:
    if not phone:
        return False
    rows = db.query("SELECT opted_out FROM sms_optout WHERE phone = ?", (phone,))
    return bool(rows and rows[0][0])


def set_kind(db: Database, user_id: str, kind: str, enabled: bool) -> None:
    """Turn one kind of notification on or off for a user."""
    if enabled:
        db.write("DELETE FROM notify_optout WHERE user_id = ? AND kind = ?", (user_id, kind))
    else:
        db.write(
            "INSERT INTO notify_optout (user_id, kind, at) VALUES (?, ?, ?) ON CONFLICT(user_id, kind) DO NOTHING",
            (user_id, kind, int(time.time() * 1000)),
        )


def kind_off(db: Database, user_id: str | None, kind: str) -> bool:
    if user_id is None:
        return False
    return bool(db.query("SELECT 1 FROM notify_optout WHERE user_id = ? AND kind = ?", (user_id, kind)))


def kinds_off(db: Database, user_id: str) -> list[str]:
    return [r[0] for r in db.query("SELECT kind FROM notify_optout WHERE user_id = ? ORDER BY kind", (user_id,))]
