-- Hardening: device-flow secrets out of URLs, and builders tied to a cache generation.

-- `depot login` requests: the CLI claims with a long secret of which only the SHA-256 is
-- stored; the approval URL carries a short user code instead. Open requests of the old
-- shape cannot be completed by the new flow, so they are dropped (they live minutes).
DELETE FROM login_requests;
ALTER TABLE login_requests
    ADD COLUMN claim_hash bytea NOT NULL CHECK (length(claim_hash) = 32),
    ADD COLUMN user_code  text  NOT NULL CHECK (user_code ~ '^[B-DF-HJ-NP-TV-XZ]{4}-[B-DF-HJ-NP-TV-XZ]{4}$');
CREATE UNIQUE INDEX login_requests_claim_key ON login_requests (claim_hash);
CREATE UNIQUE INDEX login_requests_user_code_key ON login_requests (user_code);
-- Counting open requests (the cap) and purging closed ones.
CREATE INDEX login_requests_expires_idx ON login_requests (expires_at);

-- The project's cache generation a builder was started (or adopted) for. After a reset
-- the scheduler hands no build to an older builder, and the reset job retires them.
ALTER TABLE machines ADD COLUMN cache_generation integer NOT NULL DEFAULT 0;

-- Retention deletes refusal audits by action and age.
CREATE INDEX audit_events_action_idx ON audit_events (action, occurred_at);
