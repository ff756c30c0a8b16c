//! User-visible ids: short, random, URL-safe.

use rand::Rng;
use rand::distr::Alphanumeric;

const ID_LEN: usize = 12;

/// A 12-character lowercase alphanumeric id (about 62 bits). Lowercase keeps ids usable
/// in hostnames and image references, where Depot-style project ids appear.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// `len` random characters from [A-Za-z0-9], for secrets.
pub fn random_alphanumeric(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Rejects ids that could not have been issued, before they reach a query.
pub fn is_well_formed(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_url_safe_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), ID_LEN);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(a, b);
        assert!(is_well_formed(&a));
        assert!(!is_well_formed("a/b"));
        assert!(!is_well_formed(""));
    }
}
