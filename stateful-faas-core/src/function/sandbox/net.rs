//! Network namespaces: one per tenant for exec invocations and one per managed instance, each
//! with only a loopback interface on which the gateway serves the state store for it alone.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use super::check;

/// What the sandbox serves in each network namespace: the state store over HTTP, and over
/// the Redis protocol when the core listens for it.
#[derive(Clone)]
pub struct StateServers {
    pub http: axum::Router,
    pub redis: Option<Arc<crate::redis::Server>>,
}

/// A network namespace with only a loopback interface, and the state store served on it.
pub struct NetNs {
    pub(super) fd: OwnedFd,
    /// `http://127.0.0.1:PORT/state` inside the namespace, when the state store is served there.
    pub(super) state_url: Option<String>,
    /// `127.0.0.1:PORT` of the Redis protocol inside the namespace.
    pub(super) state_redis: Option<String>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl NetNs {
    /// Makes a namespace (on a thread of its own: a namespace is per thread) and serves
    /// `state` in it.
    pub(super) fn new(state: Option<&StateServers>) -> io::Result<Self> {
        let fd = std::thread::spawn(|| -> io::Result<OwnedFd> {
            // SAFETY: plain syscalls on this thread, which ends right after.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWNET))?;
                loopback_up()?;
                let fd = libc::open(c"/proc/thread-self/ns/net".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                check(fd)?;
                Ok(OwnedFd::from_raw_fd(fd))
            }
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))??;
        let mut net = Self { fd, state_url: None, state_redis: None, servers: Vec::new() };
        let Some(state) = state else { return Ok(net) };
        let listen = |net: &NetNs| -> io::Result<(tokio::net::TcpListener, u16)> {
            let socket = socket_in(net.fd.as_raw_fd())?;
            socket.bind((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
            let listener = socket.listen(1024)?;
            let port = listener.local_addr()?.port();
            Ok((listener, port))
        };
        let (listener, port) = listen(&net)?;
        let router = state.http.clone();
        net.servers.push(tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::warn!(%error, "a sandbox's state listener stopped");
            }
        }));
        net.state_url = Some(format!("http://127.0.0.1:{port}/state"));
        if let Some(redis) = &state.redis {
            let (listener, port) = listen(&net)?;
            // Stopped by aborting the task when the namespace goes.
            net.servers.push(tokio::spawn(redis.clone().serve(listener, std::future::pending())));
            net.state_redis = Some(format!("127.0.0.1:{port}"));
        }
        Ok(net)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// The gateway's own network namespace.
static HOST_NETWORK: OnceLock<OwnedFd> = OnceLock::new();

/// A TCP socket of the network namespace `ns`, made on the calling thread: it enters `ns`,
/// makes the socket and returns to the gateway's namespace. A socket belongs to the namespace
/// it was made in, wherever it is used afterwards.
pub(super) fn socket_in(ns: RawFd) -> io::Result<tokio::net::TcpSocket> {
    let host = match HOST_NETWORK.get() {
        Some(host) => host,
        None => {
            let host = std::fs::File::open("/proc/self/ns/net")?;
            HOST_NETWORK.get_or_init(|| host.into())
        }
    };
    // SAFETY: plain syscalls; the thread is back in its own namespace before anything else runs on it.
    unsafe {
        check(libc::setns(ns, libc::CLONE_NEWNET))?;
        let socket = tokio::net::TcpSocket::new_v4();
        if libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            // A gateway thread left in a tenant's network would serve it: never go on.
            eprintln!("sfaas: cannot return to the gateway's network namespace: {}", io::Error::last_os_error());
            std::process::abort();
        }
        socket
    }
}

/// Brings up `lo` in the calling thread's network namespace.
unsafe fn loopback_up() -> io::Result<()> {
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(socket)?;
        let socket = OwnedFd::from_raw_fd(socket);
        let mut request = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        for (i, byte) in b"lo".iter().enumerate() {
            request.name[i] = *byte as libc::c_char;
        }
        check(libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request))?;
        request.flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request))
    }
}

/// Checks that the server end of a loopback connection from local port `local` to `port` on
/// the host's network belongs to `uid`. A managed instance of a tenant with egress listens on
/// the host's loopback, on a port that was free when it was given: another such tenant could
/// bind it first (or after the instance stops), and would then be sent this tenant's requests.
/// The kernel lists the accepted socket, with its owner's uid, in `/proc/net/tcp` (or `tcp6`,
/// for a server listening on `::`).
pub(super) fn served_by(port: u16, local: u16, uid: u32) -> io::Result<()> {
    let mut owner = None;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        owner = owner.or_else(|| server_uid(&text, port, local));
    }
    match owner {
        Some(owner) if owner == uid => Ok(()),
        Some(owner) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("port {port} is served by uid {owner}, not the function's ({uid}): not connecting"),
        )),
        None => Err(io::Error::new(io::ErrorKind::NotFound, format!("no server end of the connection to port {port}"))),
    }
}

/// The uid of the socket whose local port is `port` and remote port `remote`, in the text of
/// `/proc/net/tcp` (`sl local_address rem_address st … uid …`, addresses as `HEX:PORT`).
fn server_uid(text: &str, port: u16, remote: u16) -> Option<u32> {
    let port_of = |address: &str| address.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let matches = fields.len() > 7 && port_of(fields[1]) == Some(port) && port_of(fields[2]) == Some(remote);
        if matches { fields[7].parse().ok() } else { None }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_checked_against_its_servers_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let local = stream.local_addr().unwrap().port();
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        served_by(port, local, me).unwrap();
        let other = served_by(port, local, me + 1).unwrap_err();
        assert_eq!(other.kind(), io::ErrorKind::PermissionDenied, "{other}");
        // No connection from that port: nothing to trust.
        assert_eq!(served_by(port, local.wrapping_add(1), me).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_kernels_table_is_read_by_ports() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                    0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1234        0 99 1\n";
        assert_eq!(server_uid(text, 0x1F90, 0xC350), Some(1234));
        assert_eq!(server_uid(text, 0xC350, 0x1F90), None);
    }
}
