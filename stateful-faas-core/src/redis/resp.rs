//! RESP, the Redis serialization protocol: requests (arrays of bulk strings, or inline
//! commands) parsed from a connection's buffer under limits, and replies in RESP2 or RESP3.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

/// How large a request may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Arguments of one command (the command's name included).
    pub max_args: usize,
    /// Bytes of one argument.
    pub max_bulk: usize,
    /// Bytes of one whole command, framing included.
    pub max_command: usize,
}

/// Longest inline command (`PING\r\n`, as typed into a terminal), and longest header line.
const MAX_INLINE: usize = 64 << 10;
const MAX_HEADER: usize = 32;

/// What the buffer holds next.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// A whole command, now taken from the buffer into [`Request::args`] (empty for an empty
    /// inline line or `*0`).
    Command,
    /// Not yet a whole command: at least this many bytes from the buffer's start are needed.
    Incomplete(usize),
}

/// A request that breaks the protocol or a limit: answered with `-ERR Protocol error: …`, and
/// the connection is closed (as Redis does), since where the next command starts is unknown.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn protocol(message: impl Into<String>) -> ProtocolError {
    ProtocolError(message.into())
}

/// A connection's last command, in allocations reused from one command to the next.
#[derive(Debug, Default)]
pub struct Request {
    /// The command's name and arguments, each a slice of the connection's buffer.
    pub args: Vec<Bytes>,
    /// Where each argument is in the command's frame, while it is parsed.
    spans: Vec<std::ops::Range<usize>>,
    /// How far an incomplete command was parsed: the next read goes on from there instead of
    /// parsing it again from its start (a command dripped in one argument, or one byte, at a
    /// time would otherwise cost the square of its length).
    resume: Resume,
}

/// Where parsing an incomplete command stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Resume {
    #[default]
    Start,
    /// An array of `count` arguments, whole up to `at` (its spans are in `Request::spans`).
    Array { count: usize, at: usize },
    /// An inline command without its newline in the first `scanned` bytes.
    Inline { scanned: usize },
}

/// Takes the next command from `buf` into `request`, if it is whole.
pub fn parse(buf: &mut BytesMut, limits: &Limits, request: &mut Request) -> Result<Parse, ProtocolError> {
    request.args.clear();
    match buf.first() {
        None => Ok(Parse::Incomplete(1)),
        Some(b'*') => parse_array(buf, limits, request),
        Some(_) => parse_inline(buf, limits, request),
    }
}

/// The integer of a header line at `at` (after its type byte), and where the next line starts.
fn header(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, ProtocolError> {
    let rest = &buf[at.min(buf.len())..];
    let Some(cr) = rest.iter().take(MAX_HEADER).position(|b| *b == b'\r') else {
        return if rest.len() >= MAX_HEADER { Err(protocol("invalid length")) } else { Ok(None) };
    };
    if rest.len() < cr + 2 {
        return Ok(None);
    }
    if rest[cr + 1] != b'\n' {
        return Err(protocol("expected '\\n' after '\\r'"));
    }
    let value = integer(&rest[..cr]).ok_or_else(|| protocol("invalid length"))?;
    Ok(Some((value, at + cr + 2)))
}

/// A header's decimal integer: an optional `-` and at least one digit, nothing else.
fn integer(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: i64 = 0;
    for digit in digits {
        let digit = digit.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(digit as i64)?;
    }
    Some(if negative { -value } else { value })
}

fn parse_array(buf: &mut BytesMut, limits: &Limits, request: &mut Request) -> Result<Parse, ProtocolError> {
    let (count, mut at) = match std::mem::take(&mut request.resume) {
        Resume::Array { count, at } => (count, at),
        _ => {
            let Some((count, at)) = header(buf, 1)? else { return Ok(Parse::Incomplete(buf.len() + 1)) };
            if count <= 0 {
                let _ = buf.split_to(at);
                return Ok(Parse::Command);
            }
            if count as u64 > limits.max_args as u64 {
                return Err(protocol(format!(
                    "invalid multibulk length ({count} arguments; at most {})",
                    limits.max_args
                )));
            }
            request.spans.clear();
            (count as usize, at)
        }
    };
    let spans = &mut request.spans;
    while spans.len() < count {
        // Not whole yet: keep the place (what is parsed stays in `spans`).
        let incomplete = |resume: &mut Resume, needed: usize| {
            *resume = Resume::Array { count, at };
            Ok(Parse::Incomplete(needed))
        };
        match buf.get(at) {
            None => return incomplete(&mut request.resume, at + 1),
            Some(b'$') => {}
            Some(other) => return Err(protocol(format!("expected '$', got '{}'", char::from(*other)))),
        }
        let Some((len, start)) = header(buf, at + 1)? else { return incomplete(&mut request.resume, buf.len() + 1) };
        if len < 0 || len as u64 > limits.max_bulk as u64 {
            return Err(protocol(format!(
                "invalid bulk length ({len} bytes; an argument holds at most {} bytes, --state-max-value-bytes)",
                limits.max_bulk
            )));
        }
        let end = start + len as usize + 2;
        if end > limits.max_command {
            return Err(protocol(format!(
                "a command of more than {} bytes (the largest value and 1 MiB of arguments)",
                limits.max_command
            )));
        }
        if end > buf.len() {
            return incomplete(&mut request.resume, end);
        }
        if &buf[end - 2..end] != b"\r\n" {
            return Err(protocol("expected '\\r\\n' after a bulk string"));
        }
        spans.push(start..end - 2);
        at = end;
    }
    let frame = buf.split_to(at).freeze();
    request.args.extend(spans.drain(..).map(|span| frame.slice(span)));
    Ok(Parse::Command)
}

fn parse_inline(buf: &mut BytesMut, limits: &Limits, request: &mut Request) -> Result<Parse, ProtocolError> {
    let scanned = match std::mem::take(&mut request.resume) {
        Resume::Inline { scanned } => scanned,
        _ => 0,
    };
    let window = &buf[scanned.min(buf.len())..buf.len().min(MAX_INLINE + 1)];
    let Some(newline) = window.iter().position(|b| *b == b'\n').map(|at| scanned + at) else {
        return if buf.len() > MAX_INLINE {
            Err(protocol("too big inline request"))
        } else {
            request.resume = Resume::Inline { scanned: buf.len() };
            Ok(Parse::Incomplete(buf.len() + 1))
        };
    };
    let args = &mut request.args;
    let line = buf.split_to(newline + 1).freeze();
    let text = line.slice(..newline);
    let words = text.split(|b| b.is_ascii_whitespace()).filter(|word| !word.is_empty());
    args.extend(words.map(|word| text.slice_ref(word)));
    if args.len() > limits.max_args {
        return Err(protocol("invalid multibulk length"));
    }
    Ok(Parse::Command)
}

/// Replies of one connection, gathered until they are written: small ones in one buffer,
/// large values as they are (never copied).
#[derive(Debug, Default)]
pub struct Out {
    buf: BytesMut,
    chunks: Vec<Bytes>,
    queued: usize,
    /// RESP3 (after `HELLO 3`): nulls and maps have types of their own.
    pub resp3: bool,
}

/// Values at least this large are written from the store's own buffer.
const ZERO_COPY: usize = 16 << 10;

impl Out {
    pub fn simple(&mut self, text: &str) {
        self.line(b'+', text);
    }

    /// An error reply; its text starts with its code (`ERR`, `WRONGPASS`, `OOM`, …).
    pub fn error(&mut self, text: &str) {
        self.line(b'-', text);
    }

    fn line(&mut self, kind: u8, text: &str) {
        self.buf.put_u8(kind);
        // A reply line may not break: newlines in a message become spaces.
        self.buf.extend(text.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
        self.buf.put_slice(b"\r\n");
    }

    pub fn int(&mut self, value: i64) {
        let _ = write!(self.buf, ":{value}\r\n");
    }

    pub fn ok(&mut self) {
        self.buf.put_slice(b"+OK\r\n");
    }

    pub fn bulk(&mut self, value: &[u8]) {
        let _ = write!(self.buf, "${}\r\n", value.len());
        self.buf.put_slice(value);
        self.buf.put_slice(b"\r\n");
    }

    /// A value of the store, zero-copy when large.
    pub fn value(&mut self, value: &Bytes) {
        if value.len() < ZERO_COPY {
            return self.bulk(value);
        }
        let _ = write!(self.buf, "${}\r\n", value.len());
        self.queued += self.buf.len();
        self.chunks.push(self.buf.split().freeze());
        self.queued += value.len();
        self.chunks.push(value.clone());
        self.buf.put_slice(b"\r\n");
    }

    pub fn null(&mut self) {
        self.buf.put_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }

    pub fn array(&mut self, len: usize) {
        let _ = write!(self.buf, "*{len}\r\n");
    }

    /// A map of `len` pairs (an array of 2 × `len` items in RESP2).
    pub fn map(&mut self, len: usize) {
        if self.resp3 {
            let _ = write!(self.buf, "%{len}\r\n");
        } else {
            self.array(2 * len);
        }
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.queued + self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything waiting, in order; the buffer is empty afterwards.
    pub fn take(&mut self) -> Vec<Bytes> {
        let mut chunks = std::mem::take(&mut self.chunks);
        if !self.buf.is_empty() {
            chunks.push(self.buf.split().freeze());
        }
        self.queued = 0;
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_args: 8, max_bulk: 16, max_command: 64 };

    fn parse_all(input: &[u8]) -> Result<(Vec<Vec<Bytes>>, BytesMut), ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut commands = Vec::new();
        let mut request = Request::default();
        while parse(&mut buf, &LIMITS, &mut request)? == Parse::Command {
            commands.push(request.args.clone());
        }
        Ok((commands, buf))
    }

    #[test]
    fn commands_are_taken_whole_and_pipelined() {
        let (commands, rest) = parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*1\r\n$4\r\nPI").unwrap();
        assert_eq!(commands, [vec![Bytes::from("GET"), Bytes::from("k")], vec![Bytes::from("PING")]]);
        assert_eq!(&rest[..], b"*1\r\n$4\r\nPI");
        let mut buf = rest;
        assert_eq!(parse(&mut buf, &LIMITS, &mut Request::default()).unwrap(), Parse::Incomplete(14));
    }

    #[test]
    fn every_cut_of_a_command_is_incomplete_never_wrong() {
        let command = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva\r\nl\r\n";
        for cut in 0..command.len() {
            let mut buf = BytesMut::from(&command[..cut]);
            assert!(
                matches!(parse(&mut buf, &LIMITS, &mut Request::default()), Ok(Parse::Incomplete(_))),
                "cut at {cut}"
            );
            assert_eq!(buf.len(), cut, "nothing taken at {cut}");
        }
        let (commands, _) = parse_all(command).unwrap();
        assert_eq!(commands[0][2], Bytes::from("va\r\nl"), "values are binary-safe");
    }

    /// A command received a byte at a time, on one connection (one `Request`): the same
    /// commands as received whole, and the parser keeps its place between reads, so what it
    /// has parsed is not parsed again.
    #[test]
    fn a_command_dripped_a_byte_at_a_time_is_parsed_once() {
        let pipeline = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva\r\nl\r\nPING x\r\n*1\r\n$4\r\nPING\r\n";
        let (whole, _) = parse_all(pipeline).unwrap();
        let (mut buf, mut request, mut dripped) = (BytesMut::new(), Request::default(), Vec::new());
        let mut places = Vec::new();
        for byte in pipeline {
            buf.extend_from_slice(&[*byte]);
            while parse(&mut buf, &LIMITS, &mut request).unwrap() == Parse::Command {
                dripped.push(request.args.clone());
            }
            places.push(request.resume);
        }
        assert_eq!(dripped, whole);
        // Once `SET` and `k` are whole (20 bytes in), the parser goes on from the value's header.
        assert!(places.contains(&Resume::Array { count: 3, at: 20 }), "{places:?}");
        assert!(places.contains(&Resume::Inline { scanned: 4 }), "{places:?}");
    }

    #[test]
    fn limits_and_garbage_are_protocol_errors() {
        for bad in [
            &b"*9\r\n"[..],
            b"*1\r\n$17\r\n",
            b"*1\r\n$-2\r\n",
            b"*1\r\n+PING\r\n",
            b"*x\r\n",
            b"*1\r\n$1\r\nab\r\n",
            b"*4\r\n$16\r\n0123456789abcdef\r\n$16\r\n0123456789abcdef\r\n$16\r\n0123456789abcdef\r\n",
            b"*111111111111111111111111111111111111",
            b"*+1\r\n",
            b"*1\r\n$-\r\n",
            b"*1\r\n$ 1\r\n",
            b"*99999999999999999999\r\n",
        ] {
            assert!(parse_all(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut long = BytesMut::from(&vec![b'a'; MAX_INLINE + 1][..]);
        assert!(parse(&mut long, &LIMITS, &mut Request::default()).is_err());
    }

    #[test]
    fn replies_follow_the_protocol_version() {
        let mut out = Out::default();
        out.null();
        out.map(1);
        out.resp3 = true;
        out.null();
        out.map(1);
        out.error("ERR two\r\nlines");
        out.value(&Bytes::from(vec![b'x'; ZERO_COPY]));
        out.int(-3);
        let written: Vec<u8> = out.take().concat();
        let text = String::from_utf8(written).unwrap();
        assert!(text.starts_with("$-1\r\n*2\r\n_\r\n%1\r\n-ERR two  lines\r\n$16384\r\nxxx"), "{text}");
        assert!(text.ends_with("xxx\r\n:-3\r\n"));
        assert!(out.is_empty());
    }
}
