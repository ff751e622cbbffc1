//! The command table: what `COMMAND` tells clients, and what the dispatcher checks.

use bytes::Bytes;

use super::{Reply, printable};
use crate::redis::resp::Out;

/// A command's entry: what `COMMAND` tells clients, and what the dispatcher checks.
pub struct Spec {
    pub name: &'static str,
    /// As Redis counts it: the name included; negative for "at least".
    pub arity: i32,
    pub write: bool,
    /// Answers before `AUTH`.
    pub before_auth: bool,
    /// First key, last key (-1: the last argument) and step, as `COMMAND` reports them.
    pub keys: (i32, i32, i32),
    pub group: &'static str,
    pub summary: &'static str,
}

const fn spec(
    name: &'static str,
    arity: i32,
    write: bool,
    keys: (i32, i32, i32),
    group: &'static str,
    summary: &'static str,
) -> Spec {
    Spec { name, arity, write, before_auth: false, keys, group, summary }
}

const fn open(name: &'static str, arity: i32, summary: &'static str) -> Spec {
    Spec { name, arity, write: false, before_auth: true, keys: (0, 0, 0), group: "connection", summary }
}

/// Every command this listener knows.
pub const COMMANDS: &[Spec] = &[
    open("auth", -2, "Authenticates the connection as a tenant: AUTH [tenant] token."),
    open(
        "hello",
        -1,
        "Selects RESP2 or RESP3, optionally authenticating: HELLO [2|3] [AUTH tenant token] [SETNAME name].",
    ),
    open("ping", -1, "Returns PONG, or the argument."),
    open("quit", -1, "Closes the connection."),
    spec("echo", 2, false, (0, 0, 0), "connection", "Returns the argument."),
    spec("reset", 1, false, (0, 0, 0), "connection", "Resets the connection: RESP2, no name, not authenticated."),
    spec("select", 2, false, (0, 0, 0), "connection", "Selects database 0, the only one."),
    spec("client", -2, false, (0, 0, 0), "connection", "CLIENT ID | GETNAME | SETNAME name | SETINFO attr value."),
    spec(
        "command",
        -1,
        false,
        (0, 0, 0),
        "server",
        "Describes the commands: COMMAND [COUNT | INFO name… | DOCS [name…]].",
    ),
    spec("info", -1, false, (0, 0, 0), "server", "Sections server, clients, memory and keyspace, for the tenant."),
    spec("config", -2, false, (0, 0, 0), "server", "CONFIG GET pattern: the few settings clients read."),
    spec("dbsize", 1, false, (0, 0, 0), "server", "The number of keys the connection can see."),
    spec("get", 2, false, (1, 1, 1), "string", "Returns a key's value."),
    spec(
        "set",
        -3,
        true,
        (1, 1, 1),
        "string",
        "Stores a value: SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL].",
    ),
    spec("getdel", 2, true, (1, 1, 1), "string", "Returns a key's value and deletes it (Pocket's delete after read)."),
    spec("mget", -2, false, (1, -1, 1), "string", "Returns the values of keys."),
    spec("mset", -3, true, (1, -1, 2), "string", "Stores values of keys, all or none."),
    spec("strlen", 2, false, (1, 1, 1), "string", "Returns the length of a key's value."),
    spec("append", 3, true, (1, 1, 1), "string", "Appends to a key's value."),
    spec("incr", 2, true, (1, 1, 1), "string", "Adds 1 to a key's integer value."),
    spec("incrby", 3, true, (1, 1, 1), "string", "Adds to a key's integer value."),
    spec("decr", 2, true, (1, 1, 1), "string", "Subtracts 1 from a key's integer value."),
    spec("decrby", 3, true, (1, 1, 1), "string", "Subtracts from a key's integer value."),
    spec("del", -2, true, (1, -1, 1), "generic", "Deletes keys."),
    spec("unlink", -2, true, (1, -1, 1), "generic", "Deletes keys (as DEL)."),
    spec("exists", -2, false, (1, -1, 1), "generic", "Counts the keys that exist."),
    spec("type", 2, false, (1, 1, 1), "generic", "Returns string, or none."),
    spec("expire", -3, true, (1, 1, 1), "generic", "Sets a key's time to live in seconds: EXPIRE key s [NX|XX|GT|LT]."),
    spec("pexpire", -3, true, (1, 1, 1), "generic", "Sets a key's time to live in milliseconds."),
    spec("expireat", -3, true, (1, 1, 1), "generic", "Sets a key's expiry as a Unix time in seconds."),
    spec("pexpireat", -3, true, (1, 1, 1), "generic", "Sets a key's expiry as a Unix time in milliseconds."),
    spec("ttl", 2, false, (1, 1, 1), "generic", "Returns a key's time to live in seconds (-1: none, -2: no key)."),
    spec("pttl", 2, false, (1, 1, 1), "generic", "Returns a key's time to live in milliseconds."),
    spec(
        "persist",
        2,
        true,
        (1, 1, 1),
        "generic",
        "Removes a key's time to live (not Pocket's persist: see SFAAS.PERSIST).",
    ),
    spec("keys", 2, false, (0, 0, 0), "generic", "Returns the keys matching a pattern (SCAN does it in steps)."),
    spec(
        "scan",
        -2,
        false,
        (0, 0, 0),
        "generic",
        "Iterates over keys: SCAN cursor [MATCH pattern] [COUNT n] [TYPE string].",
    ),
    spec("sfaas.register", 2, true, (0, 0, 0), "sfaas", "Registers a job (Pocket's register_job)."),
    spec(
        "sfaas.deregister",
        2,
        true,
        (0, 0, 0),
        "sfaas",
        "Deregisters a job: drops its keys but persistent ones; returns its byte-seconds.",
    ),
    spec("sfaas.persist", 2, true, (1, 1, 1), "sfaas", "Marks a job's key to outlive its job (Pocket's persist flag)."),
];

pub(super) fn find(name: &[u8]) -> Option<&'static Spec> {
    let mut lower = [0u8; 24];
    let lower = lower.get_mut(..name.len())?;
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    COMMANDS.iter().find(|spec| spec.name.len() == lower.len() && spec.name.as_bytes() == lower)
}

/// `COMMAND`, `COMMAND COUNT`, `COMMAND INFO name…`, `COMMAND DOCS [name…]`.
pub(super) fn command(args: &[Bytes], out: &mut Out) -> Reply {
    let info = |out: &mut Out, spec: &Spec| {
        out.array(10);
        out.bulk(spec.name.as_bytes());
        out.int(spec.arity as i64);
        let flags: &[&str] = match (spec.write, spec.before_auth) {
            (true, _) => &["write", "denyoom"],
            (false, true) => &["fast", "no-auth"],
            (false, false) => &["readonly", "fast"],
        };
        out.array(flags.len());
        for flag in flags {
            out.simple(flag);
        }
        out.int(spec.keys.0 as i64);
        out.int(spec.keys.1 as i64);
        out.int(spec.keys.2 as i64);
        out.array(1);
        out.simple(&format!("@{}", spec.group));
        out.array(0);
        out.array(0);
        out.array(0);
    };
    let sub = args.first().map(|s| s.to_ascii_uppercase());
    match sub.as_deref() {
        None => {
            out.array(COMMANDS.len());
            for spec in COMMANDS {
                info(out, spec);
            }
        }
        Some(b"COUNT") => out.int(COMMANDS.len() as i64),
        Some(b"INFO") => {
            out.array(args.len() - 1);
            for name in &args[1..] {
                match find(name) {
                    Some(spec) => info(out, spec),
                    None => out.null(),
                }
            }
        }
        Some(b"DOCS") => {
            let specs: Vec<&Spec> = if args.len() == 1 {
                COMMANDS.iter().collect()
            } else {
                args[1..].iter().filter_map(|name| find(name)).collect()
            };
            out.map(specs.len());
            for spec in specs {
                out.bulk(spec.name.as_bytes());
                out.map(3);
                for (key, value) in [("summary", spec.summary), ("since", "1.0.0"), ("group", spec.group)] {
                    out.bulk(key.as_bytes());
                    out.bulk(value.as_bytes());
                }
            }
        }
        Some(_) => return Err(format!("ERR unknown subcommand '{}'. Try COMMAND HELP.", printable(&args[0]))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::COMMANDS;

    #[test]
    fn every_command_has_a_unique_lowercase_name() {
        let mut names: Vec<_> = COMMANDS.iter().map(|c| c.name).collect();
        assert!(names.iter().all(|n| n.chars().all(|c| !c.is_ascii_uppercase())));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len());
    }
}
