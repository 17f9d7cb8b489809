//! The sidecar's modules are layers (docs/architecture.md): each may use only modules of lower
//! layers, and the submodules of one module may not use each other in a cycle. No function is
//! longer than 100 lines. This test reads the sources, so a change that breaks either rule
//! fails here with the file and line.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top-level modules by layer, lowest first. A new module must be placed here.
const LAYERS: &[&[&str]] = &[
    &["", "config", "error"],
    &["drain", "workers", "metrics", "unary"],
    &["access", "trace"],
    &["instances"],
    &["governance"],
    &["thrift", "grpc"],
    &["mesh"],
    &["queue"],
    &["admin"],
    &["server", "status", "call"],
    &["cli"],
];

/// The longest a function may be, in lines.
const MAX_FUNCTION_LINES: usize = 100;

fn layer(top: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&top))
        .unwrap_or_else(|| panic!("module `{top}` has no layer in tests/layers.rs"))
}

/// A source file and its module path (`grpc::relay`; `""` for the crate root).
struct Source {
    path: PathBuf,
    module: String,
    text: String,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            if rel == Path::new("main") {
                continue; // the binary uses the library by its crate name
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.push(Source {
                path,
                module: parts.join("::"),
                text,
            });
        }
    }
    out
}

/// The lines of `text` that are code: comments dropped.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let code = match l.find("//") {
            Some(at) if !l[..at].contains('"') => &l[..at],
            _ => l,
        };
        (!code.trim().is_empty()).then_some((i + 1, code))
    })
}

/// Every path a file names through `crate::` or `super::`, made absolute, with its line: in
/// `use` trees (`use crate::{a::{b, c}, d}`) and inline (`crate::a::b(..)`).
fn references(source: &Source) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending_use: Option<(usize, String)> = None;
    for (line, code) in code_lines(&source.text) {
        if let Some((start, mut tree)) = pending_use.take() {
            tree.push_str(code);
            if tree.contains(';') {
                expand_use(source, &tree, start, &mut out);
            } else {
                pending_use = Some((start, tree));
            }
            continue;
        }
        let trimmed = code.trim_start();
        let use_tree = trimmed
            .strip_prefix("pub(crate) use ")
            .or_else(|| trimmed.strip_prefix("pub(super) use "))
            .or_else(|| trimmed.strip_prefix("pub use "))
            .or_else(|| trimmed.strip_prefix("use "));
        if let Some(tree) = use_tree {
            if tree.contains(';') {
                expand_use(source, tree, line, &mut out);
            } else {
                pending_use = Some((line, tree.to_owned()));
            }
            continue;
        }
        for prefix in ["crate::", "super::"] {
            for (at, _) in code.match_indices(prefix) {
                let before = code[..at].chars().last();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue; // inside a longer path (`super::super::x`), counted at its start
                }
                let path: String = code[at..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                if let Some(abs) = absolute(source, &path) {
                    out.push((line, abs));
                }
            }
        }
    }
    out
}

/// Expands a `use` tree (up to its `;`) into full paths.
fn expand_use(source: &Source, tree: &str, line: usize, out: &mut Vec<(usize, String)>) {
    let tree: String = tree[..tree.find(';').unwrap()]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let mut paths = Vec::new();
    expand(&tree, "", &mut paths);
    for p in paths {
        if let Some(abs) = absolute(source, &p) {
            out.push((line, abs));
        }
    }
}

fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let Some(open) = tree.find('{') else {
        out.push(format!("{prefix}{tree}"));
        return;
    };
    let head = &tree[..open];
    let inner = &tree[open + 1..tree.len() - 1];
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&inner[start..i], &format!("{prefix}{head}"), out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < inner.len() {
        expand(&inner[start..], &format!("{prefix}{head}"), out);
    }
}

/// `path` as written in `source`, from the crate root (`None`: another crate's).
fn absolute(source: &Source, path: &str) -> Option<String> {
    let path = path.trim_end_matches("::");
    if let Some(rest) = path.strip_prefix("crate::") {
        return Some(rest.to_owned());
    }
    let mut module: Vec<&str> = source
        .module
        .split("::")
        .filter(|s| !s.is_empty())
        .collect();
    let mut rest = path;
    let mut relative = false;
    while let Some(r) = rest.strip_prefix("super::") {
        module.pop();
        rest = r;
        relative = true;
    }
    if let Some(r) = rest.strip_prefix("self::") {
        rest = r;
        relative = true;
    }
    relative.then(|| {
        module.push(rest);
        module.join("::")
    })
}

/// The longest module among `modules` that `path` starts with.
fn owner<'a>(modules: &'a BTreeSet<String>, path: &str) -> &'a str {
    let parts: Vec<&str> = path.split("::").collect();
    (0..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find_map(|m| modules.get(&m))
        .map_or("", String::as_str)
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

fn is_within(module: &str, ancestor: &str) -> bool {
    ancestor.is_empty() || module == ancestor || module.starts_with(&format!("{ancestor}::"))
}

#[test]
fn modules_use_only_the_layers_below_them_and_siblings_never_in_a_cycle() {
    let sources = sources();
    let modules: BTreeSet<String> = sources.iter().map(|s| s.module.clone()).collect();
    let mut wrong = Vec::new();
    // Sibling uses inside one top-level module, for the cycle check.
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for source in &sources {
        let from = source.module.as_str();
        for (line, path) in references(source) {
            let to = owner(&modules, &path);
            // A module may use itself, its ancestors (`super::`) and its own submodules.
            if is_within(from, to) || is_within(to, from) {
                continue;
            }
            let (a, b) = (top(from), top(to));
            if a != b {
                if layer(a) <= layer(b) {
                    wrong.push(format!(
                        "{}:{line}: `{from}` (layer {}) uses `{path}` of `{b}` (layer {})",
                        source.path.display(),
                        layer(a),
                        layer(b)
                    ));
                }
                continue;
            }
            edges
                .entry(from.to_owned())
                .or_default()
                .insert(to.to_owned());
        }
    }
    for start in edges.keys() {
        if let Some(cycle) = cycle_from(&edges, start) {
            wrong.push(format!(
                "modules use each other in a cycle: {}",
                cycle.join(" -> ")
            ));
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

/// A path of uses from `start` back to itself, if there is one.
fn cycle_from(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_function_is_longer_than_a_screenful_or_two() {
    let mut long = Vec::new();
    for source in sources() {
        let lines: Vec<&str> = source.text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let trimmed = l.trim_start();
            let indent = &l[..l.len() - trimmed.len()];
            let is_fn = [
                "fn ",
                "pub fn ",
                "pub(crate) fn ",
                "pub(super) fn ",
                "async fn ",
            ]
            .iter()
            .chain(&[
                "pub async fn ",
                "pub(crate) async fn ",
                "pub(super) async fn ",
            ])
            .any(|p| trimmed.starts_with(p));
            if !is_fn || l.trim_end().ends_with(';') {
                continue;
            }
            let close = format!("{indent}}}");
            let Some(end) = lines[i..].iter().position(|x| *x == close) else {
                continue;
            };
            if end + 1 > MAX_FUNCTION_LINES {
                long.push(format!(
                    "{}:{}: {} lines",
                    source.path.display(),
                    i + 1,
                    end + 1
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checks_see_uses_in_every_form() {
    let source = Source {
        path: PathBuf::from("x.rs"),
        module: "grpc::relay::caller".into(),
        text: "use super::{link::Link, *};\nuse crate::{a::{b, c::D}, e};\n// crate::not::this\nlet x = crate::f::g(1); super::super::health::status();\n".into(),
    };
    let refs: Vec<String> = references(&source).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        refs,
        [
            "grpc::relay::link::Link",
            "grpc::relay::*",
            "a::b",
            "a::c::D",
            "e",
            "f::g",
            "grpc::health::status",
        ]
    );
    let modules: BTreeSet<String> = ["", "grpc", "grpc::relay", "grpc::health"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(owner(&modules, "grpc::health::status"), "grpc::health");
    assert_eq!(owner(&modules, "lock"), "");
}
