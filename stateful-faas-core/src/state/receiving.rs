//! Room for values being received: bytes of bodies read before they become objects.
//!
//! A value is counted in the store's budget only once it is stored; until then it is a buffer
//! of the gateway's. So the buffers of all values being received share one room, half the
//! store's budget (and always room for the largest value), of which one tenant may hold half
//! (and always the largest value): 40 uploads of the largest value at once wait for room in
//! turn instead of holding 10 GB, and one tenant's uploads leave room for the others'. Counted
//! in KiB, as the Redis listener counts its own (`redis::Server::hold_room`).
//!
//! Room is taken before the bytes are read: all of a declared length at once (waiting up to
//! [`WAIT`] for it: backpressure), or as a body of unknown length grows, without waiting (a
//! body holding room must never wait for more, or two could wait on each other).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::StateConfig;
use crate::tenant::TenantId;

/// How long a value of declared length may wait for room before it is refused.
pub const WAIT: Duration = Duration::from_secs(60);

/// Why room for a value being received was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiveError {
    #[error(
        "no room to receive a value of {size} bytes for tenant {tenant} within {}s: values being received may hold {room} bytes at once (half of --state-budget-bytes), {share} of them one tenant's; retry later",
        WAIT.as_secs()
    )]
    Waited { tenant: String, size: u64, room: u64, share: u64 },
    #[error(
        "no room to receive more than {held} bytes of a value without Content-Length for tenant {tenant}: values being received may hold {room} bytes at once (half of --state-budget-bytes), {share} of them one tenant's; send a Content-Length to wait for room, or retry later"
    )]
    Full { tenant: String, held: u64, room: u64, share: u64 },
}

/// The room shared by every value being received.
#[derive(Debug)]
pub struct ReceiveRoom {
    /// All of it, in KiB.
    all: Arc<Semaphore>,
    all_kib: u32,
    /// What one tenant's values may hold together, in KiB.
    share_kib: u32,
    /// Each tenant's share (tenants are few: the operator creates them).
    shares: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
}

/// Room held for one value being received; given back when dropped.
#[derive(Debug)]
pub struct Held {
    tenant: TenantId,
    share: OwnedSemaphorePermit,
    all: OwnedSemaphorePermit,
}

impl Held {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.all.num_permits() as u64 * 1024
    }
}

impl ReceiveRoom {
    pub fn new(config: &StateConfig) -> Self {
        let largest_kib = config.max_value_bytes.div_ceil(1024).min(u32::MAX as u64 / 2) as u32;
        let room_kib = (config.total_budget_bytes / 2 / 1024).min(u32::MAX as u64 / 2) as u32;
        let all_kib = room_kib.max(largest_kib);
        let share_kib = (all_kib / 2).max(largest_kib).min(all_kib);
        Self { all: Arc::new(Semaphore::new(all_kib as usize)), all_kib, share_kib, shares: Mutex::default() }
    }

    /// Bytes all values being received may hold.
    pub fn room_bytes(&self) -> u64 {
        self.all_kib as u64 * 1024
    }

    /// Bytes one tenant's values being received may hold.
    pub fn share_bytes(&self) -> u64 {
        self.share_kib as u64 * 1024
    }

    /// Bytes held now by all values being received.
    pub fn held_bytes(&self) -> u64 {
        (self.all_kib as u64 - self.all.available_permits() as u64) * 1024
    }

    fn share(&self, tenant: &TenantId) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().unwrap();
        shares.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.share_kib as usize))).clone()
    }

    fn kib(&self, bytes: u64) -> u32 {
        // Never more than a share: a value is never larger (see `new`), so this never waits forever.
        bytes.div_ceil(1024).min(self.share_kib as u64) as u32
    }

    /// Room for `bytes`, waiting up to [`WAIT`] for it: first the tenant's share, then all the
    /// room (always in that order, and holding nothing else meanwhile, so no two wait on each
    /// other).
    pub async fn hold(&self, tenant: &TenantId, bytes: u64) -> Result<Held, ReceiveError> {
        let kib = self.kib(bytes);
        let share = self.share(tenant);
        let acquire = async {
            let share = share.acquire_many_owned(kib).await.expect("never closed");
            let all = self.all.clone().acquire_many_owned(kib).await.expect("never closed");
            Held { tenant: tenant.clone(), share, all }
        };
        tokio::time::timeout(WAIT, acquire).await.map_err(|_| ReceiveError::Waited {
            tenant: tenant.to_string(),
            size: bytes,
            room: self.room_bytes(),
            share: self.share_bytes(),
        })
    }

    /// Grows `held` to `bytes` if there is room now, without waiting.
    pub fn grow(&self, held: &mut Held, bytes: u64) -> Result<(), ReceiveError> {
        let kib = self.kib(bytes);
        let have = held.all.num_permits() as u32;
        if kib <= have {
            return Ok(());
        }
        let full = || ReceiveError::Full {
            tenant: held.tenant.to_string(),
            held: held.bytes(),
            room: self.room_bytes(),
            share: self.share_bytes(),
        };
        let share = self.share(&held.tenant).try_acquire_many_owned(kib - have).map_err(|_| full())?;
        let all = self.all.clone().try_acquire_many_owned(kib - have).map_err(|_| full())?;
        held.share.merge(share);
        held.all.merge(all);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(budget: u64, largest: u64) -> ReceiveRoom {
        ReceiveRoom::new(&StateConfig { total_budget_bytes: budget, max_value_bytes: largest, ..Default::default() })
    }

    #[test]
    fn the_room_is_half_the_budget_and_a_tenant_holds_half_of_it() {
        let defaults = room(4 << 30, 256 << 20);
        assert_eq!((defaults.room_bytes(), defaults.share_bytes()), (2 << 30, 1 << 30));
        // Always room for the largest value, for all and for one tenant.
        let tight = room(1 << 20, 2 << 20);
        assert_eq!((tight.room_bytes(), tight.share_bytes()), (2 << 20, 2 << 20));
    }

    #[tokio::test]
    async fn growing_never_waits_and_dropping_gives_room_back() {
        let room = room(8 << 20, 1 << 20);
        let (acme, globex) = (TenantId::new("acme").unwrap(), TenantId::new("globex").unwrap());
        let mut first = room.hold(&acme, 1 << 20).await.unwrap();
        let mut second = room.hold(&acme, 512 << 10).await.unwrap();
        assert_eq!(room.held_bytes(), 3 << 19);
        // acme's share is 2 MiB: half a MiB more, not a whole one.
        room.grow(&mut second, 1 << 20).unwrap();
        assert!(matches!(room.grow(&mut first, 2 << 20), Err(ReceiveError::Full { .. })));
        assert_eq!(first.bytes(), 1 << 20, "a refused growth holds nothing more");
        let other = room.hold(&globex, 1 << 20).await.unwrap();
        drop((first, second, other));
        assert_eq!(room.held_bytes(), 0);
    }
}
