-- Signing keys of Kiln's OpenID Connect issuer. Every replica signs with the same key;
-- private keys are sealed under secrets.key_encryption_key.
CREATE TABLE oidc_signing_keys (
    kid                 text PRIMARY KEY,
    alg                 text NOT NULL DEFAULT 'RS256' CHECK (alg = 'RS256'),
    -- The public key as a JWK's RSA members: base64url, big-endian, no leading zeros.
    n                   text NOT NULL,
    e                   text NOT NULL,
    -- PKCS#8 DER of the private key, sealed.
    private_key_sealed  bytea NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Signs new tokens in [sign_from, sign_until); published in the JWKS from creation
    -- until expires_at, after the last token it signed has expired.
    sign_from           timestamptz NOT NULL,
    sign_until          timestamptz NOT NULL CHECK (sign_until > sign_from),
    expires_at          timestamptz NOT NULL CHECK (expires_at > sign_until)
);
CREATE INDEX oidc_signing_keys_signing ON oidc_signing_keys (sign_from DESC);
