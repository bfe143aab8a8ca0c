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
        .map(without_comment)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A line up to a `//` that is not inside a string literal.
fn without_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let (mut in_string, mut escaped) = (false, false);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Every path that starts at `crate`, `super` or `self` in `code`, with `use` groups
/// (`crate::{a, b::{c, D}}`) spelled out: `["crate", "a"]`, `["crate", "b", "c"]`, ...
fn rooted_paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut paths = Vec::new();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        if starts_word && is_ident(chars[i]) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if matches!(word.as_str(), "crate" | "super" | "self") {
                let mut pos = i;
                tree(&chars, &mut pos, vec![word], &mut paths);
                i = pos;
            }
        } else {
            i += 1;
        }
    }
    paths
}

/// Reads `::segment::...` or `::{a, b}` after `prefix` from `chars[*pos..]`.
fn tree(chars: &[char], pos: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let skip_space = |pos: &mut usize| {
        while *pos < chars.len() && chars[*pos].is_whitespace() {
            *pos += 1;
        }
    };
    let mut path = prefix;
    loop {
        skip_space(pos);
        if chars.get(*pos) != Some(&':') || chars.get(*pos + 1) != Some(&':') {
            out.push(path);
            return;
        }
        *pos += 2;
        skip_space(pos);
        match chars.get(*pos) {
            Some('{') => {
                *pos += 1;
                loop {
                    skip_space(pos);
                    match chars.get(*pos) {
                        Some('}') => {
                            *pos += 1;
                            return;
                        }
                        Some(',') => *pos += 1,
                        Some(c) if is_ident(*c) => {
                            let start = *pos;
                            while *pos < chars.len() && is_ident(chars[*pos]) {
                                *pos += 1;
                            }
                            let mut inner = path.clone();
                            inner.push(chars[start..*pos].iter().collect());
                            tree(chars, pos, inner, out);
                        }
                        // `*`, `as name`, or the end of the text.
                        Some(_) => *pos += 1,
                        None => return,
                    }
                }
            }
            Some(c) if is_ident(*c) => {
                let start = *pos;
                while *pos < chars.len() && is_ident(chars[*pos]) {
                    *pos += 1;
                }
                path.push(chars[start..*pos].iter().collect());
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
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

/// The modules `module`'s code refers to.
fn imports(module: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    // The longest known module at the start of a path.
    let resolve = |segments: &[String]| -> Option<String> {
        (1..=segments.len())
            .rev()
            .map(|n| segments[..n].join("::"))
            .find(|candidate| known.contains(candidate))
    };
    let own: Vec<String> = if module == "crate" {
        Vec::new()
    } else {
        module.split("::").map(str::to_owned).collect()
    };
    let children: BTreeSet<String> = text.lines().filter_map(declared_module).collect();
    let mut paths: Vec<Vec<String>> = rooted_paths(text);
    // A path may also start at a child module: `patterns::PatternIndex` in `hub`.
    for word in text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
        if let Some((first, _)) = word.split_once("::")
            && children.contains(first)
        {
            paths.push(vec!["self".to_owned(), first.to_owned()]);
        }
    }
    let mut found = BTreeSet::new();
    for path in paths {
        // Make it absolute (without the leading `crate`).
        let mut absolute = own.clone();
        let mut rest = path.as_slice();
        match rest.first().map(String::as_str) {
            Some("crate") => {
                absolute.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            _ => {}
        }
        while rest.first().map(String::as_str) == Some("super") {
            absolute.pop();
            rest = &rest[1..];
        }
        let parent_only = absolute.clone();
        absolute.extend(rest.iter().cloned());
        let target = resolve(&absolute).or_else(|| {
            // `super::Item`: the parent module itself.
            (!parent_only.is_empty()).then(|| parent_only.join("::"))
        });
        if let Some(target) = target.filter(|t| t != module) {
            found.insert(target);
        }
    }
    found
}

#[test]
fn the_parser_sees_every_form_of_path() {
    let known: BTreeSet<String> = ["a", "b", "b::c", "b::c::g", "d", "e", "f", "h"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let code = without_tests(
        "use crate::{a::X, b::{c::Y, Z}};\nuse super::super::d::W; // crate::e in a comment\n\
         let url = \"ws://x\"; crate::f::go();\nmod g;\nfn k() { g::run(); self::g::x() }\n\
         #[cfg(test)]\nmod tests { use crate::h; }\n",
    );
    let got: Vec<String> = imports("b::c", &code, &known).into_iter().collect();
    assert_eq!(got, ["a", "b", "b::c::g", "d", "f"]);
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
