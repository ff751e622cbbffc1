//! A span block on disk: one tenant's spans as a Parquet file (zstd), sorted by service and
//! start time, in row groups of [`ROW_GROUP_ROWS`] with min/max statistics (so that readers
//! skip row groups by service and time) and a bloom filter on the trace id (so that a lookup by
//! id skips nearly every row group that does not hold the trace). Ids are stored as their
//! bytes; every other field as [`SpanRow`] holds it (JSON text for attributes, events, links,
//! resource and scope), so that a block reads back into exactly the rows written.
//!
//! Any tool that reads Parquet reads a block (DuckDB, pandas, parquet-tools).
//!
//! One cohesive thing (about 640 lines beside its tests): the file's schema, its writer and its
//! reader, which must agree column by column.

use std::fs::File;
use std::sync::Arc;

use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, FixedLenByteArray, FixedLenByteArrayType, Int32Type, Int64Type,
};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, RowGroupReader};
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;

use crate::model::SpanRow;
use crate::store::MeteredSpan;

/// Rows per row group: the unit a reader skips or decodes.
pub const ROW_GROUP_ROWS: usize = 4_096;

const SCHEMA: &str = "message span {
    required binary tenant (UTF8);
    required binary service_name (UTF8);
    required int64 start_ns;
    required int64 end_ns;
    required fixed_len_byte_array(16) trace_id;
    required fixed_len_byte_array(8) span_id;
    optional fixed_len_byte_array(8) parent_span_id;
    required binary name (UTF8);
    required int32 kind;
    required int32 status_code;
    required binary status_message (UTF8);
    required binary attributes (UTF8);
    required binary events (UTF8);
    required binary links (UTF8);
    required binary resource (UTF8);
    required binary scope (UTF8);
    required boolean metered;
    required int64 received_ms;
}";

/// Column numbers, in schema order.
mod col {
    pub const TENANT: usize = 0;
    pub const SERVICE: usize = 1;
    pub const START: usize = 2;
    pub const END: usize = 3;
    pub const TRACE: usize = 4;
    pub const SPAN: usize = 5;
    pub const PARENT: usize = 6;
    pub const NAME: usize = 7;
    pub const KIND: usize = 8;
    pub const STATUS_CODE: usize = 9;
    pub const STATUS_MESSAGE: usize = 10;
    pub const ATTRIBUTES: usize = 11;
    pub const EVENTS: usize = 12;
    pub const LINKS: usize = 13;
    pub const RESOURCE: usize = 14;
    pub const SCOPE: usize = 15;
    pub const METERED: usize = 16;
    pub const RECEIVED: usize = 17;
    pub const COUNT: usize = 18;
}

/// A span as a block stores it: the row and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub span: SpanRow,
    pub received_ms: i64,
}

/// Why a block could not be written or read. The message includes the cause's (so the cause
/// is not also given as a `source`, which reports would print twice).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block: {0}")]
    Parquet(parquet::errors::ParquetError),
    #[error("block: {0}")]
    Io(std::io::Error),
    #[error("block {0}: {1}")]
    Corrupt(String, String),
}

impl From<parquet::errors::ParquetError> for BlockError {
    fn from(error: parquet::errors::ParquetError) -> Self {
        BlockError::Parquet(error)
    }
}

impl From<std::io::Error> for BlockError {
    fn from(error: std::io::Error) -> Self {
        BlockError::Io(error)
    }
}

fn id_bytes<const N: usize>(hex_id: &str) -> FixedLenByteArray {
    let mut bytes = [0u8; N];
    // Ids are validated as lowercase hex of this length when they are received.
    let _ = hex::decode_to_slice(hex_id, &mut bytes);
    FixedLenByteArray::from(bytes.to_vec())
}

/// Values as byte arrays that share one buffer (one allocation per column chunk, not per value).
pub(super) fn shared<'a>(values: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<ByteArray> {
    let mut buffer = bytes::BytesMut::with_capacity(values.clone().map(<[u8]>::len).sum());
    let mut ends = Vec::new();
    for value in values {
        buffer.extend_from_slice(value);
        ends.push(buffer.len());
    }
    let buffer = buffer.freeze();
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let value = ByteArray::from(buffer.slice(start..end));
            start = end;
            value
        })
        .collect()
}

/// Hex ids of `N` bytes as fixed-length arrays that share one buffer.
fn shared_ids<'a, const N: usize>(ids: impl Iterator<Item = &'a str>) -> Vec<FixedLenByteArray> {
    let mut buffer = bytes::BytesMut::new();
    let mut count = 0;
    for id in ids {
        let mut bytes = [0u8; N];
        // Ids are validated as lowercase hex of this length when they are received.
        let _ = hex::decode_to_slice(id, &mut bytes);
        buffer.extend_from_slice(&bytes);
        count += 1;
    }
    let buffer = buffer.freeze();
    (0..count).map(|i| FixedLenByteArray::from(ByteArray::from(buffer.slice(i * N..(i + 1) * N)))).collect()
}

fn properties(rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("a valid level")))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // Ids and times are unique or nearly: dictionaries would only cost.
        .set_column_dictionary_enabled(ColumnPath::from("trace_id"), false)
        .set_column_dictionary_enabled(ColumnPath::from("span_id"), false)
        .set_column_dictionary_enabled(ColumnPath::from("parent_span_id"), false)
        .set_column_dictionary_enabled(ColumnPath::from("start_ns"), false)
        .set_column_dictionary_enabled(ColumnPath::from("end_ns"), false)
        // A span's attributes are nearly always its own.
        .set_column_dictionary_enabled(ColumnPath::from("attributes"), false)
        .set_column_bloom_filter_enabled(ColumnPath::from("trace_id"), true)
        .set_column_bloom_filter_fpp(ColumnPath::from("trace_id"), 0.001)
        .set_column_bloom_filter_max_ndv(ColumnPath::from("trace_id"), rows.clamp(1, ROW_GROUP_ROWS) as u64)
        .build()
}

/// Sorts spans into a block's order: service, start, then trace and span id.
pub fn sort(spans: &mut [&Stored]) {
    spans.sort_unstable_by(|a, b| {
        (&a.span.service_name, a.span.start_ns, &a.span.trace_id, &a.span.span_id).cmp(&(
            &b.span.service_name,
            b.span.start_ns,
            &b.span.trace_id,
            &b.span.span_id,
        ))
    });
}

/// Writes `spans` (sorted by [`sort`]) as a block to `file`; returns the bytes written.
pub fn write(file: File, spans: &[&Stored]) -> Result<u64, BlockError> {
    let schema = Arc::new(parse_message_type(SCHEMA)?);
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(properties(spans.len())))?;
    for group in spans.chunks(ROW_GROUP_ROWS) {
        let mut row_group = writer.next_row_group()?;
        let mut column = 0;
        while let Some(mut writer) = row_group.next_column()? {
            let rows = group.iter();
            match column {
                col::START | col::END | col::RECEIVED => {
                    let values: Vec<i64> = rows
                        .map(|s| match column {
                            col::START => s.span.start_ns,
                            col::END => s.span.end_ns,
                            _ => s.received_ms,
                        })
                        .collect();
                    writer.typed::<Int64Type>().write_batch(&values, None, None)?;
                }
                col::KIND | col::STATUS_CODE => {
                    let values: Vec<i32> = rows
                        .map(|s| if column == col::KIND { s.span.kind } else { s.span.status_code } as i32)
                        .collect();
                    writer.typed::<Int32Type>().write_batch(&values, None, None)?;
                }
                col::METERED => {
                    let values: Vec<bool> = rows.map(|s| s.span.metered).collect();
                    writer.typed::<BoolType>().write_batch(&values, None, None)?;
                }
                col::TRACE => {
                    let values = shared_ids::<16>(rows.map(|s| s.span.trace_id.as_str()));
                    writer.typed::<FixedLenByteArrayType>().write_batch(&values, None, None)?;
                }
                col::SPAN => {
                    let values = shared_ids::<8>(rows.map(|s| s.span.span_id.as_str()));
                    writer.typed::<FixedLenByteArrayType>().write_batch(&values, None, None)?;
                }
                col::PARENT => {
                    let defined: Vec<i16> = rows.clone().map(|s| i16::from(s.span.parent_span_id.is_some())).collect();
                    let values = shared_ids::<8>(rows.filter_map(|s| s.span.parent_span_id.as_deref()));
                    writer.typed::<FixedLenByteArrayType>().write_batch(&values, Some(&defined), None)?;
                }
                _ => {
                    let values = shared(rows.map(|s| {
                        let span = &s.span;
                        match column {
                            col::TENANT => &span.tenant,
                            col::SERVICE => &span.service_name,
                            col::NAME => &span.name,
                            col::STATUS_MESSAGE => &span.status_message,
                            col::ATTRIBUTES => &span.attributes,
                            col::EVENTS => &span.events,
                            col::LINKS => &span.links,
                            col::RESOURCE => &span.resource,
                            _ => &span.scope,
                        }
                        .as_bytes()
                    }));
                    writer.typed::<ByteArrayType>().write_batch(&values, None, None)?;
                }
            }
            writer.close()?;
            column += 1;
        }
        row_group.close()?;
    }
    let file = writer.into_inner()?;
    let bytes = file.metadata()?.len();
    file.sync_all()?;
    Ok(bytes)
}

/// What a trace search without tag conditions reads of a span.
pub struct Searched {
    pub tenant: String,
    pub trace_id: String,
    pub name: String,
    pub start_ns: i64,
    pub end_ns: i64,
}

/// Which rows of a block a reader wants.
#[derive(Debug, Default, Clone)]
pub struct Filter<'a> {
    /// Spans of these traces (32 hex digits) only, when there are any.
    pub trace_ids: &'a [&'a str],
    /// Spans of this service only.
    pub service: Option<&'a str>,
    /// Spans that started in `start_ns.0..=start_ns.1`.
    pub start_ns: Option<(i64, i64)>,
    /// Spans that arrived in `(received_ms.0, received_ms.1]`.
    pub received_ms: Option<(i64, i64)>,
    /// Spans whose name starts with this.
    pub name_prefix: Option<&'a str>,
}

impl<'a> Filter<'a> {
    /// The trace ids as a set, for [`Filter::keeps`]: a query may name many traces (a Jaeger
    /// search's, or the missing parents of a dependency graph), and each span is looked up.
    pub fn trace_set(&self) -> std::collections::HashSet<&'a str> {
        self.trace_ids.iter().copied().collect()
    }

    /// Whether a span passes (`traces`: [`Filter::trace_set`]).
    pub fn keeps(&self, s: &Stored, traces: &std::collections::HashSet<&str>) -> bool {
        (traces.is_empty() || traces.contains(s.span.trace_id.as_str()))
            && self.service.is_none_or(|v| s.span.service_name == v)
            && self.start_ns.is_none_or(|(lo, hi)| (lo..=hi).contains(&s.span.start_ns))
            && self.received_ms.is_none_or(|(after, upto)| s.received_ms > after && s.received_ms <= upto)
            && self.name_prefix.is_none_or(|p| s.span.name.starts_with(p))
    }
}

/// A block's file, read with positional reads (`pread`). Parquet's reader for a `File` seeks
/// and reads a clone of it, and clones share one offset: two threads reading one open block at
/// once (a merge and a query, two queries) moved each other's offset and read the wrong bytes
/// ("Data corruption detected", missing Thrift fields).
pub(super) struct BlockFile {
    file: std::sync::Arc<File>,
    len: u64,
}

impl BlockFile {
    pub(super) fn open(path: &std::path::Path) -> Result<Self, BlockError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self { file: std::sync::Arc::new(file), len })
    }
}

/// A read from an offset of a block's file onwards, its position its own.
pub struct ReadAt {
    file: std::sync::Arc<File>,
    at: u64,
}

impl std::io::Read for ReadAt {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(&*self.file, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl parquet::file::reader::Length for BlockFile {
    fn len(&self) -> u64 {
        self.len
    }
}

impl parquet::file::reader::ChunkReader for BlockFile {
    type T = ReadAt;

    fn get_read(&self, start: u64) -> parquet::errors::Result<ReadAt> {
        Ok(ReadAt { file: self.file.clone(), at: start })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        let mut buffer = vec![0; length];
        std::os::unix::fs::FileExt::read_exact_at(&*self.file, &mut buffer, start)?;
        Ok(buffer.into())
    }
}

/// An open block.
pub struct Block {
    path: String,
    reader: SerializedFileReader<BlockFile>,
    /// Each row group's bloom filter of trace ids, read once at open.
    blooms: Vec<Option<parquet::bloom_filter::Sbbf>>,
}

pub(super) fn corrupt(path: &str, what: impl std::fmt::Display) -> BlockError {
    BlockError::Corrupt(path.to_string(), what.to_string())
}

/// The values of one column of a row group.
pub(super) fn column<T: parquet::data_type::DataType>(
    group: &dyn RowGroupReader,
    index: usize,
    rows: usize,
) -> Result<(Vec<T::T>, Vec<i16>), BlockError>
where
    T::T: Default + Clone,
{
    let mut reader = parquet::column::reader::get_typed_column_reader::<T>(group.get_column_reader(index)?);
    let (mut values, mut levels) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    reader.read_records(rows, Some(&mut levels), None, &mut values)?;
    Ok((values, levels))
}

pub(super) fn utf8(value: &ByteArray) -> String {
    String::from_utf8_lossy(value.data()).into_owned()
}

impl Block {
    pub fn open(path: &std::path::Path) -> Result<Self, BlockError> {
        let file = BlockFile::open(path)?;
        let reader = SerializedFileReader::new(BlockFile { file: file.file.clone(), len: file.len })?;
        if reader.metadata().file_metadata().schema_descr().num_columns() != col::COUNT {
            return Err(corrupt(&path.display().to_string(), "not a span block (its columns differ)"));
        }
        let blooms = reader
            .metadata()
            .row_groups()
            .iter()
            .map(|group| parquet::bloom_filter::Sbbf::read_from_column_chunk(group.column(col::TRACE), &file))
            .collect::<Result<_, _>>()?;
        Ok(Self { path: path.display().to_string(), reader, blooms })
    }

    pub fn rows(&self) -> i64 {
        self.reader.metadata().file_metadata().num_rows()
    }

    /// The spans of the block that pass `filter`, in block order.
    pub fn read(&self, filter: &Filter<'_>) -> Result<Vec<Stored>, BlockError> {
        let mut out = Vec::new();
        for g in 0..self.reader.num_row_groups() {
            out.extend(self.read_group(g, filter)?);
        }
        Ok(out)
    }

    /// The row groups with their latest start, the latest first.
    pub fn groups_newest_first(&self) -> Vec<(usize, i64)> {
        use parquet::file::statistics::Statistics;
        let latest = |g: usize| match self.reader.metadata().row_group(g).column(col::START).statistics() {
            Some(Statistics::Int64(s)) => s.max_opt().copied().unwrap_or(i64::MAX),
            _ => i64::MAX,
        };
        let mut groups: Vec<(usize, i64)> = (0..self.reader.num_row_groups()).map(|g| (g, latest(g))).collect();
        groups.sort_by_key(|(_, latest)| std::cmp::Reverse(*latest));
        groups
    }

    /// The spans of row group `g` that pass `filter`, in block order.
    pub fn read_group(&self, g: usize, filter: &Filter<'_>) -> Result<Vec<Stored>, BlockError> {
        let wanted: Vec<FixedLenByteArray> = filter.trace_ids.iter().map(|id| id_bytes::<16>(id)).collect();
        let wanted_set: std::collections::HashSet<&[u8]> = wanted.iter().map(|id| id.data()).collect();
        let mut out = Vec::new();
        {
            if !wanted.is_empty()
                && self
                    .blooms
                    .get(g)
                    .and_then(Option::as_ref)
                    .is_some_and(|bloom| !wanted.iter().any(|id| bloom.check(id)))
            {
                return Ok(out);
            }
            if !self.may_hold(g, filter) {
                return Ok(out);
            }
            let group = self.reader.get_row_group(g)?;
            let rows = group.metadata().num_rows() as usize;
            // The columns filters look at first; the others only for the rows that pass.
            let (services, _) = column::<ByteArrayType>(&*group, col::SERVICE, rows)?;
            let (starts, _) = column::<Int64Type>(&*group, col::START, rows)?;
            let (received, _) = column::<Int64Type>(&*group, col::RECEIVED, rows)?;
            let (traces, _) = column::<FixedLenByteArrayType>(&*group, col::TRACE, rows)?;
            let (names, _) = column::<ByteArrayType>(&*group, col::NAME, rows)?;
            if [services.len(), starts.len(), received.len(), traces.len(), names.len()].iter().any(|n| *n != rows) {
                return Err(corrupt(&self.path, "a column is shorter than its row group"));
            }
            let keep: Vec<usize> = (0..rows)
                .filter(|&i| {
                    (wanted_set.is_empty() || wanted_set.contains(traces[i].data()))
                        && filter.service.is_none_or(|s| services[i].data() == s.as_bytes())
                        && filter.start_ns.is_none_or(|(lo, hi)| (lo..=hi).contains(&starts[i]))
                        && filter.received_ms.is_none_or(|(after, upto)| received[i] > after && received[i] <= upto)
                        && filter.name_prefix.is_none_or(|p| names[i].data().starts_with(p.as_bytes()))
                })
                .collect();
            if keep.is_empty() {
                return Ok(out);
            }
            let (tenants, _) = column::<ByteArrayType>(&*group, col::TENANT, rows)?;
            let (ends, _) = column::<Int64Type>(&*group, col::END, rows)?;
            let (spans, _) = column::<FixedLenByteArrayType>(&*group, col::SPAN, rows)?;
            let (parents, parent_levels) = column::<FixedLenByteArrayType>(&*group, col::PARENT, rows)?;
            let (kinds, _) = column::<Int32Type>(&*group, col::KIND, rows)?;
            let (codes, _) = column::<Int32Type>(&*group, col::STATUS_CODE, rows)?;
            let (messages, _) = column::<ByteArrayType>(&*group, col::STATUS_MESSAGE, rows)?;
            let (attributes, _) = column::<ByteArrayType>(&*group, col::ATTRIBUTES, rows)?;
            let (events, _) = column::<ByteArrayType>(&*group, col::EVENTS, rows)?;
            let (links, _) = column::<ByteArrayType>(&*group, col::LINKS, rows)?;
            let (resources, _) = column::<ByteArrayType>(&*group, col::RESOURCE, rows)?;
            let (scopes, _) = column::<ByteArrayType>(&*group, col::SCOPE, rows)?;
            let (metered, _) = column::<BoolType>(&*group, col::METERED, rows)?;
            let full = [
                tenants.len(),
                ends.len(),
                spans.len(),
                parent_levels.len(),
                kinds.len(),
                codes.len(),
                messages.len(),
                attributes.len(),
                events.len(),
                links.len(),
                resources.len(),
                scopes.len(),
                metered.len(),
            ];
            if full.iter().any(|n| *n != rows) {
                return Err(corrupt(&self.path, "a column is shorter than its row group"));
            }
            // Parents are stored for the rows that have one: their index among those.
            let mut parent_at = Vec::with_capacity(rows);
            let mut next = 0;
            for level in &parent_levels {
                parent_at.push((*level == 1).then(|| {
                    next += 1;
                    next - 1
                }));
            }
            if next != parents.len() {
                return Err(corrupt(&self.path, "parent ids and their levels disagree"));
            }
            for i in keep {
                out.push(Stored {
                    span: SpanRow {
                        tenant: utf8(&tenants[i]),
                        trace_id: crate::receivers::otlp::lower_hex(traces[i].data()),
                        span_id: crate::receivers::otlp::lower_hex(spans[i].data()),
                        parent_span_id: parent_at[i].map(|p| crate::receivers::otlp::lower_hex(parents[p].data())),
                        name: utf8(&names[i]),
                        kind: i64::from(kinds[i]),
                        start_ns: starts[i],
                        end_ns: ends[i],
                        status_code: i64::from(codes[i]),
                        status_message: utf8(&messages[i]),
                        service_name: utf8(&services[i]),
                        attributes: utf8(&attributes[i]),
                        events: utf8(&events[i]),
                        links: utf8(&links[i]),
                        resource: utf8(&resources[i]),
                        scope: utf8(&scopes[i]),
                        metered: metered[i],
                    },
                    received_ms: received[i],
                });
            }
        }
        Ok(out)
    }

    /// What a trace search without tag conditions needs of the spans of row group `g` that
    /// pass `filter` (service and time): (tenant, trace id, name, start, end), five columns
    /// decoded instead of eighteen.
    pub fn search_group(&self, g: usize, filter: &Filter<'_>) -> Result<Vec<Searched>, BlockError> {
        if !self.may_hold(g, filter) {
            return Ok(Vec::new());
        }
        let group = self.reader.get_row_group(g)?;
        let rows = group.metadata().num_rows() as usize;
        let (services, _) = column::<ByteArrayType>(&*group, col::SERVICE, rows)?;
        let (starts, _) = column::<Int64Type>(&*group, col::START, rows)?;
        let keep: Vec<usize> = (0..rows)
            .filter(|&i| {
                services.get(i).is_some_and(|s| filter.service.is_none_or(|want| s.data() == want.as_bytes()))
                    && starts.get(i).is_some_and(|t| filter.start_ns.is_none_or(|(lo, hi)| (lo..=hi).contains(t)))
            })
            .collect();
        if keep.is_empty() {
            return Ok(Vec::new());
        }
        let (tenants, _) = column::<ByteArrayType>(&*group, col::TENANT, rows)?;
        let (traces, _) = column::<FixedLenByteArrayType>(&*group, col::TRACE, rows)?;
        let (names, _) = column::<ByteArrayType>(&*group, col::NAME, rows)?;
        let (ends, _) = column::<Int64Type>(&*group, col::END, rows)?;
        if [tenants.len(), traces.len(), names.len(), ends.len()].iter().any(|n| *n != rows) {
            return Err(corrupt(&self.path, "a column is shorter than its row group"));
        }
        Ok(keep
            .into_iter()
            .map(|i| Searched {
                tenant: utf8(&tenants[i]),
                trace_id: crate::receivers::otlp::lower_hex(traces[i].data()),
                name: utf8(&names[i]),
                start_ns: starts[i],
                end_ns: ends[i],
            })
            .collect())
    }

    /// What billing reads of the metered spans that arrived in `(received.0, received.1]` and
    /// whose name passes `named`: eight columns, the others (events, links, resource, …) not
    /// decoded, and strings copied for those spans only.
    pub fn metered(&self, received: (i64, i64), named: impl Fn(&str) -> bool) -> Result<Vec<MeteredSpan>, BlockError> {
        let filter = Filter { received_ms: Some(received), ..Filter::default() };
        let mut out = Vec::new();
        for g in (0..self.reader.num_row_groups()).filter(|g| self.may_hold(*g, &filter)) {
            let group = self.reader.get_row_group(g)?;
            let rows = group.metadata().num_rows() as usize;
            let (arrived, _) = column::<Int64Type>(&*group, col::RECEIVED, rows)?;
            let (metered, _) = column::<BoolType>(&*group, col::METERED, rows)?;
            let (names, _) = column::<ByteArrayType>(&*group, col::NAME, rows)?;
            if [arrived.len(), metered.len(), names.len()].iter().any(|n| *n != rows) {
                return Err(corrupt(&self.path, "a column is shorter than its row group"));
            }
            let keep: Vec<usize> = (0..rows)
                .filter(|&i| {
                    metered[i]
                        && arrived[i] > received.0
                        && arrived[i] <= received.1
                        && std::str::from_utf8(names[i].data()).is_ok_and(&named)
                })
                .collect();
            if keep.is_empty() {
                continue;
            }
            let (tenants, _) = column::<ByteArrayType>(&*group, col::TENANT, rows)?;
            let (traces, _) = column::<FixedLenByteArrayType>(&*group, col::TRACE, rows)?;
            let (spans, _) = column::<FixedLenByteArrayType>(&*group, col::SPAN, rows)?;
            let (starts, _) = column::<Int64Type>(&*group, col::START, rows)?;
            let (ends, _) = column::<Int64Type>(&*group, col::END, rows)?;
            let (attributes, _) = column::<ByteArrayType>(&*group, col::ATTRIBUTES, rows)?;
            let lengths = [tenants.len(), traces.len(), spans.len(), starts.len(), ends.len(), attributes.len()];
            if lengths.iter().any(|n| *n != rows) {
                return Err(corrupt(&self.path, "a column is shorter than its row group"));
            }
            out.extend(keep.into_iter().map(|i| MeteredSpan {
                tenant: utf8(&tenants[i]),
                trace_id: crate::receivers::otlp::lower_hex(traces[i].data()),
                span_id: crate::receivers::otlp::lower_hex(spans[i].data()),
                name: utf8(&names[i]),
                start_ns: starts[i],
                end_ns: ends[i],
                received_ms: arrived[i],
                attributes: utf8(&attributes[i]),
            }));
        }
        Ok(out)
    }

    /// Whether row group `g` may hold rows that pass `filter`, by its statistics.
    fn may_hold(&self, g: usize, filter: &Filter<'_>) -> bool {
        use parquet::file::statistics::Statistics;
        let group = self.reader.metadata().row_group(g);
        let in_range = |column: usize, lo: i64, hi: i64| match group.column(column).statistics() {
            Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                (Some(min), Some(max)) => *max >= lo && *min <= hi,
                _ => true,
            },
            _ => true,
        };
        if let Some((lo, hi)) = filter.start_ns
            && !in_range(col::START, lo, hi)
        {
            return false;
        }
        if let Some((after, upto)) = filter.received_ms
            && !in_range(col::RECEIVED, after.saturating_add(1), upto)
        {
            return false;
        }
        if let Some(service) = filter.service
            && let Some(Statistics::ByteArray(s)) = group.column(col::SERVICE).statistics()
            && let (Some(min), Some(max)) = (s.min_opt(), s.max_opt())
        {
            return min.data() <= service.as_bytes() && service.as_bytes() <= max.data();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(i: usize) -> Stored {
        Stored {
            span: SpanRow {
                tenant: "acme".into(),
                trace_id: format!("{:032x}", i / 4 + 1),
                span_id: format!("{:016x}", i + 1),
                parent_span_id: (!i.is_multiple_of(4)).then(|| format!("{:016x}", i)),
                name: format!("op{}", i % 3),
                kind: (i % 5) as i64,
                start_ns: 1_700_000_000_000_000_000 + i as i64 * 1000,
                end_ns: 1_700_000_000_000_000_000 + i as i64 * 1000 + 500,
                status_code: (i % 3) as i64,
                status_message: if i.is_multiple_of(7) { "boom".into() } else { String::new() },
                service_name: format!("svc{}", i % 2),
                attributes: format!(r#"{{"i":{i}}}"#),
                events: "[]".into(),
                links: "[]".into(),
                resource: r#"{"service.name":"x"}"#.into(),
                scope: "{}".into(),
                metered: i.is_multiple_of(2),
            },
            received_ms: 1_700_000_000_000 + (i / 100) as i64,
        }
    }

    #[test]
    fn a_block_reads_back_the_rows_written_and_filters_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.parquet");
        let all: Vec<Stored> = (0..150_000).map(stored).collect();
        let mut sorted: Vec<&Stored> = all.iter().collect();
        sort(&mut sorted);
        let bytes = write(File::create(&path).unwrap(), &sorted).unwrap();
        let spans: Vec<Stored> = sorted.into_iter().cloned().collect();
        assert!(bytes > 0);
        let block = Block::open(&path).unwrap();
        assert_eq!(block.rows(), 150_000);
        assert_eq!(block.read(&Filter::default()).unwrap(), spans);

        let trace = format!("{:032x}", 1000);
        let found = block.read(&Filter { trace_ids: &[&trace], ..Filter::default() }).unwrap();
        let expected: Vec<Stored> = spans.iter().filter(|s| s.span.trace_id == trace).cloned().collect();
        assert_eq!((found.len(), &found), (4, &expected));
        assert!(
            block.read(&Filter { trace_ids: &[&format!("{:032x}", 999_999)], ..Filter::default() }).unwrap().is_empty()
        );

        let window = (spans[10].span.start_ns, spans[10].span.start_ns + 10_000);
        let found = block.read(&Filter { service: Some("svc1"), start_ns: Some(window), ..Filter::default() }).unwrap();
        let expected: Vec<Stored> = spans
            .iter()
            .filter(|s| s.span.service_name == "svc1" && (window.0..=window.1).contains(&s.span.start_ns))
            .cloned()
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(found, expected);

        let named = block.read(&Filter { name_prefix: Some("op1"), ..Filter::default() }).unwrap();
        let expected: Vec<Stored> = spans.iter().filter(|s| s.span.name == "op1").cloned().collect();
        assert_eq!((named.len(), &named), (50_000, &expected));

        let arrived =
            block.read(&Filter { received_ms: Some((1_700_000_000_000, 1_700_000_000_002)), ..Filter::default() });
        assert_eq!(arrived.unwrap().len(), 200, "arrivals in (0, 2] ms: two hundred spans");
    }

    /// One open block read by several threads at once (a merge beside a query, two queries):
    /// each gets every row, as a read alone does.
    #[test]
    fn threads_reading_one_open_block_at_once_each_read_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.parquet");
        let all: Vec<Stored> = (0..40_000).map(stored).collect();
        let mut sorted: Vec<&Stored> = all.iter().collect();
        sort(&mut sorted);
        write(File::create(&path).unwrap(), &sorted).unwrap();
        let block = Block::open(&path).unwrap();
        let alone = block.read(&Filter::default()).unwrap();
        assert_eq!(alone.len(), 40_000);
        std::thread::scope(|scope| {
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..5).map(|_| block.read(&Filter::default()).map_err(|e| e.to_string())).collect::<Vec<_>>()
                    })
                })
                .collect();
            for reader in readers {
                for read in reader.join().unwrap() {
                    assert!(read.as_ref() == Ok(&alone), "a concurrent read differs: {:?}", read.map(|r| r.len()));
                }
            }
        });
    }

    #[test]
    fn a_file_that_is_not_a_block_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.parquet");
        std::fs::write(&path, b"PAR1 certainly not parquet PAR1").unwrap();
        assert!(Block::open(&path).is_err());
    }
}
