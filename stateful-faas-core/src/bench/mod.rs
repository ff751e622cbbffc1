//! `sfaas bench ...`: the benchmarks whose figures go to BENCHMARKS.md. Each starts what it
//! measures on loopback in this process (and, for comparisons, the real alternative beside it).

pub mod flow;
pub mod gateway;
pub mod state;

use std::time::Duration;

use crate::config::CoreConfig;
use crate::gateway::{Core, RunningCore};
use crate::tenant::{TenantCredentials, TenantId};

pub use gateway::gateway;

/// A core in a fresh temporary data directory, with one tenant `bench`.
pub(crate) struct BenchCore {
    pub running: RunningCore,
    pub credentials: TenantCredentials,
    pub tenant: TenantId,
    pub url: String,
    pub(crate) data_dir: std::path::PathBuf,
}

impl BenchCore {
    pub async fn start(configure: impl FnOnce(&mut CoreConfig)) -> anyhow::Result<Self> {
        let data_dir = std::env::temp_dir().join(format!("sfaas-bench-{}", uuid::Uuid::new_v4()));
        let mut config = CoreConfig::new(&data_dir);
        config.gateway_addr = "127.0.0.1:0".parse()?;
        config.state_redis_addr = Some("127.0.0.1:0".parse()?);
        config.admin_token = Some("bench-admin".into());
        configure(&mut config);
        let running = Core::open(config).await?.start().await?;
        let credentials = running.core.invoker.tenants.create("bench", None).await?;
        let url = format!("http://{}", running.gateway_addr);
        Ok(Self { running, credentials, tenant: TenantId::new("bench")?, url, data_dir })
    }

    pub async fn deploy(&self, deployment: serde_json::Value) -> anyhow::Result<()> {
        self.running.core.invoker.functions.deploy(&self.tenant, serde_json::from_value(deployment)?, false).await?;
        Ok(())
    }

    pub async fn stop(self) {
        self.running.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_dir_all(self.data_dir.with_extension("functions"));
    }
}

/// p50 and p99 of sorted latencies.
pub(crate) fn percentiles(latencies: &mut [Duration]) -> (Duration, Duration) {
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    (at(0.50), at(0.99))
}

pub(crate) fn ms(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1e3)
}

pub(crate) fn us(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}
