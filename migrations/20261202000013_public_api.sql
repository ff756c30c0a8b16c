-- The public API: shared builds, build statistics kept as builds finish, step logs, and
-- usage aggregated per project and hour so a month's usage is a few hundred rows, not a
-- scan of every build.

-- A shared build is readable without signing in through its share URL, whose token is an
-- HMAC of the build id and share_generation under a key derived from the key-encryption
-- key: nothing secret is stored, the URL is the same each time the build is shared, and
-- stopping sharing bumps the generation so the old URL never works again.
ALTER TABLE builds
    ADD COLUMN shared boolean NOT NULL DEFAULT false,
    ADD COLUMN share_generation integer NOT NULL DEFAULT 0,
    -- Filled when the build finishes.
    ADD COLUMN total_steps integer,
    ADD COLUMN cached_steps integer,
    ADD COLUMN saved_seconds integer,
    -- Log lines stored for the build (bounded).
    ADD COLUMN log_lines integer NOT NULL DEFAULT 0;

-- A project's settings version, bumped by every settings change: the REST API's ETag,
-- so two people editing one project at once don't overwrite each other (If-Match).
ALTER TABLE projects ADD COLUMN version bigint NOT NULL DEFAULT 1;

-- Steps keep the order they were first reported in (a stable page order).
ALTER TABLE build_steps
    ADD COLUMN position bigint GENERATED ALWAYS AS IDENTITY,
    ADD COLUMN log_lines integer NOT NULL DEFAULT 0;
CREATE INDEX build_steps_order ON build_steps (build_id, position);

-- Log lines of a step, from the BuildKit status stream the depot CLI uploads.
CREATE TABLE build_step_logs (
    build_id  text NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    digest    text NOT NULL,
    seq       integer NOT NULL,
    at        timestamptz NOT NULL,
    message   text NOT NULL,
    PRIMARY KEY (build_id, digest, seq)
);

-- How long a step took when it last ran uncached in a project: what a cache hit on it
-- saves.
CREATE TABLE step_timings (
    project_id  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    digest      text NOT NULL,
    seconds     integer NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, digest)
);

-- Finished builds per project and hour (UTC), added to as each build finishes.
CREATE TABLE usage_hourly (
    project_id       text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    organization_id  text NOT NULL,
    hour             timestamptz NOT NULL,
    build_count      integer NOT NULL DEFAULT 0,
    build_seconds    bigint NOT NULL DEFAULT 0,
    saved_seconds    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, hour)
);
CREATE INDEX usage_hourly_org ON usage_hourly (organization_id, hour);
