//! Sealing secrets at rest with the key-encryption key (AES-256-GCM). The purpose string
//! is bound as associated data, so a sealed value cannot be replayed for another use.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use crate::error::{Error, Result};

const NONCE_LEN: usize = 12;

pub fn seal(kek: &[u8; 32], purpose: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
    let cipher = Aes256Gcm::new(kek.into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: purpose.as_bytes(),
            },
        )
        .map_err(|_| Error::internal(anyhow::anyhow!("sealing failed")))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

pub fn open(kek: &[u8; 32], purpose: &str, sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(Error::internal(anyhow::anyhow!(
            "sealed value is truncated"
        )));
    }
    let (nonce, data) = sealed.split_at(NONCE_LEN);
    Aes256Gcm::new(kek.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: data, aad: purpose.as_bytes() })
        .map_err(|_| {
            Error::internal(anyhow::anyhow!(
                "cannot decrypt a stored key: secrets.key_encryption_key differs from the one it was sealed with"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_binds_key_and_purpose() {
        let kek = [7u8; 32];
        let sealed = seal(&kek, "ca", b"secret key").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"secret key"));
        assert_eq!(open(&kek, "ca", &sealed).unwrap(), b"secret key");
        assert!(open(&[8u8; 32], "ca", &sealed).is_err());
        assert!(open(&kek, "other", &sealed).is_err());
        assert!(open(&kek, "ca", &sealed[..5]).is_err());
    }
}
