//! What a managed server writes to its stdout and stderr: lines read from its pipes by a thread
//! of the gateway's and logged under its tenant, function and instance. The server never holds
//! the gateway's own descriptors (it could flood, forge or truncate the gateway's log), a line
//! is cut at [`MAX_LINE`], and past [`LINES_PER_SECOND`] lines a tenant (all its servers'
//! streams together) they are counted and dropped: the server never waits on the log, and the
//! log never grows faster than that per tenant, however many instances it runs.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Longest line logged; the rest of a longer one is dropped (and the line marked).
pub const MAX_LINE: usize = 4096;
/// Lines a tenant's servers may log a second, together (on average; a burst of ten seconds'
/// worth at once).
pub const LINES_PER_SECOND: f64 = 100.0;

/// Where an invocation's output lines go as its tenant's logs (the telemetry's function logs
/// implement it).
pub trait LogSink: Send + Sync {
    /// One line of `stream` (`stdout`/`stderr`), cut at [`MAX_LINE`] when `cut`; `false` when
    /// it was dropped.
    fn line(&self, stream: &'static str, text: &str, cut: bool) -> bool;
    /// The same invocation's lines, written by managed instance `instance`.
    fn of_instance(&self, instance: &str) -> Arc<dyn LogSink>;
    /// Lines of the same function and instance outside any invocation.
    fn between_invocations(&self) -> Arc<dyn LogSink>;
}

/// Where a managed instance's lines go now: the invocation it serves, the last one's function
/// and instance between invocations, or, before its first, the gateway's own log.
#[derive(Default)]
pub struct LogSlot(Mutex<Option<Arc<dyn LogSink>>>);

impl LogSlot {
    pub fn set(&self, sink: Arc<dyn LogSink>) {
        *self.0.lock().unwrap() = Some(sink);
    }

    fn current(&self) -> Option<Arc<dyn LogSink>> {
        self.0.lock().unwrap().clone()
    }
}

/// Lines a tenant's functions may export as their logs a second, together (a burst of ten
/// seconds' worth at once); their bytes a day are bounded too
/// ([`crate::telemetry::logs::FunctionLogs`]).
pub const EXPORTED_LINES_PER_SECOND: f64 = 2000.0;

/// What a tenant may still log now (a token bucket of lines).
#[derive(Debug)]
pub(crate) struct Budget {
    tokens: f64,
    refilled: Option<Instant>,
    rate: f64,
}

impl Budget {
    fn new(rate: f64) -> Self {
        Self { tokens: 10.0 * rate, refilled: None, rate }
    }

    /// Takes one line's token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = self.refilled.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.tokens = (self.tokens + elapsed * self.rate).min(10.0 * self.rate);
        self.refilled = Some(self.refilled.map_or(now, |at| at.max(now)));
        let taken = self.tokens >= 1.0;
        if taken {
            self.tokens -= 1.0;
        }
        taken
    }
}

/// Each tenant's budget of lines at `rate` a second, shared by all its functions' streams
/// (tenants are few; the rates two: [`LINES_PER_SECOND`] for the gateway's own log,
/// [`EXPORTED_LINES_PER_SECOND`] for exported logs).
pub(crate) fn budget_of(tenant: &str, rate: f64) -> Arc<Mutex<Budget>> {
    type Budgets = HashMap<(String, u64), Arc<Mutex<Budget>>>;
    static BUDGETS: LazyLock<Mutex<Budgets>> = LazyLock::new(Mutex::default);
    let mut budgets = BUDGETS.lock().unwrap();
    budgets
        .entry((tenant.to_string(), rate.to_bits()))
        .or_insert_with(|| Arc::new(Mutex::new(Budget::new(rate))))
        .clone()
}

/// Passes on the lines of `stream` (`"stdout"` or `"stderr"`) read from `fd` until its
/// writers close it, on a thread of its own: to the tenant's logs through `slot` (within
/// [`EXPORTED_LINES_PER_SECOND`]), or to the gateway's log while it holds no sink (within
/// [`LINES_PER_SECOND`] too).
pub fn forward(
    fd: OwnedFd,
    stream: &'static str,
    tenant: String,
    function: String,
    instance: String,
    slot: Arc<LogSlot>,
) {
    let spawned = std::thread::Builder::new().name("sfaas-output".into()).stack_size(64 << 10).spawn(move || {
        let gateway_log = budget_of(&tenant, LINES_PER_SECOND);
        let mut lines = Lines::new(budget_of(&tenant, EXPORTED_LINES_PER_SECOND), |text: &str, cut: bool, dropped: u64| {
            if dropped > 0 {
                tracing::debug!(%tenant, function, instance, stream, dropped, "a managed server's lines were dropped (over the line rate)");
            }
            if let Some(sink) = slot.current() {
                sink.line(stream, text, cut);
            } else if gateway_log.lock().unwrap().take(Instant::now()) {
                let cut = if cut { " [cut]" } else { "" };
                tracing::info!(%tenant, function, instance, stream, "{text}{cut}");
            }
        });
        let mut file = std::fs::File::from(fd);
        let mut buffer = vec![0u8; 64 << 10];
        let mut pace = Pace::default();
        while let Ok(n) = file.read(&mut buffer) {
            if n == 0 {
                break;
            }
            let now = Instant::now();
            lines.feed(&buffer[..n], now);
            if let Some(pause) = pace.after_read(now) {
                std::thread::sleep(pause);
            }
        }
        lines.finish(Instant::now());
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "a managed server's output cannot be read: it is discarded");
    }
}

/// Reads past this many in a second make a stream busy.
const BUSY_READS: u32 = 100;
/// The pause after each read of a busy stream.
const BUSY_PAUSE: Duration = Duration::from_millis(5);

/// The pace of a process's output reads: past [`BUSY_READS`] reads in a second, each read is
/// followed by [`BUSY_PAUSE`], so that a process writing a line a write (Python's stderr does,
/// to a pipe) is read a pipe's worth at a time rather than with a wakeup a line (a flood of
/// 200 000 lines a second took a core of the gateway). A busy writer then writes at most a
/// pipe (64 KiB) a pause, 13 MB a second, far above what its tenant may export; past that its
/// writes wait, and it runs on.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    window: Option<Instant>,
    reads: u32,
}

impl Pace {
    /// After a read at `now`: how long to wait before the next.
    pub(crate) fn after_read(&mut self, now: Instant) -> Option<Duration> {
        if self.window.is_none_or(|window| now.saturating_duration_since(window) >= Duration::from_secs(1)) {
            self.window = Some(now);
            self.reads = 0;
        }
        self.reads += 1;
        (self.reads > BUSY_READS).then_some(BUSY_PAUSE)
    }
}

/// Splits bytes into lines, cut at [`MAX_LINE`], and passes them on as the tenant's
/// [`Budget`] allows, with the count of those dropped before each.
pub(crate) struct Lines<F: FnMut(&str, bool, u64)> {
    line: Vec<u8>,
    cut: bool,
    budget: Arc<Mutex<Budget>>,
    dropped: u64,
    emit: F,
}

impl<F: FnMut(&str, bool, u64)> Lines<F> {
    pub(crate) fn new(budget: Arc<Mutex<Budget>>, emit: F) -> Self {
        Self { line: Vec::new(), cut: false, budget, dropped: 0, emit }
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8], now: Instant) {
        while !bytes.is_empty() {
            let end = memchr::memchr(b'\n', bytes);
            let part = &bytes[..end.unwrap_or(bytes.len())];
            let room = MAX_LINE - self.line.len();
            self.line.extend_from_slice(&part[..part.len().min(room)]);
            self.cut |= part.len() > room;
            match end {
                Some(at) => {
                    self.end_line(now);
                    bytes = &bytes[at + 1..];
                }
                None => break,
            }
        }
    }

    pub(crate) fn finish(&mut self, now: Instant) {
        if !self.line.is_empty() {
            self.end_line(now);
        }
    }

    fn end_line(&mut self, now: Instant) {
        if self.budget.lock().unwrap().take(now) {
            let text = String::from_utf8_lossy(&self.line);
            (self.emit)(text.trim_end_matches('\r'), self.cut, std::mem::take(&mut self.dropped));
        } else {
            self.dropped += 1;
        }
        self.line.clear();
        self.cut = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_stream_is_read_at_a_pace() {
        let mut pace = Pace::default();
        let start = Instant::now();
        for _ in 0..BUSY_READS {
            assert_eq!(pace.after_read(start), None);
        }
        assert_eq!(pace.after_read(start), Some(BUSY_PAUSE));
        // A new second: the count starts again.
        assert_eq!(pace.after_read(start + Duration::from_secs(1)), None);
    }

    #[test]
    fn lines_are_cut_split_across_reads_and_held_to_their_rate() {
        let mut seen = Vec::new();
        let start = Instant::now();
        let budget = Arc::new(Mutex::new(Budget::new(LINES_PER_SECOND)));
        let mut lines =
            Lines::new(budget.clone(), |text: &str, cut: bool, dropped: u64| seen.push((text.len(), cut, dropped)));
        lines.feed(b"one\r\ntw", start);
        lines.feed(b"o\n", start);
        lines.feed(&vec![b'x'; 3 * MAX_LINE], start);
        lines.feed(b"\n", start);
        // A flood at one instant: the burst passes, the rest is dropped and counted.
        for _ in 0..2000 {
            lines.feed(b"flood\n", start);
        }
        // A second later, a second's worth more.
        lines.feed(b"later\n", start + std::time::Duration::from_secs(1));
        lines.finish(start + std::time::Duration::from_secs(1));
        drop(lines);
        assert_eq!(&seen[..3], &[(3, false, 0), (3, false, 0), (MAX_LINE, true, 0)]);
        let burst = 10 * LINES_PER_SECOND as usize;
        assert_eq!(seen.len(), burst + 1, "the burst, and the line a second later");
        assert_eq!(seen.last(), Some(&(5, false, 2000 - (burst - 3) as u64)));

        // Another stream of the same tenant (another instance, say) shares what is left: what
        // two seconds since the burst gave back, not a burst of its own.
        let mut more = 0;
        let mut other = Lines::new(budget, |_: &str, _: bool, _: u64| more += 1);
        for _ in 0..2000 {
            other.feed(
                b"flood
",
                start + std::time::Duration::from_secs(2),
            );
        }
        drop(other);
        assert_eq!(more, 2 * LINES_PER_SECOND as usize - 1, "two seconds' worth, less the line at 1 s");
    }
}
