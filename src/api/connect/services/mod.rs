//! The Connect services the depot CLI and the public API's clients call, mapped onto
//! the domain.

pub mod build;
pub mod build_api;
pub mod buildkit;
pub mod core_builds;
pub mod login;
pub mod projects;
pub mod usage;

use super::ConnectRouter;

/// Every Connect method Kiln serves.
pub fn router() -> ConnectRouter {
    let mut router = ConnectRouter::new();
    projects::register(&mut router);
    login::register(&mut router);
    build::register(&mut router);
    build_api::register(&mut router);
    buildkit::register(&mut router);
    core_builds::register(&mut router);
    usage::register(&mut router);
    router
}
