//! Share links: a build made readable without signing in, at
//! `/shared/builds/<build>/<token>`. The token is an HMAC of the build id and its share
//! generation, so nothing secret is stored, sharing twice gives the same link, and
//! stopping bumps the generation so an earlier link never works again.

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use super::{BUILD_CHANNEL, BuildDetails, Builds};
use crate::auth::Principal;
use crate::auth::authz::Action;
use crate::db::builds::{self, Build};
use crate::db::{audit, notify};
use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// The share-link key, derived from the key-encryption key (never the key itself).
pub fn derive_key(kek: &[u8; 32]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(kek).expect("HMAC takes any key length");
    mac.update(b"kiln build share links v1");
    mac.finalize().into_bytes().into()
}

fn link_mac(key: &[u8; 32], build_id: &str, generation: i32) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{build_id}:{generation}").as_bytes());
    mac
}

fn link_token(key: &[u8; 32], build_id: &str, generation: i32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(link_mac(key, build_id, generation).finalize().into_bytes())
}

/// Whether `token` is the link token of this build and generation (constant time).
fn verify_link(key: &[u8; 32], build_id: &str, generation: i32, token: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .is_ok_and(|raw| {
            link_mac(key, build_id, generation)
                .verify_slice(&raw)
                .is_ok()
        })
}

/// The path of a build's share link, below the server's public URL.
pub fn share_path(build_id: &str, token: &str) -> String {
    format!("/shared/builds/{build_id}/{token}")
}

impl Builds {
    fn share_key(&self) -> Result<&[u8; 32]> {
        self.share_key.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(
                "sharing builds needs a key-encryption key; ask the operator to set \
                 secrets.key_encryption_key"
                    .into(),
            )
        })
    }

    /// Shares a build: returns its share-link path. Sharing a shared build again gives
    /// the same link.
    pub async fn share(&self, principal: &Principal, build_id: &str) -> Result<String> {
        let build = self.set_shared(principal, build_id, true).await?;
        let key = self.share_key()?;
        Ok(share_path(
            &build.id,
            &link_token(key, &build.id, build.share_generation),
        ))
    }

    /// Stops sharing a build: its share link stops working at once, on every replica.
    pub async fn stop_sharing(&self, principal: &Principal, build_id: &str) -> Result<()> {
        self.set_shared(principal, build_id, false)
            .await
            .map(|_| ())
    }

    async fn set_shared(
        &self,
        principal: &Principal,
        build_id: &str,
        shared: bool,
    ) -> Result<Build> {
        let build = self
            .authorize(principal, build_id, Action::ShareBuild)
            .await?;
        self.share_key()?;
        let mut tx = self.pool.begin().await?;
        let updated = builds::set_shared(&mut *tx, &build.id, shared)
            .await?
            .ok_or_else(|| Error::not_found("build", build_id))?;
        audit::record(
            &mut *tx,
            principal
                .audit(if shared {
                    "build.share"
                } else {
                    "build.stop_sharing"
                })
                .org(&build.organization_id)
                .target("build", &build.id)
                .details(json!({ "project_id": build.project_id })),
        )
        .await?;
        notify::send(&mut *tx, BUILD_CHANNEL, &build.id).await?;
        tx.commit().await?;
        self.forget(&build.id);
        Ok(updated)
    }

    /// A shared build, read through its share link without signing in. A wrong token,
    /// an unshared build and an unknown build are the same `not_found`.
    pub async fn shared(&self, build_id: &str, token: &str) -> Result<BuildDetails> {
        let not_found = || Error::NotFound("this share link does not exist or was revoked".into());
        let key = self.share_key.as_ref().ok_or_else(not_found)?;
        if !crate::db::ids::is_well_formed(build_id) || token.len() > 64 {
            return Err(not_found());
        }
        let build = builds::get(&self.pool, build_id)
            .await?
            .filter(|b| b.shared)
            .ok_or_else(not_found)?;
        if !verify_link(key, &build.id, build.share_generation, token) {
            return Err(not_found());
        }
        let platforms = builds::platforms(&self.pool, &build.id).await?;
        let steps = builds::steps(&self.pool, &build.id).await?;
        Ok(BuildDetails {
            build,
            platforms,
            steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_depend_on_build_generation_and_key() {
        let key = derive_key(&[7; 32]);
        let a = link_token(&key, "b1", 0);
        assert_eq!(a, link_token(&key, "b1", 0));
        assert_ne!(a, link_token(&key, "b1", 1));
        assert_ne!(a, link_token(&key, "b2", 0));
        assert_ne!(a, link_token(&derive_key(&[8; 32]), "b1", 0));
        assert_ne!(derive_key(&[7; 32]), [7; 32]);
        assert!(verify_link(&key, "b1", 0, &a));
        assert!(!verify_link(&key, "b1", 1, &a));
        assert!(!verify_link(&key, "b1", 0, "not base64!"));
    }
}
