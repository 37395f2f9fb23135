-- Fleet: nodes as operator-managed rows, and routing reservations shared by every webhook box.

-- What the operator asked of the node (`xswarm nodes drain|resume`): ready | draining.
-- "down" is never stored: it is a heartbeat older than the stale limit.
ALTER TABLE nodes ADD COLUMN state TEXT NOT NULL DEFAULT 'ready';
ALTER TABLE nodes ADD COLUMN supervisor_url TEXT;
ALTER TABLE nodes ADD COLUMN version TEXT;
ALTER TABLE nodes ADD COLUMN live_calls INTEGER NOT NULL DEFAULT 0;
-- A random id of the process holding this node id: a second live process with the same
-- XSWARM_NODE_ID is refused at start.
ALTER TABLE nodes ADD COLUMN instance TEXT;
-- Set by the voice webhook when a call on this node dropped without ending normally; the node
-- gets no new calls until a heartbeat newer than this proves it alive.
ALTER TABLE nodes ADD COLUMN suspect_at INTEGER;

-- A call routed to a node but not yet streaming there. It counts against the node's free
-- slots until the call connects (the node deletes it) or the call token expires.
CREATE TABLE route_reservations (
  call_sid    TEXT PRIMARY KEY,
  node_id     TEXT NOT NULL,
  reserved_at INTEGER NOT NULL,
  expires_at  INTEGER NOT NULL
);
CREATE INDEX route_reservations_node ON route_reservations(node_id, expires_at);

-- A call re-routed after its node died keeps its row; each new stream is one more leg.
ALTER TABLE calls ADD COLUMN legs INTEGER NOT NULL DEFAULT 1;

-- Exactly once across webhook boxes: a processor commits a row's effects only while it still
-- holds the row's lease (same attempt number, not done). One lost its lease when it was
-- slower than the lease and another box claimed the row again; its commit then fails whole.
CREATE VIEW inbox_lease AS SELECT 0 AS inbox_rowid, 0 AS attempts;
CREATE TRIGGER inbox_lease_check INSTEAD OF INSERT ON inbox_lease
BEGIN
  SELECT RAISE(ABORT, 'inbox lease lost')
  WHERE NOT EXISTS (
    SELECT 1 FROM webhook_inbox
    WHERE rowid = NEW.inbox_rowid AND attempts = NEW.attempts AND status IN ('pending', 'failed')
  );
END;
