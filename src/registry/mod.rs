//! The model registry: AI models served as OCI images (like depot.ai), so a Dockerfile
//! embeds one with a single `COPY --from`.
//!
//! So far: `image`, which turns a model directory into a reproducible OCI image (an index
//! over linux/amd64 and linux/arm64, one layer per large file) written as an OCI image
//! layout; `reference`, the spec's grammar for names, tags, digests and `/v2/` paths;
//! `range`, how a blob request's `Range` header is answered; and `errors`, the `/v2/`
//! API's errors in the spec's format.
//! Storage through `object_store`, the `/v2/` read API, imports from a hub and the
//! metadata in Postgres come next (issue 13).

pub mod errors;
pub mod hub;
pub mod image;
pub mod models;
pub mod range;
pub mod reference;
pub mod store;

pub use models::Models;
