//! Where PromQL queries load and evaluate: a share of the places per scope, and a budget of
//! query time at the request threads' priority.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::response::ApiError;

/// Places for PromQL queries to load and evaluate in: `all` at once, of which one tenant's (or
/// the operator's) queries hold at most half, so that a tenant's query storm leaves room for
/// the others'. More wait for a place.
///
/// Each scope also has a budget of query time at the request threads' priority
/// ([`FOREGROUND_SHARE`] of a core, a second of it at once): a dashboard's queries stay within
/// it and are answered at once; a scope over it has its queries loaded and evaluated on the
/// background runtime ([`collector::background`]), where they take the CPU that calls leave.
pub(crate) struct Places {
    all: std::sync::Arc<tokio::sync::Semaphore>,
    per_scope: usize,
    scopes: std::sync::Mutex<HashMap<Option<String>, Scope>>,
}

/// The share of a core each scope's queries may use at the request threads' priority.
const FOREGROUND_SHARE: f64 = 0.1;
/// Seconds of query time a scope may spend at once before its budget holds it back.
const FOREGROUND_BURST: f64 = 1.0;

struct Scope {
    share: std::sync::Arc<tokio::sync::Semaphore>,
    /// Seconds of query time left in the foreground budget (below zero: in debt), as of `at`.
    budget: f64,
    at: Instant,
}

/// A query's place: its scope's share and one of all, held until it is dropped.
pub(crate) struct Place {
    _share: tokio::sync::OwnedSemaphorePermit,
    _place: tokio::sync::OwnedSemaphorePermit,
    /// Within its scope's foreground budget.
    pub(crate) foreground: bool,
}

impl Places {
    /// One place per core: what a dashboard's query APIs share.
    pub(crate) fn per_core() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::new(std::thread::available_parallelism().map_or(2, usize::from)))
    }

    /// `all` places (at least two).
    pub(crate) fn new(all: usize) -> Self {
        let all = all.max(2);
        Self {
            all: std::sync::Arc::new(tokio::sync::Semaphore::new(all)),
            per_scope: all / 2,
            scopes: Default::default(),
        }
    }

    /// Runs `f` on `scope`'s state, its budget refilled to now.
    fn scope<T>(&self, scope: Option<&str>, f: impl FnOnce(&mut Scope) -> T) -> T {
        let mut scopes = self.scopes.lock().unwrap();
        let state = scopes.entry(scope.map(str::to_string)).or_insert_with(|| Scope {
            share: std::sync::Arc::new(tokio::sync::Semaphore::new(self.per_scope)),
            budget: FOREGROUND_BURST,
            at: Instant::now(),
        });
        let now = Instant::now();
        state.budget = (state.budget + (now - state.at).as_secs_f64() * FOREGROUND_SHARE).min(FOREGROUND_BURST);
        state.at = now;
        f(state)
    }

    /// Waits for a place for a query of `scope`, until `deadline`.
    pub(crate) async fn take(&self, scope: Option<&str>, deadline: Instant) -> Result<Place, ApiError> {
        let share = self.scope(scope, |state| state.share.clone());
        let queued = async {
            let _share = share.acquire_owned().await.expect("the semaphore is never closed");
            let _place = self.all.clone().acquire_owned().await.expect("the semaphore is never closed");
            let foreground = self.scope(scope, |state| state.budget > 0.0);
            Place { _share, _place, foreground }
        };
        tokio::time::timeout_at(deadline.into(), queued)
            .await
            .map_err(|_| ApiError::timeout("query timed out in query queue"))
    }

    /// Counts `spent` seconds of a query against its scope's foreground budget.
    pub(crate) fn spend(&self, scope: Option<&str>, spent: Duration) {
        self.scope(scope, |state| state.budget -= spent.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant whose queries hold its share of places does not keep another's waiting, and
    /// one whose queries took much time runs the next ones in the background.
    #[tokio::test]
    async fn one_scope_holds_at_most_half_the_places() {
        let places = Places::new(4);
        let soon = || Instant::now() + Duration::from_millis(50);
        let held =
            [places.take(Some("storm"), soon()).await.unwrap(), places.take(Some("storm"), soon()).await.unwrap()];
        let error = places.take(Some("storm"), soon()).await.err().expect("storm's share is taken");
        assert_eq!(error.message, "query timed out in query queue");
        let calm = [places.take(Some("calm"), soon()).await.unwrap(), places.take(None, soon()).await.unwrap()];
        assert!(places.take(Some("other"), soon()).await.is_err(), "all four places are taken");
        drop(held);
        assert!(places.take(Some("storm"), soon()).await.unwrap().foreground);
        drop(calm);
        // Past its budget of query time, a scope's queries go to the background; others' do not.
        places.spend(Some("storm"), Duration::from_secs(2));
        assert!(!places.take(Some("storm"), soon()).await.unwrap().foreground);
        assert!(places.take(Some("calm"), soon()).await.unwrap().foreground);
    }
}
