//! Conventions checked by a plain test (after rust-analyzer's `xtask/src/tidy.rs`): the crate
//! edges ARCHITECTURE.md states as invariants, no circle of `use crate::` imports between the
//! files of one crate, no file over 600 lines of code without a reason at its top, every path
//! ARCHITECTURE.md names exists, and each crate's `//!` module table lists its modules.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a tidy check fails loudly by design

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// The workspace's packages as `cargo metadata` declares them (no resolution: what each
/// manifest says is what the invariants are about).
fn packages() -> Vec<Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["packages"].as_array().unwrap().clone()
}

struct Dep {
    from: String,
    to: String,
    optional: bool,
    features: Vec<String>,
}

/// Every normal (not dev, not build) dependency of a workspace package.
fn normal_deps(packages: &[Value]) -> Vec<Dep> {
    let mut out = Vec::new();
    for p in packages {
        for d in p["dependencies"].as_array().unwrap() {
            if !d["kind"].is_null() {
                continue;
            }
            out.push(Dep {
                from: p["name"].as_str().unwrap().to_owned(),
                to: d["name"].as_str().unwrap().to_owned(),
                optional: d["optional"].as_bool().unwrap_or(false),
                features: d["features"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            });
        }
    }
    out
}

fn users_of(deps: &[Dep], to: &str) -> BTreeSet<String> {
    deps.iter()
        .filter(|d| d.to == to)
        .map(|d| d.from.clone())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// The features of `package` that turn on `dependency` (`dep:x`, `x`, or `x/feature`).
fn features_enabling(packages: &[Value], package: &str, dependency: &str) -> BTreeSet<String> {
    let p = packages.iter().find(|p| p["name"] == package).unwrap();
    let mut out = BTreeSet::new();
    for (feature, enables) in p["features"].as_object().unwrap() {
        for e in enables.as_array().unwrap() {
            let e = e.as_str().unwrap();
            let name = e.trim_start_matches("dep:").split('/').next().unwrap();
            if name.trim_end_matches('?') == dependency {
                out.insert(feature.clone());
            }
        }
    }
    out
}

#[test]
fn crate_edges_are_the_ones_architecture_md_states() {
    let packages = packages();
    let deps = normal_deps(&packages);
    // Only calsync-store speaks SQL, only calsync-graph speaks HTTP to Graph; graph-sim is
    // Graph's side, whose handshake and notification deliveries call the client's receiver;
    // calsync-sinks posts the change feed to the apps' own endpoints (never to Graph).
    assert_eq!(users_of(&deps, "sqlx"), set(&["calsync-store"]));
    assert_eq!(
        users_of(&deps, "reqwest"),
        set(&["calsync-graph", "calsync-sinks", "graph-sim"])
    );
    // The read model's detail columns are declared once, in a crate that knows neither HTTP
    // nor SQL, read by the parser and bound by the store.
    let details_deps: Vec<&Dep> = deps
        .iter()
        .filter(|d| d.from == "calsync-details")
        .collect();
    assert!(
        details_deps.iter().all(|d| !d.to.starts_with("calsync")),
        "calsync-details depends on a calsync crate"
    );
    assert!(
        users_of(&deps, "calsync-details").is_superset(&set(&["calsync-graph", "calsync-store"])),
        "the parser and the store both take the detail columns from calsync-details"
    );
    // graph-sim reaches calsync only through the demo feature and the test kit, and knows
    // no calsync crate itself.
    assert_eq!(
        users_of(&deps, "graph-sim"),
        set(&["calsync", "calsync-testkit"])
    );
    let sim_deps: Vec<&Dep> = deps.iter().filter(|d| d.from == "graph-sim").collect();
    assert!(
        sim_deps.iter().all(|d| !d.to.starts_with("calsync")),
        "graph-sim depends on a calsync crate"
    );
    // The shipped daemon (`--no-default-features`) links neither the simulator, nor the test
    // kit, nor the benchmarks: each is optional in calsync and turned on by `demo` alone.
    for dev in ["graph-sim", "calsync-testkit", "calsync-bench"] {
        for d in deps.iter().filter(|d| d.to == dev) {
            if d.from == "calsync-testkit" || d.from == "calsync-bench" {
                continue;
            }
            assert_eq!(d.from, "calsync", "{} depends on {dev}", d.from);
            assert!(
                d.optional,
                "calsync depends on {dev} without the demo feature"
            );
            assert_eq!(
                features_enabling(&packages, "calsync", dev),
                set(&["demo"]),
                "only the demo feature may turn on {dev}"
            );
        }
    }
    // The store's fault points are compiled only into the test kit and the benchmarks (and
    // dev-dependencies, which this list leaves out).
    for d in deps.iter().filter(|d| d.to == "calsync-store") {
        if d.features.iter().any(|f| f == "testing") {
            assert!(
                d.from == "calsync-testkit" || d.from == "calsync-bench",
                "{} compiles calsync-store's testing hooks",
                d.from
            );
        }
    }
    let store_testing: BTreeSet<String> = packages
        .iter()
        .filter(|p| p["name"] != "calsync-testkit" && p["name"] != "calsync-bench")
        .flat_map(|p| {
            p["features"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, en)| {
                    en.as_array()
                        .unwrap()
                        .iter()
                        .any(|e| e.as_str().unwrap().contains("calsync-store/testing"))
                })
                .map(|(f, _)| format!("{}/{f}", p["name"].as_str().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(store_testing.is_empty(), "{store_testing:?}");
}

/// The `src` directories of the workspace's crates.
fn crate_sources() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The module paths a file's code names through the crate root: every `use crate::...;`
/// (`use crate::a::{b, c::d}` gives `[a, b]`, `[a, c, d]`) and every `crate::a::b` written in
/// place. Comments are left out; prefixes are resolved to files later.
fn use_paths(text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let is_use = rest[..i].trim_end().ends_with("use");
        let end = if is_use {
            after.find(';').unwrap_or(after.len())
        } else {
            // A path in place: segments while they are names joined by `::`.
            let mut n = 0;
            let bytes = after.as_bytes();
            while n < bytes.len()
                && (bytes[n].is_ascii_alphanumeric()
                    || bytes[n] == b'_'
                    || (bytes[n] == b':' && bytes.get(n + 1) == Some(&b':'))
                    || (bytes[n] == b':' && n > 0 && bytes[n - 1] == b':'))
            {
                n += 1;
            }
            n
        };
        expand(&after[..end], &mut Vec::new(), &mut out);
        rest = &after[end..];
    }
    out
}

fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let n = prefix.len();
        prefix.extend(head);
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], prefix, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], prefix, out);
        prefix.truncate(n);
    } else {
        let mut path = prefix.clone();
        path.extend(
            tree.split(" as ")
                .next()
                .unwrap_or("")
                .split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty() && *s != "self")
                .map(str::to_owned),
        );
        if !path.is_empty() {
            out.push(path);
        }
    }
}

/// The file a module path lives in: the longest prefix that names a module file (`a/b.rs`,
/// `a/b/mod.rs`); `None` for an item of the crate root.
fn module_file(src: &Path, path: &[String]) -> Option<PathBuf> {
    for n in (1..=path.len()).rev() {
        let rel: PathBuf = path[..n].iter().collect();
        let file = src.join(&rel).with_extension("rs");
        if file.is_file() {
            return Some(file);
        }
        let modrs = src.join(&rel).join("mod.rs");
        if modrs.is_file() {
            return Some(modrs);
        }
    }
    None
}

/// The code of a file before its `#[cfg(test)]` module.
fn code_of(text: &str) -> &str {
    match text.find("\n#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    }
}

#[test]
fn no_file_of_a_crate_imports_one_that_imports_it_back() {
    let mut circles = Vec::new();
    for src in crate_sources() {
        let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
        for file in rust_files(&src) {
            let text = std::fs::read_to_string(&file).unwrap();
            for path in use_paths(code_of(&text)) {
                if let Some(to) = module_file(&src, &path) {
                    if to != file {
                        edges.entry(file.clone()).or_default().insert(to);
                    }
                }
            }
        }
        // A depth-first search; any edge back to a file on the stack closes a circle.
        fn visit(
            f: &PathBuf,
            edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
            stack: &mut Vec<PathBuf>,
            done: &mut BTreeSet<PathBuf>,
            circles: &mut Vec<String>,
            src: &Path,
        ) {
            if done.contains(f) {
                return;
            }
            if let Some(i) = stack.iter().position(|s| s == f) {
                let names: Vec<String> = stack[i..]
                    .iter()
                    .chain(std::iter::once(f))
                    .map(|p| p.strip_prefix(src).unwrap().display().to_string())
                    .collect();
                circles.push(format!("{}: {}", src.display(), names.join(" -> ")));
                return;
            }
            stack.push(f.clone());
            for to in edges.get(f).into_iter().flatten() {
                visit(to, edges, stack, done, circles, src);
            }
            stack.pop();
            done.insert(f.clone());
        }
        let mut done = BTreeSet::new();
        for f in edges.keys() {
            visit(f, &edges, &mut Vec::new(), &mut done, &mut circles, &src);
        }
    }
    assert!(
        circles.is_empty(),
        "circles of imports:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_import_reader_expands_groups_and_renames() {
    let got = use_paths(
        "use crate::a::{b, c::{d, e as f}, self};\nuse crate::Engine;\n\
         // crate::commented::out\nlet x = crate::g::h::RETRY + 1;\n",
    );
    let want: Vec<Vec<String>> = [
        vec!["a", "b"],
        vec!["a", "c", "d"],
        vec!["a", "c", "e"],
        vec!["a"],
        vec!["Engine"],
        vec!["g", "h", "RETRY"],
    ]
    .iter()
    .map(|p| p.iter().map(|s| (*s).to_owned()).collect())
    .collect();
    assert_eq!(got, want);
}

/// The most lines of code (before the tests) a file has without a reason at its top.
const MAX_LINES: usize = 600;

#[test]
fn no_file_is_over_600_lines_of_code_without_a_reason_at_its_top() {
    let mut long = Vec::new();
    for src in crate_sources() {
        for file in rust_files(&src) {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines = code_of(&text).lines().count();
            let head: String = text.lines().take(15).collect::<Vec<_>>().join("\n");
            if lines > MAX_LINES && !head.contains("Longer than 600 lines because") {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these, or say at the top why not (\"Longer than 600 lines because ...\"):\n{}",
        long.join("\n")
    );
}

/// Every file under the repository (but `target` and dot-directories), relative to it.
fn repo_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &root(), &mut out);
    out
}

#[test]
fn every_path_architecture_md_names_exists() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let files = repo_files();
    let exts = [".rs", ".md", ".sql", ".toml", ".yml", ".yaml", ".service"];
    let mut missing = Vec::new();
    for (i, token) in text.split('`').enumerate() {
        // Odd pieces are inside backticks.
        if i % 2 == 0 || token.contains(' ') || token.contains("::") {
            continue;
        }
        let token = token.trim_end_matches('/');
        let looks_like_path = exts.iter().any(|e| token.ends_with(e));
        if !looks_like_path {
            continue;
        }
        // `shared/` lies beside the checkout (the project's shared notes), not in it: a clean
        // clone elsewhere (CI) may not have it, so it is not the repository's to check.
        if token.starts_with("shared/") {
            continue;
        }
        let found = if token.contains('/') {
            // A path from the repository or from `crates/`, or the tail of a longer one.
            files.iter().any(|f| {
                f == Path::new(token) || f == &Path::new("crates").join(token) || f.ends_with(token)
            })
        } else {
            files
                .iter()
                .any(|f| f.file_name().is_some_and(|n| n == token))
        };
        if !found {
            missing.push(token.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn each_crates_module_table_lists_its_modules() {
    let mut wrong = Vec::new();
    for src in crate_sources() {
        let root_file = if src.join("lib.rs").is_file() {
            src.join("lib.rs")
        } else {
            src.join("main.rs")
        };
        let text = std::fs::read_to_string(&root_file).unwrap();
        let table: String = text
            .lines()
            .filter(|l| l.starts_with("//! |"))
            .collect::<Vec<_>>()
            .join("\n");
        let modules: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter_map(|l| {
                let l = l.strip_prefix("pub ").unwrap_or(l);
                let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
                l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
            })
            .collect();
        for m in &modules {
            if !table.contains(&format!("`{m}`")) {
                wrong.push(format!("{}: module `{m}`", root_file.display()));
            }
        }
        // And no row for a module that is gone.
        for row in table.lines().skip(2) {
            let Some(name) = row.split('`').nth(1) else {
                continue;
            };
            if !modules.iter().any(|m| m == name) {
                wrong.push(format!(
                    "{}: a row for `{name}`, no such module",
                    root_file.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "module tables out of date:\n{}",
        wrong.join("\n")
    );
}

/// `migrations/README.md` names, for each view, the last migration that defines it: the copy
/// to start from when a migration changes the view.
#[test]
fn migrations_readme_names_the_current_definition_of_each_view() {
    let dir = root().join("migrations");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for f in &files {
        let sql = std::fs::read_to_string(f).unwrap();
        for line in sql.lines() {
            let l = line.trim_start();
            let Some(rest) = l
                .strip_prefix("CREATE OR REPLACE VIEW ")
                .or_else(|| l.strip_prefix("CREATE VIEW "))
            else {
                continue;
            };
            let view = rest.split_whitespace().next().unwrap().to_owned();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            last.insert(view, name);
        }
    }
    assert!(last.contains_key("calendar_events"), "{last:?}");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for (view, file) in &last {
        let row = format!("| `{view}` | `{file}` |");
        assert!(
            readme.contains(&row),
            "migrations/README.md should say `{file}` holds the current `{view}` (want the row {row})"
        );
    }
}
