-- Token ids (jti) already accepted, per issuer, kept until the token expires: a replayed
-- token is refused on every replica. Only tokens whose signature verified are recorded.
CREATE TABLE oidc_seen_jtis (
    issuer      text NOT NULL,
    jti         text NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (issuer, jti)
);
CREATE INDEX oidc_seen_jtis_expiry ON oidc_seen_jtis (expires_at);
