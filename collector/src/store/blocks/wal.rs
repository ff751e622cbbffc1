//! The write-ahead log of spans not yet in a block: numbered segment files of records, one
//! record per write, each `[payload length u32][CRC-32 of the payload u32][payload]` (little
//! endian). A write returns once its record is on disk (`fdatasync`). A crash can leave a torn
//! record at a segment's end: reading stops there, and what came before is intact.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::format::Stored;
use crate::model::SpanRow;

/// Largest record read back (a write is one ingest batch, far smaller).
const MAX_RECORD: usize = 1 << 30;

/// The segment file of number `seq` in `dir`.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// The segments in `dir`, by number.
pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(seq) = name.to_str().and_then(|n| n.strip_suffix(".wal")).and_then(|n| n.parse().ok()) {
            out.push(seq);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A segment being appended to.
pub struct Segment {
    pub seq: u64,
    file: File,
    buffer: Vec<u8>,
}

impl Segment {
    /// Creates segment `seq` in `dir` (and makes its directory entry durable).
    pub fn create(dir: &Path, seq: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create_new(true).append(true).open(segment_path(dir, seq))?;
        File::open(dir)?.sync_all()?;
        Ok(Self { seq, file, buffer: Vec::new() })
    }

    /// Appends one record of `spans`, durably.
    pub fn append(&mut self, spans: &[Stored]) -> std::io::Result<()> {
        self.buffer.clear();
        self.buffer.extend_from_slice(&[0; 8]);
        encode(spans, &mut self.buffer);
        let payload = self.buffer.len() - 8;
        let crc = crc32fast::hash(&self.buffer[8..]);
        self.buffer[..4].copy_from_slice(&(payload as u32).to_le_bytes());
        self.buffer[4..8].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all(&self.buffer)?;
        self.file.sync_data()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode(spans: &[Stored], out: &mut Vec<u8>) {
    out.extend_from_slice(&(spans.len() as u32).to_le_bytes());
    for Stored { span, received_ms } in spans {
        for s in [&span.tenant, &span.trace_id, &span.span_id, &span.name, &span.status_message, &span.service_name] {
            put_str(out, s);
        }
        for s in [&span.attributes, &span.events, &span.links, &span.resource, &span.scope] {
            put_str(out, s);
        }
        match &span.parent_span_id {
            Some(parent) => {
                out.push(1);
                put_str(out, parent);
            }
            None => out.push(0),
        }
        for n in [span.kind, span.start_ns, span.end_ns, span.status_code, *received_ms] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.push(u8::from(span.metered));
    }
}

/// Reads a record's payload back.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn decode(payload: &[u8]) -> Option<Vec<Stored>> {
    let mut r = Reader(payload);
    let count = r.u32()? as usize;
    // Every span takes at least 70 bytes: a count beyond that is not a record of ours.
    let mut out = Vec::with_capacity(count.min(payload.len() / 70));
    for _ in 0..count {
        let [tenant, trace_id, span_id, name, status_message, service_name] =
            [r.string()?, r.string()?, r.string()?, r.string()?, r.string()?, r.string()?];
        let [attributes, events, links, resource, scope] =
            [r.string()?, r.string()?, r.string()?, r.string()?, r.string()?];
        let parent_span_id = match r.take(1)?[0] {
            0 => None,
            _ => Some(r.string()?),
        };
        let [kind, start_ns, end_ns, status_code, received_ms] = [r.i64()?, r.i64()?, r.i64()?, r.i64()?, r.i64()?];
        let metered = r.take(1)?[0] != 0;
        let span = SpanRow {
            tenant,
            trace_id,
            span_id,
            parent_span_id,
            name,
            kind,
            start_ns,
            end_ns,
            status_code,
            status_message,
            service_name,
            attributes,
            events,
            links,
            resource,
            scope,
            metered,
        };
        out.push(Stored { span, received_ms });
    }
    r.0.is_empty().then_some(out)
}

/// Every intact record of a segment file, in order, and whether it ended in a torn or corrupt
/// record (whose bytes, and any after them, are ignored).
pub fn read(path: &Path) -> std::io::Result<(Vec<Vec<Stored>>, bool)> {
    let data = std::fs::read(path)?;
    let (records, end) = parse(&data);
    Ok((records, end < data.len()))
}

/// The whole records of a segment that another process may be appending to, from byte
/// `offset` on, and the offset after the last of them (a record still being written is read
/// the next time).
pub fn read_from(path: &Path, offset: u64) -> std::io::Result<(Vec<Vec<Stored>>, u64)> {
    use std::io::{Read, Seek};
    let mut file = File::open(path)?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let (records, end) = parse(&data);
    Ok((records, offset + end as u64))
}

/// The intact records at the start of `data`, and where they end.
fn parse(data: &[u8]) -> (Vec<Vec<Stored>>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let Some(header) = data.get(at..at + 8) else { break };
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let Some(payload) = data.get(at + 8..at + 8 + len).filter(|_| len <= MAX_RECORD) else { break };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(spans) = decode(payload) else { break };
        records.push(spans);
        at += 8 + len;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(i: i64) -> Stored {
        Stored {
            span: SpanRow {
                tenant: "acme".into(),
                trace_id: format!("{i:032x}"),
                span_id: format!("{i:016x}"),
                parent_span_id: (i % 2 == 0).then(|| "00000000000000ff".into()),
                name: "é op".into(),
                kind: 2,
                start_ns: i,
                end_ns: i + 1,
                status_code: 1,
                status_message: String::new(),
                service_name: "svc".into(),
                attributes: r#"{"a":1}"#.into(),
                events: "[]".into(),
                links: "[]".into(),
                resource: "{}".into(),
                scope: "{}".into(),
                metered: i % 3 == 0,
            },
            received_ms: 7,
        }
    }

    #[test]
    fn records_read_back_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 3).unwrap();
        let a: Vec<Stored> = (1..=3).map(stored).collect();
        let b: Vec<Stored> = (4..=4).map(stored).collect();
        segment.append(&a).unwrap();
        segment.append(&b).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![3]);
        let path = segment_path(dir.path(), 3);
        assert_eq!(read(&path).unwrap(), (vec![a.clone(), b.clone()], false));

        // A crash in the middle of a third record: the first two are intact.
        let whole = std::fs::read(&path).unwrap();
        segment.append(&a).unwrap();
        let with_third = std::fs::read(&path).unwrap();
        for cut in [whole.len() + 3, whole.len() + 8, with_third.len() - 1] {
            std::fs::write(&path, &with_third[..cut]).unwrap();
            assert_eq!(read(&path).unwrap(), (vec![a.clone(), b.clone()], true), "cut at {cut}");
        }
        // A flipped bit is caught by the checksum.
        let mut flipped = with_third.clone();
        flipped[whole.len() + 20] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(read(&path).unwrap(), (vec![a, b], true));
    }
}
