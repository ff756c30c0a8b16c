//! The Connect services the depot CLI calls, mapped onto the domain.

pub mod build;
pub mod login;
pub mod projects;

use super::ConnectRouter;

/// Every Connect method Kiln serves.
pub fn router() -> ConnectRouter {
    let mut router = ConnectRouter::new();
    projects::register(&mut router);
    login::register(&mut router);
    build::register(&mut router);
    router
}
