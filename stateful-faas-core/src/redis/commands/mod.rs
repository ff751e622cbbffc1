//! The commands: Pocket's model (`docs/state-redis.md`) over Redis's string commands, with
//! Redis's own replies and error texts where clients depend on them.
//!
//! Here the dispatcher and the data commands, one match over the table (about 700 lines, one
//! cohesive thing); the table itself in `table.rs`, the connection's `AUTH`/`HELLO`/`CLIENT` in
//! `session.rs`, keys as addresses and pattern budgets in `keys.rs`.

use bytes::Bytes;

mod keys;
mod session;
mod table;

use keys::{Budget, pattern};
pub use keys::{PLAIN_BUCKET, key_name, parse_key};
use session::{auth, client, hello};
use table::{Spec, command, find};

use super::resp::Out;
use super::{Server, TenantSlot, glob};
use crate::state::{Change, Current, ObjectKey, StateError, TenantHandle};

/// The Redis version whose protocol and replies this listener follows.
pub const REDIS_VERSION: &str = "7.0.0";

/// What an authenticated connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A tenant's ingest token or the admin's: everything in the tenant's store.
    Full,
    /// A tenant's read token: commands that change nothing.
    Read,
    /// A running function's token: its job's objects and the job-less ones, while it runs.
    Function { job: Option<String> },
}

/// An authenticated connection's tenant and rights.
pub struct Auth<'s> {
    pub tenant: TenantHandle,
    pub access: Access,
    /// The token's hash, checked again when a token was revoked since.
    token_hash: String,
    revocations: u64,
    slot: TenantSlot<'s>,
}

/// One connection's state.
pub struct Session<'s> {
    pub id: u64,
    pub name: Option<String>,
    pub auth: Option<Auth<'s>>,
}

impl Auth<'_> {
    /// The tenant's share of the room for large commands being received.
    pub fn receiving(&self) -> &std::sync::Arc<tokio::sync::Semaphore> {
        &self.slot.receiving
    }
}

impl Session<'_> {
    pub fn new(id: u64) -> Self {
        Self { id, name: None, auth: None }
    }
}

/// A command's failure, as a reply line (`ERR …`, `WRONGPASS …`, …).
type Reply = Result<(), String>;

fn syntax() -> String {
    "ERR syntax error".into()
}

fn not_integer() -> String {
    "ERR value is not an integer or out of range".into()
}

/// Runs one command; answers whether the connection ends.
pub fn run<'s>(server: &'s Server, session: &mut Session<'s>, args: &[Bytes], out: &mut Out) -> bool {
    let Some(spec) = find(&args[0]) else {
        match session.auth {
            Some(_) => out.error(&unknown_command(args)),
            None => out.error("NOAUTH Authentication required."),
        }
        return false;
    };
    let arity_ok =
        if spec.arity >= 0 { args.len() == spec.arity as usize } else { args.len() >= (-spec.arity) as usize };
    if !arity_ok {
        out.error(&format!("ERR wrong number of arguments for '{}' command", spec.name));
        return false;
    }
    if !spec.before_auth {
        if let Some(auth) = &mut session.auth
            && auth.revocations != server.tenants.revocations()
        {
            auth.revocations = server.tenants.revocations();
            if server.tenants.authenticate_hash(&auth.token_hash).is_none() {
                session.auth = None;
                out.error("NOAUTH this connection's token was revoked (a function's token ends with its invocation)");
                return false;
            }
        }
        let Some(auth) = &session.auth else {
            out.error("NOAUTH Authentication required.");
            return false;
        };
        if spec.write && auth.access == Access::Read {
            out.error(&format!(
                "NOPERM this user has no permissions to run the '{}' command (a read token; use the tenant's ingest token)",
                spec.name
            ));
            return false;
        }
    }
    let result = match spec.name {
        "quit" => {
            out.ok();
            return true;
        }
        "auth" => auth(server, session, &args[1..]).map(|()| out.ok()),
        "hello" => hello(server, session, &args[1..], out),
        "ping" => {
            match args.get(1) {
                Some(message) => out.bulk(message),
                None => out.simple("PONG"),
            }
            Ok(())
        }
        "reset" => {
            *session = Session::new(session.id);
            out.resp3 = false;
            out.simple("RESET");
            Ok(())
        }
        "client" => client(session, &args[1..], out),
        _ => {
            let auth = session.auth.as_ref().expect("checked above");
            Context { server, auth, session_id: session.id }.run(spec, args, out)
        }
    };
    if let Err(error) = result {
        out.error(&error);
    }
    false
}

/// Redis's answer to an unknown command, naming its first arguments.
fn unknown_command(args: &[Bytes]) -> String {
    let mut text = format!("ERR unknown command '{}', with args beginning with: ", printable(&args[0]));
    for arg in &args[1..] {
        if text.len() > 128 {
            break;
        }
        text.push_str(&format!("'{}' ", printable(arg)));
    }
    text
}

fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(128)]).into_owned()
}

/// An authenticated command's surroundings.
struct Context<'a, 's> {
    server: &'a Server,
    auth: &'a Auth<'s>,
    session_id: u64,
}

/// When an object expires, as a Redis command states it.
enum Expiry {
    /// Seconds or milliseconds from now.
    In(u64),
    /// A Unix time in ns.
    At(u64),
}

impl Context<'_, '_> {
    fn run(&self, spec: &Spec, args: &[Bytes], out: &mut Out) -> Reply {
        let store = &self.server.state;
        let tenant = &self.auth.tenant;
        match spec.name {
            "echo" => out.bulk(&args[1]),
            "select" => {
                if &args[1][..] != b"0" {
                    return Err("ERR DB index is out of range".into());
                }
                out.ok();
            }
            "command" => command(&args[1..], out)?,
            "info" => {
                let text = self.info(&args[1..]);
                out.bulk(text.as_bytes());
            }
            "config" => config(self.server, &args[1..], out)?,
            "dbsize" => out.int(store.count(tenant, |key| self.visible(key)).0 as i64),
            "get" => {
                let key = self.key(&args[1])?;
                store
                    .modify(tenant, &key, |current, _| (Change::Keep, reply_value(out, current)))
                    .map_err(state_error)?;
            }
            "getdel" => {
                let key = self.key(&args[1])?;
                let value = store
                    .modify(tenant, &key, |current, _| match current {
                        Some(c) => (Change::Remove, Some(c.value.clone())),
                        None => (Change::Keep, None),
                    })
                    .map_err(state_error)?;
                match value {
                    Some(value) => out.value(&value),
                    None => out.null(),
                }
            }
            "set" => self.set(args, out)?,
            "mget" => {
                let keys = self.keys(&args[1..])?;
                // The values first (shared, not copied), so that a reply larger than the largest
                // command (one small value named a million times) is refused, not built.
                let values = store
                    .modify_each(tenant, &keys, |c, _| (Change::Keep, c.map(|c| c.value.clone())))
                    .map_err(state_error)?;
                let bytes: usize = values.iter().flatten().map(Bytes::len).sum();
                let limit = self.server.limits.max_command;
                if bytes > limit {
                    return Err(format!("ERR MGET would answer {bytes} bytes; a reply holds at most {limit}"));
                }
                out.array(values.len());
                for value in &values {
                    match value {
                        Some(value) => out.value(value),
                        None => out.null(),
                    }
                }
            }
            "mset" => {
                if args.len().is_multiple_of(2) {
                    return Err("ERR wrong number of arguments for 'mset' command".into());
                }
                let mut items = Vec::with_capacity(args.len() / 2);
                for pair in args[1..].chunks(2) {
                    items.push((self.key(&pair[0])?, own(&pair[1])));
                }
                store.put_many(tenant, items).map_err(state_error)?;
                out.ok();
            }
            "strlen" => {
                let key = self.key(&args[1])?;
                let len = store.modify(tenant, &key, |c, _| (Change::Keep, c.map_or(0, |c| c.value.len())));
                out.int(len.map_err(state_error)? as i64);
            }
            "append" => {
                let key = self.key(&args[1])?;
                let suffix = &args[2];
                let len = store
                    .modify(tenant, &key, |current, _| {
                        (Change::Append(own(suffix)), current.map_or(0, |c| c.value.len()) + suffix.len())
                    })
                    .map_err(state_error)?;
                out.int(len as i64);
            }
            "incr" | "decr" | "incrby" | "decrby" => {
                let by = match args.get(2) {
                    Some(by) => integer(by)?,
                    None => 1,
                };
                let by = if spec.name.starts_with("decr") {
                    by.checked_neg().ok_or("ERR decrement would overflow")?
                } else {
                    by
                };
                let key = self.key(&args[1])?;
                let result = store
                    .modify(tenant, &key, |current, _| {
                        let old = match current {
                            Some(c) => match integer(c.value) {
                                Ok(old) => old,
                                Err(error) => return (Change::Keep, Err(error)),
                            },
                            None => 0,
                        };
                        match old.checked_add(by) {
                            Some(new) => (put_like(current, Bytes::from(new.to_string())), Ok(new)),
                            None => (Change::Keep, Err("ERR increment or decrement would overflow".to_string())),
                        }
                    })
                    .map_err(state_error)?;
                out.int(result?);
            }
            "del" | "unlink" => {
                let keys = self.keys(&args[1..])?;
                let removed = store.modify_each(tenant, &keys, |c, _| match c {
                    Some(_) => (Change::Remove, 1),
                    None => (Change::Keep, 0),
                });
                out.int(removed.map_err(state_error)?.iter().sum());
            }
            "exists" => {
                let keys = self.keys(&args[1..])?;
                let found = store.modify_each(tenant, &keys, |c, _| (Change::Keep, c.is_some() as i64));
                out.int(found.map_err(state_error)?.iter().sum());
            }
            "type" => {
                let key = self.key(&args[1])?;
                let exists = store.modify(tenant, &key, |c, _| (Change::Keep, c.is_some())).map_err(state_error)?;
                out.simple(if exists { "string" } else { "none" });
            }
            "expire" | "pexpire" | "expireat" | "pexpireat" => self.expire(spec.name, args, out)?,
            "ttl" | "pttl" => {
                let key = self.key(&args[1])?;
                let ttl = store
                    .modify(tenant, &key, |current, now| {
                        let ttl = match current {
                            None => -2,
                            Some(Current { expires_at_ns: None, .. }) => -1,
                            Some(Current { expires_at_ns: Some(at), .. }) => {
                                let ms = (at.saturating_sub(now)).div_ceil(1_000_000) as i64;
                                if spec.name == "ttl" { (ms + 500) / 1000 } else { ms }
                            }
                        };
                        (Change::Keep, ttl)
                    })
                    .map_err(state_error)?;
                out.int(ttl);
            }
            "persist" => {
                let key = self.key(&args[1])?;
                let changed = store
                    .modify(tenant, &key, |current, _| match current {
                        Some(c) if c.expires_at_ns.is_some() => {
                            let change =
                                Change::Put { value: c.value.clone(), persist: c.persist, expires_at_ns: None };
                            (change, 1)
                        }
                        _ => (Change::Keep, 0),
                    })
                    .map_err(state_error)?;
                out.int(changed);
            }
            "sfaas.persist" => {
                let key = self.key(&args[1])?;
                let changed = store
                    .modify(tenant, &key, |current, _| match current {
                        Some(c) => {
                            let change =
                                Change::Put { value: c.value.clone(), persist: true, expires_at_ns: c.expires_at_ns };
                            (change, 1)
                        }
                        None => (Change::Keep, 0),
                    })
                    .map_err(state_error)?;
                out.int(changed);
            }
            "scan" => self.scan(&args[1..], out)?,
            "keys" => {
                let pattern = pattern(&args[1])?;
                let budget = Budget::default();
                let (stopped, keys) = store.scan(
                    tenant,
                    0,
                    usize::MAX,
                    |key| self.visible(key) && budget.matches(Some(pattern), key),
                    || budget.spent(),
                );
                if stopped != 0 {
                    return Err("ERR KEYS stopped: this pattern over this many keys takes too long or answers \
                                too much here (the server is shared); use SCAN with MATCH"
                        .into());
                }
                out.array(keys.len());
                for key in &keys {
                    out.bulk(key_name(key).as_bytes());
                }
            }
            "sfaas.register" | "sfaas.deregister" => {
                if matches!(self.auth.access, Access::Function { .. }) {
                    return Err(format!(
                        "NOPERM this user has no permissions to run the '{}' command (a function's token cannot register or deregister jobs)",
                        spec.name
                    ));
                }
                let job = std::str::from_utf8(&args[1]).map_err(|_| "ERR a job's name is UTF-8 text".to_string())?;
                if spec.name == "sfaas.register" {
                    store.register_paced(tenant.tenant(), job).map_err(state_error)?;
                    out.ok();
                } else {
                    let byte_seconds = store.deregister(tenant.tenant(), job).map_err(state_error)?;
                    out.bulk(byte_seconds.to_decimal_string().as_bytes());
                }
            }
            other => unreachable!("{other} is in the table and handled before"),
        }
        Ok(())
    }

    /// The object a Redis key names, if this connection may reach it.
    fn key(&self, raw: &[u8]) -> Result<ObjectKey, String> {
        let key = parse_key(raw)?;
        if let (Access::Function { job: own }, Some(job)) = (&self.auth.access, &key.job)
            && own.as_ref() != Some(job)
        {
            return Err(format!(
                "NOPERM this function's token reaches the keys of job {} and the job-less ones, not job {job:?}",
                own.as_deref().map_or("(none)".to_string(), |own| format!("{own:?}"))
            ));
        }
        Ok(key)
    }

    /// Every key of a multi-key command, checked before any is touched.
    fn keys(&self, raw: &[Bytes]) -> Result<Vec<ObjectKey>, String> {
        raw.iter().map(|key| self.key(key)).collect()
    }

    /// Whether this connection sees the object (in `SCAN`, `DBSIZE`).
    fn visible(&self, key: &ObjectKey) -> bool {
        match &self.auth.access {
            Access::Function { job } => key.job.is_none() || key.job == *job,
            _ => true,
        }
    }

    /// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
    fn set(&self, args: &[Bytes], out: &mut Out) -> Reply {
        let key = self.key(&args[1])?;
        let value = own(&args[2]);
        let (mut only_if, mut get, mut keep_ttl, mut expiry) = (None, false, false, None);
        let mut i = 3;
        while i < args.len() {
            let option = args[i].to_ascii_uppercase();
            match &option[..] {
                b"NX" | b"XX" if only_if.is_none() => only_if = Some(&option[..] == b"NX"),
                b"GET" => get = true,
                b"KEEPTTL" if expiry.is_none() => keep_ttl = true,
                b"EX" | b"PX" | b"EXAT" | b"PXAT" if expiry.is_none() && !keep_ttl && i + 1 < args.len() => {
                    i += 1;
                    let invalid = || "ERR invalid expire time in 'set' command".to_string();
                    let amount = integer(&args[i])?;
                    if amount <= 0 {
                        return Err(invalid());
                    }
                    let ns = match &option[..] {
                        b"EX" | b"EXAT" => (amount as u64).checked_mul(1_000_000_000),
                        _ => (amount as u64).checked_mul(1_000_000),
                    }
                    .ok_or_else(invalid)?;
                    expiry = Some(if option.ends_with(b"AT") { Expiry::At(ns) } else { Expiry::In(ns) });
                }
                _ => return Err(syntax()),
            }
            i += 1;
        }
        let (old, stored) = self
            .server
            .state
            .modify(&self.auth.tenant, &key, |current, now| {
                let old = current.map(|c| c.value.clone());
                if only_if.is_some_and(|absent| absent == current.is_some()) {
                    return (Change::Keep, (old, false));
                }
                let expires_at_ns = match expiry {
                    Some(Expiry::In(ns)) => Some(now.saturating_add(ns)),
                    Some(Expiry::At(ns)) => Some(ns),
                    None if keep_ttl => current.and_then(|c| c.expires_at_ns),
                    None => None,
                };
                // Pocket's persist flag belongs to the key: a new value keeps it.
                let persist = current.is_some_and(|c| c.persist);
                (Change::Put { value, persist, expires_at_ns }, (old, true))
            })
            .map_err(state_error)?;
        match (get, old, stored) {
            (true, Some(old), _) => out.value(&old),
            (true, None, _) | (false, _, false) => out.null(),
            (false, _, true) => out.ok(),
        }
        Ok(())
    }

    /// `EXPIRE`, `PEXPIRE`, `EXPIREAT`, `PEXPIREAT` with `NX|XX|GT|LT`.
    fn expire(&self, name: &str, args: &[Bytes], out: &mut Out) -> Reply {
        let key = self.key(&args[1])?;
        let amount = integer(&args[2])?;
        let unit: i128 = if name.starts_with('p') { 1_000_000 } else { 1_000_000_000 };
        let mut condition = None;
        for option in &args[3..] {
            let option = option.to_ascii_uppercase();
            let known = matches!(&option[..], b"NX" | b"XX" | b"GT" | b"LT");
            if !known || condition.is_some() {
                return Err(format!("ERR Unsupported option {}", printable(&option)));
            }
            condition = Some(option);
        }
        let invalid = || format!("ERR invalid expire time in '{name}' command");
        let at_unix = name.ends_with("at");
        let changed = self
            .server
            .state
            .modify(&self.auth.tenant, &key, |current, now| {
                let Some(current) = current else { return (Change::Keep, Ok(0)) };
                let at = amount as i128 * unit + if at_unix { 0 } else { now as i128 };
                let Ok(at) = u64::try_from(at.max(0)) else { return (Change::Keep, Err(invalid())) };
                let allowed = match (condition.as_deref(), current.expires_at_ns) {
                    (Some(b"NX"), existing) => existing.is_none(),
                    (Some(b"XX"), existing) => existing.is_some(),
                    (Some(b"GT"), existing) => existing.is_some_and(|e| at > e),
                    (Some(b"LT"), existing) => existing.is_none_or(|e| at < e),
                    _ => true,
                };
                if !allowed {
                    return (Change::Keep, Ok(0));
                }
                let change =
                    Change::Put { value: current.value.clone(), persist: current.persist, expires_at_ns: Some(at) };
                (change, Ok(1))
            })
            .map_err(state_error)?;
        out.int(changed?);
        Ok(())
    }

    /// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE type]`.
    fn scan(&self, args: &[Bytes], out: &mut Out) -> Reply {
        let cursor = std::str::from_utf8(&args[0])
            .ok()
            .and_then(|c| c.parse::<u64>().ok())
            .ok_or_else(|| "ERR invalid cursor".to_string())?;
        let (mut pattern, mut count, mut strings) = (None, 10usize, true);
        let mut options = args[1..].chunks(2);
        for pair in options.by_ref() {
            let [option, value] = pair else { return Err(syntax()) };
            match &option.to_ascii_uppercase()[..] {
                b"MATCH" => pattern = Some(self::pattern(value)?.clone()),
                b"COUNT" => {
                    let n = integer(value)?;
                    if n < 1 {
                        return Err(syntax());
                    }
                    count = n.min(1 << 20) as usize;
                }
                b"TYPE" => strings = value.eq_ignore_ascii_case(b"string"),
                _ => return Err(syntax()),
            }
        }
        // A costly pattern, or many long names, end a step early with fewer keys (as SCAN may).
        let budget = Budget::default();
        let (next, keys) = self.server.state.scan(
            &self.auth.tenant,
            cursor,
            count,
            |key| strings && self.visible(key) && budget.matches(pattern.as_deref(), key),
            || budget.spent(),
        );
        out.array(2);
        out.bulk(next.to_string().as_bytes());
        out.array(keys.len());
        for key in &keys {
            out.bulk(key_name(key).as_bytes());
        }
        Ok(())
    }

    /// `INFO [section…]`: what the connection's tenant holds, in Redis's format.
    fn info(&self, sections: &[Bytes]) -> String {
        let wanted = |name: &str| {
            sections.is_empty()
                || sections.iter().any(|s| {
                    s.eq_ignore_ascii_case(name.as_bytes())
                        || s.eq_ignore_ascii_case(b"all")
                        || s.eq_ignore_ascii_case(b"default")
                        || s.eq_ignore_ascii_case(b"everything")
                })
        };
        let store = &self.server.state;
        let usage = store.usage(self.auth.tenant.tenant());
        let mut text = String::new();
        if wanted("server") {
            text.push_str(&format!(
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nsfaas_version:{}\r\nprocess_id:{}\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ));
        }
        if wanted("clients") {
            let clients = self.server.config.max_clients - self.server.clients.available_permits();
            text.push_str(&format!(
                "# Clients\r\nconnected_clients:{clients}\r\nmaxclients:{}\r\nclient_id:{}\r\n\r\n",
                self.server.config.max_clients, self.session_id
            ));
        }
        if wanted("memory") {
            text.push_str(&format!(
                "# Memory\r\nused_memory:{}\r\nsfaas_value_bytes:{}\r\nmaxmemory:{}\r\nmaxmemory_policy:noeviction\r\nsfaas_byte_seconds:{}\r\n\r\n",
                usage.held,
                usage.bytes,
                store.quota_of(self.auth.tenant.tenant()),
                usage.total.to_decimal_string()
            ));
        }
        if wanted("keyspace") {
            let (keys, expires) = store.count(&self.auth.tenant, |key| self.visible(key));
            text.push_str("# Keyspace\r\n");
            if keys > 0 {
                text.push_str(&format!("db0:keys={keys},expires={expires},avg_ttl=0\r\n"));
            }
        }
        text
    }
}

/// A value to keep: a small one is copied out of the request's buffer, which it would
/// otherwise keep alive whole (a few bytes pinning the connection's read buffer, uncounted by
/// any quota); a large one is most of its buffer, and is kept as it is.
fn own(value: &Bytes) -> Bytes {
    if value.len() < 64 << 10 { Bytes::copy_from_slice(value) } else { value.clone() }
}

/// Answers an object's value (copied while the store is locked when small, shared when large),
/// or null.
fn reply_value(out: &mut Out, current: Option<Current<'_>>) {
    match current {
        Some(c) => out.value(c.value),
        None => out.null(),
    }
}

/// A `Put` that keeps what the object had besides its value (its persist flag, its expiry).
fn put_like(current: Option<Current<'_>>, value: Bytes) -> Change {
    Change::Put {
        value,
        persist: current.is_some_and(|c| c.persist),
        expires_at_ns: current.and_then(|c| c.expires_at_ns),
    }
}

/// A Redis integer argument or value: optional sign, digits, nothing else.
fn integer(raw: &[u8]) -> Result<i64, String> {
    let valid = raw.len() <= 20
        && !raw.is_empty()
        && raw.iter().enumerate().all(|(i, b)| b.is_ascii_digit() || (i == 0 && *b == b'-' && raw.len() > 1));
    let text = std::str::from_utf8(raw).ok().filter(|_| valid).ok_or_else(not_integer)?;
    text.parse().map_err(|_| not_integer())
}

/// A refused state operation as Redis words it: `OOM` for the quota and the budget.
fn state_error(error: StateError) -> String {
    match error {
        StateError::QuotaExceeded { .. } | StateError::BudgetExceeded { .. } => format!("OOM {error}"),
        other => format!("ERR {other}"),
    }
}

/// `CONFIG GET pattern…`: the settings benchmark tools and clients read; nothing is settable.
fn config(server: &Server, args: &[Bytes], out: &mut Out) -> Reply {
    if !args[0].eq_ignore_ascii_case(b"GET") || args.len() < 2 {
        return Err("ERR CONFIG: only CONFIG GET pattern is available here; the operator sets limits".into());
    }
    let config = server.state.config();
    let settings = [
        ("save", String::new()),
        ("appendonly", "no".to_string()),
        ("databases", "1".to_string()),
        ("maxclients", server.config.max_clients.to_string()),
        ("maxmemory-policy", "noeviction".to_string()),
        ("proto-max-bulk-len", config.max_value_bytes.to_string()),
    ];
    let patterns = args[1..].iter().map(pattern).collect::<Result<Vec<_>, _>>()?;
    let found: Vec<_> = settings
        .iter()
        .filter(|(name, _)| patterns.iter().any(|pattern| glob::matches(pattern, name.as_bytes())))
        .collect();
    out.map(found.len());
    for (name, value) in found {
        out.bulk(name.as_bytes());
        out.bulk(value.as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_objects_and_back() {
        for (raw, job, bucket, key) in [
            ("counter", None, PLAIN_BUCKET, "counter"),
            ("logs/2026", None, "logs", "2026"),
            ("{job:run-1}out/part-0", Some("run-1"), "out", "part-0"),
            ("{job:run-1}x", Some("run-1"), PLAIN_BUCKET, "x"),
        ] {
            let parsed = parse_key(raw.as_bytes()).unwrap();
            assert_eq!(parsed, ObjectKey::new(job, bucket, key).unwrap());
            assert_eq!(key_name(&parsed), raw);
        }
        for bad in ["", "a/b/c", "{job:x", "{job:}b/k", "b/", "a\nb"] {
            assert!(parse_key(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(parse_key(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn integers_are_redis_integers() {
        assert_eq!(integer(b"-42"), Ok(-42));
        assert_eq!(integer(b"9223372036854775807"), Ok(i64::MAX));
        for bad in [&b""[..], b"-", b" 1", b"1.5", b"+1", b"9223372036854775808", b"0x10"] {
            assert!(integer(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
