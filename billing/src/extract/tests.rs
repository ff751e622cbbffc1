use super::*;

/// The serde renames in mod.rs are literals (serde takes nothing else): each must be the name
/// the core emits, as the contract defines it.
#[test]
fn the_attributes_read_are_the_contracts_names() {
    use contract::semconv as names;
    type Field = for<'b> fn(&'b Attributes<'static>) -> &'b Attr<'static>;
    let read: [(&str, Field); 16] = [
        (names::SFAAS_BILLABLE, |a| &a.billable),
        (names::FAAS_INVOCATION_ID, |a| &a.invocation_id),
        (names::FAAS_NAME, |a| &a.function),
        (names::SFAAS_CALL_ID, |a| &a.call_id),
        (names::SFAAS_FLOW_RUN_ID, |a| &a.run_id),
        (names::SFAAS_STATE_JOB, |a| &a.job),
        (names::SFAAS_STATE_OWNER, |a| &a.owner),
        (names::SFAAS_USAGE_ID, |a| &a.usage_id),
        (names::SFAAS_STATE_BYTE_SECONDS, |a| &a.byte_seconds),
        (names::SFAAS_CPU_MS, |a| &a.cpu_ms),
        (names::SFAAS_WALL_MS, |a| &a.wall_ms),
        (names::SFAAS_MEMORY_PEAK_BYTES, |a| &a.memory),
        (names::SFAAS_BYTES_IN, |a| &a.bytes_in),
        (names::SFAAS_BYTES_OUT, |a| &a.bytes_out),
        (names::SFAAS_LOG_BYTES, |a| &a.log_bytes),
        (names::HTTP_RESPONSE_STATUS_CODE, |a| &a.status),
    ];
    for (name, field) in read {
        let json = serde_json::json!({ name: 7 }).to_string();
        let attributes: Attributes<'static> = serde_json::from_str(json.leak()).unwrap();
        assert!(matches!(field(&attributes), Attr::Int(7)), "{name} is not read");
    }
}

fn ns(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_nanos_opt().unwrap()
}

fn span(tenant: &str, name: &str, trace: &str, received_ms: i64, start: &str, attributes: &str) -> Span {
    let start_ns = ns(start);
    Span {
        tenant: tenant.into(),
        trace_id: trace.into(),
        span_id: "00000000000000aa".into(),
        name: name.into(),
        start_ns,
        end_ns: start_ns + 1_000_000,
        received_ms,
        attributes: attributes.into(),
    }
}

fn figures(r: &Record) -> [i64; 6] {
    let f = r.figures;
    [f.cpu_ms, f.wall_ms, f.memory_peak_bytes, f.bytes_in, f.bytes_out, f.status_code]
}

#[test]
fn instance_usage_is_cpu_of_its_function_and_never_an_invocation() {
    let at = "2026-10-03T10:00:00Z";
    let spans = vec![
        span(
            "acme",
            "instance.usage",
            "t1",
            10,
            at,
            r#"{"sfaas.billable":true,"faas.name":"srv","sfaas.cpu_ms":250,"sfaas.usage_id":"instance/ab12/1"}"#,
        ),
        // Not the platform's kind of id (an invocation's could be anything): malformed.
        span(
            "acme",
            "instance.usage",
            "t2",
            10,
            at,
            r#"{"sfaas.billable":true,"faas.name":"srv","sfaas.cpu_ms":9,"sfaas.usage_id":"x"}"#,
        ),
        // No function: malformed.
        span(
            "acme",
            "instance.usage",
            "t3",
            10,
            at,
            r#"{"sfaas.billable":true,"sfaas.cpu_ms":9,"sfaas.usage_id":"instance/ab12/2"}"#,
        ),
        // Not billable: not a candidate.
        span(
            "acme",
            "instance.usage",
            "t4",
            10,
            at,
            r#"{"faas.name":"srv","sfaas.cpu_ms":9,"sfaas.usage_id":"instance/ab12/3"}"#,
        ),
    ];
    let (records, candidates, malformed) = records(spans, PeriodKind::Month);
    assert_eq!((candidates, malformed), (3, 2));
    let [record] = &records[..] else { panic!("one record") };
    assert_eq!((record.key(), record.kind, &*record.function), (("acme", "instance/ab12/1"), Kind::Instance, "srv"));
    assert_eq!(figures(record), [250, 0, 0, 0, 0, 0]);
    let billed = Billed { period: "2026-10", billed_period: "2026-10", plan: "basic" };
    let (sums, count, _) = crate::segments::sum_new(&[("acme", "2026-10", record.stored(&billed))], &[true]).unwrap();
    let totals = sums.values().next().unwrap();
    assert_eq!((count, totals.records, totals.invocations, totals.cpu_ms), (1, 1, 0, 250));
}

#[test]
fn spans_become_records_by_the_rules() {
    let billable = r#""sfaas.billable":true"#;
    let not_an_execution_id = |id: &str| {
        let attributes = format!(r#"{{{billable},"faas.invocation_id":"{id}"}}"#);
        span("acme", "invoke resize", "t4", 10, "2026-10-03T10:00:00Z", &attributes)
    };
    let spans = [
        // The second copy of `a` arrived first: it is the one kept.
        span(
            "acme",
            "invoke resize",
            "t2",
            20,
            "2026-10-03T10:00:00Z",
            &format!(
                r#"{{{billable},"faas.invocation_id":"0190b4e2-7c3a-7d2e-9f00-00000000000a","sfaas.cpu_ms":12,"http.response.status_code":500,"other":[1,{{"x":2}}]}}"#
            ),
        ),
        span(
            "acme",
            "invoke resize",
            "t1",
            10,
            "2026-10-03T10:00:00Z",
            &format!(
                r#"{{{billable},"faas.invocation_id":"0190b4e2-7c3a-7d2e-9f00-00000000000a","sfaas.cpu_ms":3,"faas.name":"thumb","sfaas.flow.run_id":"run-1"}}"#
            ),
        ),
        // Not billable: not a candidate. Billable without an id, or with an id that is not
        // the gateway's (a caller's text, a state record's): malformed.
        span("acme", "invoke resize", "t3", 10, "2026-10-03T10:00:00Z", r#"{"faas.invocation_id":"b"}"#),
        span("acme", "invoke resize", "t4", 10, "2026-10-03T10:00:00Z", &format!("{{{billable}}}")),
        not_an_execution_id("dup-1"),
        not_an_execution_id("state/standing/1"),
        // State: a numeric usage id, a job's interval; then bad byte-seconds and bad JSON.
        span(
            "beta",
            "state.usage",
            "t5",
            10,
            "2026-10-20T00:00:00Z",
            r#"{"sfaas.usage_id":7,"sfaas.state.byte_seconds":"1.50","sfaas.state.owner":"job","sfaas.state.job":"j"}"#,
        ),
        span(
            "beta",
            "state.usage",
            "t6",
            10,
            "2026-10-20T00:00:00Z",
            r#"{"sfaas.usage_id":"s","sfaas.state.byte_seconds":"1."}"#,
        ),
        span(
            "beta",
            "state.usage",
            "t7",
            10,
            "2026-10-20T00:00:00Z",
            r#"{"sfaas.usage_id":"s","sfaas.state.byte_seconds":1.5}"#,
        ),
        span("beta", "state.usage", "t8", 10, "2026-10-20T00:00:00Z", "{"),
        // September is final: late usage goes on October's invoice; no plan: the default.
        span(
            "gamma",
            "invoke f",
            "t9",
            10,
            "2026-09-30T23:59:59Z",
            &format!(r#"{{{billable},"faas.invocation_id":"0190b4e2-7c3a-7d2e-9f00-000000000009"}}"#),
        ),
    ];
    let plans = Plans(crate::Assignments::from([
        ("acme".to_string(), vec![(0, "free".to_string()), (ns("2026-10-03T10:00:00Z"), "pro".to_string())]),
        ("beta".to_string(), vec![(ns("2026-10-25T00:00:00Z"), "pro".to_string())]),
    ]));
    let september = Period::parse(PeriodKind::Month, "2026-09").unwrap();
    let attributes = spans[0].attributes.clone();
    let (records, candidates, malformed) = records(spans.into(), PeriodKind::Month);
    let periods = PeriodKeys::new(Some(september), records.iter().map(|r| r.period));
    assert_eq!((candidates, malformed), (10, 6));
    let seen: Vec<_> = records
        .iter()
        .map(|r| {
            let kind = r.kind.as_str();
            let (period, billed_period) = periods.keys(r.period);
            let plan = plans.at(&r.span.tenant, r.span.start_ns).unwrap_or("basic");
            let where_ = [period, billed_period, plan].join(" ");
            (r.key(), kind, &r.span.trace_id[..], &*r.function, r.flow_run.as_deref(), figures(r), &*r.state.0, where_)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                ("acme", "0190b4e2-7c3a-7d2e-9f00-00000000000a"),
                "invocation",
                "t1",
                "thumb",
                Some("run-1"),
                [3, 0, 0, 0, 0, 0],
                "0",
                "2026-10 2026-10 pro".into()
            ),
            (("beta", "7"), "state", "t5", "", Some("j"), [0; 6], "1.50", "2026-10 2026-10 pro".into()),
            (
                ("gamma", "0190b4e2-7c3a-7d2e-9f00-000000000009"),
                "invocation",
                "t9",
                "f",
                None,
                [0; 6],
                "0",
                "2026-09 2026-10 basic".into()
            ),
        ]
    );
    assert_eq!(records[1].state.1, Decimal::new(150, 2));
    // Figures are whole numbers of at least 0, and CPU fits the span's time on 1 024 cores:
    // a credit, a fraction, a text or an absurd figure is malformed, whoever sent it.
    // Attributes that are not a JSON object are malformed.
    let mut more = vec![span("acme", "invoke resize", "t2", 1, "2026-10-03T10:00:00Z", &attributes)];
    for bad in ["\"sfaas.cpu_ms\":-5", "\"sfaas.cpu_ms\":1.5", "\"sfaas.wall_ms\":\"9\"", "\"sfaas.cpu_ms\":2049000"] {
        let attributes = attributes.replace("\"sfaas.cpu_ms\":12", bad);
        more.push(span("acme", "invoke resize", "t3", 1, "2026-10-03T10:00:00Z", &attributes));
    }
    more.push(span("acme", "invoke resize", "t3", 1, "2026-10-03T10:00:00Z", r#"[true,"x"]"#));
    let (records, candidates, malformed) = self::records(more, PeriodKind::Month);
    assert_eq!((figures(&records[0]), &*records[0].function), ([12, 0, 0, 0, 0, 500], "resize"));
    assert_eq!((records.len(), candidates, malformed), (1, 6, 5));
    for (text, decimal) in [
        ("0", true),
        ("12", true),
        ("1.50", true),
        ("1.", false),
        (".5", false),
        ("1.2.3", false),
        ("-1", false),
        ("1e3", false),
        ("", false),
    ] {
        assert_eq!(is_decimal(text), decimal, "{text:?}");
    }
}
