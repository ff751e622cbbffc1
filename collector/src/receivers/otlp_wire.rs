//! An OTLP trace request read from its protobuf bytes without prost's message structs: every
//! string and id borrows from the request body, and only what the conversion keeps is copied
//! (once, into the span rows). The same rules as prost's decoder, so that a body this accepts
//! prost accepts too, with the same content, and the other way round (a differential fuzz
//! target and a test on the real SDKs' requests check it):
//!
//! - a known field with another wire type, a varint over ten bytes, a length past the end, a
//!   string that is not UTF-8, a field number 0, an unmatched end group: errors;
//! - unknown fields are skipped (groups included); nesting deeper than 100 messages is an error;
//! - a singular field seen twice: the last scalar wins, messages merge (a repeated field in the
//!   second appends); a oneof's message variant seen twice merges, any other replaces.

use super::otlp::{AttrValue, Kv, Request, ResourceSpans, ScopeSpans, Span, SpanEvent, SpanLink};

/// Why a body is not a trace request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid protobuf: {0}")]
pub struct WireError(&'static str);

type Result<T> = std::result::Result<T, WireError>;

const RECURSION_LIMIT: u32 = 100;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// A cursor over a message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some((&byte, rest)) = self.buf.split_first() else { return Err(WireError("truncated varint")) };
            self.buf = rest;
            if i == 9 && byte > 1 {
                return Err(WireError("invalid varint"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(WireError("invalid varint"))
    }

    fn key(&mut self) -> Result<(u32, u8)> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(WireError("invalid key value"));
        }
        let wire = (key & 7) as u8;
        if wire > 5 {
            return Err(WireError("invalid wire type value"));
        }
        let tag = (key >> 3) as u32;
        if tag == 0 {
            return Err(WireError("invalid tag value: 0"));
        }
        Ok((tag, wire))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8]> {
        if len > self.buf.len() as u64 {
            return Err(WireError("buffer underflow"));
        }
        let (taken, rest) = self.buf.split_at(len as usize);
        self.buf = rest;
        Ok(taken)
    }

    fn bytes(&mut self, wire: u8) -> Result<&'a [u8]> {
        expect(wire, LEN)?;
        let len = self.varint()?;
        self.take(len)
    }

    fn string(&mut self, wire: u8) -> Result<&'a str> {
        std::str::from_utf8(self.bytes(wire)?).map_err(|_| WireError("invalid string value: data is not UTF-8 encoded"))
    }

    fn fixed64(&mut self, wire: u8) -> Result<u64> {
        expect(wire, FIXED64)?;
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("eight bytes")))
    }

    fn fixed32(&mut self, wire: u8) -> Result<u32> {
        expect(wire, FIXED32)?;
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    fn uint(&mut self, wire: u8) -> Result<u64> {
        expect(wire, VARINT)?;
        self.varint()
    }

    /// A nested message's bytes, at `depth` (the limit checked as prost checks it).
    fn message(&mut self, wire: u8, depth: u32) -> Result<Reader<'a>> {
        expect(wire, LEN)?;
        limit(depth)?;
        let len = self.varint()?;
        Ok(Reader { buf: self.take(len)? })
    }

    /// Skips an unknown field.
    fn skip(&mut self, tag: u32, wire: u8, depth: u32) -> Result<()> {
        limit(depth)?;
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            FIXED32 => self.take(4).map(drop),
            LEN => {
                let len = self.varint()?;
                self.take(len).map(drop)
            }
            START_GROUP => loop {
                let (inner, inner_wire) = self.key()?;
                if inner_wire == END_GROUP {
                    return if inner == tag { Ok(()) } else { Err(WireError("unexpected end group tag")) };
                }
                self.skip(inner, inner_wire, depth - 1)?;
            },
            _ => Err(WireError("unexpected end group tag")),
        }
    }

    /// Runs `field` on each field of this message.
    fn fields(&mut self, mut field: impl FnMut(&mut Self, u32, u8) -> Result<()>) -> Result<()> {
        while !self.buf.is_empty() {
            let (tag, wire) = self.key()?;
            field(self, tag, wire)?;
        }
        Ok(())
    }
}

fn expect(wire: u8, want: u8) -> Result<()> {
    if wire == want { Ok(()) } else { Err(WireError("invalid wire type")) }
}

fn limit(depth: u32) -> Result<()> {
    if depth == 0 { Err(WireError("recursion limit reached")) } else { Ok(()) }
}

/// Decodes an `ExportTraceServiceRequest`.
pub fn decode(body: &[u8]) -> Result<Request<'_>> {
    let mut request = Request::default();
    let depth = RECURSION_LIMIT;
    Reader { buf: body }.fields(|r, tag, wire| match tag {
        1 => {
            let mut resource_spans = ResourceSpans::default();
            resource_spans_into(&mut r.message(wire, depth)?, &mut resource_spans, depth - 1)?;
            request.resource_spans.push(resource_spans);
            Ok(())
        }
        _ => r.skip(tag, wire, depth),
    })?;
    Ok(request)
}

fn resource_spans_into<'a>(r: &mut Reader<'a>, out: &mut ResourceSpans<'a>, depth: u32) -> Result<()> {
    r.fields(|r, tag, wire| match tag {
        1 => resource_into(&mut r.message(wire, depth)?, &mut out.resource_attributes, depth - 1),
        2 => {
            let mut scope_spans = ScopeSpans::default();
            scope_spans_into(&mut r.message(wire, depth)?, &mut scope_spans, depth - 1)?;
            out.scope_spans.push(scope_spans);
            Ok(())
        }
        3 => r.string(wire).map(drop),
        _ => r.skip(tag, wire, depth),
    })
}

fn resource_into<'a>(r: &mut Reader<'a>, attributes: &mut Vec<Kv<'a>>, depth: u32) -> Result<()> {
    r.fields(|r, tag, wire| match tag {
        1 => key_value(r, wire, depth).map(|kv| attributes.push(kv)),
        2 => r.uint(wire).map(drop),
        // Entity references: read for their strings' validity only.
        3 => r.message(wire, depth)?.fields(|r, tag, wire| match tag {
            1..=4 => r.string(wire).map(drop),
            _ => r.skip(tag, wire, depth - 1),
        }),
        _ => r.skip(tag, wire, depth),
    })
}

fn scope_spans_into<'a>(r: &mut Reader<'a>, out: &mut ScopeSpans<'a>, depth: u32) -> Result<()> {
    r.fields(|r, tag, wire| match tag {
        1 => {
            let scope = out.scope.get_or_insert_default();
            let mut m = r.message(wire, depth)?;
            m.fields(|r, tag, wire| match tag {
                1 => r.string(wire).map(|s| scope.0 = s),
                2 => r.string(wire).map(|s| scope.1 = s),
                3 => key_value(r, wire, depth - 1).map(drop),
                4 => r.uint(wire).map(drop),
                _ => r.skip(tag, wire, depth - 1),
            })
        }
        2 => {
            let mut span = Span::default();
            span_into(&mut r.message(wire, depth)?, &mut span, depth - 1)?;
            out.spans.push(span);
            Ok(())
        }
        3 => r.string(wire).map(drop),
        _ => r.skip(tag, wire, depth),
    })
}

fn span_into<'a>(r: &mut Reader<'a>, span: &mut Span<'a>, depth: u32) -> Result<()> {
    r.fields(|r, tag, wire| match tag {
        1 => r.bytes(wire).map(|b| span.trace_id = b),
        2 => r.bytes(wire).map(|b| span.span_id = b),
        3 => r.string(wire).map(drop),
        4 => r.bytes(wire).map(|b| span.parent_span_id = b),
        16 => r.fixed32(wire).map(drop),
        5 => r.string(wire).map(|s| span.name = s),
        6 => r.uint(wire).map(|v| span.kind = v as i32),
        7 => r.fixed64(wire).map(|v| span.start_time_unix_nano = v),
        8 => r.fixed64(wire).map(|v| span.end_time_unix_nano = v),
        9 => key_value(r, wire, depth).map(|kv| span.attributes.push(kv)),
        10 | 12 | 14 => r.uint(wire).map(drop),
        11 => {
            let mut event = SpanEvent::default();
            r.message(wire, depth)?.fields(|r, tag, wire| match tag {
                1 => r.fixed64(wire).map(|v| event.time_unix_nano = v),
                2 => r.string(wire).map(|s| event.name = s),
                3 => key_value(r, wire, depth - 1).map(|kv| event.attributes.push(kv)),
                4 => r.uint(wire).map(drop),
                _ => r.skip(tag, wire, depth - 1),
            })?;
            span.events.push(event);
            Ok(())
        }
        13 => {
            let mut link = SpanLink::default();
            r.message(wire, depth)?.fields(|r, tag, wire| match tag {
                1 => r.bytes(wire).map(|b| link.trace_id = b),
                2 => r.bytes(wire).map(|b| link.span_id = b),
                3 => r.string(wire).map(drop),
                4 => key_value(r, wire, depth - 1).map(|kv| link.attributes.push(kv)),
                5 => r.uint(wire).map(drop),
                6 => r.fixed32(wire).map(drop),
                _ => r.skip(tag, wire, depth - 1),
            })?;
            span.links.push(link);
            Ok(())
        }
        15 => {
            let status = span.status.get_or_insert_default();
            r.message(wire, depth)?.fields(|r, tag, wire| match tag {
                2 => r.string(wire).map(|s| status.message = s),
                3 => r.uint(wire).map(|v| status.code = v as i32),
                _ => r.skip(tag, wire, depth - 1),
            })
        }
        _ => r.skip(tag, wire, depth),
    })
}

/// A `KeyValue` message.
fn key_value<'a>(r: &mut Reader<'a>, wire: u8, depth: u32) -> Result<Kv<'a>> {
    let mut kv = Kv::default();
    r.message(wire, depth)?.fields(|r, tag, wire| match tag {
        1 => r.string(wire).map(|s| kv.key = s),
        2 => any_value_into(&mut r.message(wire, depth - 1)?, &mut kv.value, depth - 2),
        3 => r.uint(wire).map(drop),
        _ => r.skip(tag, wire, depth - 1),
    })?;
    Ok(kv)
}

/// An `AnyValue` message's fields, merged into `value` (`None`: no variant set).
fn any_value_into<'a>(r: &mut Reader<'a>, value: &mut Option<AttrValue<'a>>, depth: u32) -> Result<()> {
    r.fields(|r, tag, wire| {
        match tag {
            1 => *value = Some(AttrValue::String(r.string(wire)?)),
            2 => *value = Some(AttrValue::Bool(r.uint(wire)? != 0)),
            3 => *value = Some(AttrValue::Int(r.uint(wire)? as i64)),
            4 => *value = Some(AttrValue::Double(f64::from_bits(r.fixed64(wire)?))),
            5 => {
                let mut m = r.message(wire, depth)?;
                if !matches!(value, Some(AttrValue::Array(_))) {
                    *value = Some(AttrValue::Array(Vec::new()));
                }
                let Some(AttrValue::Array(values)) = value else { unreachable!("set above") };
                m.fields(|r, tag, wire| match tag {
                    1 => {
                        let mut item = None;
                        any_value_into(&mut r.message(wire, depth - 1)?, &mut item, depth - 2)?;
                        values.push(item);
                        Ok(())
                    }
                    _ => r.skip(tag, wire, depth - 1),
                })?;
            }
            6 => {
                let mut m = r.message(wire, depth)?;
                if !matches!(value, Some(AttrValue::Kvlist(_))) {
                    *value = Some(AttrValue::Kvlist(Vec::new()));
                }
                let Some(AttrValue::Kvlist(values)) = value else { unreachable!("set above") };
                m.fields(|r, tag, wire| match tag {
                    1 => key_value(r, wire, depth - 1).map(|kv| values.push(kv)),
                    _ => r.skip(tag, wire, depth - 1),
                })?;
            }
            7 => *value = Some(AttrValue::Bytes(r.bytes(wire)?)),
            8 => *value = Some(AttrValue::Strindex(r.uint(wire)? as i32)),
            _ => r.skip(tag, wire, depth)?,
        }
        Ok(())
    })
}

/// Whether this decoder and prost's agree on `body`: both refuse it, or both accept it and
/// convert it into the same rows for `sender`. Differences are described.
#[cfg(any(test, fuzzing))]
pub fn differs_from_prost(body: &[u8], sender: &crate::auth::Sender) -> Option<String> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let prost = ExportTraceServiceRequest::decode(body)
        .map_err(|e| e.to_string())
        .and_then(|request| super::otlp::traces(request, sender).map_err(|e| e.to_string()));
    let wire = super::otlp::traces_from_protobuf(body, sender).map_err(|e| e.to_string());
    match (prost, wire) {
        (Err(_), Err(_)) => None,
        (Ok(a), Ok(b)) if a.batch.spans == b.batch.spans && (a.rejected, &a.reasons) == (b.rejected, &b.reasons) => {
            None
        }
        (Ok(a), Ok(b)) => Some(format!("different rows:\nprost {a:?}\nwire {b:?}")),
        (Ok(_), Err(e)) => Some(format!("prost accepts, wire refuses: {e}")),
        (Err(e), Ok(_)) => Some(format!("wire accepts, prost refuses: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Credential, Sender};
    use prost::Message;

    fn senders() -> [Sender; 2] {
        [
            Sender { credential: Credential::Ingest { tenant: "acme".into() }, org_id: None },
            Sender { credential: Credential::Meter, org_id: None },
        ]
    }

    fn agree(body: &[u8]) {
        for sender in senders() {
            if let Some(difference) = differs_from_prost(body, &sender) {
                panic!("{difference}\nbody: {}", hex::encode(body));
            }
        }
    }

    /// A protobuf field: key then payload.
    fn field(tag: u32, wire: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(u64::from(tag << 3 | u32::from(wire)), &mut out);
        if wire == LEN {
            prost::encoding::encode_varint(payload.len() as u64, &mut out);
        }
        out.extend_from_slice(payload);
        out
    }

    fn message(tag: u32, fields: &[Vec<u8>]) -> Vec<u8> {
        field(tag, LEN, &fields.concat())
    }

    /// A request with one span whose fields are `span_fields`, after valid ids.
    fn one_span(resource: &[Vec<u8>], span_fields: &[Vec<u8>]) -> Vec<u8> {
        let mut span = vec![field(1, LEN, &[7; 16]), field(2, LEN, &[9; 8])];
        span.extend_from_slice(span_fields);
        message(1, &[message(1, resource), message(2, &[message(2, &span)])])
    }

    fn kv(key: &str, value: &[Vec<u8>]) -> Vec<u8> {
        [field(1, LEN, key.as_bytes()), message(2, value)].concat()
    }

    #[test]
    fn the_python_sdks_requests_agree_with_prost() {
        // Recorded from the OpenTelemetry Python SDK's OTLP/HTTP exporter (the fuzz seeds).
        for body in [
            &include_bytes!("../../../fuzz/seeds/otlp_wire/python-sdk-v1-traces-0")[..],
            &include_bytes!("../../../fuzz/seeds/otlp_wire/python-sdk-v1-traces-1")[..],
        ] {
            agree(body);
            assert!(!super::super::otlp::traces_from_protobuf(body, &senders()[1]).unwrap().batch.spans.is_empty());
        }
    }

    #[test]
    fn the_bench_requests_and_every_truncation_and_byte_flip_of_one_agree_with_prost() {
        for seed in 0..20 {
            let body = crate::bench::realistic_request(seed).encode_to_vec();
            agree(&body);
            let rows = super::super::otlp::traces_from_protobuf(&body, &senders()[0]).unwrap();
            assert_eq!(rows.batch.spans.len(), crate::bench::SPANS_PER_REQUEST);
        }
        let body = crate::bench::realistic_request(3).encode_to_vec();
        let body = &body[..body.len().min(6000)];
        for cut in 0..body.len() {
            agree(&body[..cut]);
        }
        let mut random = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            let mut mutated = body.to_vec();
            let at = (random % mutated.len() as u64) as usize;
            mutated[at] = (random >> 32) as u8;
            if random & (1 << 20) != 0 {
                mutated.insert((random >> 40) as usize % mutated.len(), (random >> 24) as u8);
            }
            agree(&mutated);
        }
    }

    #[test]
    fn repeated_singular_fields_merge_and_replace_as_prost_does() {
        let int = |v: u64| {
            let mut out = Vec::new();
            prost::encoding::encode_varint(v, &mut out);
            out
        };
        let resource =
            [kv("service.name", &[field(1, LEN, b"shop")]), kv("service.namespace", &[field(1, LEN, b"acme")])];
        let cases: Vec<Vec<u8>> = vec![
            // Status twice: the code of the first, the message of the second.
            one_span(&resource, &[message(15, &[field(3, VARINT, &int(2))]), message(15, &[field(2, LEN, b"boom")])]),
            // A value that is a string, then an array, then more of the array; a bytes value.
            one_span(
                &resource,
                &[
                    message(
                        9,
                        &[kv(
                            "a",
                            &[
                                field(1, LEN, b"s"),
                                message(5, &[message(1, &[field(3, VARINT, &int(1))])]),
                                message(5, &[message(1, &[field(2, VARINT, &int(1))]), message(1, &[])]),
                            ],
                        )],
                    ),
                    message(9, &[kv("b", &[field(7, LEN, &[0xde, 0xad])])]),
                ],
            ),
            // An array, then a string: the string.
            one_span(&resource, &[message(9, &[kv("a", &[message(5, &[]), field(1, LEN, b"x")])])]),
            // The key twice; a value field twice; a key without a value; strindex.
            one_span(
                &resource,
                &[
                    message(
                        9,
                        &[
                            field(1, LEN, b"k"),
                            field(1, LEN, b"k2"),
                            message(2, &[field(3, VARINT, &int(5))]),
                            message(2, &[field(4, FIXED64, &1.5f64.to_le_bytes())]),
                        ],
                    ),
                    message(9, &[field(1, LEN, b"none")]),
                    message(9, &[kv("ix", &[field(8, VARINT, &int(u64::MAX))])]),
                ],
            ),
            // The resource twice (attributes appended), the scope twice, unknown fields and groups.
            message(
                1,
                &[
                    message(1, &resource[..1]),
                    message(1, &resource[1..]),
                    field(99, START_GROUP, &[]),
                    field(5, VARINT, &int(1)),
                    field(99, END_GROUP, &[]),
                    message(
                        2,
                        &[
                            message(1, &[field(1, LEN, b"lib")]),
                            message(1, &[field(2, LEN, b"1.0")]),
                            field(3, LEN, b"schema"),
                        ],
                    ),
                ],
            ),
            // Kind and times as varints of any size; events and links.
            one_span(
                &resource,
                &[
                    field(6, VARINT, &int(u64::MAX)),
                    field(7, FIXED64, &u64::MAX.to_le_bytes()),
                    message(
                        11,
                        &[
                            field(2, LEN, b"ev"),
                            field(1, FIXED64, &5u64.to_le_bytes()),
                            message(3, &[kv("x", &[field(2, VARINT, &int(0))])]),
                        ],
                    ),
                    message(13, &[field(1, LEN, &[1; 16]), field(2, LEN, &[2; 8]), field(6, FIXED32, &[0; 4])]),
                    field(4, LEN, &[3; 8]),
                ],
            ),
            // Wrong wire types, invalid UTF-8, a field 0, an unmatched end group: refused.
            one_span(&resource, &[field(5, VARINT, &int(1))]),
            one_span(&resource, &[field(5, LEN, &[0xff, 0xfe])]),
            one_span(&[field(3, LEN, &field(2, LEN, &[0xc3]))], &[]),
            one_span(&resource, &[vec![0]]),
            one_span(&resource, &[field(7, END_GROUP, &[])]),
            one_span(&resource, &[field(16, FIXED64, &[0; 8])]),
        ];
        for body in &cases {
            agree(body);
        }
        // Nested arrays around the recursion limit: accepted up to it, refused past it.
        for depth in [40, 44, 45, 46, 47, 48, 60] {
            let mut value = field(3, VARINT, &int(1));
            for _ in 0..depth {
                value = message(5, &[message(1, &[value])]);
            }
            agree(&one_span(&resource, &[message(9, &[kv("deep", &[value])])]));
        }
    }
}
