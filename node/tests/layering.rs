//! The modules of `df-node` form no import circle: each top-level module (`api`, `task`, `store`,
//! …) may use the ones below it, never one that uses it back. Read from the sources, so a new
//! `crate::x` reference that closes a circle fails here with the circle named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to: `task/runner.rs` → `task`, `store.rs` → `store`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules a source text names through `crate::`, outside comments and outside its
/// `#[cfg(test)]` tail (tests may reach anywhere).
fn references(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a, b::C}`: the names up to the closing brace, on this line.
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != "self" {
                        out.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

/// A circle through `start`, if there is one: the modules in order, `start` first and last.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then_some(path)
}

fn graph_of(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in files {
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(references(text).into_iter().filter(|d| d != module));
    }
    graph
}

#[test]
fn node_modules_form_no_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<(String, String)> = paths
        .iter()
        .filter(|p| !p.ends_with("lib.rs"))
        .map(|p| (module_of(&src, p), std::fs::read_to_string(p).unwrap()))
        .collect();
    let graph = graph_of(&files);
    assert!(
        graph.len() > 10,
        "found only {:?}: is this node/src?",
        graph.keys()
    );
    // The composition root uses the parts; the parts never use it.
    assert!(graph["node"].contains("api") && graph["node"].contains("task"));
    let circles: Vec<String> = graph
        .keys()
        .filter_map(|m| circle(&graph, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(
        circles.is_empty(),
        "import circles in node/src: {circles:#?}"
    );
}

#[test]
fn the_checker_sees_a_circle_and_ignores_comments_and_tests() {
    let files = vec![
        (
            "api".to_owned(),
            "use crate::{config, task::X};\n// crate::node in a comment\n".to_owned(),
        ),
        ("task".to_owned(), "fn f() { crate::store::g() }".to_owned()),
        (
            "store".to_owned(),
            "/// [`crate::api`]\nfn g() {}\n#[cfg(test)]\nuse crate::api;".to_owned(),
        ),
        ("config".to_owned(), String::new()),
    ];
    let graph = graph_of(&files);
    assert_eq!(
        graph["api"],
        BTreeSet::from(["config".to_owned(), "task".to_owned()])
    );
    assert!(graph.keys().all(|m| circle(&graph, m).is_none()));

    let mut closed = files.clone();
    closed.push(("store".to_owned(), "use crate::api::Thing;".to_owned()));
    let graph = graph_of(&closed);
    assert_eq!(
        circle(&graph, "api").unwrap(),
        ["api", "task", "store", "api"]
    );
}
