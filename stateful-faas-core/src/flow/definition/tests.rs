use super::*;

fn validate(yaml: &str) -> Result<Flow, FlowErrors> {
    parse(yaml)?.validate(|f| f != "ghost", |f| f == "sub")
}

#[test]
fn a_complete_flow_validates() {
    let flow = validate(
        r#"
name: etl
nodes:
  extract: {function: parse}
  clean: {function: validate, needs: [extract], when: "$.count > 0"}
  enrich: {foreach: "$.records", function: enrich, concurrency: 4, needs: [clean]}
  report: {flow: sub, needs: [enrich], timeout: 30s, catch: fallback, retry: {attempts: 3, initial_interval: 200ms}}
  fallback: {function: report-error}
"#,
    )
    .unwrap();
    assert_eq!(flow.output, FlowOutput::Node(flow.index("report").unwrap()));
    let report = &flow.nodes[flow.index("report").unwrap()];
    assert_eq!(report.retry.attempts, 3);
    assert_eq!(report.retry.delay_after(1), Duration::from_millis(200));
    assert_eq!(report.retry.delay_after(2), Duration::from_millis(400));
    assert!(flow.nodes[flow.index("fallback").unwrap()].is_catch);
    let text = render_text(&flow);
    assert!(text.contains("enrich <- [clean] function enrich foreach $.records (concurrency 4)"), "{text}");
    assert!(render_dot(&flow).contains("\"report\" -> \"fallback\" [style=dashed"));
}

#[test]
fn every_problem_is_reported_with_its_node() {
    let errors = validate(
        r#"
name: bad
nodes:
  a: {function: ghost, needs: [nowhere]}
  b: {function: f, when: "$.x >", foreach: "items"}
  c: {function: f, flow: sub}
  d: {function: f, retry: {attempts: 0}, timeout: soon, catch: e}
  e: {function: f, needs: [a]}
"#,
    )
    .unwrap_err()
    .0;
    let all = errors.join("\n");
    for expected in [
        "node a: function \"ghost\" is not deployed",
        "node a: needs unknown node \"nowhere\"",
        "node b: when \"$.x >\": expected a path",
        "node b: foreach \"items\": a path starts with '$'",
        "node c: set exactly one of `function` or `flow`",
        "node d: retry.attempts must be 1 to 100",
        "node d: timeout: bad duration",
        "node e: a catch node receives the failure as its input and cannot have `needs`",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

#[test]
fn cycles_and_unreachable_nodes_are_refused() {
    let cycle = validate("name: c\nnodes:\n  a: {function: f, needs: [c]}\n  b: {function: f, needs: [a]}\n  c: {function: f, needs: [b]}\n")
        .unwrap_err();
    assert!(cycle.to_string().contains("cycle: b -> c -> a -> b"), "{cycle}");
    let unreachable = validate(
        "name: u\noutput: b\nnodes:\n  a: {function: f}\n  b: {function: f}\n  c: {function: f, needs: [a]}\n",
    )
    .unwrap_err();
    assert!(unreachable.to_string().contains("node a is unreachable"), "{unreachable}");
    assert!(unreachable.to_string().contains("node c is unreachable"), "{unreachable}");
    let self_sub = validate("name: sub\nnodes:\n  a: {flow: sub}\n").unwrap_err();
    assert!(self_sub.to_string().contains("cannot run itself"));
    assert!(validate("name: x\nnodes:\n  a: {function: f, bogus: 1}\n").unwrap_err().to_string().contains("bogus"));
}

/// A chain `n0 needs n1, n1 needs n2, …` of `length` nodes.
fn chain(length: usize) -> String {
    let mut yaml = String::from("name: chain\nnodes:\n");
    for i in 0..length {
        match i + 1 < length {
            true => yaml.push_str(&format!("  n{i}: {{function: f, needs: [n{}]}}\n", i + 1)),
            false => yaml.push_str(&format!("  n{i}: {{function: f}}\n")),
        }
    }
    yaml
}

#[test]
fn a_chain_as_long_as_allowed_is_walked_without_recursion() {
    // On a thread with a small stack: the depth of the chain must cost no stack.
    let handle = std::thread::Builder::new().stack_size(256 << 10).spawn(|| {
        let flow = validate(&chain(MAX_NODES)).unwrap();
        let order = topological_order(&flow);
        assert_eq!(order.len(), MAX_NODES);
        assert_eq!(flow.nodes[order[0]].id, format!("n{}", MAX_NODES - 1), "needs come first");
        assert_eq!(flow.nodes[order[MAX_NODES - 1]].id, "n0");
        assert_eq!(flow.output, FlowOutput::Node(flow.index("n0").unwrap()));
        let cycle = validate(&chain(MAX_NODES).replace("n999: {function: f}", "n999: {function: f, needs: [n0]}"));
        let cycle = cycle.unwrap_err().to_string();
        assert!(cycle.starts_with("invalid flow: cycle: n999 -> n998 -> n997"), "{}", &cycle[..100]);
        assert!(cycle.ends_with("n1 -> n0 -> n999"), "{}", &cycle[cycle.len() - 100..]);
    });
    handle.unwrap().join().unwrap();
}

#[test]
fn definitions_beyond_the_limits_are_refused_before_their_graph_is_walked() {
    let error = validate(&chain(MAX_NODES + 1)).unwrap_err();
    assert_eq!(error.0, vec![format!("a flow has at most {MAX_NODES} nodes; this one has {}", MAX_NODES + 1)]);
    let needs: Vec<String> = (0..=MAX_NEEDS).map(|i| format!("n{i}")).collect();
    let wide = format!("name: wide\nnodes:\n  join: {{function: f, needs: [{}]}}\n", needs.join(", "));
    assert!(validate(&wide).unwrap_err().to_string().contains("node join: at most 256 needs; it has 257"));
    let long_id = "x".repeat(1000); // YAML's longest implicit key
    let text = format!(
        "name: long\ndescription: {}\nnodes:\n  {long_id}: {{function: f}}\n  a: {{function: f, when: \"{}\"}}\n",
        "d".repeat(MAX_DESCRIPTION_BYTES + 1),
        "!".repeat(MAX_EXPRESSION_BYTES + 1),
    );
    let error = validate(&text).unwrap_err().to_string();
    assert!(error.contains("description is 4097 bytes; the limit is 4096"), "{error}");
    assert!(error.contains("node a: when is 1025 bytes; the limit is 1024"), "{error}");
    assert!(error.contains("node id \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"… is 1000 bytes; the limit is 63"), "{error}");
    assert!(error.len() < 1000, "no long text is echoed: {error}");
}
