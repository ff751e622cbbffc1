//! Entry points for the fuzz targets in `fuzz/` (built by `cargo fuzz`, which sets
//! `--cfg fuzzing`; nothing here is in a normal build). Each runs a parser on arbitrary bytes
//! and what a request does with its result: an `Err` is fine, a panic is a bug.

use crate::flow::{definition, executor, expr, stream};
use crate::function::deployment::FunctionDeployment;

/// A flow definition (YAML or JSON), validated as a deploy validates it, with its `when`
/// conditions evaluated on an input.
pub fn flow(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(definition) = definition::parse(&text) {
        if let Ok(flow) = definition.validate(|name| name != "missing", |name| name != "missing") {
            definition::render_text(&flow);
            definition::render_dot(&flow);
            definition::topological_order(&flow);
        }
    }
}

/// A `when` expression (the first line) evaluated on a JSON input (the rest).
pub fn condition(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (condition, input) = text.split_once('\n').unwrap_or((&text, "{}"));
    if let Ok(condition) = expr::Condition::parse(condition) {
        condition.eval(&executor::as_json(input.as_bytes()));
    }
}

/// A stack file (`stack.yml`), resolved to its deployments.
pub fn stack(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(stack) = crate::stack::parse("stack.yml", &text, None) {
        for function in &stack.functions {
            let _ = function.resolve();
        }
    }
}

/// A `FunctionDeployment` as `POST /system/functions` takes it, resolved to a spec.
pub fn deployment(data: &[u8]) {
    if let Ok(deployment) = serde_json::from_slice::<FunctionDeployment>(data) {
        let _ = deployment.resolve();
    }
}

/// A stream trigger's body, split into JSON lines or CSV records.
pub fn stream_records(data: &[u8]) {
    let body = bytes::Bytes::copy_from_slice(data);
    let _ = stream::split(stream::Format::JsonLines, body.clone());
    let _ = stream::split(stream::Format::Csv { header: bytes::Bytes::new() }, body);
}

/// A connection's bytes as the state store's Redis protocol listener reads them: commands are
/// taken while whole, each takes at least a byte, and every argument is tried as a key and as
/// a `MATCH` pattern.
pub fn resp(data: &[u8]) {
    use crate::redis::resp::{Limits, Parse, Request, parse};
    let limits = Limits { max_args: 64, max_bulk: 4096, max_command: 8192 };
    let mut buf = bytes::BytesMut::from(data);
    let mut request = Request::default();
    loop {
        let before = buf.len();
        match parse(&mut buf, &limits, &mut request) {
            Ok(Parse::Command) => {
                let args = &request.args;
                assert!(buf.len() < before, "a command took no bytes");
                for arg in args {
                    let _ = crate::redis::commands::parse_key(arg);
                    crate::redis::glob::matches(arg, &args[0]);
                }
            }
            Ok(Parse::Incomplete(needed)) => {
                assert!(needed > buf.len(), "incomplete, yet {needed} bytes are there");
                return;
            }
            Err(_) => return,
        }
    }
}
