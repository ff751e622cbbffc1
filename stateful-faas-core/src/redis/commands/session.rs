//! The connection's own commands: `AUTH`, `HELLO` and `CLIENT`.

use bytes::Bytes;

use super::{Access, Auth, REDIS_VERSION, Reply, Session, printable, syntax};
use crate::redis::Server;
use crate::redis::resp::Out;
use crate::tenant::{Principal, Scope, TenantId, hash_token};

/// `AUTH [tenant] token`: the tenant named must be the token's (or any, for the admin's).
pub(super) fn auth<'s>(server: &'s Server, session: &mut Session<'s>, args: &[Bytes]) -> Reply {
    let (user, token) = match args {
        [token] => (None, token),
        [user, token] => (Some(user), token),
        _ => return Err(syntax()),
    };
    let wrong = || "WRONGPASS invalid username-password pair or user is disabled.".to_string();
    let user = match user.map(|u| std::str::from_utf8(u)) {
        None => None,
        Some(Ok("default")) => None,
        Some(Ok(user)) => Some(user),
        Some(Err(_)) => return Err(wrong()),
    };
    let token = std::str::from_utf8(token).map_err(|_| wrong())?;
    let token_hash = hash_token(token);
    let revocations = server.tenants.revocations();
    let principal = server.tenants.authenticate_hash(&token_hash).ok_or_else(wrong)?;
    let (tenant, access) = match principal {
        Principal::Admin => {
            let user = user.ok_or_else(|| {
                "WRONGPASS the admin token acts for a tenant: AUTH tenant token (or redis://tenant:token@…)".to_string()
            })?;
            (TenantId::new(user).map_err(|_| wrong())?, Access::Full)
        }
        Principal::Tenant { tenant, scope } => {
            let access = match scope {
                Scope::Ingest => Access::Full,
                Scope::Read => Access::Read,
                Scope::Admin | Scope::Meter => return Err(wrong()),
            };
            (tenant, access)
        }
        Principal::Function { tenant, job } => (tenant, Access::Function { job }),
        Principal::Meter => return Err(wrong()),
    };
    if user.is_some_and(|user| user != tenant.as_str()) {
        return Err(wrong());
    }
    // The connection's old tenant slot is given back first: re-authenticating as the same
    // tenant at its limit must not fail.
    session.auth = None;
    let slot = server.admit(&tenant).ok_or_else(|| {
        format!(
            "ERR max number of clients reached for tenant {tenant} ({} connections)",
            server.config.max_clients_per_tenant
        )
    })?;
    let tenant = server.state.handle(&tenant);
    session.auth = Some(Auth { tenant, access, token_hash, revocations, slot });
    Ok(())
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
pub(super) fn hello<'s>(server: &'s Server, session: &mut Session<'s>, args: &[Bytes], out: &mut Out) -> Reply {
    let mut resp3 = out.resp3;
    let mut rest = args;
    if let Some(version) = rest.first() {
        resp3 = match &version[..] {
            b"2" => false,
            b"3" => true,
            _ => return Err("NOPROTO unsupported protocol version".into()),
        };
        rest = &rest[1..];
    }
    let mut name = None;
    while let Some(option) = rest.first() {
        if option.eq_ignore_ascii_case(b"AUTH") && rest.len() >= 3 {
            auth(server, session, &rest[1..3])?;
            rest = &rest[3..];
        } else if option.eq_ignore_ascii_case(b"SETNAME") && rest.len() >= 2 {
            name = Some(client_name(&rest[1])?);
            rest = &rest[2..];
        } else {
            return Err(format!("ERR Syntax error in HELLO option '{}'", printable(option)));
        }
    }
    if session.auth.is_none() {
        return Err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into());
    }
    if let Some(name) = name {
        session.name = name;
    }
    out.resp3 = resp3;
    out.map(7);
    for (key, value) in [("server", "redis"), ("version", REDIS_VERSION)] {
        out.bulk(key.as_bytes());
        out.bulk(value.as_bytes());
    }
    out.bulk(b"proto");
    out.int(if resp3 { 3 } else { 2 });
    out.bulk(b"id");
    out.int(session.id as i64);
    for (key, value) in [("mode", "standalone"), ("role", "master")] {
        out.bulk(key.as_bytes());
        out.bulk(value.as_bytes());
    }
    out.bulk(b"modules");
    out.array(0);
    Ok(())
}

/// A client name: no spaces or newlines, as Redis requires; empty clears it.
pub(super) fn client_name(name: &[u8]) -> Result<Option<String>, String> {
    if name.iter().any(|b| *b <= b' ' || *b > b'~') {
        return Err("ERR Client names cannot contain spaces, newlines or special characters.".into());
    }
    Ok((!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned()))
}

/// `CLIENT …`: the subcommands clients send on connecting, and the name.
pub(super) fn client(session: &mut Session<'_>, args: &[Bytes], out: &mut Out) -> Reply {
    let sub = args[0].to_ascii_uppercase();
    match (&sub[..], args.len()) {
        (b"ID", 1) => out.int(session.id as i64),
        (b"GETNAME", 1) => match &session.name {
            Some(name) => out.bulk(name.as_bytes()),
            None => out.null(),
        },
        (b"SETNAME", 2) => {
            session.name = client_name(&args[1])?;
            out.ok();
        }
        // Library name and version (redis-py, …): accepted, not kept.
        (b"SETINFO", 3) | (b"NO-EVICT", 2) | (b"NO-TOUCH", 2) => out.ok(),
        (b"ID" | b"GETNAME" | b"SETNAME" | b"SETINFO" | b"NO-EVICT" | b"NO-TOUCH", _) => {
            return Err(format!(
                "ERR wrong number of arguments for 'client|{}' command",
                printable(&sub).to_lowercase()
            ));
        }
        _ => return Err(format!("ERR unknown subcommand '{}'. Try CLIENT HELP.", printable(&args[0]))),
    }
    Ok(())
}
