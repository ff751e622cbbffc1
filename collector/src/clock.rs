//! The time "now" that stored results depend on: when the store received a row, which billing
//! periods are over and final, what retention deletes, up to when the dashboard's series run.
//! Everything that decides by "now" reads one [`Clock`], handed out by the telemetry store,
//! so a test (or an operator replaying a past month) sets the date once for every component.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Wall-clock time in nanoseconds since the Unix epoch: the system's, shifted by an offset
/// that [`Clock::set`] moves. It keeps ticking at the system's rate, so waits and timeouts
/// measured against it still pass; clones share the offset.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ns: Arc<AtomicI64>,
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that reads `now_ns` now and ticks on from there.
    pub fn starting_at(now_ns: i64) -> Self {
        let clock = Self::default();
        clock.set(now_ns);
        clock
    }

    /// Moves this clock, and every clone of it, so that it reads `now_ns` now.
    pub fn set(&self, now_ns: i64) {
        self.offset_ns.store(now_ns.saturating_sub(system_ns()), Ordering::SeqCst);
    }

    /// Nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> i64 {
        system_ns().saturating_add(self.offset_ns.load(Ordering::SeqCst))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.now_ns().div_euclid(1_000_000)
    }
}

fn system_ns() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_clock_reads_its_time_in_every_clone_and_ticks_on() {
        let clock = Clock::system();
        let shared = clock.clone();
        let at = 1_790_000_000_000_000_000; // 2026-09-21
        clock.set(at);
        let read = shared.now_ns();
        assert!((at..at + 60_000_000_000).contains(&read), "{read}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(shared.now_ns() > read);
        assert_eq!(Clock::starting_at(at).now_ms() / 60_000, at / 60_000_000_000);
        let system = Clock::system().now_ns();
        assert!((system - system_ns()).abs() < 60_000_000_000);
    }
}
