//! Where builder machines come from. Providers are idempotent by machine id: launching an
//! id twice yields the same machine.

use futures_util::future::BoxFuture;

use crate::db::builds::Platform;
use crate::error::Result;
use crate::pki::Issued;

/// What a provider needs to start one builder.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub machine_id: String,
    pub platform: Platform,
    pub server_name: String,
    /// BuildKit's server certificate and the CA that client certificates chain to, for
    /// providers that start BuildKit themselves. Agents get theirs in their directive.
    pub server_cert: Issued,
    pub ca_pem: String,
    /// Set when the provider runs `kiln agent` on the machine (`uses_agent`).
    pub agent: Option<AgentBootstrap>,
}

/// What `kiln agent` needs to find and join Kiln. The token is a secret: it goes into
/// user data or the agent's environment, never into logs or tags.
#[derive(Clone)]
pub struct AgentBootstrap {
    pub api_url: String,
    pub registration_token: String,
    /// PEM CA bundle for `api_url`, when it is not publicly trusted.
    pub api_ca_pem: Option<String>,
}

impl std::fmt::Debug for AgentBootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBootstrap")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    /// The provider's handle (instance id, process id).
    pub provider_ref: String,
    /// Where BuildKit listens, as `tcp://host:port` (the CLI requires the scheme).
    pub endpoint: String,
}

/// An instance as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub machine_id: String,
    pub running: bool,
}

pub trait ComputeProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Whether machines run `kiln agent`, which registers and reports when BuildKit
    /// serves. Otherwise `wait_ready` decides.
    fn uses_agent(&self) -> bool {
        false
    }

    /// Every instance this provider manages (for EC2: found by Kiln's ownership tags).
    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>>>;

    /// Whether a machine row with this `provider_ref` is within this provider's view
    /// (the local provider sees only the processes of its own kiln).
    fn owns(&self, provider_ref: &str) -> bool;

    /// Starts the machine, or returns the one already started for this id.
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched>>;

    /// Waits until the launched machine serves BuildKit, or fails at `deadline`. Not
    /// called for agent-managed machines.
    fn wait_ready<'a>(
        &'a self,
        machine_id: &'a str,
        launched: &'a Launched,
        deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<()>>;

    /// Whether the machine is still running.
    fn is_alive(&self, machine_id: &str) -> BoxFuture<'_, Result<bool>>;

    /// Stops and removes the machine; succeeds if it is already gone.
    fn terminate(&self, machine_id: &str) -> BoxFuture<'_, Result<()>>;

    /// Stops the machine but keeps it (its disk) for a later `start`. Providers without
    /// stopped machines say so.
    fn stop(&self, machine_id: &str) -> BoxFuture<'_, Result<()>> {
        let _ = machine_id;
        Box::pin(async move {
            Err(crate::error::Error::Unimplemented(format!(
                "the {} provider cannot stop machines; terminate them instead",
                self.name()
            )))
        })
    }

    /// Starts a stopped machine.
    fn start(&self, machine_id: &str) -> BoxFuture<'_, Result<()>> {
        let _ = machine_id;
        Box::pin(async move {
            Err(crate::error::Error::Unimplemented(format!(
                "the {} provider cannot start stopped machines",
                self.name()
            )))
        })
    }
}
