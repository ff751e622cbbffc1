//! A flow run's DAG as the run page draws it: where each node goes, and the critical path.
//! Pure functions of the nodes, so that the layout is tested without a browser.

use std::collections::HashMap;

use rust_decimal::Decimal;

/// One node of a run's DAG, from its spans.
#[derive(Debug, Default, Clone)]
pub struct DagNode {
    pub id: String,
    pub needs: Vec<String>,
    pub start_ns: i64,
    pub end_ns: i64,
    pub failed: bool,
    pub attempts: i64,
    pub cpu_ms: i64,
    pub state_bytes: i64,
    pub cost: Decimal,
}

impl DagNode {
    /// How long the node ran, in ns: 0 when its span ends before it starts (the span's times
    /// are the sender's, so the plain difference can overflow).
    pub fn duration_ns(&self) -> i64 {
        self.end_ns.saturating_sub(self.start_ns).max(0)
    }
}

/// The needs of each node that count: those naming a node, in an order where every need comes
/// before what needs it (Kahn's algorithm). Spans are data from outside, so a cycle is
/// possible: its nodes come last, each keeping only the needs already ordered (no loop, no
/// recursion: a chain of any length takes linear time and constant stack).
fn ordered(nodes: &[DagNode]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let mut needs: Vec<Vec<usize>> =
        nodes.iter().map(|n| n.needs.iter().filter_map(|need| index.get(need.as_str()).copied()).collect()).collect();
    let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut needed_by: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, of) in needs.iter().enumerate() {
        for &j in of {
            needed_by[j].push(i);
        }
    }
    let mut order: Vec<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    let mut placed = vec![false; nodes.len()];
    let (mut next, mut unplaced) = (0, 0);
    loop {
        while next < order.len() {
            let i = order[next];
            placed[i] = true;
            next += 1;
            for &k in &needed_by[i] {
                if waiting[k] == 0 {
                    continue; // released from a cycle: this need was dropped
                }
                waiting[k] -= 1;
                if waiting[k] == 0 {
                    order.push(k);
                }
            }
        }
        // What is left waits on a cycle: release its first node with the needs already placed
        // (everything queued is placed by now, and placed nodes stay placed).
        while unplaced < nodes.len() && placed[unplaced] {
            unplaced += 1;
        }
        if unplaced == nodes.len() {
            break;
        }
        let stuck = unplaced;
        needs[stuck].retain(|&j| placed[j]);
        waiting[stuck] = 0;
        order.push(stuck);
    }
    (order, needs)
}

/// The chain of nodes with the largest total duration, following `needs`.
pub fn critical_path(nodes: &[DagNode]) -> Vec<usize> {
    let (order, needs) = ordered(nodes);
    // Per node: the longest chain ending there, and the need it came through.
    let mut best: Vec<(i64, Option<usize>)> = vec![(0, None); nodes.len()];
    for &i in &order {
        let before = needs[i].iter().map(|&j| (best[j].0, Some(j))).max_by_key(|(length, _)| *length);
        let (length, previous) = before.unwrap_or((0, None));
        best[i] = (length.saturating_add(nodes[i].duration_ns()), previous);
    }
    let mut end = (0..nodes.len()).max_by_key(|&i| (best[i].0, std::cmp::Reverse(i)));
    let mut path = Vec::new();
    // Each step goes to a node placed earlier in `order`, so the walk ends; the bound is a guard.
    while let Some(i) = end
        && path.len() < nodes.len()
    {
        path.push(i);
        end = best[i].1;
    }
    path.reverse();
    path
}

/// Each node's (column, row): columns by dependency depth (the longest chain of `needs` before
/// it), rows in a column by id. Needs naming no node are ignored, and so is the need that
/// closes a cycle (bad data).
pub fn layout(nodes: &[DagNode]) -> Vec<(usize, usize)> {
    let (order, needs) = ordered(nodes);
    let mut depth = vec![0usize; nodes.len()];
    for &i in &order {
        depth[i] = needs[i].iter().map(|&j| depth[j] + 1).max().unwrap_or(0);
    }
    let mut rows_in_column: HashMap<usize, usize> = HashMap::new();
    let mut position = vec![(0usize, 0usize); nodes.len()];
    let mut by_place: Vec<usize> = (0..nodes.len()).collect();
    by_place.sort_by(|&a, &b| (depth[a], &nodes[a].id).cmp(&(depth[b], &nodes[b].id)));
    for i in by_place {
        let row = rows_in_column.entry(depth[i]).or_default();
        position[i] = (depth[i], *row);
        *row += 1;
    }
    position
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that ran from `start` to `end` ms after needing `needs`.
    fn node(id: &str, needs: &[&str], start: i64, end: i64) -> DagNode {
        DagNode {
            id: id.into(),
            needs: needs.iter().map(|n| n.to_string()).collect(),
            start_ns: start * 1_000_000,
            end_ns: end * 1_000_000,
            ..Default::default()
        }
    }

    fn ids(nodes: &[DagNode], path: &[usize]) -> Vec<String> {
        path.iter().map(|&i| nodes[i].id.clone()).collect()
    }

    #[test]
    fn the_critical_path_is_the_longest_chain_of_needs() {
        // extract → (fast, slow) → load: the slow branch decides.
        let nodes = [
            node("extract", &[], 0, 10),
            node("fast", &["extract"], 10, 15),
            node("slow", &["extract"], 10, 40),
            node("load", &["fast", "slow"], 40, 45),
            node("audit", &[], 0, 20),
        ];
        assert_eq!(ids(&nodes, &critical_path(&nodes)), ["extract", "slow", "load"]);
        // A lone node longer than any chain is the path.
        let nodes = [node("a", &[], 0, 10), node("b", &["a"], 10, 20), node("long", &[], 0, 50)];
        assert_eq!(ids(&nodes, &critical_path(&nodes)), ["long"]);
        assert!(critical_path(&[]).is_empty());
    }

    #[test]
    fn bad_data_neither_loops_nor_panics() {
        // A cycle and a need naming no node: spans are data from outside.
        let nodes = [node("a", &["b"], 0, 5), node("b", &["a"], 5, 10), node("c", &["ghost"], 0, 1)];
        let path = critical_path(&nodes);
        assert!(!path.is_empty() && path.len() <= nodes.len(), "{path:?}");
        let positions = layout(&nodes);
        assert_eq!(positions.len(), 3);
        assert_eq!(positions[2].0, 0, "an unknown need counts for nothing");
    }

    #[test]
    fn many_cycles_take_linear_time() {
        // 100 000 two-node cycles: each is broken once, without a scan from the start.
        let nodes: Vec<DagNode> = (0..200_000)
            .map(|i| DagNode {
                id: format!("n{i}"),
                needs: vec![format!("n{}", i ^ 1)],
                end_ns: 1,
                ..Default::default()
            })
            .collect();
        assert_eq!(critical_path(&nodes).len(), 2);
        assert!(layout(&nodes).iter().all(|&(column, _)| column <= 1));
    }

    #[test]
    fn a_long_chain_takes_linear_time_and_no_stack() {
        // A tenant can send any spans: 200 000 nodes in one chain, each needing the one before.
        let nodes: Vec<DagNode> = (0..200_000)
            .map(|i| {
                let needs = if i == 0 { vec![] } else { vec![format!("n{}", i - 1)] };
                DagNode { id: format!("n{i}"), needs, end_ns: 1, ..Default::default() }
            })
            .collect();
        assert_eq!(critical_path(&nodes).len(), nodes.len());
        assert_eq!(layout(&nodes).last(), Some(&(nodes.len() - 1, 0)));
    }

    #[test]
    fn columns_follow_depth_and_rows_follow_ids() {
        let nodes = [
            node("load", &["b", "a"], 0, 0),
            node("b", &["root"], 0, 0),
            node("a", &["root"], 0, 0),
            node("root", &[], 0, 0),
            node("late", &["load"], 0, 0),
        ];
        let positions = layout(&nodes);
        assert_eq!(positions, [(2, 0), (1, 1), (1, 0), (0, 0), (3, 0)]);
    }
}
