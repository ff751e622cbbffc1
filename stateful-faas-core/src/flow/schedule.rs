//! Which nodes of a run can start: those whose needs are all resolved (done or skipped). Kept
//! up to date as nodes resolve, so that a node's completion costs its dependents, not a scan
//! of the whole flow.

use std::collections::BTreeSet;

use super::definition::Node;

/// The nodes ready to start, and how many unresolved needs every other node waits for.
pub struct Ready {
    dependents: Vec<Vec<usize>>,
    unresolved: Vec<usize>,
    ready: BTreeSet<usize>,
}

impl Ready {
    /// `resolved(i)`: node `i` is already done or skipped (a resumed run). Catch nodes are
    /// never ready: they run only in place of a failed node.
    pub fn new(nodes: &[Node], resolved: impl Fn(usize) -> bool) -> Self {
        let mut dependents = vec![Vec::new(); nodes.len()];
        let mut unresolved = vec![0; nodes.len()];
        for (i, node) in nodes.iter().enumerate() {
            for &need in &node.needs {
                dependents[need].push(i);
                if !resolved(need) {
                    unresolved[i] += 1;
                }
            }
        }
        let ready = (0..nodes.len()).filter(|&i| unresolved[i] == 0 && !resolved(i) && !nodes[i].is_catch).collect();
        Self { dependents, unresolved, ready }
    }

    /// The next node to look at, lowest index first (the flow's order). The caller checks that
    /// it is still pending: a resumed run may have finished it already.
    pub fn pop(&mut self) -> Option<usize> {
        self.ready.pop_first()
    }

    /// Node `index` is now done or skipped (once per node): its dependents whose needs are all
    /// resolved become ready.
    pub fn resolve(&mut self, nodes: &[Node], index: usize) {
        for &dependent in &self.dependents[index] {
            self.unresolved[dependent] -= 1;
            if self.unresolved[dependent] == 0 && !nodes[dependent].is_catch {
                self.ready.insert(dependent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::definition::parse;

    #[test]
    fn nodes_become_ready_as_their_needs_resolve() {
        let yaml = "name: d\nnodes:\n  a: {function: f}\n  b: {function: f, needs: [a]}\n  c: {function: f, needs: [a, b], catch: z}\n  z: {function: f}\n";
        let flow = parse(yaml).unwrap().validate(|_| true, |_| true).unwrap();
        let [a, b, c] = ["a", "b", "c"].map(|id| flow.index(id).unwrap());
        let mut ready = Ready::new(&flow.nodes, |_| false);
        assert_eq!(ready.pop(), Some(a));
        assert_eq!(ready.pop(), None, "the catch node z is never ready");
        ready.resolve(&flow.nodes, a);
        assert_eq!(ready.pop(), Some(b));
        assert_eq!(ready.pop(), None, "c still waits for b");
        ready.resolve(&flow.nodes, b);
        assert_eq!(ready.pop(), Some(c));
        // Resumed with a done: b is ready at once.
        let mut resumed = Ready::new(&flow.nodes, |i| i == a);
        assert_eq!(resumed.pop(), Some(b));
        assert_eq!(resumed.pop(), None);
    }
}
