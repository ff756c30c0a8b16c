-- Builds for the depot CLI, the device-login flow, cache resets and trust policies.

ALTER TABLE users ADD COLUMN password_hash text;

-- Bumped by every cache reset; builders attach the volume of the current generation.
ALTER TABLE projects
    ADD COLUMN cache_generation integer NOT NULL DEFAULT 0,
    ADD COLUMN cache_reset_at timestamptz;

CREATE TABLE builds (
    id               text PRIMARY KEY,
    project_id       text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    organization_id  text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'success', 'failed', 'canceled', 'timed_out')),
    command          text NOT NULL DEFAULT 'build',
    options          jsonb NOT NULL DEFAULT '[]',
    created_by       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- The CLI cancels the build once this passes: the project's build timeout, or now()
    -- when someone cancels it.
    cancels_at       timestamptz NOT NULL,
    last_health_at   timestamptz,
    error            text
);
CREATE INDEX builds_project_idx ON builds (project_id, created_at DESC, id DESC);
CREATE INDEX builds_live_idx ON builds (state, created_at) WHERE state IN ('queued', 'running');

-- One builder request per platform of a build (amd64, arm64).
CREATE TABLE build_platforms (
    build_id        text NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    platform        text NOT NULL CHECK (platform IN ('amd64', 'arm64')),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'assigned', 'ready', 'released', 'failed')),
    builder_id      text,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    assigned_at     timestamptz,
    ready_at        timestamptz,
    released_at     timestamptz,
    PRIMARY KEY (build_id, platform)
);
CREATE INDEX build_platforms_pending_idx ON build_platforms (requested_at) WHERE state = 'pending';

-- Build insights: the steps (BuildKit vertexes) reported by the CLI.
CREATE TABLE build_steps (
    build_id      text NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    digest        text NOT NULL,
    name          text NOT NULL,
    cached        boolean NOT NULL DEFAULT false,
    started_at    timestamptz,
    completed_at  timestamptz,
    error         text,
    PRIMARY KEY (build_id, digest)
);

CREATE TABLE build_dockerfiles (
    build_id   text NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    target     text NOT NULL,
    filename   text NOT NULL,
    contents   text NOT NULL,
    PRIMARY KEY (build_id, target, filename)
);

-- `depot login`: StartLogin creates a request, a signed-in user approves it on the
-- approval page, and FinishLogin mints the token when it claims the approval. No token
-- is ever stored here.
CREATE TABLE login_requests (
    id           text PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    approved_by  text REFERENCES users (id) ON DELETE CASCADE,
    approved_at  timestamptz,
    denied_at    timestamptz,
    consumed_at  timestamptz
);

CREATE TABLE trust_policies (
    id          text PRIMARY KEY,
    project_id  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    provider    text NOT NULL CHECK (provider IN ('github', 'circleci', 'buildkite', 'gitlab')),
    -- Provider-specific match fields, e.g. {"repository_owner": "acme", "repository": "api"}.
    claims      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trust_policies_project_idx ON trust_policies (project_id);
