-- Fork pull request claims: a workflow run asks for a token (POST /claim), proves it is
-- that run, and exchanges the claim once. The exchange URL's secret is stored only as its
-- SHA-256. A check of GitHub holds a lease (lease_id, lease_until), so replicas never
-- check one claim at once and a crashed check is taken over when its lease ends.
CREATE TABLE oidc_claims (
    id              text PRIMARY KEY,
    secret_hash     bytea NOT NULL UNIQUE,
    challenge_code  text NOT NULL,
    -- GitHub's spelling of the base repository, lowercased, for per-repository limits.
    repository      text NOT NULL,
    repository_id   bigint NOT NULL,
    run_id          bigint NOT NULL,
    run_attempt     integer,
    audience        text NOT NULL,
    client_ip       text NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'issued', 'failed')),
    failure         text,
    checks          integer NOT NULL DEFAULT 0,
    lease_id        text,
    lease_until     timestamptz,
    issued_jti      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);
CREATE INDEX oidc_claims_pending_repository ON oidc_claims (repository) WHERE state = 'pending';
CREATE INDEX oidc_claims_expiry ON oidc_claims (expires_at);

-- Trust policies are found by the identity a CI token carries: a lowercase key per
-- provider (GitHub "owner/repo", GitLab the project path, CircleCI "org/project",
-- Buildkite "org/pipeline").
ALTER TABLE trust_policies ADD COLUMN match_key text;
UPDATE trust_policies SET match_key = lower(CASE provider
    WHEN 'github' THEN (claims->>'repository_owner') || '/' || (claims->>'repository')
    WHEN 'gitlab' THEN claims->>'project_path'
    WHEN 'circleci' THEN (claims->>'organization_uuid') || '/' || (claims->>'project_uuid')
    WHEN 'buildkite' THEN (claims->>'organization_slug') || '/' || (claims->>'pipeline_slug')
END);
ALTER TABLE trust_policies ALTER COLUMN match_key SET NOT NULL;
CREATE INDEX trust_policies_match ON trust_policies (provider, match_key);
