//! The deployment's BuildKit certificate authority. Generated at first start, its private
//! key sealed with the key-encryption key. It issues short-lived server certificates for
//! builder machines and client certificates for builds: the CLI and buildkitd
//! authenticate each other with these (mTLS).

pub mod seal;

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sqlx::PgPool;
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};

const CA_NAME: &str = "buildkit";
const SEAL_PURPOSE: &str = "kiln/buildkit-ca-key";

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

pub struct Pki {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Kiln");
    dn.push(DnType::CommonName, "Kiln BuildKit CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Pki {
    /// Loads the CA, creating it on first use. Replicas racing here agree on one CA:
    /// the first insert wins and everyone reads it back.
    pub async fn load_or_create(pool: &PgPool, kek: &[u8; 32]) -> Result<Arc<Pki>> {
        if let Some(pki) = Self::load(pool, kek).await? {
            return Ok(pki);
        }
        let key = KeyPair::generate()
            .map_err(|e| Error::internal(anyhow::anyhow!("generating CA key: {e}")))?;
        let mut params = ca_params();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::internal(anyhow::anyhow!("self-signing CA: {e}")))?;
        let sealed = seal::seal(kek, SEAL_PURPOSE, key.serialize_pem().as_bytes())?;
        sqlx::query("INSERT INTO certificate_authorities (name, cert_pem, key_sealed) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(CA_NAME)
            .bind(cert.pem())
            .bind(sealed)
            .execute(pool)
            .await?;
        Self::load(pool, kek).await?.ok_or_else(|| {
            Error::internal(anyhow::anyhow!(
                "the BuildKit CA vanished after it was created"
            ))
        })
    }

    async fn load(pool: &PgPool, kek: &[u8; 32]) -> Result<Option<Arc<Pki>>> {
        let row: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT cert_pem, key_sealed FROM certificate_authorities WHERE name = $1",
        )
        .bind(CA_NAME)
        .fetch_optional(pool)
        .await?;
        let Some((ca_pem, sealed)) = row else {
            return Ok(None);
        };
        let key_pem = String::from_utf8(seal::open(kek, SEAL_PURPOSE, &sealed)?)
            .map_err(|_| Error::internal(anyhow::anyhow!("stored CA key is not PEM")))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| Error::internal(anyhow::anyhow!("stored CA key: {e}")))?;
        // Same subject and key as the stored certificate, so what it signs chains to it.
        let issuer = Issuer::new(ca_params(), key);
        Ok(Some(Arc::new(Pki { ca_pem, issuer })))
    }

    fn issue(
        &self,
        sans: Vec<SanType>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        lifetime: Duration,
    ) -> Result<Issued> {
        let key = KeyPair::generate()
            .map_err(|e| Error::internal(anyhow::anyhow!("generating key: {e}")))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // Small backdating tolerates clock skew between Kiln, the CLI and builders.
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| Error::internal(anyhow::anyhow!("signing certificate: {e}")))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for a builder's BuildKit endpoint, valid for `server_name`
    /// (what the CLI verifies) and, for local builders, 127.0.0.1.
    pub fn server_certificate(&self, server_name: &str, lifetime: Duration) -> Result<Issued> {
        let dns = server_name
            .to_string()
            .try_into()
            .map_err(|_| Error::internal(anyhow::anyhow!("invalid server name {server_name:?}")))?;
        let sans = vec![
            SanType::DnsName(dns),
            SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
        ];
        self.issue(
            sans,
            server_name,
            ExtendedKeyUsagePurpose::ServerAuth,
            lifetime,
        )
    }

    /// A client certificate the CLI presents to the build's builders.
    pub fn client_certificate(&self, build_id: &str, lifetime: Duration) -> Result<Issued> {
        self.issue(
            Vec::new(),
            &format!("build {build_id}"),
            ExtendedKeyUsagePurpose::ClientAuth,
            lifetime,
        )
    }
}
