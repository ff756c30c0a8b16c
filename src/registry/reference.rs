//! Names, tags, digests and request paths of the OCI distribution spec, checked against
//! its grammar, and model names made from hub ids the way depot.ai makes them (lower
//! case).

use std::fmt;

/// Why a name, tag, digest or path was refused; the registry answers with the spec's
/// matching error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "{0:?} is not a valid repository name: lower-case letters and digits, separated by '.', '_', '__', '-' or '/'"
    )]
    Name(String),
    #[error(
        "{0:?} is not a valid tag: up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'"
    )]
    Tag(String),
    #[error("{0:?} is not a valid digest: expected sha256:<64 lower-case hex digits>")]
    Digest(String),
    #[error("{0:?} is not a registry path")]
    Path(String),
}

/// Longest repository name accepted (clients cap `host[:port]/name` at 255).
pub const MAX_NAME_LEN: usize = 200;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn parse(text: &str) -> Result<Name, ReferenceError> {
        let refused = || ReferenceError::Name(text.to_string());
        if text.is_empty() || text.len() > MAX_NAME_LEN {
            return Err(refused());
        }
        for component in text.split('/') {
            if !valid_component(component) {
                return Err(refused());
            }
        }
        Ok(Name(text.to_string()))
    }

    /// The name a hub repository id is published under: the id in lower case, which must
    /// then fit the grammar (`Sentence-Transformers/all-MiniLM-L6-v2` →
    /// `sentence-transformers/all-minilm-l6-v2`).
    pub fn from_hub_id(id: &str) -> Result<Name, ReferenceError> {
        Name::parse(&id.to_ascii_lowercase()).map_err(|_| ReferenceError::Name(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn alphanumeric(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alphanumeric(*first) || !alphanumeric(*last) {
        return false;
    }
    // Separators between alphanumeric runs: one '.', one or two '_', or any run of '-'.
    let mut i = 0;
    while i < bytes.len() {
        if alphanumeric(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alphanumeric(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(text: &str) -> Result<Tag, ReferenceError> {
        let bytes = text.as_bytes();
        let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
        let ok = !bytes.is_empty()
            && bytes.len() <= 128
            && word(&bytes[0])
            && bytes[1..]
                .iter()
                .all(|b| word(b) || *b == b'.' || *b == b'-');
        if ok {
            Ok(Tag(text.to_string()))
        } else {
            Err(ReferenceError::Tag(text.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sha256 digest (the only algorithm Kiln stores): `sha256:` and 64 lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(text: &str) -> Result<Digest, ReferenceError> {
        let refused = || ReferenceError::Digest(text.to_string());
        let hex = text.strip_prefix("sha256:").ok_or_else(refused)?;
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Digest(text.to_string()))
        } else {
            Err(refused())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A digest when it has an algorithm prefix, a tag otherwise.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        if text.contains(':') {
            Digest::parse(text).map(Reference::Digest)
        } else {
            Tag::parse(text).map(Reference::Tag)
        }
    }
}

/// What a path under `/v2/` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest(Name, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(Name, Digest),
    /// `/v2/<name>/tags/list`
    Tags(Name),
    /// `/v2/_catalog`
    Catalog,
}

/// Parses the part of a path after `/v2/`. Names hold `/`, so the path is split at the
/// last `/manifests/`, `/blobs/` or `/tags/list`.
pub fn route(rest: &str) -> Result<Route, ReferenceError> {
    let refused = || ReferenceError::Path(format!("/v2/{rest}"));
    if rest.is_empty() {
        return Ok(Route::Base);
    }
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags(Name::parse(name)?));
    }
    let manifests = rest.rfind("/manifests/");
    let blobs = rest.rfind("/blobs/");
    match (manifests, blobs) {
        (Some(m), b) if b.is_none_or(|b| m > b) => {
            let name = Name::parse(&rest[..m])?;
            let reference = Reference::parse(&rest[m + "/manifests/".len()..])?;
            Ok(Route::Manifest(name, reference))
        }
        (_, Some(b)) => {
            let name = Name::parse(&rest[..b])?;
            let digest = Digest::parse(&rest[b + "/blobs/".len()..])?;
            Ok(Route::Blob(name, digest))
        }
        _ => Err(refused()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

    #[test]
    fn names_follow_the_spec_grammar() {
        for ok in [
            "bert-base-uncased",
            "runwayml/stable-diffusion-v1-5",
            "a",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "org/sub/model9",
        ] {
            assert!(Name::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Upper",
            "-lead",
            "trail-",
            "a..b",
            "a___b",
            "a/",
            "/a",
            "a//b",
            "a_-b",
            "../etc",
            "a b",
            "é",
            &"a".repeat(201),
        ] {
            assert!(Name::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hub_ids_are_lower_cased_and_still_checked() {
        assert_eq!(
            Name::from_hub_id("sentence-transformers/all-MiniLM-L6-v2")
                .unwrap()
                .as_str(),
            "sentence-transformers/all-minilm-l6-v2"
        );
        let err = Name::from_hub_id("org/-Leading").unwrap_err();
        assert!(err.to_string().contains("-Leading"), "{err}");
    }

    #[test]
    fn tags_digests_and_references() {
        assert!(Tag::parse("latest").is_ok());
        assert!(Tag::parse("c9ab35ff5f2c362e9e22fbafe278077e196057f0").is_ok());
        assert!(Tag::parse("v1.0_rc-2").is_ok());
        assert!(Tag::parse(&"a".repeat(128)).is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Digest::parse(SHA).unwrap().hex().len(), 64);
        for bad in [
            "sha256:",
            "sha256:ABCDEF",
            &SHA.to_uppercase(),
            &format!("{SHA}0"),
            "sha512:00",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(Reference::parse(SHA), Ok(Reference::Digest(_))));
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert!(Reference::parse("sha256:nothex").is_err());
    }

    #[test]
    fn paths_split_at_the_last_keyword() {
        assert_eq!(route(""), Ok(Route::Base));
        assert_eq!(route("_catalog"), Ok(Route::Catalog));
        assert_eq!(
            route("runwayml/stable-diffusion-v1-5/manifests/latest"),
            Ok(Route::Manifest(
                Name::parse("runwayml/stable-diffusion-v1-5").unwrap(),
                Reference::Tag(Tag::parse("latest").unwrap())
            ))
        );
        // A repository may itself be called "blobs" or "manifests".
        assert_eq!(
            route(&format!("org/blobs/blobs/{SHA}")),
            Ok(Route::Blob(
                Name::parse("org/blobs").unwrap(),
                Digest::parse(SHA).unwrap()
            ))
        );
        assert_eq!(
            route("org/manifests/manifests/v1"),
            Ok(Route::Manifest(
                Name::parse("org/manifests").unwrap(),
                Reference::Tag(Tag::parse("v1").unwrap())
            ))
        );
        assert_eq!(
            route("a/b/tags/list"),
            Ok(Route::Tags(Name::parse("a/b").unwrap()))
        );
        assert!(matches!(route("a/b"), Err(ReferenceError::Path(_))));
        assert!(matches!(
            route("../../etc/manifests/latest"),
            Err(ReferenceError::Name(_))
        ));
        assert!(matches!(
            route("a/blobs/sha256:zz"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            route("a/manifests/.bad"),
            Err(ReferenceError::Tag(_))
        ));
    }
}
