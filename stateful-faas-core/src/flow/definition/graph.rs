//! A validated flow as a graph: cycles and unreachable nodes (for validation), the order nodes
//! run in, and the graph drawn as text or Graphviz dot (`sfaas flow describe`).

use super::{Flow, FlowOutput, Node, NodeTarget};

/// A cycle of node ids, if the graph has one. Depth-first with an explicit stack, so that a
/// long chain of needs costs heap, not the thread's stack.
pub(super) fn find_cycle(nodes: &[Node]) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks = vec![Mark::New; nodes.len()];
    // The path being explored: each node with how many of its needs were looked at.
    let mut path: Vec<(usize, usize)> = Vec::new();
    for root in 0..nodes.len() {
        if marks[root] != Mark::New {
            continue;
        }
        marks[root] = Mark::Active;
        path.push((root, 0));
        while let Some((node, next)) = path.last_mut() {
            let Some(&need) = nodes[*node].needs.get(*next) else {
                marks[*node] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            match marks[need] {
                Mark::Active => {
                    // The path runs against the data (each node needs the next): reversed, each
                    // node feeds the next, and the first closes the cycle.
                    let start = path.iter().position(|&(s, _)| s == need).expect("active nodes are on the path");
                    let mut cycle: Vec<String> =
                        path[start..].iter().rev().map(|&(s, _)| nodes[s].id.clone()).collect();
                    cycle.push(cycle[0].clone());
                    return Some(cycle);
                }
                Mark::New => {
                    marks[need] = Mark::Active;
                    path.push((need, 0));
                }
                Mark::Done => {}
            }
        }
    }
    None
}

/// Nodes whose work can reach neither the output nor a catch.
pub(super) fn unreachable(nodes: &[Node], output: &FlowOutput) -> Vec<usize> {
    let mut reached = vec![false; nodes.len()];
    let mut stack: Vec<usize> = match output {
        FlowOutput::Node(i) => vec![*i],
        FlowOutput::Sinks(sinks) => sinks.clone(),
    };
    stack.extend(nodes.iter().filter_map(|n| n.catch));
    while let Some(i) = stack.pop() {
        if !reached[i] {
            reached[i] = true;
            stack.extend(&nodes[i].needs);
        }
    }
    (0..nodes.len()).filter(|&i| !reached[i]).collect()
}

/// The flow as text: one line per node, in an order where needs come first.
pub fn render_text(flow: &Flow) -> String {
    let mut out = format!("flow {}\n", flow.name());
    for i in topological_order(flow) {
        let node = &flow.nodes[i];
        let target = match &node.target {
            NodeTarget::Function(f) => format!("function {f}"),
            NodeTarget::Flow(f) => format!("flow {f}"),
        };
        let needs: Vec<&str> = node.needs.iter().map(|&n| flow.nodes[n].id.as_str()).collect();
        out.push_str(&format!("  {} <- [{}] {target}", node.id, needs.join(", ")));
        if let Some(when) = &flow.definition.nodes[&node.id].when {
            out.push_str(&format!(" when {when}"));
        }
        if let Some(foreach) = &flow.definition.nodes[&node.id].foreach {
            out.push_str(&format!(" foreach {foreach} (concurrency {})", node.concurrency));
        }
        if node.retry.attempts > 1 {
            out.push_str(&format!(" retry {}", node.retry.attempts));
        }
        if let Some(catch) = node.catch {
            out.push_str(&format!(" catch -> {}", flow.nodes[catch].id));
        }
        out.push('\n');
    }
    out
}

/// The flow in Graphviz DOT.
pub fn render_dot(flow: &Flow) -> String {
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", flow.name());
    for node in &flow.nodes {
        let target = match &node.target {
            NodeTarget::Function(f) => f.clone(),
            NodeTarget::Flow(f) => format!("flow {f}"),
        };
        let shape = if node.foreach.is_some() { "box3d" } else { "box" };
        out.push_str(&format!("  \"{}\" [shape={shape}, label=\"{}\\n{}\"];\n", node.id, node.id, target));
        for &need in &node.needs {
            out.push_str(&format!("  \"{}\" -> \"{}\";\n", flow.nodes[need].id, node.id));
        }
        if let Some(catch) = node.catch {
            out.push_str(&format!(
                "  \"{}\" -> \"{}\" [style=dashed, label=\"catch\"];\n",
                node.id, flow.nodes[catch].id
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// Node indices with every node after its needs: level by level (the nodes without needs, then
/// those whose needs are all in earlier levels, …), each level in the flow's order. Kahn's
/// algorithm, linear in nodes and needs.
pub fn topological_order(flow: &Flow) -> Vec<usize> {
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); flow.nodes.len()];
    let mut waiting: Vec<usize> = flow.nodes.iter().map(|node| node.needs.len()).collect();
    for (i, node) in flow.nodes.iter().enumerate() {
        for &need in &node.needs {
            dependents[need].push(i);
        }
    }
    let mut order = Vec::with_capacity(flow.nodes.len());
    let mut level: Vec<usize> = (0..flow.nodes.len()).filter(|&i| waiting[i] == 0).collect();
    while !level.is_empty() {
        let mut next = Vec::new();
        for &i in &level {
            for &dependent in &dependents[i] {
                waiting[dependent] -= 1;
                if waiting[dependent] == 0 {
                    next.push(dependent);
                }
            }
        }
        order.append(&mut level);
        next.sort_unstable();
        level = next;
    }
    order // shorter than the flow only with a cycle, which validation refuses
}
