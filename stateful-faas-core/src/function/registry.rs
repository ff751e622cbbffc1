//! The deployed functions of every tenant: persisted in the database, live in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::builtin::{self, Builtins};
use super::deployment::{DeploymentError, FunctionDeployment, FunctionSpec, Target};
use super::http::{InstanceMeter, InstanceUsage, ManagedPool};
use super::sandbox::Sandbox;
use super::{FunctionError, Invocation, Outcome, RunContext, exec, http};
use crate::database::now_ms;
use crate::tenant::TenantId;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("function {name} not found in namespace {tenant}")]
    NotFound { tenant: String, name: String },
    #[error("function {name} already exists in namespace {tenant}; update it with PUT")]
    Exists { tenant: String, name: String },
    #[error(transparent)]
    Invalid(#[from] DeploymentError),
    #[error("cannot scale function {0}: {1}")]
    Scale(String, FunctionError),
    #[error(
        "namespace {tenant} has {quota} functions, its quota (its plan's `functions`, by default --tenant-max-functions); remove one first"
    )]
    Quota { tenant: String, quota: usize },
    #[error("function store: {0}")]
    Database(#[from] sqlx::Error),
}

/// A function as it runs now.
pub struct DeployedFunction {
    pub tenant: TenantId,
    pub deployment: FunctionDeployment,
    pub spec: FunctionSpec,
    pub created_ms: i64,
    inflight: Arc<Semaphore>,
    managed: Option<Arc<ManagedPool>>,
    invocations: AtomicU64,
    /// Where its processes run (`None`: the sandbox is off).
    sandbox: Option<Arc<Sandbox>>,
    /// Its tenant's builtin threads (shared by the tenant's functions).
    builtin_threads: Arc<Semaphore>,
}

/// What a function shares with the other functions of its tenant.
struct TenantShares {
    /// Threads its builtins run on.
    builtin_threads: Arc<Semaphore>,
    /// Managed instances it may have running.
    instances: Arc<Semaphore>,
}

impl DeployedFunction {
    fn new(
        tenant: TenantId,
        deployment: FunctionDeployment,
        spec: FunctionSpec,
        created_ms: i64,
        sandbox: Option<Arc<Sandbox>>,
        shares: TenantShares,
        meter: &InstanceMeter,
    ) -> Self {
        let managed = match &spec.target {
            Target::Managed { command } => {
                Some(ManagedPool::new(&spec, command, &tenant, sandbox.clone(), shares.instances, meter.clone()))
            }
            _ => None,
        };
        Self {
            inflight: Arc::new(Semaphore::new(spec.limits.max_inflight)),
            tenant,
            deployment,
            spec,
            created_ms,
            managed,
            invocations: AtomicU64::new(0),
            sandbox,
            builtin_threads: shares.builtin_threads,
        }
    }

    /// A slot for one more invocation, or `None` when `max_inflight` are running (429).
    pub fn try_begin(&self) -> Option<OwnedSemaphorePermit> {
        self.inflight.clone().try_acquire_owned().ok()
    }

    /// Invocations started since the function was deployed (in this process).
    pub fn invocation_count(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    /// Instances able to serve now: running servers of a managed function, else 1.
    pub fn replicas(&self) -> usize {
        self.managed.as_ref().map_or(1, |pool| pool.running())
    }

    /// Runs one invocation with the function's kind-specific runner.
    pub async fn run(&self, context: &RunContext<'_>, invocation: &Invocation) -> Result<Outcome, FunctionError> {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        match &self.spec.target {
            Target::Exec { command } => {
                let env = context.state_env(invocation.job.as_deref());
                let sandbox = self.sandbox.as_deref();
                exec::run(&self.spec, command, invocation, &env, &self.tenant, sandbox, context).await
            }
            Target::Builtin { name } => {
                builtin::run(context.builtins, &self.spec, name, context, invocation, &self.builtin_threads).await
            }
            // An external server is not given a state token: it is not run by the platform.
            Target::Upstream { url } => {
                http::run_upstream(context.outbound, &self.spec, url, invocation, context.buffers).await
            }
            Target::Managed { .. } => {
                let pool = self.managed.as_ref().expect("managed functions have a pool");
                pool.run(context, &self.spec, invocation).await
            }
        }
    }

    fn reap_idle(&self) {
        if let Some(pool) = &self.managed {
            pool.reap_idle(self.spec.limits.idle_timeout);
        }
    }
}

type Key = (TenantId, String);

/// Every tenant's functions.
pub struct Registry {
    pool: sqlx::SqlitePool,
    functions: RwLock<HashMap<Key, Arc<DeployedFunction>>>,
    /// Where the state store listens once the gateway does, handed to process functions.
    pub state_addresses: std::sync::OnceLock<super::StateAddresses>,
    /// Where process functions run, limited and metered (`None`: the sandbox is off).
    sandbox: Option<Arc<Sandbox>>,
    /// Each tenant's builtin threads.
    builtin_threads: PerTenant,
    /// Each tenant's managed instances.
    instances: PerTenant,
    /// Functions and managed instances one tenant may have, where its plan does not say.
    max_functions: usize,
    max_instances: usize,
    quotas: Arc<crate::quota::Quotas>,
    /// Managed instances' usage outside requests, until it is reported.
    instance_usage: InstanceMeter,
    /// The builtins deployments may name.
    builtins: Builtins,
}

/// A number of permits for each tenant (builtin threads, managed instances), which a plan
/// may change.
#[derive(Default)]
struct PerTenant {
    tenants: std::sync::Mutex<HashMap<TenantId, Share>>,
}

struct Share {
    semaphore: Arc<Semaphore>,
    /// Permits the semaphore has, handed out or not.
    total: usize,
}

impl Share {
    /// Brings the semaphore to `permits`. Permits in use stay until they are returned; what
    /// could not be taken away now is taken at the next resize.
    fn resize(&mut self, permits: usize) {
        let permits = permits.min(Semaphore::MAX_PERMITS);
        if permits > self.total {
            self.semaphore.add_permits(permits - self.total);
            self.total = permits;
        } else if permits < self.total {
            self.total -= self.semaphore.forget_permits(self.total - permits);
        }
    }
}

impl PerTenant {
    fn of(&self, tenant: &TenantId, permits: usize) -> Arc<Semaphore> {
        let mut tenants = self.tenants.lock().unwrap();
        let share =
            tenants.entry(tenant.clone()).or_insert_with(|| Share { semaphore: Arc::new(Semaphore::new(0)), total: 0 });
        share.resize(permits);
        share.semaphore.clone()
    }

    fn resize_all(&self, permits: impl Fn(&TenantId) -> usize) {
        for (tenant, share) in self.tenants.lock().unwrap().iter_mut() {
            share.resize(permits(tenant));
        }
    }
}

impl Registry {
    /// Loads the functions deployed before the last stop.
    pub async fn load(
        pool: sqlx::SqlitePool,
        sandbox: Option<Arc<Sandbox>>,
        builtins: Builtins,
        max_functions: usize,
        max_instances: usize,
        quotas: Arc<crate::quota::Quotas>,
    ) -> Result<Self, RegistryError> {
        let rows: Vec<(String, String, String, i64)> =
            sqlx::query_as("SELECT tenant, name, spec, created_ms FROM functions").fetch_all(&pool).await?;
        let registry = Self {
            pool,
            functions: RwLock::default(),
            state_addresses: std::sync::OnceLock::new(),
            sandbox,
            builtin_threads: PerTenant::default(),
            instances: PerTenant::default(),
            max_functions,
            max_instances,
            quotas,
            instance_usage: InstanceMeter::default(),
            builtins,
        };
        let mut functions = HashMap::new();
        for (tenant, name, json, created_ms) in rows {
            let loaded = TenantId::new(&tenant).map_err(|e| e.to_string()).and_then(|tenant| {
                let deployment: FunctionDeployment = serde_json::from_str(&json).map_err(|e| e.to_string())?;
                let spec = registry.resolve(&deployment).map_err(|e| e.to_string())?;
                let shares = registry.shares(&tenant);
                Ok(DeployedFunction::new(
                    tenant,
                    deployment,
                    spec,
                    created_ms,
                    registry.sandbox.clone(),
                    shares,
                    &registry.instance_usage,
                ))
            });
            match loaded {
                Ok(function) => {
                    functions.insert((function.tenant.clone(), name), Arc::new(function));
                }
                Err(error) => {
                    tracing::error!(%tenant, %name, %error, "stored function no longer validates; not loaded")
                }
            }
        }
        *registry.functions.write().unwrap() = functions;
        Ok(registry)
    }

    /// The builtins deployments may name.
    pub fn builtins(&self) -> &Builtins {
        &self.builtins
    }

    /// Validates a deployment into a spec, with the builtins this registry has.
    fn resolve(&self, deployment: &FunctionDeployment) -> Result<FunctionSpec, DeploymentError> {
        let spec = deployment.resolve()?;
        if let Target::Builtin { name } = &spec.target {
            self.builtins
                .check(name, &spec.env)
                .map_err(|message| DeploymentError::Invalid(spec.name.clone(), message))?;
        }
        Ok(spec)
    }

    fn max_functions(&self, tenant: &TenantId) -> usize {
        self.quotas.of(tenant.as_str()).functions.map_or(self.max_functions, crate::quota::count)
    }

    fn max_instances(&self, tenant: &TenantId) -> usize {
        self.quotas.of(tenant.as_str()).instances.map_or(self.max_instances, crate::quota::count)
    }

    /// Applies changed plan limits to the instances tenants may run.
    pub fn resize_instances(&self) {
        self.instances.resize_all(|tenant| self.max_instances(tenant));
    }

    fn shares(&self, tenant: &TenantId) -> TenantShares {
        TenantShares {
            builtin_threads: self.builtin_threads.of(tenant, builtin::THREADS_PER_TENANT),
            instances: self.instances.of(tenant, self.max_instances(tenant)),
        }
    }

    pub fn get(&self, tenant: &TenantId, name: &str) -> Option<Arc<DeployedFunction>> {
        self.functions.read().unwrap().get(&(tenant.clone(), name.to_string())).cloned()
    }

    /// Functions of one tenant, or of all when `tenant` is `None`, sorted by namespace and name.
    pub fn list(&self, tenant: Option<&TenantId>) -> Vec<Arc<DeployedFunction>> {
        let mut list: Vec<_> = self
            .functions
            .read()
            .unwrap()
            .values()
            .filter(|function| tenant.is_none_or(|t| &function.tenant == t))
            .cloned()
            .collect();
        list.sort_by(|a, b| (&a.tenant, &a.spec.name).cmp(&(&b.tenant, &b.spec.name)));
        list
    }

    /// Deploys a new function (`replace = false`) or updates an existing one.
    pub async fn deploy(
        &self,
        tenant: &TenantId,
        mut deployment: FunctionDeployment,
        replace: bool,
    ) -> Result<Arc<DeployedFunction>, RegistryError> {
        deployment.namespace = Some(tenant.to_string());
        let spec = self.resolve(&deployment)?;
        if let Some(dir) = &spec.workdir
            && !dir.is_dir()
        {
            let message = format!("workdir {} is not a directory on the gateway's host", dir.display());
            return Err(DeploymentError::Invalid(spec.name, message).into());
        }
        let name = spec.name.clone();
        let json = serde_json::to_string(&deployment).expect("deployment serializes");
        let now = now_ms();
        let max_functions = self.max_functions(tenant);
        let result = if replace {
            sqlx::query("UPDATE functions SET spec = ?, updated_ms = ? WHERE tenant = ? AND name = ?")
                .bind(&json)
                .bind(now)
                .bind(tenant.as_str())
                .bind(&name)
                .execute(&self.pool)
                .await?
        } else {
            // The quota is checked in the same statement, so concurrent deploys cannot pass it.
            sqlx::query(
                "INSERT INTO functions (tenant, name, spec, created_ms, updated_ms) SELECT ?, ?, ?, ?, ? \
                 WHERE (SELECT COUNT(*) FROM functions WHERE tenant = ?) < ? ON CONFLICT DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(&name)
            .bind(&json)
            .bind(now)
            .bind(now)
            .bind(tenant.as_str())
            .bind(i64::try_from(max_functions).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?
        };
        if result.rows_affected() == 0 {
            let exists = self.get(tenant, &name).is_some();
            let (tenant, name) = (tenant.to_string(), name);
            return Err(match (replace, exists) {
                (true, _) => RegistryError::NotFound { tenant, name },
                (false, true) => RegistryError::Exists { tenant, name },
                (false, false) => RegistryError::Quota { tenant, quota: max_functions },
            });
        }
        let created_ms = self.get(tenant, &name).map_or(now, |old| old.created_ms);
        let function = Arc::new(DeployedFunction::new(
            tenant.clone(),
            deployment,
            spec,
            created_ms,
            self.sandbox.clone(),
            self.shares(tenant),
            &self.instance_usage,
        ));
        // The replaced function's instances stop when its last in-flight call drops it.
        self.functions.write().unwrap().insert((tenant.clone(), name), function.clone());
        if function.spec.limits.min_instances > 0 {
            self.scale(tenant, &function.spec.name, function.spec.limits.min_instances).await?;
        }
        Ok(function)
    }

    /// Removes a function.
    pub async fn remove(&self, tenant: &TenantId, name: &str) -> Result<(), RegistryError> {
        let result = sqlx::query("DELETE FROM functions WHERE tenant = ? AND name = ?")
            .bind(tenant.as_str())
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.functions.write().unwrap().remove(&(tenant.clone(), name.to_string()));
        if result.rows_affected() == 0 {
            return Err(RegistryError::NotFound { tenant: tenant.to_string(), name: name.to_string() });
        }
        Ok(())
    }

    /// Keeps `replicas` instances of a managed http function warm; other kinds always have one.
    pub async fn scale(&self, tenant: &TenantId, name: &str, replicas: usize) -> Result<(), RegistryError> {
        let function = self
            .get(tenant, name)
            .ok_or_else(|| RegistryError::NotFound { tenant: tenant.to_string(), name: name.to_string() })?;
        if let Some(pool) = &function.managed {
            pool.scale(&function.spec, replicas, self.state_addresses.get())
                .await
                .map_err(|e| RegistryError::Scale(name.to_string(), e))?;
        }
        Ok(())
    }

    /// Where process functions run (`None`: the sandbox is off).
    pub fn sandbox(&self) -> Option<&Sandbox> {
        self.sandbox.as_deref()
    }

    /// Managed instances' usage outside requests since the last call.
    pub fn take_instance_usage(&self) -> Vec<InstanceUsage> {
        std::mem::take(&mut *self.instance_usage.lock().unwrap())
    }

    /// Stops every idle managed instance (at shutdown), metering what each used.
    pub fn stop_instances(&self) {
        for function in self.list(None) {
            if let Some(pool) = &function.managed {
                pool.stop();
            }
        }
    }

    /// Stops idle instances past their functions' idle timeouts (scale to zero).
    pub fn reap_idle(&self) {
        for function in self.list(None) {
            function.reap_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan that lowers a tenant's instances while some run takes the rest back as they end.
    #[test]
    fn a_share_follows_its_plan_through_permits_in_use() {
        let shares = PerTenant::default();
        let acme = TenantId::new("acme").unwrap();
        let semaphore = shares.of(&acme, 3);
        let running = [semaphore.clone().try_acquire_owned().unwrap(), semaphore.clone().try_acquire_owned().unwrap()];
        shares.resize_all(|_| 1);
        assert_eq!(semaphore.available_permits(), 0, "one free permit is taken back at once");
        drop(running);
        assert_eq!(semaphore.available_permits(), 2, "returned permits come back until the next resize");
        shares.resize_all(|_| 1);
        assert_eq!(semaphore.available_permits(), 1);
        shares.resize_all(|_| 5);
        assert_eq!(semaphore.available_permits(), 5);
        assert!(Arc::ptr_eq(&semaphore, &shares.of(&acme, 5)), "a tenant keeps its semaphore");
    }
}
