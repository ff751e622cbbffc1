//! A log block on disk: one tenant's log records as a Parquet file (zstd), sorted by time and
//! record hash, in row groups of [`LOG_GROUP_ROWS`] with min/max statistics, so that readers
//! skip row groups by time and read the rest newest or oldest first. Every field is stored as
//! [`LogRow`] holds it (JSON text for attributes and resource), so that a block reads back
//! into exactly the rows written; a function record's name, instance and stream are also
//! stored as columns of their own (from its attributes), which readers filter and group by
//! without parsing JSON.
//!
//! Any tool that reads Parquet reads a block (DuckDB, pandas, parquet-tools).

use std::fs::File;
use std::sync::Arc;

use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;

use super::format::{BlockError, BlockFile, column, corrupt, shared, utf8};
use crate::model::LogRow;

/// Rows per row group: the unit a reader skips or decodes.
pub const LOG_GROUP_ROWS: usize = 8_192;

const SCHEMA: &str = "message log {
    required binary tenant (UTF8);
    required int64 ts_ns;
    required binary record_hash (UTF8);
    required int64 received_ms;
    required boolean metered;
    optional binary function (UTF8);
    optional binary instance (UTF8);
    optional binary iostream (UTF8);
    required int64 severity_number;
    required binary severity_text (UTF8);
    required binary body (UTF8);
    required binary attributes (UTF8);
    required binary resource (UTF8);
    optional binary trace_id (UTF8);
    optional binary span_id (UTF8);
}";

/// Column numbers, in schema order.
mod col {
    pub const TENANT: usize = 0;
    pub const TS: usize = 1;
    pub const HASH: usize = 2;
    pub const RECEIVED: usize = 3;
    pub const METERED: usize = 4;
    pub const FUNCTION: usize = 5;
    pub const INSTANCE: usize = 6;
    pub const IOSTREAM: usize = 7;
    pub const SEVERITY_NUMBER: usize = 8;
    pub const SEVERITY_TEXT: usize = 9;
    pub const BODY: usize = 10;
    pub const ATTRIBUTES: usize = 11;
    pub const RESOURCE: usize = 12;
    pub const TRACE: usize = 13;
    pub const SPAN: usize = 14;
    pub const COUNT: usize = 15;
}

/// A log record as a block stores it: the row, when it arrived, and what its attributes say of
/// the function it came from (a metered record's).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLog {
    pub row: LogRow,
    pub received_ms: i64,
    pub function: Option<String>,
    pub instance: Option<String>,
    pub iostream: Option<String>,
}

impl StoredLog {
    /// A row as stored, its function's fields read from its attributes (a metered record's).
    pub fn new(row: LogRow, received_ms: i64) -> Self {
        let function =
            if row.metered { FunctionAttributes::of(&row.attributes) } else { FunctionAttributes::default() };
        Self { row, received_ms, function: function.name, instance: function.instance, iostream: function.iostream }
    }
}

/// What the gateway writes in a function line's attributes (the others are skipped).
#[derive(serde::Deserialize, Default)]
pub(crate) struct FunctionAttributes {
    #[serde(rename = "faas.name")]
    pub name: Option<String>,
    #[serde(rename = "faas.instance")]
    pub instance: Option<String>,
    #[serde(rename = "log.iostream")]
    pub iostream: Option<String>,
    #[serde(rename = "faas.invocation_id")]
    pub invocation_id: Option<String>,
    #[serde(rename = "sfaas.call_id")]
    pub call_id: Option<String>,
}

impl FunctionAttributes {
    /// A record's attributes (JSON text) as a function line's; none of them if not an object.
    pub(crate) fn of(attributes: &str) -> Self {
        serde_json::from_str(attributes).unwrap_or_default()
    }
}

fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("a valid level")))
        .set_max_row_group_row_count(Some(LOG_GROUP_ROWS))
        // Unique or nearly: dictionaries would only cost.
        .set_column_dictionary_enabled(ColumnPath::from("ts_ns"), false)
        .set_column_dictionary_enabled(ColumnPath::from("record_hash"), false)
        .set_column_dictionary_enabled(ColumnPath::from("attributes"), false)
        .set_column_dictionary_enabled(ColumnPath::from("trace_id"), false)
        .set_column_dictionary_enabled(ColumnPath::from("span_id"), false)
        .build()
}

/// Sorts records into a block's order: time, then record hash (a scan's order).
pub fn sort(logs: &mut [StoredLog]) {
    logs.sort_unstable_by(|a, b| (a.row.ts_ns, &a.row.record_hash).cmp(&(b.row.ts_ns, &b.row.record_hash)));
}

/// Writes `logs` (sorted by [`sort`]) as a block to `file`, durably; returns the bytes written.
pub fn write(file: File, logs: &[StoredLog]) -> Result<u64, BlockError> {
    let schema = Arc::new(parse_message_type(SCHEMA)?);
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(properties()))?;
    for group in logs.chunks(LOG_GROUP_ROWS) {
        let mut row_group = writer.next_row_group()?;
        let mut column = 0;
        while let Some(mut writer) = row_group.next_column()? {
            let rows = group.iter();
            match column {
                col::TS | col::RECEIVED | col::SEVERITY_NUMBER => {
                    let values: Vec<i64> = rows
                        .map(|s| match column {
                            col::TS => s.row.ts_ns,
                            col::RECEIVED => s.received_ms,
                            _ => s.row.severity_number,
                        })
                        .collect();
                    writer.typed::<Int64Type>().write_batch(&values, None, None)?;
                }
                col::METERED => {
                    let values: Vec<bool> = rows.map(|s| s.row.metered).collect();
                    writer.typed::<BoolType>().write_batch(&values, None, None)?;
                }
                col::FUNCTION | col::INSTANCE | col::IOSTREAM | col::TRACE | col::SPAN => {
                    fn field(s: &StoredLog, column: usize) -> Option<&String> {
                        match column {
                            col::FUNCTION => s.function.as_ref(),
                            col::INSTANCE => s.instance.as_ref(),
                            col::IOSTREAM => s.iostream.as_ref(),
                            col::TRACE => s.row.trace_id.as_ref(),
                            _ => s.row.span_id.as_ref(),
                        }
                    }
                    let defined: Vec<i16> = rows.clone().map(|s| i16::from(field(s, column).is_some())).collect();
                    let values = shared(rows.filter_map(|s| field(s, column).map(String::as_bytes)));
                    writer.typed::<ByteArrayType>().write_batch(&values, Some(&defined), None)?;
                }
                _ => {
                    let values = shared(rows.map(|s| {
                        let row = &s.row;
                        match column {
                            col::TENANT => &row.tenant,
                            col::HASH => &row.record_hash,
                            col::SEVERITY_TEXT => &row.severity_text,
                            col::BODY => &row.body,
                            col::ATTRIBUTES => &row.attributes,
                            _ => &row.resource,
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

/// Which rows of a log block a reader wants: what is decided before a row is decoded whole.
#[derive(Debug, Default, Clone)]
pub struct LogFilter<'a> {
    /// Records dated in `[ts_ns.0, ts_ns.1)`.
    pub ts_ns: (i64, i64),
    /// Only the platform's records of functions (`true`) or only the tenant's own (`false`).
    pub metered: Option<bool>,
    /// Only this function's.
    pub function: Option<&'a str>,
    /// Only records whose body contains each of these.
    pub contains: &'a [String],
    /// Only records that arrived at or after this time (ms).
    pub received_from_ms: Option<i64>,
    /// Only records of this trace.
    pub trace_id: Option<&'a str>,
}

/// An open log block.
pub struct LogBlock {
    path: String,
    reader: SerializedFileReader<BlockFile>,
}

/// A row group's place and time range.
#[derive(Debug, Clone, Copy)]
pub struct LogGroup {
    pub index: usize,
    pub min_ts_ns: i64,
    pub max_ts_ns: i64,
}

impl LogBlock {
    pub fn open(path: &std::path::Path) -> Result<Self, BlockError> {
        let file = BlockFile::open(path)?;
        let reader = SerializedFileReader::new(file)?;
        if reader.metadata().file_metadata().schema_descr().num_columns() != col::COUNT {
            return Err(corrupt(&path.display().to_string(), "not a log block (its columns differ)"));
        }
        Ok(Self { path: path.display().to_string(), reader })
    }

    /// The row groups with their time ranges, in block (time) order.
    pub fn groups(&self) -> Vec<LogGroup> {
        use parquet::file::statistics::Statistics;
        (0..self.reader.num_row_groups())
            .map(|g| {
                let (min, max) = match self.reader.metadata().row_group(g).column(col::TS).statistics() {
                    Some(Statistics::Int64(s)) => {
                        (s.min_opt().copied().unwrap_or(i64::MIN), s.max_opt().copied().unwrap_or(i64::MAX))
                    }
                    _ => (i64::MIN, i64::MAX),
                };
                LogGroup { index: g, min_ts_ns: min, max_ts_ns: max }
            })
            .collect()
    }

    /// The rows of row group `g` that pass `filter`, in block order; the columns filters look
    /// at first, the others only when a row passes.
    /// The catalog says whose a block is; the rows say it again: those of another `tenant`
    /// are skipped.
    pub fn read_group(&self, g: usize, tenant: &str, filter: &LogFilter<'_>) -> Result<Vec<StoredLog>, BlockError> {
        let group = self.reader.get_row_group(g)?;
        let rows = group.metadata().num_rows() as usize;
        let short = || corrupt(&self.path, "a column is shorter than its row group");
        let (tenants, _) = column::<ByteArrayType>(&*group, col::TENANT, rows)?;
        let (ts, _) = column::<Int64Type>(&*group, col::TS, rows)?;
        let (metered, _) = column::<BoolType>(&*group, col::METERED, rows)?;
        let (received, _) = column::<Int64Type>(&*group, col::RECEIVED, rows)?;
        if tenants.len() != rows || ts.len() != rows || metered.len() != rows || received.len() != rows {
            return Err(short());
        }
        let mut keep: Vec<usize> = (0..rows)
            .filter(|&i| {
                tenants[i].data() == tenant.as_bytes()
                    && ts[i] >= filter.ts_ns.0
                    && ts[i] < filter.ts_ns.1
                    && filter.metered.is_none_or(|m| metered[i] == m)
                    && filter.received_from_ms.is_none_or(|from| received[i] >= from)
            })
            .collect();
        if keep.is_empty() {
            return Ok(Vec::new());
        }
        let function = optional(&*group, col::FUNCTION, rows, &self.path)?;
        if let Some(wanted) = filter.function {
            keep.retain(|&i| function.get(i).is_some_and(|f| f.data() == wanted.as_bytes()));
        }
        let traces = optional(&*group, col::TRACE, rows, &self.path)?;
        if let Some(wanted) = filter.trace_id {
            keep.retain(|&i| traces.get(i).is_some_and(|t| t.data() == wanted.as_bytes()));
        }
        let (bodies, _) = column::<ByteArrayType>(&*group, col::BODY, rows)?;
        if bodies.len() != rows {
            return Err(short());
        }
        if !filter.contains.is_empty() {
            let finders: Vec<memchr::memmem::Finder<'_>> =
                filter.contains.iter().map(|c| memchr::memmem::Finder::new(c.as_bytes())).collect();
            keep.retain(|&i| finders.iter().all(|f| f.find(bodies[i].data()).is_some()));
        }
        if keep.is_empty() {
            return Ok(Vec::new());
        }
        let (hashes, _) = column::<ByteArrayType>(&*group, col::HASH, rows)?;
        let instance = optional(&*group, col::INSTANCE, rows, &self.path)?;
        let iostream = optional(&*group, col::IOSTREAM, rows, &self.path)?;
        let (severity_numbers, _) = column::<Int64Type>(&*group, col::SEVERITY_NUMBER, rows)?;
        let (severity_texts, _) = column::<ByteArrayType>(&*group, col::SEVERITY_TEXT, rows)?;
        let (attributes, _) = column::<ByteArrayType>(&*group, col::ATTRIBUTES, rows)?;
        let (resources, _) = column::<ByteArrayType>(&*group, col::RESOURCE, rows)?;
        let spans = optional(&*group, col::SPAN, rows, &self.path)?;
        let full = [hashes.len(), severity_numbers.len(), severity_texts.len(), attributes.len(), resources.len()];
        if full.iter().any(|n| *n != rows) {
            return Err(short());
        }
        let text = |v: Option<&ByteArray>| v.map(utf8);
        Ok(keep
            .into_iter()
            .map(|i| StoredLog {
                row: LogRow {
                    tenant: utf8(&tenants[i]),
                    record_hash: utf8(&hashes[i]),
                    ts_ns: ts[i],
                    severity_number: severity_numbers[i],
                    severity_text: utf8(&severity_texts[i]),
                    body: utf8(&bodies[i]),
                    attributes: utf8(&attributes[i]),
                    resource: utf8(&resources[i]),
                    trace_id: text(traces.get(i)),
                    span_id: text(spans.get(i)),
                    metered: metered[i],
                },
                received_ms: received[i],
                function: text(function.get(i)),
                instance: text(instance.get(i)),
                iostream: text(iostream.get(i)),
            })
            .collect())
    }

    /// The rows of row group `g` of `tenant` that pass `filter` (and are not in `skip`, by
    /// time and hash) as their time, stream and body bytes: the columns a label query or a metric query
    /// that needs nothing else reads, and no others.
    pub fn group_lines(
        &self,
        g: usize,
        tenant: &str,
        filter: &LogFilter<'_>,
        skip: &std::collections::HashSet<(i64, String)>,
    ) -> Result<StreamLines, BlockError> {
        let group = self.reader.get_row_group(g)?;
        let rows = group.metadata().num_rows() as usize;
        let (tenants, _) = column::<ByteArrayType>(&*group, col::TENANT, rows)?;
        let (ts, _) = column::<Int64Type>(&*group, col::TS, rows)?;
        let (metered, _) = column::<BoolType>(&*group, col::METERED, rows)?;
        let function = optional(&*group, col::FUNCTION, rows, &self.path)?;
        let instance = optional(&*group, col::INSTANCE, rows, &self.path)?;
        let iostream = optional(&*group, col::IOSTREAM, rows, &self.path)?;
        let (severity_numbers, _) = column::<Int64Type>(&*group, col::SEVERITY_NUMBER, rows)?;
        let (severity_texts, _) = column::<ByteArrayType>(&*group, col::SEVERITY_TEXT, rows)?;
        let (resources, _) = column::<ByteArrayType>(&*group, col::RESOURCE, rows)?;
        let (bodies, _) = column::<ByteArrayType>(&*group, col::BODY, rows)?;
        let hashes = match skip.is_empty() {
            true => Vec::new(),
            false => column::<ByteArrayType>(&*group, col::HASH, rows)?.0,
        };
        let received = match filter.received_from_ms {
            Some(_) => column::<Int64Type>(&*group, col::RECEIVED, rows)?.0,
            None => Vec::new(),
        };
        let traces = match filter.trace_id {
            Some(_) => Some(optional(&*group, col::TRACE, rows, &self.path)?),
            None => None,
        };
        let lengths =
            [tenants.len(), ts.len(), metered.len(), severity_numbers.len(), severity_texts.len(), resources.len()];
        if lengths.iter().chain([&bodies.len()]).any(|n| *n != rows)
            || (!skip.is_empty() && hashes.len() != rows)
            || (filter.received_from_ms.is_some() && received.len() != rows)
        {
            return Err(corrupt(&self.path, "a column is shorter than its row group"));
        }
        let finders: Vec<memchr::memmem::Finder<'_>> =
            filter.contains.iter().map(|c| memchr::memmem::Finder::new(c.as_bytes())).collect();
        type Key<'k> = (bool, Option<&'k [u8]>, Option<&'k [u8]>, Option<&'k [u8]>, i64, &'k [u8], &'k [u8]);
        let mut index: std::collections::HashMap<Key<'_>, u32> = std::collections::HashMap::new();
        let mut out = StreamLines::default();
        let text = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
        for i in 0..rows {
            if tenants[i].data() != tenant.as_bytes()
                || ts[i] < filter.ts_ns.0
                || ts[i] >= filter.ts_ns.1
                || filter.metered.is_some_and(|m| metered[i] != m)
                || filter.function.is_some_and(|f| function.get(i).is_none_or(|v| v.data() != f.as_bytes()))
                || filter.received_from_ms.is_some_and(|from| received[i] < from)
                || filter.trace_id.is_some_and(|t| {
                    traces.as_ref().and_then(|traces| traces.get(i)).is_none_or(|v| v.data() != t.as_bytes())
                })
                || !finders.iter().all(|f| f.find(bodies[i].data()).is_some())
                || (!skip.is_empty() && skip.contains(&(ts[i], utf8(&hashes[i]))))
            {
                continue;
            }
            let resource: &[u8] = if metered[i] { b"{}" } else { resources[i].data() };
            let key = (
                metered[i],
                function.get(i).map(ByteArray::data),
                instance.get(i).map(ByteArray::data),
                iostream.get(i).map(ByteArray::data),
                severity_numbers[i],
                severity_texts[i].data(),
                resource,
            );
            let stream = *index.entry(key).or_insert_with(|| {
                out.streams.push(StreamKey {
                    metered: key.0,
                    function: text(key.1),
                    instance: text(key.2),
                    iostream: text(key.3),
                    severity_number: key.4,
                    severity_text: String::from_utf8_lossy(key.5).into_owned(),
                    resource: String::from_utf8_lossy(key.6).into_owned(),
                });
                out.streams.len() as u32 - 1
            });
            out.lines.push((ts[i], stream, bodies[i].len() as u32));
        }
        Ok(out)
    }

    /// The (time, hash) of each row of row group `g` dated in `[ts_ns.0, ts_ns.1)`.
    pub fn group_keys(&self, g: usize, ts_ns: (i64, i64)) -> Result<Vec<(i64, String)>, BlockError> {
        let group = self.reader.get_row_group(g)?;
        let rows = group.metadata().num_rows() as usize;
        let (ts, _) = column::<Int64Type>(&*group, col::TS, rows)?;
        let (hashes, _) = column::<ByteArrayType>(&*group, col::HASH, rows)?;
        if ts.len() != rows || hashes.len() != rows {
            return Err(corrupt(&self.path, "a column is shorter than its row group"));
        }
        Ok((0..rows).filter(|&i| ts[i] >= ts_ns.0 && ts[i] < ts_ns.1).map(|i| (ts[i], utf8(&hashes[i]))).collect())
    }
}

/// What tells streams apart: a record's source, its function's name, instance and output
/// stream (a function's record), its severity, and its resource (a tenant's own record).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub metered: bool,
    pub function: Option<String>,
    pub instance: Option<String>,
    pub iostream: Option<String>,
    pub severity_number: i64,
    pub severity_text: String,
    /// `{}` for a function's record.
    pub resource: String,
}

impl StreamKey {
    /// A stored record's stream.
    pub fn of(log: &StoredLog) -> Self {
        Self {
            metered: log.row.metered,
            function: log.function.clone(),
            instance: log.instance.clone(),
            iostream: log.iostream.clone(),
            severity_number: log.row.severity_number,
            severity_text: log.row.severity_text.clone(),
            resource: if log.row.metered { "{}".into() } else { log.row.resource.clone() },
        }
    }
}

/// Records as their streams and, per record, (time, its stream's index, body bytes).
#[derive(Debug, Default, Clone)]
pub struct StreamLines {
    pub streams: Vec<StreamKey>,
    pub lines: Vec<(i64, u32, u32)>,
}

/// An optional column's values by row.
fn optional(
    group: &dyn parquet::file::reader::RowGroupReader,
    index: usize,
    rows: usize,
    path: &str,
) -> Result<OptionalColumn, BlockError> {
    let (values, levels) = column::<ByteArrayType>(group, index, rows)?;
    if levels.len() != rows || levels.iter().filter(|l| **l == 1).count() != values.len() {
        return Err(corrupt(path, "an optional column's values and levels disagree"));
    }
    let mut next = 0u32;
    let at = levels
        .iter()
        .map(|level| {
            (*level == 1).then(|| {
                next += 1;
                next - 1
            })
        })
        .collect();
    Ok(OptionalColumn { values, at })
}

/// An optional column: its values, and for each row the index of its value.
struct OptionalColumn {
    values: Vec<ByteArray>,
    at: Vec<Option<u32>>,
}

impl OptionalColumn {
    /// Row `i`'s value, if it has one.
    fn get(&self, i: usize) -> Option<&ByteArray> {
        self.at[i].map(|at| &self.values[at as usize])
    }
}
