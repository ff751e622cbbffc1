//! The bytes of a segment's records (its `data` column).
//!
//! The format (version 2): `SFU2`, the record count, a dictionary of the functions, periods
//! and plans, then the records, each: usage id, kind (a byte), function (dictionary index),
//! flow run and call id (optional strings), trace and span id, start (delta from the record
//! before), duration, CPU-ms, wall-ms, memory peak, bytes in, bytes out, log bytes, status
//! code, the state byte-seconds as exact decimal text, period and plan (dictionary indexes),
//! and arrival (delta). Version 1 (`SFU1`, written before log bytes were billed) is read too:
//! its records have no log bytes. Integers are zigzag LEB128 varints; strings are a length and UTF-8 bytes; an
//! optional string's length is 0 when absent and length + 1 otherwise.

use std::collections::HashMap;

use rust_decimal::Decimal;

use crate::usage::{Kind, Totals, UsageRecord};
use crate::{BillingError, Result};

const MAGIC: &[u8; 4] = b"SFU2";
/// Segments written before log bytes were billed.
const MAGIC_V1: &[u8; 4] = b"SFU1";

/// A usage record as a segment holds it (its tenant and billed period are the segment's),
/// borrowed from the segment's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stored<'a> {
    pub usage_id: &'a str,
    pub kind: Kind,
    pub function: &'a str,
    pub flow_run: Option<&'a str>,
    pub call_id: Option<&'a str>,
    pub trace_id: &'a str,
    pub span_id: &'a str,
    pub start_ns: i64,
    pub end_ns: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub memory_peak_bytes: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub log_bytes: i64,
    pub status_code: i64,
    /// Exact byte-seconds as decimal text ("0" for records that are not state).
    pub state: &'a str,
    /// The period the usage happened in.
    pub period: &'a str,
    pub plan: &'a str,
    pub received_ms: i64,
}

impl<'a> Stored<'a> {
    /// Billing's order: start, then usage id.
    pub fn order(&self) -> (i64, &'a str) {
        (self.start_ns, self.usage_id)
    }

    pub fn state_decimal(&self) -> Result<Decimal> {
        crate::records::decimal_of(self.state)
    }

    /// The record's sums, as the running totals count it.
    pub fn totals(&self) -> Result<Totals> {
        let invocation = self.kind == Kind::Invocation;
        Ok(Totals {
            records: 1,
            invocations: i64::from(invocation),
            errors: i64::from(invocation && self.status_code >= 500),
            cpu_ms: self.cpu_ms,
            wall_ms: self.wall_ms,
            bytes_out: self.bytes_out,
            log_bytes: self.log_bytes,
            state_byte_seconds: if self.kind == Kind::State { self.state_decimal()? } else { Decimal::ZERO },
        })
    }

    /// The record, owned, with its segment's tenant and billed period.
    pub fn to_record(&self, tenant: &str, billed_period: &str) -> Result<UsageRecord> {
        Ok(UsageRecord {
            tenant: tenant.into(),
            usage_id: self.usage_id.into(),
            kind: self.kind,
            function: self.function.into(),
            flow_run: self.flow_run.map(str::to_owned),
            call_id: self.call_id.map(str::to_owned),
            trace_id: self.trace_id.into(),
            span_id: self.span_id.into(),
            start_ns: self.start_ns,
            end_ns: self.end_ns,
            cpu_ms: self.cpu_ms,
            wall_ms: self.wall_ms,
            memory_peak_bytes: self.memory_peak_bytes,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            log_bytes: self.log_bytes,
            status_code: self.status_code,
            state_byte_seconds: self.state_decimal()?,
            period: self.period.into(),
            billed_period: billed_period.into(),
            plan: self.plan.into(),
            received_ms: self.received_ms,
        })
    }

    /// A record borrowed from an owned one (its tenant and billed period aside).
    pub fn of(record: &'a UsageRecord, state: &'a str) -> Self {
        Stored {
            usage_id: &record.usage_id,
            kind: record.kind,
            function: &record.function,
            flow_run: record.flow_run.as_deref(),
            call_id: record.call_id.as_deref(),
            trace_id: &record.trace_id,
            span_id: &record.span_id,
            start_ns: record.start_ns,
            end_ns: record.end_ns,
            cpu_ms: record.cpu_ms,
            wall_ms: record.wall_ms,
            memory_peak_bytes: record.memory_peak_bytes,
            bytes_in: record.bytes_in,
            bytes_out: record.bytes_out,
            log_bytes: record.log_bytes,
            status_code: record.status_code,
            state,
            period: &record.period,
            plan: &record.plan,
            received_ms: record.received_ms,
        }
    }
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Invocation => 0,
        Kind::State => 1,
        Kind::Instance => 2,
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_int(out: &mut Vec<u8>, value: i64) {
    put_varint(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        None => put_varint(out, 0),
        Some(text) => {
            put_varint(out, text.len() as u64 + 1);
            out.extend_from_slice(text.as_bytes());
        }
    }
}

/// The segment's bytes for `records`, which are in billing's order.
pub fn encode(records: &[Stored<'_>]) -> Vec<u8> {
    let mut words: Vec<&str> = Vec::new();
    let mut index: HashMap<&str, u64> = HashMap::new();
    let mut word = |text| {
        *index.entry(text).or_insert_with(|| {
            words.push(text);
            words.len() as u64 - 1
        })
    };
    let mut rows = Vec::with_capacity(records.len() * 100);
    let (mut start, mut received) = (0i64, 0i64);
    for r in records {
        put_str(&mut rows, r.usage_id);
        rows.push(kind_byte(r.kind));
        put_varint(&mut rows, word(r.function));
        put_opt(&mut rows, r.flow_run);
        put_opt(&mut rows, r.call_id);
        put_str(&mut rows, r.trace_id);
        put_str(&mut rows, r.span_id);
        put_int(&mut rows, r.start_ns.wrapping_sub(start));
        put_int(&mut rows, r.end_ns.wrapping_sub(r.start_ns));
        for figure in [r.cpu_ms, r.wall_ms, r.memory_peak_bytes, r.bytes_in, r.bytes_out, r.log_bytes, r.status_code] {
            put_int(&mut rows, figure);
        }
        put_str(&mut rows, r.state);
        put_varint(&mut rows, word(r.period));
        put_varint(&mut rows, word(r.plan));
        put_int(&mut rows, r.received_ms.wrapping_sub(received));
        (start, received) = (r.start_ns, r.received_ms);
    }
    let mut out = Vec::with_capacity(rows.len() + 64);
    out.extend_from_slice(MAGIC);
    put_varint(&mut out, records.len() as u64);
    put_varint(&mut out, words.len() as u64);
    for w in &words {
        put_str(&mut out, w);
    }
    out.extend_from_slice(&rows);
    out
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

pub(super) fn corrupt(why: &str) -> BillingError {
    BillingError::Corrupt { what: "usage segment", detail: why.to_string() }
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.data.get(self.at).ok_or_else(|| corrupt("it ends inside a number"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(corrupt("a number is too long"))
    }

    fn int(&mut self) -> Result<i64> {
        let raw = self.varint()?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    fn bytes(&mut self, len: u64) -> Result<&'a str> {
        let end = usize::try_from(len).ok().and_then(|len| self.at.checked_add(len));
        let bytes = end.and_then(|end| self.data.get(self.at..end)).ok_or_else(|| corrupt("it ends inside a text"))?;
        self.at += bytes.len();
        std::str::from_utf8(bytes).map_err(|_| corrupt("a text is not UTF-8"))
    }

    fn str(&mut self) -> Result<&'a str> {
        let len = self.varint()?;
        self.bytes(len)
    }

    fn opt(&mut self) -> Result<Option<&'a str>> {
        match self.varint()? {
            0 => Ok(None),
            len => self.bytes(len - 1).map(Some),
        }
    }
}

/// Calls `f` with each record of a segment's bytes, in order.
pub fn each<'a>(data: &'a [u8], mut f: impl FnMut(Stored<'a>) -> Result<()>) -> Result<()> {
    let v1 = match data.get(..4) {
        Some(magic) if magic == MAGIC => false,
        Some(magic) if magic == MAGIC_V1 => true,
        _ => return Err(corrupt("not a usage segment of this version")),
    };
    let mut r = Reader { data, at: 4 };
    let count = r.varint()?;
    let words = (0..r.varint()?).map(|_| r.str()).collect::<Result<Vec<_>>>()?;
    let word = |r: &mut Reader<'a>| -> Result<&'a str> {
        let i = r.varint()?;
        usize::try_from(i)
            .ok()
            .and_then(|i| words.get(i).copied())
            .ok_or_else(|| corrupt("a word is not in its dictionary"))
    };
    let (mut start, mut received) = (0i64, 0i64);
    for _ in 0..count {
        let usage_id = r.str()?;
        let kind = match r.data.get(r.at) {
            Some(0) => Kind::Invocation,
            Some(1) => Kind::State,
            Some(2) => Kind::Instance,
            _ => return Err(corrupt("an unknown kind")),
        };
        r.at += 1;
        let function = word(&mut r)?;
        let (flow_run, call_id) = (r.opt()?, r.opt()?);
        let (trace_id, span_id) = (r.str()?, r.str()?);
        start = start.wrapping_add(r.int()?);
        let end_ns = start.wrapping_add(r.int()?);
        let [cpu_ms, wall_ms, memory_peak_bytes, bytes_in, bytes_out] =
            [r.int()?, r.int()?, r.int()?, r.int()?, r.int()?];
        let log_bytes = if v1 { 0 } else { r.int()? };
        let status_code = r.int()?;
        let state = r.str()?;
        let (period, plan) = (word(&mut r)?, word(&mut r)?);
        received = received.wrapping_add(r.int()?);
        f(Stored {
            usage_id,
            kind,
            function,
            flow_run,
            call_id,
            trace_id,
            span_id,
            start_ns: start,
            end_ns,
            cpu_ms,
            wall_ms,
            memory_peak_bytes,
            bytes_in,
            bytes_out,
            log_bytes,
            status_code,
            state,
            period,
            plan,
            received_ms: received,
        })?;
    }
    if r.at != data.len() {
        return Err(corrupt("bytes after its last record"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> UsageRecord {
        UsageRecord {
            tenant: "acme".into(),
            usage_id: format!("0190b4e2-7c3a-7d2e-9f00-{i:012x}"),
            kind: [Kind::Invocation, Kind::State, Kind::Instance][i % 3],
            function: format!("f{}", i % 4),
            flow_run: i.is_multiple_of(2).then(|| format!("run-{i}")),
            call_id: i.is_multiple_of(5).then(String::new),
            trace_id: format!("{i:032x}"),
            span_id: format!("{i:016x}"),
            start_ns: 1_790_000_000_000_000_000 + (i as i64 % 7) * 1_000 - 3_000,
            end_ns: i64::MAX - i as i64,
            cpu_ms: i as i64,
            wall_ms: i64::MIN + i as i64,
            memory_peak_bytes: 1 << 20,
            bytes_in: 0,
            bytes_out: -1,
            log_bytes: i as i64 * 3,
            status_code: 200,
            state_byte_seconds: Decimal::new(150 + i as i64, 2),
            period: "2026-10".into(),
            billed_period: "2026-11".into(),
            plan: ["free", "pro"][i % 2].into(),
            received_ms: 1_790_000_000_000 - i as i64,
        }
    }

    #[test]
    fn a_segment_gives_back_every_field_of_every_record() {
        let records: Vec<UsageRecord> = (0..300).map(record).collect();
        let states: Vec<String> = records.iter().map(|r| r.state_byte_seconds.to_string()).collect();
        let stored: Vec<Stored> = records.iter().zip(&states).map(|(r, s)| Stored::of(r, s)).collect();
        let bytes = encode(&stored);
        let mut back = Vec::new();
        each(&bytes, |r| {
            back.push(r.to_record("acme", "2026-11")?);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, records);
        // Every cut of the bytes is an error, never a panic or a shorter list.
        for cut in 0..bytes.len() {
            assert!(each(&bytes[..cut], |_| Ok(())).is_err(), "cut at {cut}");
        }
    }

    /// A segment written before log bytes were billed (version 1) reads as it did, with no log
    /// bytes.
    #[test]
    fn a_version_1_segment_reads_without_log_bytes() {
        let r = record(4);
        let mut v1 = MAGIC_V1.to_vec();
        put_varint(&mut v1, 1);
        put_varint(&mut v1, 3);
        for word in [r.function.as_str(), &r.period, &r.plan] {
            put_str(&mut v1, word);
        }
        put_str(&mut v1, &r.usage_id);
        v1.push(kind_byte(r.kind));
        put_varint(&mut v1, 0);
        put_opt(&mut v1, r.flow_run.as_deref());
        put_opt(&mut v1, r.call_id.as_deref());
        put_str(&mut v1, &r.trace_id);
        put_str(&mut v1, &r.span_id);
        put_int(&mut v1, r.start_ns);
        put_int(&mut v1, r.end_ns.wrapping_sub(r.start_ns));
        for figure in [r.cpu_ms, r.wall_ms, r.memory_peak_bytes, r.bytes_in, r.bytes_out, r.status_code] {
            put_int(&mut v1, figure);
        }
        put_str(&mut v1, &r.state_byte_seconds.to_string());
        put_varint(&mut v1, 1);
        put_varint(&mut v1, 2);
        put_int(&mut v1, r.received_ms);
        let mut back = Vec::new();
        each(&v1, |stored| {
            back.push(stored.to_record("acme", "2026-11")?);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, [UsageRecord { log_bytes: 0, ..r }]);
    }
}
