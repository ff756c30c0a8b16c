-- Provider instances with no live machine row (a crash between launch and the database
-- write, say). The reconciler terminates them once they stay orphaned past a grace period.
CREATE TABLE machine_orphans (
    machine_id     text PRIMARY KEY,
    provider       text NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now()
);
