//! Billing periods: calendar months (the default) or days, in UTC, named by keys that sort in
//! time order (`2026-11`, `2026-11-26`).

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// How long a period is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodKind {
    #[default]
    Month,
    Day,
}

/// A period key that does not name a period of the card's kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("period {key:?}: expected {}, of the years 1970 to 2261", match kind {
    PeriodKind::Month => "YYYY-MM (billing periods are months)",
    PeriodKind::Day => "YYYY-MM-DD (billing periods are days)",
})]
pub struct PeriodError {
    pub key: String,
    pub kind: PeriodKind,
}

/// One period: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    pub kind: PeriodKind,
    start: NaiveDate,
}

impl Period {
    /// The period that contains `ns` (nanoseconds since the epoch).
    pub fn containing(kind: PeriodKind, ns: i64) -> Self {
        let date = DateTime::from_timestamp_nanos(ns).date_naive();
        let start = match kind {
            PeriodKind::Month => date.with_day(1).expect("day 1 exists"),
            PeriodKind::Day => date,
        };
        Self { kind, start }
    }

    /// Parses a key: `YYYY-MM` for months, `YYYY-MM-DD` for days, of the years whose every
    /// instant is a nanosecond count in an `i64` (1970 to 2261).
    pub fn parse(kind: PeriodKind, key: &str) -> Result<Self, PeriodError> {
        let parsed = match kind {
            PeriodKind::Month => {
                NaiveDate::parse_from_str(&format!("{key}-01"), "%Y-%m-%d").ok().filter(|_| key.len() == 7)
            }
            PeriodKind::Day => NaiveDate::parse_from_str(key, "%Y-%m-%d").ok().filter(|_| key.len() == 10),
        };
        let error = PeriodError { key: key.to_string(), kind };
        let start = parsed.ok_or_else(|| error.clone())?;
        if !(1970..=2261).contains(&start.year()) {
            return Err(error);
        }
        Ok(Self { kind, start })
    }

    pub fn key(&self) -> String {
        match self.kind {
            PeriodKind::Month => self.start.format("%Y-%m").to_string(),
            PeriodKind::Day => self.start.format("%Y-%m-%d").to_string(),
        }
    }

    pub fn next(&self) -> Self {
        let start = match self.kind {
            PeriodKind::Month => self.start.checked_add_months(chrono::Months::new(1)).expect("in range"),
            PeriodKind::Day => self.start.succ_opt().expect("in range"),
        };
        Self { kind: self.kind, start }
    }

    pub fn start(&self) -> DateTime<Utc> {
        Utc.from_utc_datetime(&self.start.and_hms_opt(0, 0, 0).expect("midnight"))
    }

    pub fn end(&self) -> DateTime<Utc> {
        self.next().start()
    }

    pub fn start_ns(&self) -> i64 {
        self.start().timestamp_nanos_opt().expect("in range")
    }

    pub fn end_ns(&self) -> i64 {
        self.end().timestamp_nanos_opt().expect("in range")
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// RFC 3339 text of a time in ns, second precision unless it has a fraction.
pub fn rfc3339(ns: i64) -> String {
    DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_days_in_utc() {
        let ns = DateTime::parse_from_rfc3339("2026-11-30T23:59:59.999999999Z").unwrap().timestamp_nanos_opt().unwrap();
        let month = Period::containing(PeriodKind::Month, ns);
        assert_eq!(month.key(), "2026-11");
        assert_eq!(month.next().key(), "2026-12");
        assert_eq!(month.next().next().key(), "2027-01");
        assert_eq!(month.end_ns(), ns + 1);
        let day = Period::containing(PeriodKind::Day, ns);
        assert_eq!(day.key(), "2026-11-30");
        assert_eq!(day.next().key(), "2026-12-01");
        assert_eq!(Period::parse(PeriodKind::Month, "2026-11").unwrap(), month);
        assert!(Period::parse(PeriodKind::Month, "2026-11-01").unwrap_err().to_string().contains("YYYY-MM"));
        assert!(Period::parse(PeriodKind::Day, "2026-13-01").is_err());
        // Every parsed period's bounds are nanosecond counts: a year past 2261 is refused,
        // not a panic where its end is computed.
        for (kind, key) in
            [(PeriodKind::Month, "2261-12"), (PeriodKind::Day, "2261-12-31"), (PeriodKind::Month, "1970-01")]
        {
            let period = Period::parse(kind, key).unwrap();
            assert!(period.start_ns() < period.end_ns());
        }
        for (kind, key) in
            [(PeriodKind::Month, "2262-04"), (PeriodKind::Month, "9999-12"), (PeriodKind::Day, "1969-12-31")]
        {
            assert!(Period::parse(kind, key).unwrap_err().to_string().contains("1970 to 2261"), "{key}");
        }
        assert_eq!(rfc3339(month.start_ns()), "2026-11-01T00:00:00Z");
    }
}
