//! Room for bytes the gateway buffers on a tenant's behalf, shared by all tenants.
//!
//! Two rooms use it: the values being received by the state API (bytes of bodies read before
//! they become objects, counted in the store's budget only once stored), and the buffers of
//! invocations (a request's body, then the function's response, until it is sent). Each room
//! is shared by every tenant, of which one may hold half (and always the largest buffer): 40
//! uploads of the largest value at once wait for room in turn instead of holding 10 GB, and one
//! tenant's buffers leave room for the others'. Counted in KiB.
//!
//! Room is taken before the bytes are read: all of a declared length at once (waiting up to
//! [`WAIT`] for it: backpressure), or as a buffer of unknown length grows, without waiting (a
//! buffer holding room must never wait for more, or two could wait on each other).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::tenant::TenantId;

/// How long a buffer of declared length may wait for room before it is refused.
pub const WAIT: Duration = Duration::from_secs(60);

/// Why room was refused (answered 429: the room frees as other buffers end).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoomError {
    #[error(
        "no room for {size} bytes of tenant {tenant} within {}s: {what} may hold {room} bytes at once, {share} of them one tenant's; retry later",
        WAIT.as_secs()
    )]
    Waited { what: &'static str, tenant: String, size: u64, room: u64, share: u64 },
    #[error(
        "no room for more than {held} bytes of tenant {tenant}: {what} may hold {room} bytes at once, {share} of them one tenant's; retry later (a request body with a Content-Length waits for room)"
    )]
    Full { what: &'static str, tenant: String, held: u64, room: u64, share: u64 },
}

/// One room, shared by every tenant.
#[derive(Debug)]
pub struct Room {
    /// What it holds and which setting sizes it, for errors.
    what: &'static str,
    /// All of it, in KiB.
    all: Arc<Semaphore>,
    all_kib: u32,
    /// What one tenant's buffers may hold together, in KiB.
    share_kib: u32,
    /// Each tenant's share (tenants are few: the operator creates them).
    shares: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
}

/// Room held for one buffer; given back when dropped.
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

impl Room {
    /// `room` bytes for all (at least `largest`), half of it (at least `largest`) for one tenant.
    pub fn new(room: u64, largest: u64, what: &'static str) -> Self {
        let largest_kib = largest.div_ceil(1024).min(u32::MAX as u64 / 2) as u32;
        let room_kib = (room / 1024).min(u32::MAX as u64 / 2) as u32;
        let all_kib = room_kib.max(largest_kib);
        let share_kib = (all_kib / 2).max(largest_kib).min(all_kib);
        Self { what, all: Arc::new(Semaphore::new(all_kib as usize)), all_kib, share_kib, shares: Mutex::default() }
    }

    /// Bytes all buffers may hold.
    pub fn room_bytes(&self) -> u64 {
        self.all_kib as u64 * 1024
    }

    /// Bytes one tenant's buffers may hold.
    pub fn share_bytes(&self) -> u64 {
        self.share_kib as u64 * 1024
    }

    /// Bytes held now by all buffers.
    pub fn held_bytes(&self) -> u64 {
        (self.all_kib as u64 - self.all.available_permits() as u64) * 1024
    }

    fn share(&self, tenant: &TenantId) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().unwrap();
        shares.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.share_kib as usize))).clone()
    }

    fn kib(&self, bytes: u64) -> u32 {
        // Never more than a share: no buffer is larger (see `new`), so this never waits forever.
        bytes.div_ceil(1024).min(self.share_kib as u64) as u32
    }

    /// Room for `bytes`, waiting up to [`WAIT`] for it: first the tenant's share, then all the
    /// room (always in that order, and holding nothing else meanwhile, so no two wait on each
    /// other).
    pub async fn hold(&self, tenant: &TenantId, bytes: u64) -> Result<Held, RoomError> {
        let kib = self.kib(bytes);
        let share = self.share(tenant);
        let acquire = async {
            let share = share.acquire_many_owned(kib).await.expect("never closed");
            let all = self.all.clone().acquire_many_owned(kib).await.expect("never closed");
            Held { tenant: tenant.clone(), share, all }
        };
        tokio::time::timeout(WAIT, acquire).await.map_err(|_| RoomError::Waited {
            what: self.what,
            tenant: tenant.to_string(),
            size: bytes,
            room: self.room_bytes(),
            share: self.share_bytes(),
        })
    }

    /// Grows `held` to `bytes` if there is room now, without waiting.
    pub fn grow(&self, held: &mut Held, bytes: u64) -> Result<(), RoomError> {
        let kib = self.kib(bytes);
        let have = held.all.num_permits() as u32;
        if kib <= have {
            return Ok(());
        }
        let full = || RoomError::Full {
            what: self.what,
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
/// One invocation's buffers in the invocations' room: its request's body, held from the start,
/// and its function's response, which takes room as it is read (never waiting).
#[derive(Debug)]
pub struct Buffers {
    room: Arc<Room>,
    held: Mutex<Held>,
    request: u64,
}

impl Buffers {
    /// `held` holds the request's `request` bytes.
    pub fn new(room: Arc<Room>, held: Held, request: u64) -> Self {
        Self { room, held: Mutex::new(held), request }
    }

    /// Room for a response of `bytes` beside the request, if there is room now.
    pub fn response(&self, bytes: u64) -> Result<(), RoomError> {
        self.room.grow(&mut self.held.lock().unwrap(), self.request + bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(room: u64, largest: u64) -> Room {
        Room::new(room, largest, "test buffers")
    }

    #[test]
    fn a_tenant_holds_half_the_room() {
        let defaults = room(2 << 30, 256 << 20);
        assert_eq!((defaults.room_bytes(), defaults.share_bytes()), (2 << 30, 1 << 30));
        // Always room for the largest value, for all and for one tenant.
        let tight = room(512 << 10, 2 << 20);
        assert_eq!((tight.room_bytes(), tight.share_bytes()), (2 << 20, 2 << 20));
    }

    #[tokio::test]
    async fn growing_never_waits_and_dropping_gives_room_back() {
        let room = room(4 << 20, 1 << 20);
        let (acme, globex) = (TenantId::new("acme").unwrap(), TenantId::new("globex").unwrap());
        let mut first = room.hold(&acme, 1 << 20).await.unwrap();
        let mut second = room.hold(&acme, 512 << 10).await.unwrap();
        assert_eq!(room.held_bytes(), 3 << 19);
        // acme's share is 2 MiB: half a MiB more, not a whole one.
        room.grow(&mut second, 1 << 20).unwrap();
        assert!(matches!(room.grow(&mut first, 2 << 20), Err(RoomError::Full { .. })));
        assert_eq!(first.bytes(), 1 << 20, "a refused growth holds nothing more");
        let other = room.hold(&globex, 1 << 20).await.unwrap();
        drop((first, second, other));
        assert_eq!(room.held_bytes(), 0);
    }
}
