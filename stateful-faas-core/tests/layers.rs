//! The core's layers, as ARCHITECTURE.md's table describes them, hold in the code: every
//! `crate::<module>` path in the code of every file of a module (comments aside) names a module
//! of a lower layer, or one of the same layer that the table allows (`a` → `b`). Every module
//! of `lib.rs` has a layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Backquoted words of a text.
fn quoted(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The table: each module's layer, and the edges allowed within a layer.
fn table(architecture: &str, modules: &BTreeSet<String>) -> (BTreeMap<String, usize>, BTreeSet<(String, String)>) {
    let (mut layers, mut edges) = (BTreeMap::new(), BTreeSet::new());
    for row in
        architecture.lines().filter(|l| l.starts_with("| ") && l.as_bytes().get(2).is_some_and(u8::is_ascii_digit))
    {
        let cells: Vec<&str> = row.split(" | ").collect();
        let layer: usize = cells[0].trim_start_matches("| ").split('.').next().unwrap().parse().unwrap();
        for word in quoted(cells[1]).into_iter().filter(|w| modules.contains(*w)) {
            layers.entry(word.to_string()).or_insert(layer);
        }
        for clause in cells[2].split(';').filter(|c| c.contains('→')) {
            let (from, to) = clause.split_once('→').unwrap();
            for a in quoted(from) {
                for b in quoted(to) {
                    edges.insert((a.to_string(), b.to_string()));
                }
            }
        }
    }
    (layers, edges)
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules a file's code names as `crate::<module>` (not its comments, nor `$crate`).
fn named(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .flat_map(|line| {
            line.match_indices("crate::").filter(|(i, _)| !line[..*i].ends_with('$')).map(|(i, m)| {
                line[i + m.len()..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
            })
        })
        .filter(|name: &String| !name.is_empty())
        .collect()
}

#[test]
fn every_module_imports_only_what_its_layer_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let modules: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';').to_string())
        .chain(["semconv".to_string()]) // re-exported from the contract crate
        .collect();
    let architecture = std::fs::read_to_string(root.join("../ARCHITECTURE.md")).unwrap();
    let (layers, edges) = table(&architecture, &modules);
    let unplaced: Vec<&String> = modules.iter().filter(|m| !layers.contains_key(*m)).collect();
    assert!(unplaced.is_empty(), "modules without a layer in ARCHITECTURE.md: {unplaced:?}");
    assert!(layers["database"] < layers["gateway"] && edges.len() >= 4, "the table was read: {layers:?} {edges:?}");

    let mut wrong = Vec::new();
    for module in modules.iter().filter(|m| *m != "semconv") {
        let mut paths = Vec::new();
        match (src.join(format!("{module}.rs")), src.join(module)) {
            (file, _) if file.is_file() => paths.push(file),
            (_, dir) => files(&dir, &mut paths),
        }
        assert!(!paths.is_empty(), "no source for module {module}");
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap();
            for other in named(&text) {
                let Some(&to) = layers.get(&other) else { continue };
                let from = layers[module];
                let allowed = to < from || *module == other || edges.contains(&(module.clone(), other.clone()));
                if !allowed {
                    wrong.push(format!("{} (layer {from}) names crate::{other} (layer {to})", path.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers of ARCHITECTURE.md:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_an_import_up_the_layers() {
    let modules: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let text = "| layer | modules | imports |\n|---|---|---|\n| 1. low | `a`, `b` | nothing; `b` → `a` |\n| 2. high | `c` | layer 1 |\n";
    let (layers, edges) = table(text, &modules);
    assert_eq!(layers, BTreeMap::from([("a".into(), 1), ("b".into(), 1), ("c".into(), 2)]));
    assert_eq!(edges, BTreeSet::from([("b".into(), "a".into())]));
    let code = "use crate::c::X;\n/// [`crate::a`]\nlet x = crate::a::f();\n$crate::b";
    assert_eq!(named(code), BTreeSet::from(["a".into(), "c".into()]));
}
