-- Trust policies name the issuer they trust: a GitLab project path on one GitLab says
-- nothing about the same path on another. Existing policies get their provider's public
-- issuer (CircleCI's is per organization).
ALTER TABLE trust_policies ADD COLUMN issuer text;
UPDATE trust_policies SET issuer = CASE provider
    WHEN 'github' THEN 'https://token.actions.githubusercontent.com'
    WHEN 'gitlab' THEN 'https://gitlab.com'
    WHEN 'buildkite' THEN 'https://agent.buildkite.com'
    WHEN 'circleci' THEN 'https://oidc.circleci.com/org/' || (claims->>'organization_uuid')
END;
ALTER TABLE trust_policies ALTER COLUMN issuer SET NOT NULL;

-- What besides the match key tells two policies apart: a GitHub policy's repository id,
-- a GitLab policy's ref. A project trusts an identity once: duplicates are refused, and
-- those already stored are folded into the oldest.
ALTER TABLE trust_policies ADD COLUMN qualifier text
    GENERATED ALWAYS AS (COALESCE(claims->>'repository_id', '') || '|' || COALESCE(claims->>'ref', '')) STORED;
DELETE FROM trust_policies t USING trust_policies older
WHERE t.project_id = older.project_id AND t.provider = older.provider
  AND t.issuer = older.issuer AND t.match_key = older.match_key
  AND t.qualifier = older.qualifier
  AND (older.created_at, older.id) < (t.created_at, t.id);
CREATE UNIQUE INDEX trust_policies_unique
    ON trust_policies (project_id, provider, issuer, match_key, qualifier);

-- Policies are found by the identity a token carries, within one project or across all.
DROP INDEX trust_policies_match;
CREATE INDEX trust_policies_match ON trust_policies (provider, issuer, match_key, project_id);

-- The CI identity that started a build (its issuer and identity), so a CI job that names
-- no project builds where that identity last built: a choice no other tenant can sway.
ALTER TABLE builds ADD COLUMN ci_identity text;
CREATE INDEX builds_ci_identity_idx ON builds (ci_identity, created_at DESC)
    WHERE ci_identity IS NOT NULL;
