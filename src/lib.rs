//! Kiln: a self-hostable, Depot-compatible build-acceleration backend.
//! See docs/ARCHITECTURE.md for the map of this crate.

pub mod admin;
pub mod agent;
pub mod api;
pub mod app;
pub mod auth;
pub mod builds;
pub mod cache;
pub mod cli;
pub mod config;
pub mod db;
pub mod dev;
pub mod error;
pub mod jobs;
pub mod oidc;
pub mod orgs;
pub mod outbound;
pub mod pages;
pub mod pki;
pub mod projects;
pub mod proto;
pub mod registry;
pub mod scheduler;
pub mod telemetry;
pub mod tokens;
pub mod usage;
