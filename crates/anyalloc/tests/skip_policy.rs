//! No silent skips. A test that needs something from the system (a program,
//! the rseq fast path, a kernel facility) and does not find it must fail,
//! unless `ANYALLOC_ALLOW_SKIP=1` is set; then it prints a line starting
//! `skipped:` and returns. This file holds every test and example of this
//! crate to that rule: a source that prints "skipped" must consult
//! `ANYALLOC_ALLOW_SKIP`, so a skip can never pass unnoticed in CI (which
//! never sets it).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether a line announces a skip (a print of a "skipped" message).
fn announces_skip(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    (lower.contains("println!") || lower.contains("eprintln!") || lower.contains("write"))
        && (lower.contains("\"skipped") || lower.contains("\"skipping"))
}

#[test]
fn every_skip_is_allowed_explicitly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("tests"), &mut files);
    sources(&root.join("examples"), &mut files);
    assert!(
        files.len() > 10,
        "the crate's tests and examples were found: {files:?}"
    );
    let me = Path::new(file!()).file_name().unwrap();
    let mut offenders = Vec::new();
    for file in &files {
        if file.file_name() == Some(me) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("a readable source");
        let skips: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| announces_skip(l))
            .map(|(i, _)| i + 1)
            .collect();
        if !skips.is_empty() && !text.contains("ANYALLOC_ALLOW_SKIP") {
            offenders.push(format!("{} (lines {skips:?})", file.display()));
        }
    }
    assert!(
        offenders.is_empty(),
        "these sources skip without consulting ANYALLOC_ALLOW_SKIP: {offenders:?}"
    );
}

#[test]
fn the_skip_detector_sees_a_silent_skip() {
    assert!(announces_skip(
        r#"        println!("skipped: sqlite3 not installed");"#
    ));
    assert!(announces_skip(r#"eprintln!("skipping: no rseq");"#));
    assert!(!announces_skip(r#"let skipped = 3;"#));
}
