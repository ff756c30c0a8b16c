//! Configuration precedence and validation.
use std::io::Write;

use kiln::config::{Config, LogFormat};
use secrecy::ExposeSecret;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

#[test]
fn file_overrides_defaults_and_env_overrides_both() {
    let f = file(
        "[server]\nlisten = \"0.0.0.0:9000\"\nmax_body_bytes = 2048\n[log]\nformat = \"json\"\n",
    );
    let from_file = Config::load_from(Some(f.path()), env(&[])).unwrap();
    assert_eq!(from_file.server.listen.to_string(), "0.0.0.0:9000");
    assert_eq!(from_file.server.max_body_bytes, 2048);
    assert_eq!(from_file.log.format, LogFormat::Json);
    // Untouched keys keep their defaults.
    assert_eq!(from_file.database.max_connections, 32);

    let both = Config::load_from(
        Some(f.path()),
        env(&[
            ("KILN_SERVER__LISTEN", "127.0.0.1:9100"),
            ("KILN_DATABASE__URL", "postgres://u:p@db:5432/kiln"),
            ("KILN_JOBS__WORKERS", "7"),
            ("UNRELATED", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(
        both.server.listen.to_string(),
        "127.0.0.1:9100",
        "env beats file"
    );
    assert_eq!(both.server.max_body_bytes, 2048, "file beats default");
    assert_eq!(both.jobs.workers, 7);
    assert_eq!(
        both.database.url.expose_secret(),
        "postgres://u:p@db:5432/kiln"
    );
}

#[test]
fn errors_name_the_key_and_value() {
    let err = Config::load_from(None, env(&[("KILN_SERVER__LISTEN", "not-an-address")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.listen")
            && err.contains("not-an-address")
            && err.contains("KILN_SERVER__LISTEN"),
        "{err}"
    );

    let err = Config::load_from(None, env(&[("KILN_JOBS__WORKERS", "0")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("jobs.workers = 0"), "{err}");

    let f = file("[server]\nlisen = \"0.0.0.0:1\"\n");
    let err = Config::load_from(Some(f.path()), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lisen"), "typos are rejected: {err}");

    let f = file("[server\nlisten = ");
    let err = Config::load_from(Some(f.path()), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid configuration"), "{err}");

    let err = Config::load_from(
        Some(std::path::Path::new("/nonexistent/kiln.toml")),
        env(&[]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/kiln.toml"), "{err}");
}

#[test]
fn secret_values_are_never_echoed() {
    let err = Config::load_from(
        None,
        env(&[("KILN_DATABASE__URL", "mysql://root:hunter2@db/x")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("database.url") && !err.contains("hunter2"),
        "{err}"
    );
    let err = Config::load_from(
        None,
        env(&[("KILN_SECRETS__KEY_ENCRYPTION_KEY", "c2hvcnQ=")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("secrets.key_encryption_key")
            && err.contains("expected 32")
            && !err.contains("c2hvcnQ="),
        "{err}"
    );
    let ok = Config::load_from(
        None,
        env(&[
            (
                "KILN_SECRETS__KEY_ENCRYPTION_KEY",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            ),
            ("KILN_DATABASE__URL", "postgres://kiln:hunter2@db/kiln"),
        ]),
    )
    .unwrap();
    assert_eq!(ok.secrets.key_encryption_key().unwrap()[31], 31);
    let debug = format!("{ok:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("AAECAwQF"),
        "{debug}"
    );
}

#[test]
fn tls_needs_both_files() {
    let err = Config::load_from(None, env(&[("KILN_SERVER__TLS__CERT_PATH", "/etc/hosts")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.tls") && err.contains("both"), "{err}");
}

#[test]
fn the_documented_defaults_file_is_the_one_compiled_in() {
    let on_disk =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .unwrap();
    assert_eq!(on_disk, kiln::config::DEFAULT_TOML);
}

#[test]
fn builder_durations_are_range_checked_not_cast() {
    // Values that would overflow an i32 cast or a doubling are refused at start, each
    // naming its key, instead of wrapping into nonsense deadlines.
    for (key, value, name) in [
        (
            "KILN_BUILDERS__MAX_LIFETIME_HOURS",
            "3000000000",
            "builders.max_lifetime_hours",
        ),
        (
            "KILN_BUILDERS__BOOT_TIMEOUT_SECONDS",
            "18446744073709551615",
            "builders.boot_timeout_seconds",
        ),
        (
            "KILN_BUILDERS__SERVER_CERT_HOURS",
            "0",
            "builders.server_cert_hours",
        ),
        (
            "KILN_BUILDERS__LAUNCH_MAX_ATTEMPTS",
            "0",
            "builders.launch_max_attempts",
        ),
        (
            "KILN_SERVER__REQUEST_TIMEOUT_SECONDS",
            "0",
            "server.request_timeout_seconds",
        ),
        (
            "KILN_JOBS__LEASE_SECONDS",
            "999999999",
            "jobs.lease_seconds",
        ),
        (
            "KILN_LIMITS__CLIENT_IP_HEADER",
            "not a header",
            "limits.client_ip_header",
        ),
        // A proxy header believed from anyone lets every client pick its address.
        (
            "KILN_LIMITS__CLIENT_IP_HEADER",
            "x-forwarded-for",
            "limits.trusted_proxies",
        ),
        (
            "KILN_LIMITS__TRUSTED_PROXIES",
            "[\"10.0.0.300/8\"]",
            "limits.trusted_proxies",
        ),
    ] {
        let err = Config::load_from(None, env(&[(key, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{key}={value}: {err}");
    }
    let err = Config::load_from(
        None,
        env(&[
            ("KILN_BUILDERS__SERVER_CERT_HOURS", "24"),
            ("KILN_BUILDERS__MAX_LIFETIME_HOURS", "48"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("outlive"), "{err}");
}
