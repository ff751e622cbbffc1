//! The state store over the Redis protocol (RESP2 and RESP3), so that a function in any
//! language reaches it with the Redis client it already has.
//!
//! A connection authenticates as a tenant (`AUTH tenant token`, or `HELLO 3 AUTH …`) and then
//! sees that tenant's objects only; which token it used decides what it may do (see
//! [`Access`]). Keys name objects as `bucket/key`, a key without `/` lives in the bucket
//! [`commands::PLAIN_BUCKET`], and `{job:ID}bucket/key` names an object of a job. The commands,
//! and how Pocket's model maps onto them, are in docs/state-redis.md.
//!
//! Every request is hostile until proven otherwise: before `AUTH` only `AUTH`, `HELLO`, `PING`
//! and `QUIT` answer, with small arguments; afterwards one argument holds at most the store's
//! largest value, a command at most that and 1 MiB more, and the bytes of large commands being
//! received by all connections together are bounded (a connection waits for room: backpressure,
//! not memory). A connection that sends part of a command and stalls, or that does not
//! authenticate, is closed after [`STALL`]. Replies are written before more requests are read,
//! so a client that does not read its replies stops being read.

pub mod commands;
pub mod glob;
pub mod resp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BufMut;
use bytes::BytesMut;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::StateStore;
use crate::tenant::{TenantId, TenantStore};
use resp::{Limits, Out, Parse, Request};

/// Limits of the listener.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Connections open at once, authenticated or not (Redis's `maxclients`).
    pub max_clients: usize,
    /// Connections one tenant may have authenticated at once.
    pub max_clients_per_tenant: usize,
    /// Threads serving connections, each a single-threaded event loop as Redis's own (a
    /// connection stays on one, so serving it never wakes another thread); default: half the
    /// cores, at least one (the others run functions, the gateway and the collector).
    pub threads: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { max_clients: 10_000, max_clients_per_tenant: 1_000, threads: (cores / 2).max(1) }
    }
}

/// A connection handed to an event loop thread.
type Handoff = (Arc<Server>, std::net::TcpStream, SocketAddr);

/// How long a connection may take to authenticate, or to send the rest of a command.
pub const STALL: Duration = Duration::from_secs(60);

/// What one read may take: a pipeline of 16 commands of 1 KiB values in one system call.
const READ_ROOM: usize = 64 << 10;

/// Commands at least this large hold room in the bytes being received by all connections.
const LARGE_COMMAND: usize = 1 << 20;

/// How long one connection runs commands before the others on its event loop get a turn.
const TURN: Duration = Duration::from_millis(2);

/// Before `AUTH`: Redis's own limits for unauthenticated clients.
const UNAUTHENTICATED: Limits = Limits { max_args: 10, max_bulk: 16 << 10, max_command: 64 << 10 };

/// The listener's shared part: the store, the tokens, and the limits every connection draws on.
pub struct Server {
    state: Arc<StateStore>,
    tenants: Arc<TenantStore>,
    config: RedisConfig,
    limits: Limits,
    clients: Arc<Semaphore>,
    /// Room for large commands being received, in KiB.
    receiving: Arc<Semaphore>,
    /// Of that room, what one tenant's connections may hold together: half, and always room
    /// for the largest command (so one tenant cannot hold it all while others wait).
    tenant_receiving_kib: u32,
    /// Each tenant's connections, and its share of the room for large commands.
    per_tenant: Mutex<HashMap<TenantId, (usize, Arc<Semaphore>)>>,
    next_id: AtomicU64,
    handed: std::sync::atomic::AtomicUsize,
    /// The event loops, started by the first `serve`.
    loops: std::sync::OnceLock<Vec<tokio::sync::mpsc::UnboundedSender<Handoff>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("redis::Server").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Server {
    pub fn new(state: Arc<StateStore>, tenants: Arc<TenantStore>, config: RedisConfig) -> Arc<Self> {
        let max_value = state.config().max_value_bytes as usize;
        let limits = Limits { max_args: 1 << 20, max_bulk: max_value, max_command: max_value + (1 << 20) };
        // Large commands being received together: half the store's budget, and always room
        // for the largest one.
        let room = (state.config().total_budget_bytes / 2).max(limits.max_command as u64);
        let receiving_kib = (room / 1024).min(u32::MAX as u64 / 2) as u32;
        let tenant_receiving_kib = (receiving_kib / 2).max(limits.max_command.div_ceil(1024) as u32).min(receiving_kib);
        Arc::new(Self {
            state,
            tenants,
            limits,
            clients: Arc::new(Semaphore::new(config.max_clients)),
            receiving: Arc::new(Semaphore::new(receiving_kib as usize)),
            tenant_receiving_kib,
            config,
            per_tenant: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            handed: Default::default(),
            loops: std::sync::OnceLock::new(),
        })
    }

    /// Accepts connections until the task is dropped or `stop` completes. Connections already
    /// open go on until their clients leave.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut stop => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, say: wait instead of spinning.
                    tracing::warn!(%error, "the state store's Redis listener cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Round robin over the event loops.
            let loops = self.loops.get_or_init(|| (0..self.config.threads.max(1)).map(event_loop).collect());
            let index = self.handed.fetch_add(1, Ordering::Relaxed) % loops.len();
            match stream.into_std() {
                Ok(stream) => {
                    let _ = loops[index].send((self.clone(), stream, peer));
                }
                Err(error) => tracing::warn!(%error, "a Redis protocol connection could not be handed over"),
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: std::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        // SAFETY: the socket is owned by the AsyncFd, so its descriptor stays open and the same
        // for the AsyncFd's whole life.
        let stream = match unsafe { AsyncFd::register(stream) } {
            Ok(stream) => stream,
            Err(error) => {
                return tracing::warn!(%error, "a Redis protocol connection could not be served");
            }
        };
        let Ok(_client) = self.clients.clone().try_acquire_owned() else {
            let _ = write_all(&stream, b"-ERR max number of clients reached\r\n").await;
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut session = commands::Session::new(id);
        if let Err(error) = self.run(&stream, &mut session).await {
            tracing::debug!(%peer, %error, "a state store Redis connection ended");
        }
    }

    /// Reads, runs and answers commands until the client quits or breaks the protocol.
    async fn run<'s>(&'s self, stream: &Socket, session: &mut commands::Session<'s>) -> std::io::Result<()> {
        let mut buf = BytesMut::with_capacity(READ_ROOM);
        let mut request = Request::default();
        let mut out = Out::default();
        let mut room: Option<Room> = None;
        // Commands already received run back to back; past a slice of the loop's time the
        // connection lets the others on its event loop run (one tenant's pipeline of costly
        // commands, such as KEYS over many keys, does not hold the loop).
        let mut turn = std::time::Instant::now();
        loop {
            let limits = if session.auth.is_some() { self.limits } else { UNAUTHENTICATED };
            match resp::parse(&mut buf, &limits, &mut request) {
                Ok(Parse::Command) => {
                    room = None;
                    if request.args.is_empty() {
                        continue;
                    }
                    let quit = commands::run(self, session, &request.args, &mut out);
                    // The arguments are slices of the read buffer: let go of it at once.
                    request.args.clear();
                    if quit || out.len() >= 1 << 20 {
                        write(stream, &mut out).await?;
                    }
                    if quit {
                        return Ok(());
                    }
                    if turn.elapsed() >= TURN {
                        tokio::task::yield_now().await;
                        turn = std::time::Instant::now();
                    }
                    continue;
                }
                Ok(Parse::Incomplete(needed)) => {
                    // Room first: the buffer grows only within the shared bound.
                    if needed >= LARGE_COMMAND {
                        // Only a signed-in connection may send a command this large.
                        let share = session.auth.as_ref().map(commands::Auth::receiving);
                        room = Some(self.hold_room(room.take(), needed, share).await);
                    }
                    if needed > buf.capacity() {
                        buf.reserve(needed - buf.len());
                    }
                }
                Err(error) => {
                    out.error(&format!("ERR {error}"));
                    write(stream, &mut out).await?;
                    return Ok(());
                }
            }
            write(stream, &mut out).await?;
            if buf.capacity() - buf.len() < READ_ROOM / 4 {
                buf.reserve(READ_ROOM);
            }
            let read = if session.auth.is_none() || !buf.is_empty() {
                match tokio::time::timeout(STALL, read(stream, &mut buf)).await {
                    Ok(read) => read?,
                    Err(_) => return Ok(()),
                }
            } else {
                read(stream, &mut buf).await?
            };
            if read == 0 {
                return Ok(());
            }
            turn = std::time::Instant::now();
        }
    }

    /// Room for a command of `needed` bytes being received, adding to what `held` already is:
    /// first from the tenant's `share`, then from all the room (always in that order, so that
    /// no two connections wait on each other).
    async fn hold_room(&self, held: Option<Room>, needed: usize, share: Option<&Arc<Semaphore>>) -> Room {
        let kib = (needed.div_ceil(1024) as u64).min(self.tenant_receiving_kib as u64) as u32;
        let have = held.as_ref().map_or(0, |room| room.all.num_permits() as u32);
        if kib <= have {
            return held.expect("holds some");
        }
        let more_of_share = match share {
            Some(share) => Some(share.clone().acquire_many_owned(kib - have).await.expect("never closed")),
            None => None,
        };
        let more = self.receiving.clone().acquire_many_owned(kib - have).await.expect("never closed");
        match held {
            Some(mut held) => {
                held.all.merge(more);
                match (&mut held.share, more_of_share) {
                    (Some(share), Some(more)) => share.merge(more),
                    (share @ None, more) => *share = more,
                    (Some(_), None) => {}
                }
                held
            }
            None => Room { all: more, share: more_of_share },
        }
    }

    /// Counts a connection of `tenant`, if it has room for one more.
    fn admit(&self, tenant: &TenantId) -> Option<TenantSlot<'_>> {
        let mut counts = self.per_tenant.lock().unwrap();
        let share = self.tenant_receiving_kib as usize;
        let (count, receiving) = counts.entry(tenant.clone()).or_insert_with(|| (0, Arc::new(Semaphore::new(share))));
        if *count >= self.config.max_clients_per_tenant {
            return None;
        }
        *count += 1;
        Some(TenantSlot { server: self, tenant: tenant.clone(), receiving: receiving.clone() })
    }
}

/// One event loop thread: serves the connections handed to it until the server goes.
fn event_loop(index: usize) -> tokio::sync::mpsc::UnboundedSender<Handoff> {
    let (sender, mut connections) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
    let spawned = std::thread::Builder::new().name(format!("sfaas-redis-{index}")).spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(error) => return tracing::error!(%error, "a Redis protocol event loop could not start"),
        };
        runtime.block_on(async move {
            while let Some((server, stream, peer)) = connections.recv().await {
                drop(tokio::spawn(server.connection(stream, peer)));
            }
        });
    });
    if let Err(error) = spawned {
        tracing::error!(%error, "a Redis protocol event loop thread could not start");
    }
    sender
}

/// A connection's socket, read and written as the event loop finds it ready.
type Socket = AsyncFd<std::net::TcpStream>;

/// Reads what the socket holds into `buf`'s spare room (0: the client closed). A read that
/// does not fill the room has drained the socket, so readiness is cleared at once instead of
/// by one more read that would fail: one system call fewer per request, as Redis's own loop.
async fn read(stream: &Socket, buf: &mut BytesMut) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        let mut ready = stream.readable().await?;
        let room = buf.chunk_mut();
        let capacity = room.len();
        // SAFETY: reads at most `capacity` bytes into `buf`'s spare room, and only the bytes
        // the kernel wrote are then counted as initialized.
        let read = unsafe { libc::read(stream.get_ref().as_raw_fd(), room.as_mut_ptr().cast(), capacity) };
        if read < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                ready.clear_ready();
                continue;
            }
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        let read = read as usize;
        // SAFETY: the kernel initialized `read` bytes of the spare room.
        unsafe { buf.advance_mut(read) };
        if read < capacity {
            ready.clear_ready();
        }
        return Ok(read);
    }
}

async fn write_all(stream: &Socket, mut data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    while !data.is_empty() {
        let mut ready = stream.writable().await?;
        match ready.try_io(|socket| socket.get_ref().write(data)) {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(written)) => data = &data[written..],
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(Err(error)) => return Err(error),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

async fn write(stream: &Socket, out: &mut Out) -> std::io::Result<()> {
    for chunk in out.take() {
        write_all(stream, &chunk).await?;
    }
    Ok(())
}

/// A tenant's count of connections, given back when the session ends or authenticates anew.
pub struct TenantSlot<'a> {
    server: &'a Server,
    tenant: TenantId,
    /// The tenant's share of the room for large commands.
    pub(crate) receiving: Arc<Semaphore>,
}

/// Room held for a large command being received: of all the room, and of the tenant's share.
struct Room {
    all: OwnedSemaphorePermit,
    share: Option<OwnedSemaphorePermit>,
}

impl Drop for TenantSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self.server.per_tenant.lock().unwrap();
        if let Some((count, _)) = counts.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}
