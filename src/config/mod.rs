//! Typed configuration: `config/default.toml` (compiled in) < `--config FILE` < `KILN_*` env.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub secrets: SecretsConfig,
    pub jobs: JobsConfig,
    pub builds: BuildsConfig,
    pub builders: BuildersConfig,
    pub cache: CacheConfig,
    pub registry: RegistryConfig,
    pub models: ModelsConfig,
    pub oidc: OidcConfig,
    pub login: LoginConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    pub log: LogConfig,
    pub dev: DevConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub public_url: url::Url,
    pub max_body_bytes: usize,
    pub shutdown_grace_seconds: u64,
    /// Longest a unary call or page may take before the server answers
    /// `deadline_exceeded` (a client's `connect-timeout-ms` can only shorten it).
    pub request_timeout_seconds: u64,
    /// Longest a client stream (ReportStatusStream) may stay silent.
    pub stream_idle_timeout_seconds: u64,
    pub http2_max_concurrent_streams: u32,
    /// A second port serving only the machine-agent gRPC API; `None`: the main port.
    #[serde(default, deserialize_with = "optional_socket_addr")]
    pub agent_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
}

/// An empty string means "not set", so the key can live in default.toml.
fn optional_socket_addr<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim()
        .parse()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_path.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub max_connections: u32,
    pub min_connections: u32,
    pub acquire_timeout_seconds: u64,
    pub migrate_on_start: bool,
    pub reconnect_max_backoff_seconds: u64,
}

impl DatabaseConfig {
    pub fn is_configured(&self) -> bool {
        !self.url.expose_secret().is_empty()
    }

    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.acquire_timeout_seconds)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub token_cache_ttl_seconds: u64,
    pub token_cache_capacity: usize,
    pub last_used_flush_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    pub key_encryption_key: SecretString,
}

impl SecretsConfig {
    /// The decoded 32-byte key-encryption key, if configured.
    pub fn key_encryption_key(&self) -> Option<[u8; 32]> {
        decode_kek(self.key_encryption_key.expose_secret())
            .ok()
            .flatten()
    }
}

fn decode_kek(text: &str) -> anyhow::Result<Option<[u8; 32]>> {
    if text.is_empty() {
        return Ok(None);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .context("it is not valid base64")?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| anyhow::anyhow!("it decodes to {} bytes, expected 32", b.len()))?;
    Ok(Some(key))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    pub workers: usize,
    pub poll_interval_seconds: u64,
    pub lease_seconds: u64,
    pub backoff_base_seconds: u64,
    pub backoff_max_seconds: u64,
    pub max_attempts: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildsConfig {
    pub health_timeout_seconds: u64,
    pub connection_wait_seconds: u64,
    pub pending_wait_ms: u32,
    pub health_flush_millis: u64,
    /// Step log lines kept per step and per build; later lines are dropped.
    pub log_lines_per_step: i32,
    pub log_lines_per_build: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildersConfig {
    pub provider: ProviderKind,
    pub server_cert_hours: u64,
    pub boot_timeout_seconds: u64,
    pub idle_timeout_seconds: u64,
    pub max_lifetime_hours: u64,
    pub max_machines_total: i64,
    pub max_machines_per_organization: i64,
    pub orphan_grace_seconds: u64,
    pub warm_pool_amd64: u16,
    pub warm_pool_arm64: u16,
    /// The URL agents call; empty: `server.public_url` (the local provider uses the
    /// address it serves on).
    pub agent_api_url: String,
    /// PEM bundle agents trust for that URL (a private CA); empty: public roots.
    pub agent_api_ca_file: PathBuf,
    pub agent_health_interval_seconds: u32,
    pub agent_health_timeout_seconds: u64,
    pub max_parallelism: u32,
    /// Attempts of a machine's launch job before the machine is failed.
    pub launch_max_attempts: i32,
    /// The scheduler wakes on NOTIFY; it also looks for waiting builds this often.
    pub scheduler_poll_seconds: u64,
    pub local: LocalBuildersConfig,
    pub ec2: Ec2BuildersConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2BuildersConfig {
    pub region: String,
    pub endpoint_url: String,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub cluster_id: String,
    pub amd64_launch_template: String,
    pub amd64_image_id: String,
    pub amd64_instance_types: Vec<String>,
    pub arm64_launch_template: String,
    pub arm64_image_id: String,
    pub arm64_instance_types: Vec<String>,
    pub subnets: Vec<String>,
    pub security_group_ids: Vec<String>,
    pub buildkit_port: u16,
    pub agent_command: String,
    pub throttle_max_retries: u32,
    pub throttle_base_delay_millis: u64,
    pub capacity_cooldown_seconds: u64,
    pub call_timeout_seconds: u64,
    pub identity_certificate_file: PathBuf,
    /// Digits only, so `KILN_…=123456789012` arrives as a number; accept both (AWS
    /// account ids are 12 digits, so a number is zero-padded back to 12).
    #[serde(deserialize_with = "aws_account_id")]
    pub identity_account_id: String,
}

fn aws_account_id<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        String(String),
        Number(u64),
    }
    Ok(match Text::deserialize(deserializer)? {
        Text::String(s) => s,
        Text::Number(n) => format!("{n:012}"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    /// EC2 instances running `kiln agent` (crates/kiln-ec2).
    Ec2,
    /// In-memory machines for scheduler benchmarks.
    Sim,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalBuildersConfig {
    pub command: Vec<String>,
    pub state_dir: PathBuf,
    /// Run each builder under `kiln agent` (registration, directives, health), as on EC2.
    pub agent: bool,
    /// The kiln binary that runs agents; empty: this executable.
    pub kiln_binary: PathBuf,
}

/// The layer-cache allocator: one volume per project and architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub provider: CacheProviderKind,
    /// When a project's volumes are created.
    pub create_on: CacheCreateOn,
    /// What the allocator may hand out before overcommit, in GiB. 0: the Ceph cluster's
    /// raw size; no limit for the local provider.
    pub capacity_gb: u64,
    /// Provisioned sizes may add up to capacity × this (volumes are thin).
    pub overcommit_ratio: f64,
    pub min_size_gb: i32,
    pub max_size_gb: i32,
    /// BuildKit's GC keeps the volume's size minus this share, so the filesystem never
    /// fills.
    pub gc_margin_percent: u8,
    /// How often every volume's usage is measured.
    pub usage_interval_seconds: u64,
    /// How often images that no row owns are looked for, and how long one must stay
    /// unowned before it is removed.
    pub sweep_interval_seconds: u64,
    pub sweep_grace_seconds: u64,
    /// Longest one provider call (create, resize, remove, usage) may take.
    pub call_timeout_seconds: u64,
    pub ceph: CephCacheConfig,
    pub local: LocalCacheConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheProviderKind {
    /// Directories under `cache.local.dir` (kiln dev, tests without Ceph).
    Local,
    /// RBD images on a Ceph cluster (crates/kiln-ceph).
    Ceph,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheCreateOn {
    /// At the project's first build of each architecture.
    Build,
    /// With the project, for both architectures.
    Project,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephCacheConfig {
    /// ceph.conf naming the monitors and Kiln's keyring.
    pub conf_path: PathBuf,
    /// The cephx client Kiln connects as (`client.<client>`): it creates images and
    /// builders' keys, so it needs `mon 'allow *'`-level caps (see docs/ARCHITECTURE.md).
    pub client: String,
    pub pool: String,
    /// Monitor addresses builders use; empty: the cluster's monitor map.
    pub monitors: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCacheConfig {
    /// Empty: `<dev.data_dir>/cache` under `kiln dev`, else a directory under /tmp.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub host: String,
    pub pull_token_ttl_seconds: u64,
}

/// The model registry: AI models as OCI images, served read-only at `/v2/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Serve `/v2/` on kiln's port.
    pub enabled: bool,
    /// Where blobs, manifests and tag pointers live.
    pub store: ModelStoreKind,
    /// Who may pull.
    pub auth: ModelPullAuth,
    /// How new images' layers are stored: "tar" or "gzip".
    pub layer_format: String,
    /// Files at least this large (MiB) get a layer of their own.
    pub large_file_mb: u64,
    /// At most this many layers per image.
    pub max_layers: usize,
    /// Blob GETs answer 307 to a presigned URL of the store (S3 only).
    pub redirect_blobs: bool,
    pub presigned_url_seconds: u64,
    /// How often each replica adds its pull counts to the database.
    pub pull_count_flush_seconds: u64,
    /// Longest one import may take (hub downloads included).
    pub import_timeout_seconds: u64,
    pub local: LocalModelStoreConfig,
    pub s3: S3ModelStoreConfig,
    pub hub: HubConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStoreKind {
    /// A directory (`kiln dev`, single-machine installations).
    Local,
    /// Any S3-compatible store: S3, R2, MinIO, Ceph RGW.
    S3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelPullAuth {
    /// Anyone who reaches the port may pull, as from depot.ai.
    Anonymous,
    /// Pulls need a Kiln token, through the registry token flow (`/v2/token`).
    Token,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelStoreConfig {
    /// Empty: `<dev.data_dir>/models` under `kiln dev`, else a directory under /tmp.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3ModelStoreConfig {
    /// Empty: AWS S3 in `region`; else the store's URL (e.g. http://127.0.0.1:7480).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Empty: the AWS environment (AWS_ACCESS_KEY_ID, instance profile, ...).
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    /// Objects go under this prefix inside the bucket.
    pub prefix: String,
    /// Needed for an `http://` endpoint.
    pub allow_http: bool,
    /// bucket.host/key instead of host/bucket/key.
    pub virtual_hosted_style: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// A Hugging Face-compatible hub (the HF_ENDPOINT convention).
    pub endpoint: url::Url,
    /// Sent as a bearer token; empty: anonymous.
    pub token: SecretString,
    /// Where partial downloads are kept so an interrupted import resumes. Empty: a
    /// directory under /tmp.
    pub download_dir: PathBuf,
    /// Largest model accepted, GiB.
    pub max_model_gb: u64,
    /// Most files accepted in one repository.
    pub max_files: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer's URL: `iss` of every token and the prefix of its discovery document.
    /// Empty: `server.public_url`. Never taken from a request's Host header.
    pub issuer_url: String,
    /// How long one signing key signs before the next takes over.
    pub key_rotation_days: u64,
    /// How long before a key starts signing it is published, so verifiers that cache
    /// the JWKS already know it.
    pub key_prepublish_hours: u64,
    /// Lifetime of the tokens Kiln issues.
    pub token_lifetime_seconds: u64,
    /// Discovery lists `authorization_endpoint` and `token_endpoint` (which answer a
    /// clear OAuth error), as OpenID Connect Discovery 1.0 requires. Off: GitHub's shape,
    /// which strict validators reject.
    pub strict_discovery: bool,
    /// Audiences Kiln issues tokens for and accepts in CI providers' tokens.
    pub audiences: Vec<String>,
    pub jwks_cache_seconds: u64,
    pub jwks_refresh_min_seconds: u64,
    /// After a failed load of an issuer's keys, tokens naming it are refused this long
    /// without another fetch.
    pub jwks_failure_retry_seconds: u64,
    pub claims: ClaimsConfig,
    pub github: GitHubConfig,
    pub trusted_issuers: Vec<TrustedIssuerConfig>,
}

/// The fork pull request claim flow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsConfig {
    pub enabled: bool,
    /// A second listener for the claim flow, with its own certificate. Empty: none.
    pub listen: String,
    pub tls_cert_path: PathBuf,
    pub tls_key_path: PathBuf,
    /// Base URL of exchange URLs. Empty: the issuer URL.
    pub exchange_base_url: String,
    pub ttl_seconds: u64,
    pub proofs: Vec<ClaimProof>,
    pub check_interval_ms: u64,
    pub max_checks: i32,
    pub per_client_per_minute: u32,
    pub per_client_burst: u32,
    pub max_pending_per_repository: i64,
    /// Unexchanged claims at once per client address and repository, so one address
    /// cannot hold a repository's whole budget.
    pub max_pending_per_claimant: i64,
    pub max_pending: i64,
    /// GitHub calls one check (one exchange poll) may make, in all.
    pub max_github_calls_per_check: u32,
    /// Running jobs whose live logs one check reads (rotating through them poll by poll).
    pub max_jobs_per_check: u32,
    /// Step log tails one check reads, across its jobs.
    pub max_log_tails_per_check: u32,
    /// GitHub calls one claim may cost over all its checks; then it is refused.
    pub max_github_calls_per_claim: i32,
}

impl ClaimsConfig {
    pub fn tls(&self) -> TlsConfig {
        TlsConfig {
            cert_path: self.tls_cert_path.clone(),
            key_path: self.tls_key_path.clone(),
        }
    }
}

/// How a claimant proves it runs inside the workflow run it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimProof {
    /// The challenge code in the live log of one of the run's jobs.
    Log,
    /// An artifact named `oidc-challenge-<code>` uploaded to the run.
    Artifact,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    pub api_url: String,
    pub web_url: String,
    pub token: SecretString,
    /// A GitHub account's `user_session` cookie, for reading live job logs.
    pub web_session: SecretString,
    pub timeout_seconds: u64,
    pub max_job_pages: u32,
}

/// A CI provider's OIDC issuer whose tokens Kiln accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuerConfig {
    pub provider: TrustedProvider,
    /// `iss`, exactly; its discovery document is `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// Accepted audiences. Empty: `oidc.audiences`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The one signing algorithm accepted from this issuer.
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Where its keys are, if not named by its discovery document.
    #[serde(default)]
    pub jwks_uri: String,
    /// Refuse a token's second use.
    #[serde(default = "default_true")]
    pub single_use: bool,
}

fn default_algorithm() -> String {
    "RS256".into()
}

fn default_true() -> bool {
    true
}

/// Which kind of CI identity an issuer's tokens carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrustedProvider {
    Github,
    Gitlab,
    Circleci,
    Buildkite,
    /// A fork pull request issuer: its tokens get an isolated principal.
    GithubFork,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    pub request_ttl_seconds: u64,
    /// Most `depot login` requests open at once; more answer `resource_exhausted`.
    pub max_open_requests: i64,
}

/// Bounds on what callers without a token can make Kiln do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per minute per client address to the endpoints that need no token.
    pub unauthenticated_per_minute: u32,
    /// Requests a client may make at once before the per-minute rate applies.
    pub unauthenticated_burst: u32,
    /// A header carrying the client's address when Kiln runs behind a proxy, e.g.
    /// `x-forwarded-for`. Empty: the TCP peer.
    pub client_ip_header: String,
    /// The proxies (addresses or CIDRs) whose `client_ip_header` is believed; the client
    /// is the rightmost address in it that is not one of them.
    pub trusted_proxies: Vec<String>,
    /// Refused agent calls written to the audit log per minute per replica; the rest
    /// are only counted (`kiln_audit_suppressed_total`).
    pub refusal_audits_per_minute: u32,
    /// The dashboard's live streams (server-sent events) open at once per session, and
    /// in total per replica; past either, 429.
    pub live_streams_per_session: usize,
    pub live_streams_total: usize,
}

impl LimitsConfig {
    /// `trusted_proxies` as networks (entries that do not parse are refused at start).
    pub fn trusted_proxy_networks(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| parse_network(p))
            .collect()
    }
}

/// A CIDR, or a single address as the network of just it.
fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

/// How long records are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Closed (used, denied or expired) `depot login` requests.
    pub login_requests_hours: i32,
    /// Audit entries of refused agent calls (which unauthenticated callers can cause).
    pub refusal_audit_days: i32,
    /// Failed jobs kept for inspection.
    pub failed_jobs_days: i32,
    /// Tokens that expired or were revoked.
    pub dead_tokens_days: i32,
}

impl Config {
    /// The registry host pull tokens are for.
    pub fn registry_host(&self) -> String {
        if !self.registry.host.is_empty() {
            return self.registry.host.clone();
        }
        let url = &self.server.public_url;
        match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            _ => "localhost".to_string(),
        }
    }

    /// The OIDC issuer's URL, without a trailing slash.
    pub fn oidc_issuer(&self) -> String {
        let url = if self.oidc.issuer_url.is_empty() {
            self.server.public_url.as_str()
        } else {
            self.oidc.issuer_url.as_str()
        };
        url.trim_end_matches('/').to_string()
    }

    /// Where the local cache provider keeps its volumes.
    pub fn local_cache_dir(&self) -> PathBuf {
        if self.cache.local.dir.as_os_str().is_empty() {
            // One directory per database: the reconciler deletes images its database does
            // not know, so two installations on one machine must not share a directory.
            self.per_database_temp_dir("kiln-cache")
        } else {
            self.cache.local.dir.clone()
        }
    }

    /// `<temp dir>/<prefix>-<hash of the database URL>`: one directory per installation.
    fn per_database_temp_dir(&self, prefix: &str) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.database.url.expose_secret().as_bytes());
        std::env::temp_dir().join(format!("{prefix}-{}", hex::encode(&digest[..6])))
    }

    /// Where the local model store keeps blobs.
    pub fn local_models_dir(&self) -> PathBuf {
        if self.models.local.dir.as_os_str().is_empty() {
            self.per_database_temp_dir("kiln-models")
        } else {
            self.models.local.dir.clone()
        }
    }

    /// Where hub downloads are kept between attempts.
    pub fn hub_download_dir(&self) -> PathBuf {
        if self.models.hub.download_dir.as_os_str().is_empty() {
            self.per_database_temp_dir("kiln-hub")
        } else {
            self.models.hub.download_dir.clone()
        }
    }

    /// A URL under `server.public_url`.
    pub fn public_link(&self, path: &str) -> String {
        format!(
            "{}/{}",
            self.server.public_url.as_str().trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevConfig {
    pub data_dir: PathBuf,
    pub postgres_bin_dir: PathBuf,
    /// The depot CLI `kiln dev` names in its hint. Empty: `depot` on PATH, else the
    /// copy `scripts/dev.sh` and `scripts/test.sh` install.
    pub depot_cli: PathBuf,
}

impl Config {
    /// Loads the layered configuration and validates it. Errors name the key and value.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.is_file() {
                bail!(
                    "config file {} does not exist or is not a file",
                    path.display()
                );
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvLayer::from_vars(env));
        let config: Config = figment.extract().map_err(|err| {
            let messages: Vec<String> = err
                .into_iter()
                .map(|e| describe_figment_error(&figment, e))
                .collect();
            anyhow::anyhow!("invalid configuration: {}", messages.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, value: String, rule: &str| {
            if !ok {
                problems.push(format!("{key} = {value}: {rule}"));
            }
        };
        let s = &self.server;
        check(
            s.max_body_bytes >= 1024,
            "server.max_body_bytes",
            s.max_body_bytes.to_string(),
            "must be at least 1024",
        );
        check(
            s.http2_max_concurrent_streams >= 1,
            "server.http2_max_concurrent_streams",
            s.http2_max_concurrent_streams.to_string(),
            "must be at least 1",
        );
        let cert_set = !s.tls.cert_path.as_os_str().is_empty();
        let key_set = !s.tls.key_path.as_os_str().is_empty();
        check(
            cert_set == key_set,
            "server.tls",
            format!(
                "cert_path={:?} key_path={:?}",
                s.tls.cert_path, s.tls.key_path
            ),
            "set both cert_path and key_path, or neither",
        );
        for (key, path) in [
            ("server.tls.cert_path", &s.tls.cert_path),
            ("server.tls.key_path", &s.tls.key_path),
        ] {
            if !path.as_os_str().is_empty() {
                check(
                    path.is_file(),
                    key,
                    format!("{path:?}"),
                    "file does not exist",
                );
            }
        }
        let db = &self.database;
        if db.is_configured() {
            let parsed = url::Url::parse(db.url.expose_secret());
            let ok =
                matches!(&parsed, Ok(u) if u.scheme() == "postgres" || u.scheme() == "postgresql");
            // Never echo the URL: it may carry a password.
            check(
                ok,
                "database.url",
                "<redacted>".into(),
                "must be a postgres:// or postgresql:// URL",
            );
        }
        check(
            db.max_connections >= 1,
            "database.max_connections",
            db.max_connections.to_string(),
            "must be at least 1",
        );
        check(
            db.min_connections <= db.max_connections,
            "database.min_connections",
            db.min_connections.to_string(),
            "must not exceed database.max_connections",
        );
        check(
            db.acquire_timeout_seconds >= 1,
            "database.acquire_timeout_seconds",
            db.acquire_timeout_seconds.to_string(),
            "must be at least 1",
        );
        check(
            db.reconnect_max_backoff_seconds >= 1,
            "database.reconnect_max_backoff_seconds",
            db.reconnect_max_backoff_seconds.to_string(),
            "must be at least 1",
        );
        let a = &self.auth;
        check(
            a.token_cache_ttl_seconds <= 300,
            "auth.token_cache_ttl_seconds",
            a.token_cache_ttl_seconds.to_string(),
            "must be at most 300",
        );
        check(
            a.last_used_flush_seconds >= 1,
            "auth.last_used_flush_seconds",
            a.last_used_flush_seconds.to_string(),
            "must be at least 1",
        );
        if let Err(err) = decode_kek(self.secrets.key_encryption_key.expose_secret()) {
            check(
                false,
                "secrets.key_encryption_key",
                "<redacted>".into(),
                &format!("{err:#}; generate one with `openssl rand -base64 32`"),
            );
        }
        let e = &self.builders.ec2;
        if self.builders.provider == ProviderKind::Ec2 {
            check(
                !e.amd64_launch_template.is_empty() || !e.arm64_launch_template.is_empty(),
                "builders.ec2.amd64_launch_template",
                e.amd64_launch_template.clone(),
                "the ec2 provider needs a launch template for amd64, arm64 or both",
            );
            check(
                !e.cluster_id.is_empty() && e.cluster_id.len() <= 128,
                "builders.ec2.cluster_id",
                e.cluster_id.clone(),
                "must be 1 to 128 characters",
            );
            check(
                e.access_key_id.is_empty() == e.secret_access_key.expose_secret().is_empty(),
                "builders.ec2.access_key_id",
                e.access_key_id.clone(),
                "set both access_key_id and secret_access_key, or neither",
            );
        }
        check(
            self.builders.agent_health_interval_seconds >= 1
                && u64::from(self.builders.agent_health_interval_seconds)
                    < self.builders.agent_health_timeout_seconds,
            "builders.agent_health_interval_seconds",
            self.builders.agent_health_interval_seconds.to_string(),
            "must be at least 1 and below builders.agent_health_timeout_seconds",
        );
        check(
            (1..=3600).contains(&s.request_timeout_seconds),
            "server.request_timeout_seconds",
            s.request_timeout_seconds.to_string(),
            "must be between 1 and 3600",
        );
        check(
            (10..=86_400).contains(&s.stream_idle_timeout_seconds),
            "server.stream_idle_timeout_seconds",
            s.stream_idle_timeout_seconds.to_string(),
            "must be between 10 and 86400",
        );
        let b = &self.builders;
        for (key, value, min, max) in [
            (
                "builders.boot_timeout_seconds",
                b.boot_timeout_seconds,
                5,
                86_400,
            ),
            (
                "builders.idle_timeout_seconds",
                b.idle_timeout_seconds,
                1,
                30 * 86_400,
            ),
            ("builders.max_lifetime_hours", b.max_lifetime_hours, 1, 8760),
            ("builders.server_cert_hours", b.server_cert_hours, 1, 8760),
            (
                "builders.orphan_grace_seconds",
                b.orphan_grace_seconds,
                0,
                7 * 86_400,
            ),
            (
                "builders.agent_health_timeout_seconds",
                b.agent_health_timeout_seconds,
                2,
                86_400,
            ),
            (
                "builders.scheduler_poll_seconds",
                b.scheduler_poll_seconds,
                1,
                3600,
            ),
        ] {
            check(
                (min..=max).contains(&value),
                key,
                value.to_string(),
                &format!("must be between {min} and {max}"),
            );
        }
        check(
            b.server_cert_hours >= b.max_lifetime_hours,
            "builders.server_cert_hours",
            b.server_cert_hours.to_string(),
            "must be at least builders.max_lifetime_hours (a builder's certificate must outlive it)",
        );
        check(
            (0..=1_000_000).contains(&b.max_machines_total),
            "builders.max_machines_total",
            b.max_machines_total.to_string(),
            "must be between 0 and 1000000",
        );
        check(
            (0..=b.max_machines_total).contains(&b.max_machines_per_organization),
            "builders.max_machines_per_organization",
            b.max_machines_per_organization.to_string(),
            "must be between 0 and builders.max_machines_total",
        );
        check(
            (1..=100).contains(&b.launch_max_attempts),
            "builders.launch_max_attempts",
            b.launch_max_attempts.to_string(),
            "must be between 1 and 100",
        );
        check(
            (1..=1024).contains(&b.max_parallelism),
            "builders.max_parallelism",
            b.max_parallelism.to_string(),
            "must be between 1 and 1024",
        );
        let c = &self.cache;
        check(
            c.min_size_gb >= 1 && c.min_size_gb <= c.max_size_gb && c.max_size_gb <= 1_000_000,
            "cache.min_size_gb",
            format!("{} (max {})", c.min_size_gb, c.max_size_gb),
            "needs 1 <= min_size_gb <= max_size_gb <= 1000000",
        );
        check(
            c.overcommit_ratio.is_finite() && (0.1..=100.0).contains(&c.overcommit_ratio),
            "cache.overcommit_ratio",
            c.overcommit_ratio.to_string(),
            "must be between 0.1 and 100",
        );
        check(
            c.gc_margin_percent <= 50,
            "cache.gc_margin_percent",
            c.gc_margin_percent.to_string(),
            "must be at most 50",
        );
        for (key, value, min, max) in [
            (
                "cache.usage_interval_seconds",
                c.usage_interval_seconds,
                5,
                86_400,
            ),
            (
                "cache.sweep_interval_seconds",
                c.sweep_interval_seconds,
                10,
                86_400,
            ),
            (
                "cache.sweep_grace_seconds",
                c.sweep_grace_seconds,
                0,
                30 * 86_400,
            ),
            (
                "cache.call_timeout_seconds",
                c.call_timeout_seconds,
                1,
                3600,
            ),
        ] {
            check(
                (min..=max).contains(&value),
                key,
                value.to_string(),
                &format!("must be between {min} and {max}"),
            );
        }
        let o = &self.oidc;
        check(
            (1..=365).contains(&o.key_rotation_days),
            "oidc.key_rotation_days",
            o.key_rotation_days.to_string(),
            "must be between 1 and 365",
        );
        check(
            o.key_prepublish_hours < o.key_rotation_days * 24,
            "oidc.key_prepublish_hours",
            o.key_prepublish_hours.to_string(),
            "must be shorter than the rotation period",
        );
        check(
            (60..=3600).contains(&o.token_lifetime_seconds),
            "oidc.token_lifetime_seconds",
            o.token_lifetime_seconds.to_string(),
            "must be between 60 and 3600",
        );
        let is_url = |u: &str, loopback_http: bool| {
            url::Url::parse(u).is_ok_and(|u| {
                let loopback = matches!(u.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
                    || u.host_str().is_some_and(|h| h.starts_with("127."));
                (u.scheme() == "https" || (u.scheme() == "http" && (loopback || loopback_http)))
                    && u.host_str().is_some()
                    && u.query().is_none()
                    && u.fragment().is_none()
            })
        };
        check(
            !o.audiences.is_empty()
                && o.audiences
                    .iter()
                    .all(|a| !a.trim().is_empty() && a.len() <= 256),
            "oidc.audiences",
            format!("{:?}", o.audiences),
            "must list at least one audience, each 1 to 256 characters",
        );
        check(
            o.jwks_cache_seconds >= 1 && o.jwks_cache_seconds <= 86_400,
            "oidc.jwks_cache_seconds",
            o.jwks_cache_seconds.to_string(),
            "must be between 1 and 86400",
        );
        check(
            o.jwks_refresh_min_seconds <= o.jwks_cache_seconds,
            "oidc.jwks_refresh_min_seconds",
            o.jwks_refresh_min_seconds.to_string(),
            "must not exceed oidc.jwks_cache_seconds",
        );
        check(
            (1..=3600).contains(&o.jwks_failure_retry_seconds),
            "oidc.jwks_failure_retry_seconds",
            o.jwks_failure_retry_seconds.to_string(),
            "must be between 1 and 3600",
        );
        let cl = &o.claims;
        check(
            (10..=3600).contains(&cl.ttl_seconds),
            "oidc.claims.ttl_seconds",
            cl.ttl_seconds.to_string(),
            "must be between 10 and 3600",
        );
        check(
            !cl.proofs.is_empty(),
            "oidc.claims.proofs",
            format!("{:?}", cl.proofs),
            "must list at least one of \"log\" and \"artifact\"",
        );
        check(
            cl.max_checks >= 1,
            "oidc.claims.max_checks",
            cl.max_checks.to_string(),
            "must be at least 1",
        );
        check(
            cl.max_pending >= 1
                && cl.max_pending_per_repository >= 1
                && cl.max_pending_per_claimant >= 1,
            "oidc.claims.max_pending",
            format!(
                "{} / {} / {}",
                cl.max_pending, cl.max_pending_per_repository, cl.max_pending_per_claimant
            ),
            "max_pending, max_pending_per_repository and max_pending_per_claimant must be at \
             least 1",
        );
        // A check reads the run, its artifacts and a page of jobs before any log.
        check(
            (4..=200).contains(&cl.max_github_calls_per_check)
                && (1..=50).contains(&cl.max_jobs_per_check)
                && (1..=100).contains(&cl.max_log_tails_per_check)
                && cl.max_github_calls_per_claim >= cl.max_github_calls_per_check as i32,
            "oidc.claims.max_github_calls_per_check",
            format!(
                "{} per check, {} jobs, {} log tails, {} per claim",
                cl.max_github_calls_per_check,
                cl.max_jobs_per_check,
                cl.max_log_tails_per_check,
                cl.max_github_calls_per_claim
            ),
            "calls per check must be 4 to 200, jobs 1 to 50, log tails 1 to 100, and calls \
             per claim at least the calls per check",
        );
        check(
            cl.per_client_per_minute >= 1 && cl.per_client_burst >= 1,
            "oidc.claims.per_client_per_minute",
            format!("{} / {}", cl.per_client_per_minute, cl.per_client_burst),
            "per_client_per_minute and per_client_burst must be at least 1",
        );
        if !cl.listen.is_empty() {
            check(
                cl.listen.parse::<std::net::SocketAddr>().is_ok(),
                "oidc.claims.listen",
                cl.listen.clone(),
                "must be an address and port such as 0.0.0.0:443",
            );
        }
        check(
            cl.tls_cert_path.as_os_str().is_empty() == cl.tls_key_path.as_os_str().is_empty(),
            "oidc.claims.tls_cert_path",
            format!("{:?} / {:?}", cl.tls_cert_path, cl.tls_key_path),
            "set both tls_cert_path and tls_key_path, or neither",
        );
        if !cl.exchange_base_url.is_empty() {
            check(
                is_url(&cl.exchange_base_url, true),
                "oidc.claims.exchange_base_url",
                cl.exchange_base_url.clone(),
                "must be an absolute http(s) URL with no query or fragment",
            );
        }
        let g = &o.github;
        for (key, value) in [
            ("oidc.github.api_url", &g.api_url),
            ("oidc.github.web_url", &g.web_url),
        ] {
            check(
                is_url(value, true),
                key,
                value.clone(),
                "must be an absolute http(s) URL",
            );
        }
        check(
            (1..=120).contains(&g.timeout_seconds),
            "oidc.github.timeout_seconds",
            g.timeout_seconds.to_string(),
            "must be between 1 and 120",
        );
        check(
            (1..=50).contains(&g.max_job_pages),
            "oidc.github.max_job_pages",
            g.max_job_pages.to_string(),
            "must be between 1 and 50",
        );
        for (i, t) in o.trusted_issuers.iter().enumerate() {
            check(
                is_url(&t.issuer, false),
                &format!("oidc.trusted_issuers[{i}].issuer"),
                t.issuer.clone(),
                "must be an absolute https URL (http only on loopback) with no query or fragment",
            );
            check(
                t.algorithm == "RS256",
                &format!("oidc.trusted_issuers[{i}].algorithm"),
                t.algorithm.clone(),
                "must be \"RS256\", the algorithm every supported CI provider signs with",
            );
            if !t.jwks_uri.is_empty() {
                check(
                    is_url(&t.jwks_uri, false),
                    &format!("oidc.trusted_issuers[{i}].jwks_uri"),
                    t.jwks_uri.clone(),
                    "must be an absolute https URL (http only on loopback)",
                );
            }
            check(
                o.trusted_issuers[..i].iter().all(|u| u.issuer != t.issuer),
                &format!("oidc.trusted_issuers[{i}].issuer"),
                t.issuer.clone(),
                "is listed twice",
            );
        }
        if !o.issuer_url.is_empty() {
            let parsed = url::Url::parse(&o.issuer_url);
            check(
                parsed.as_ref().is_ok_and(|u| {
                    matches!(u.scheme(), "https" | "http")
                        && u.host_str().is_some()
                        && u.query().is_none()
                        && u.fragment().is_none()
                }),
                "oidc.issuer_url",
                o.issuer_url.clone(),
                "must be an absolute https URL with no query or fragment",
            );
        }
        if c.provider == CacheProviderKind::Ceph {
            check(
                c.ceph.conf_path.is_file(),
                "cache.ceph.conf_path",
                format!("{:?}", c.ceph.conf_path),
                "file does not exist",
            );
            check(
                crate::cache::names::is_ceph_name(&c.ceph.pool),
                "cache.ceph.pool",
                format!("{:?}", c.ceph.pool),
                "must be a pool name (letters, digits, '-', '_', '.')",
            );
            check(
                crate::cache::names::is_ceph_name(&c.ceph.client),
                "cache.ceph.client",
                format!("{:?}", c.ceph.client),
                "must be a client id such as \"admin\" or \"kiln\"",
            );
        }
        let l = &self.limits;
        check(
            l.unauthenticated_per_minute >= 1 && l.unauthenticated_burst >= 1,
            "limits.unauthenticated_per_minute",
            format!(
                "{} (burst {})",
                l.unauthenticated_per_minute, l.unauthenticated_burst
            ),
            "rate and burst must be at least 1",
        );
        check(
            l.client_ip_header.is_empty()
                || http::HeaderName::from_bytes(l.client_ip_header.as_bytes()).is_ok(),
            "limits.client_ip_header",
            format!("{:?}", l.client_ip_header),
            "must be empty or a header name",
        );
        check(
            l.client_ip_header.is_empty() || !l.trusted_proxies.is_empty(),
            "limits.trusted_proxies",
            "[]".to_string(),
            "must list the reverse proxies' addresses (CIDRs) when limits.client_ip_header is \
             set: the header is believed only from them",
        );
        check(
            l.live_streams_per_session >= 1 && l.live_streams_total >= l.live_streams_per_session,
            "limits.live_streams_per_session",
            format!("{} / {}", l.live_streams_per_session, l.live_streams_total),
            "must be at least 1, and live_streams_total at least as many",
        );
        for proxy in &l.trusted_proxies {
            check(
                parse_network(proxy).is_some(),
                "limits.trusted_proxies",
                format!("{proxy:?}"),
                "each entry must be an address or a CIDR, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\"",
            );
        }
        check(
            (1..=1_000_000).contains(&self.login.max_open_requests),
            "login.max_open_requests",
            self.login.max_open_requests.to_string(),
            "must be between 1 and 1000000",
        );
        let r = &self.retention;
        for (key, value) in [
            ("retention.login_requests_hours", r.login_requests_hours),
            ("retention.refusal_audit_days", r.refusal_audit_days),
            ("retention.failed_jobs_days", r.failed_jobs_days),
            ("retention.dead_tokens_days", r.dead_tokens_days),
        ] {
            check(
                (1..=3650).contains(&value),
                key,
                value.to_string(),
                "must be between 1 and 3650",
            );
        }
        let j = &self.jobs;
        check(
            j.workers >= 1,
            "jobs.workers",
            j.workers.to_string(),
            "must be at least 1",
        );
        check(
            j.poll_interval_seconds >= 1,
            "jobs.poll_interval_seconds",
            j.poll_interval_seconds.to_string(),
            "must be at least 1",
        );
        check(
            (5..=86_400).contains(&j.lease_seconds),
            "jobs.lease_seconds",
            j.lease_seconds.to_string(),
            "must be between 5 and 86400",
        );
        check(
            j.backoff_base_seconds >= 1,
            "jobs.backoff_base_seconds",
            j.backoff_base_seconds.to_string(),
            "must be at least 1",
        );
        check(
            j.backoff_max_seconds >= j.backoff_base_seconds && j.backoff_max_seconds <= 86_400,
            "jobs.backoff_max_seconds",
            j.backoff_max_seconds.to_string(),
            "must be between jobs.backoff_base_seconds and 86400",
        );
        check(
            j.max_attempts >= 1,
            "jobs.max_attempts",
            j.max_attempts.to_string(),
            "must be at least 1",
        );
        let b = &self.builds;
        check(
            (30..=86_400).contains(&b.health_timeout_seconds),
            "builds.health_timeout_seconds",
            b.health_timeout_seconds.to_string(),
            "must be between 30 (the CLI reports every 5 s) and 86400",
        );
        check(
            b.connection_wait_seconds <= 120
                && b.connection_wait_seconds < self.server.request_timeout_seconds,
            "builds.connection_wait_seconds",
            b.connection_wait_seconds.to_string(),
            "must be at most 120 and below server.request_timeout_seconds",
        );
        check(
            (1..=60_000).contains(&b.pending_wait_ms),
            "builds.pending_wait_ms",
            b.pending_wait_ms.to_string(),
            "must be between 1 and 60000 (0 would make the CLI spin)",
        );
        check(
            (10..=10_000).contains(&b.health_flush_millis),
            "builds.health_flush_millis",
            b.health_flush_millis.to_string(),
            "must be between 10 and 10000",
        );
        check(
            (60..=86_400).contains(&self.registry.pull_token_ttl_seconds),
            "registry.pull_token_ttl_seconds",
            self.registry.pull_token_ttl_seconds.to_string(),
            "must be between 60 and 86400",
        );
        let m = &self.models;
        check(
            matches!(m.layer_format.as_str(), "tar" | "gzip"),
            "models.layer_format",
            m.layer_format.clone(),
            "must be \"tar\" or \"gzip\"",
        );
        check(
            (1..=16_384).contains(&m.large_file_mb),
            "models.large_file_mb",
            m.large_file_mb.to_string(),
            "must be between 1 and 16384",
        );
        check(
            (1..=100).contains(&m.max_layers),
            "models.max_layers",
            m.max_layers.to_string(),
            "must be between 1 and 100 (runtimes fail past about 125 layers)",
        );
        check(
            (60..=604_800).contains(&m.presigned_url_seconds),
            "models.presigned_url_seconds",
            m.presigned_url_seconds.to_string(),
            "must be between 60 and 604800",
        );
        check(
            (1..=3600).contains(&m.pull_count_flush_seconds),
            "models.pull_count_flush_seconds",
            m.pull_count_flush_seconds.to_string(),
            "must be between 1 and 3600",
        );
        check(
            (10..=86_400).contains(&m.import_timeout_seconds),
            "models.import_timeout_seconds",
            m.import_timeout_seconds.to_string(),
            "must be between 10 and 86400",
        );
        check(
            m.store != ModelStoreKind::S3 || !m.s3.bucket.is_empty(),
            "models.s3.bucket",
            "\"\"".into(),
            "must be set when models.store = \"s3\"",
        );
        check(
            !m.redirect_blobs || m.store == ModelStoreKind::S3,
            "models.redirect_blobs",
            "true".into(),
            "needs models.store = \"s3\" (a local directory has no URLs to redirect to)",
        );
        check(
            (1..=100_000).contains(&m.hub.max_files),
            "models.hub.max_files",
            m.hub.max_files.to_string(),
            "must be between 1 and 100000",
        );
        check(
            (30..=3600).contains(&self.login.request_ttl_seconds),
            "login.request_ttl_seconds",
            self.login.request_ttl_seconds.to_string(),
            "must be between 30 and 3600",
        );
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            check(
                false,
                "log.filter",
                format!("{:?}", self.log.filter),
                &err.to_string(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("invalid configuration: {}", problems.join("; "))
        }
    }
}

/// The `KILN_*` environment layer. Like figment's `Env`, but reading a given list of
/// variables so precedence can be tested without touching the process environment.
struct EnvLayer {
    vars: Vec<(String, String)>,
}

const ENV_PREFIX: &str = "KILN_";

impl EnvLayer {
    fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars = vars
            .into_iter()
            .filter_map(|(key, value)| {
                let rest = key.strip_prefix(ENV_PREFIX)?;
                let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
                if path.iter().any(|p| p.is_empty()) {
                    return None;
                }
                Some((path.join("."), value))
            })
            .collect();
        EnvLayer { vars }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").interpolater(|_: &Profile, keys: &[&str]| {
            let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!("{ENV_PREFIX}{}", upper.join("__"))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, raw) in &self.vars {
            let value: Value = raw.parse().unwrap_or_else(|never| match never {});
            insert_path(&mut dict, &key.split('.').collect::<Vec<_>>(), value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn insert_path(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [leaf] => {
            dict.insert(leaf.to_string(), value);
        }
        [head, rest @ ..] => {
            let child = dict
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if child.as_dict().is_none() {
                *child = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = child {
                insert_path(inner, rest, value);
            }
        }
    }
}

fn is_secret_key(key: &str) -> bool {
    key == "database.url"
        || key.starts_with("secrets.")
        || key.ends_with("secret_access_key")
        || key == "oidc.github.token"
        || key == "oidc.github.web_session"
}

/// "key `a.b` = value (from <where>): problem", never echoing secret values.
fn describe_figment_error(figment: &Figment, err: figment::Error) -> String {
    let key = if err.path.is_empty() {
        "<root>".to_string()
    } else {
        err.path.join(".")
    };
    // An unknown key may be a misplaced secret: never echo its value.
    let unknown = matches!(err.kind, figment::error::Kind::UnknownField(..));
    let value = if err.path.is_empty() || unknown {
        String::new()
    } else if is_secret_key(&key) {
        " = <redacted>".to_string()
    } else {
        figment
            .find_value(&key)
            .ok()
            .and_then(|v| serde_json::to_string(&v).ok())
            .map(|v| format!(" = {v}"))
            .unwrap_or_default()
    };
    let source = match &err.metadata {
        Some(meta) => {
            let path: Vec<&str> = err.path.iter().map(String::as_str).collect();
            let place = match &meta.source {
                Some(figment::Source::File(file)) => format!(" {}", file.display()),
                _ if !path.is_empty() => format!(" {}", meta.interpolate(&Profile::Default, &path)),
                _ => String::new(),
            };
            format!(" (from {}{place})", meta.name)
        }
        None => String::new(),
    };
    format!("key `{key}`{value}{source}: {}", err.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn installations_get_local_cache_directories_of_their_own() {
        let dir = |url: &str| {
            Config::load_from(None, env(&[("KILN_DATABASE__URL", url)]))
                .unwrap()
                .local_cache_dir()
        };
        let a = dir("postgres://db-a/kiln");
        assert_eq!(a, dir("postgres://db-a/kiln"));
        assert_ne!(a, dir("postgres://db-b/kiln"));
        assert!(a.to_string_lossy().contains("kiln-cache-"));
    }

    #[test]
    fn defaults_parse_and_validate() {
        let config = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert!(!config.database.is_configured());
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let config = Config::load_from(
            None,
            env(&[("KILN_DATABASE__URL", "postgres://kiln:hunter2@db/kiln")]),
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
