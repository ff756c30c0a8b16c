-- Fork pull request claims: the GitHub calls each has cost (bounded per claim), and the
-- pending claims of one client address per repository (bounded, so one address cannot
-- hold a repository's whole budget).
ALTER TABLE oidc_claims ADD COLUMN github_calls integer NOT NULL DEFAULT 0;
CREATE INDEX oidc_claims_pending_claimant ON oidc_claims (repository, client_ip)
    WHERE state = 'pending';
