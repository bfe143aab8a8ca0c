//! The crate's modules import each other without a cycle: every arrow points from a module to
//! the ones it builds on (see "How it works" in the README).
//!
//! Reads `src/` and follows `crate::`, `super::` and child-module paths; test code (`#[cfg(test)]`
//! modules) may reach anywhere and is left out. `cargo modules dependencies -p crier --lib
//! --no-externs --no-fns --no-traits --no-types --no-sysroot --no-owns` draws the same graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`backend::memory`; the crate root is `crate`) → source text without test code.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| p != "mod")
            .collect();
        let name = match parts.as_slice() {
            [root] if root == "lib" => "crate".to_owned(),
            [bin] if bin == "main" => continue,
            _ => parts.join("::"),
        };
        let text = std::fs::read_to_string(&file).unwrap();
        modules.insert(name, without_tests(&text));
    }
    // Modules declared under `#[cfg(test)]` exist only in tests.
    let test_only: Vec<String> = modules
        .iter()
        .flat_map(|(name, text)| {
            let lines: Vec<&str> = text.lines().collect();
            lines
                .windows(2)
                .filter(|w| w[0].trim() == "#[cfg(test)]")
                .filter_map(|w| declared_module(w[1]))
                .map(|child| child_path(name, &child))
                .collect::<Vec<_>>()
        })
        .collect();
    for name in test_only {
        modules.remove(&name);
    }
    modules
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The code before the file's `#[cfg(test)] mod tests` (which by convention closes a file),
/// without comments: a doc comment naming a module does not depend on it.
fn without_tests(text: &str) -> String {
    let cut = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..cut]
        .lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `foo` for a line `mod foo;` or `pub(crate) mod foo;`.
fn declared_module(line: &str) -> Option<String> {
    let line = line.trim();
    let rest = line
        .strip_prefix("pub(crate) mod ")
        .or_else(|| line.strip_prefix("pub mod "))
        .or_else(|| line.strip_prefix("mod "))?;
    Some(rest.strip_suffix(';')?.to_owned())
}

fn child_path(parent: &str, child: &str) -> String {
    if parent == "crate" {
        child.to_owned()
    } else {
        format!("{parent}::{child}")
    }
}

fn parent_of(module: &str) -> &str {
    module
        .rsplit_once("::")
        .map_or("crate", |(parent, _)| parent)
}

/// The modules `module`'s code refers to.
fn imports(module: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    // The longest known module at the start of a path.
    let resolve = |segments: &[&str]| -> Option<String> {
        (1..=segments.len())
            .rev()
            .map(|n| segments[..n].join("::"))
            .find(|candidate| known.contains(candidate))
    };
    let children: BTreeSet<String> = text.lines().filter_map(declared_module).collect();
    let mut found = BTreeSet::new();
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.contains("::"))
        .collect();
    for word in words {
        let segments: Vec<&str> = word.split("::").filter(|s| !s.is_empty()).collect();
        let target = match segments.as_slice() {
            ["crate", rest @ ..] => resolve(rest),
            ["super", rest @ ..] => {
                let parent = parent_of(module);
                let mut path: Vec<&str> = if parent == "crate" {
                    Vec::new()
                } else {
                    parent.split("::").collect()
                };
                path.extend_from_slice(rest);
                resolve(&path).or_else(|| (parent != "crate").then(|| parent.to_owned()))
            }
            [first, ..] if children.contains(*first) => Some(child_path(module, first)),
            _ => None,
        };
        if let Some(target) = target.filter(|t| t != module) {
            found.insert(target);
        }
    }
    found
}

#[test]
fn the_module_graph_has_no_cycle() {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(name, text)| (name.clone(), imports(name, text, &known)))
        .collect();
    let shown: String = graph
        .iter()
        .map(|(m, deps)| {
            format!(
                "{m} -> {}\n",
                deps.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();

    println!("{shown}");

    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|m| *m == module) {
            let mut cycle: Vec<String> = path[i..].iter().map(|m| m.to_string()).collect();
            cycle.push(module.to_owned());
            return Some(cycle);
        }
        if !done.insert(module) {
            return None;
        }
        path.push(module);
        for dep in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = visit(module, &graph, &mut Vec::new(), &mut done) {
            panic!(
                "import cycle: {}\n\nmodule graph:\n{shown}",
                cycle.join(" -> ")
            );
        }
    }

    // The boundaries this layout exists for.
    let uses = |from: &str, to: &str| graph[from].contains(to);
    for backend in known.iter().filter(|m| m.starts_with("backend")) {
        for forbidden in [
            "connection",
            "hub",
            "broker",
            "queue",
            "frame",
            "actor",
            "ws",
            "api",
        ] {
            assert!(
                !uses(backend, forbidden),
                "{backend} must not know {forbidden}:\n{shown}"
            );
        }
    }
    for module in ["frame", "model", "queue", "metrics", "hub", "backend"] {
        assert!(
            !uses(module, "broker"),
            "{module} must not reach the broker:\n{shown}"
        );
    }
    assert!(
        !uses("queue", "connection"),
        "queue.rs knows nothing of connections:\n{shown}"
    );
    for module in ["api", "actor", "server", "ws"] {
        for inner in ["hub", "backend"] {
            assert!(
                !uses(module, inner),
                "{module} goes through the broker, not {inner}:\n{shown}"
            );
        }
    }
    // The checker itself sees imports: the crate has a root and the broker reaches the hub.
    assert!(uses("crate", "server") && uses("broker", "hub"), "{shown}");
}
