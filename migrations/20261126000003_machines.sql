-- Builder machines and the BuildKit certificate authority.

-- Private keys are sealed (AES-256-GCM) with the configured key-encryption key.
CREATE TABLE certificate_authorities (
    name        text PRIMARY KEY,
    cert_pem    text NOT NULL,
    key_sealed  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A machine runs BuildKit for one project and architecture (its slot).
-- requested → launching → booting → ready ⇄ assigned → draining → terminated, or failed.
CREATE TABLE machines (
    id                text PRIMARY KEY,
    provider          text NOT NULL,
    platform          text NOT NULL CHECK (platform IN ('amd64', 'arm64')),
    project_id        text REFERENCES projects (id) ON DELETE SET NULL,
    state             text NOT NULL DEFAULT 'requested'
                      CHECK (state IN ('requested', 'launching', 'booting', 'ready', 'assigned', 'draining', 'terminated', 'failed')),
    endpoint          text,
    server_name       text,
    provider_ref      text,
    active_builds     integer NOT NULL DEFAULT 0 CHECK (active_builds >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    launched_at       timestamptz,
    ready_at          timestamptz,
    last_assigned_at  timestamptz,
    last_released_at  timestamptz,
    terminated_at     timestamptz,
    error             text
);
-- One live builder per project and architecture: the database itself refuses a second
-- launch for a slot, whichever replica asks.
CREATE UNIQUE INDEX machines_live_slot ON machines (project_id, platform)
    WHERE state IN ('requested', 'launching', 'booting', 'ready', 'assigned');
CREATE INDEX machines_state_idx ON machines (state);
