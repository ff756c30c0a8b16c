//! The `sim` provider: machines that exist only in memory and boot at once. For scale
//! benchmarks of the scheduler, never for builds (its endpoints serve nothing).

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::future::BoxFuture;

use super::provider::{ComputeProvider, Instance, LaunchSpec, Launched};
use crate::error::Result;

#[derive(Default)]
pub struct SimProvider {
    machines: Mutex<HashMap<String, Launched>>,
}

impl ComputeProvider for SimProvider {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched>> {
        Box::pin(async move {
            let mut machines = self.machines.lock().unwrap_or_else(|e| e.into_inner());
            let n = machines.len();
            Ok(machines
                .entry(spec.machine_id.clone())
                .or_insert_with(|| Launched {
                    provider_ref: format!("sim:{}", spec.machine_id),
                    endpoint: format!("tcp://10.0.{}.{}:443", (n / 250) % 250, n % 250 + 1),
                })
                .clone())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>>> {
        Box::pin(async move {
            let machines = self.machines.lock().unwrap_or_else(|e| e.into_inner());
            Ok(machines
                .keys()
                .map(|id| Instance {
                    machine_id: id.clone(),
                    running: true,
                })
                .collect())
        })
    }

    fn owns(&self, provider_ref: &str) -> bool {
        provider_ref.starts_with("sim:")
    }

    fn wait_ready<'a>(
        &'a self,
        _machine_id: &'a str,
        _launched: &'a Launched,
        _deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn is_alive(&self, machine_id: &str) -> BoxFuture<'_, Result<bool>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            Ok(self
                .machines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&machine_id))
        })
    }

    fn terminate(&self, machine_id: &str) -> BoxFuture<'_, Result<()>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            self.machines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&machine_id);
            Ok(())
        })
    }
}
