//! The examples run in CI through their own tests: each example file has a
//! `#[cfg(test)] mod tests` that runs its scenario for about a second, and
//! `Cargo.toml` declares it with `test = true`, so `cargo test` (and the
//! README's `cargo test --workspace --release --all-features`) builds the
//! example as a test target and runs those tests. This file guards that
//! wiring: an example that lost `test = true`, its tests, or the run command
//! in its documentation fails here instead of silently leaving CI.
//!
//! (Running the example binaries from here would need their paths, which
//! cargo does not give integration tests, or a nested `cargo run`, which is
//! slow and can wait forever on the build directory's lock.)

use std::path::Path;

const EXAMPLES: [&str; 3] = ["profiler", "flow_table", "realtime"];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `(name, test = true?)` of every `[[example]]` table in the manifest.
fn declared_examples(manifest: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut current: Option<(String, bool)> = None;
    let mut in_example = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            if let Some(c) = current.take() {
                out.push(c);
            }
            in_example = line == "[[example]]";
            if in_example {
                current = Some((String::new(), false));
            }
            continue;
        }
        if !in_example {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        if let Some(c) = current.as_mut() {
            match key.trim() {
                "name" => c.0 = value.to_string(),
                "test" => c.1 = value == "true",
                _ => {}
            }
        }
    }
    out.extend(current);
    out
}

#[test]
fn every_example_runs_its_tests_under_cargo_test() {
    let manifest = std::fs::read_to_string(manifest_dir().join("Cargo.toml")).unwrap();
    let declared = declared_examples(&manifest);
    for name in EXAMPLES {
        assert!(
            declared.iter().any(|(n, test)| n == name && *test),
            "examples/{name}.rs must be declared in Cargo.toml with `test = true` \
             (found {declared:?})"
        );
    }
}

#[test]
fn every_example_says_what_it_solves_and_how_to_run_it() {
    for name in EXAMPLES {
        let path = manifest_dir().join("examples").join(format!("{name}.rs"));
        let src = std::fs::read_to_string(&path).unwrap();
        let doc: Vec<&str> = src.lines().take_while(|l| l.starts_with("//!")).collect();
        let doc = doc.join("\n");
        assert!(
            doc.contains("**The problem.**") && doc.contains("**How anyalloc solves it.**"),
            "{name}: the module documentation says what problem it solves and how"
        );
        let run = format!("cargo run --release -p anyalloc --example {name}");
        assert!(
            doc.contains(&run),
            "{name}: the documentation shows `{run}`"
        );
        assert!(
            src.contains("#[cfg(test)]") || src.contains("#[cfg(all(test"),
            "{name}: the example has tests"
        );
        assert!(
            src.contains("\"--seconds\""),
            "{name}: takes --seconds to run briefly"
        );
    }
}

#[test]
fn the_manifest_parser_reads_example_tables() {
    let toml = "[package]\nname = \"x\"\n\n[[example]]\nname = \"a\"\ntest = true\n\n\
                [[example]]\nname = \"b\"\n\n[[test]]\nname = \"c\"\ntest = true\n";
    assert_eq!(
        declared_examples(toml),
        vec![("a".to_string(), true), ("b".to_string(), false)]
    );
}
