//! The documents a newcomer reads: every relative link in the project's Markdown resolves to a
//! file or folder of the repository, every command of README.md's quick start exists (a script
//! that is there and executable; a binary whose `--help` succeeds), and no document carries
//! notes of who did what when.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The project's own Markdown files (build outputs, runs and fetched data left out).
fn documents() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable folder") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && !["target", "runs", "node_modules"].contains(&&*name) {
                    walk(&path, out);
                }
            } else if name.ends_with(".md") {
                out.push(path);
            }
        }
    }
    let mut out = vec![];
    walk(&root(), &mut out);
    out.sort();
    out
}

/// Markdown link targets in `text`: the `T` of every `[...](T)`.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = vec![];
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            targets.push(rest[..end].trim().to_string());
            rest = &rest[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_in_the_documents_resolves() {
    let docs = documents();
    assert!(docs.len() >= 8, "found only {docs:?}");
    let mut broken = vec![];
    for doc in &docs {
        let text = std::fs::read_to_string(doc).expect("readable document");
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap_or_default();
            let resolved = doc.parent().expect("folder").join(file);
            if !resolved.exists() {
                broken.push(format!("{}: {target}", doc.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to nothing: {broken:#?}");
}

#[test]
fn link_targets_are_read_from_markdown() {
    assert_eq!(
        link_targets("see [a](docs/a.md#x) and [b](http://x) or [c]( c.md )"),
        vec!["docs/a.md#x", "http://x", "c.md"]
    );
}

#[test]
fn every_quick_start_command_exists() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Two commands"))
        .expect("README.md has a `## Two commands` section");
    let block = section
        .split("```")
        .nth(1)
        .expect("the section opens with a code block");
    let commands: Vec<&str> = block
        .lines()
        .skip(1)
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(commands.len() >= 2, "quick start: {commands:?}");
    for command in commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words[0] {
            "cargo" => assert!(
                std::process::Command::new("cargo")
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success()),
                "`{command}`: cargo is not on PATH"
            ),
            script if script.starts_with("scripts/") => {
                use std::os::unix::fs::PermissionsExt;
                let path = root().join(script);
                let mode = std::fs::metadata(&path)
                    .unwrap_or_else(|e| panic!("`{command}`: {}: {e}", path.display()))
                    .permissions()
                    .mode();
                assert!(mode & 0o111 != 0, "`{command}`: {script} is not executable");
                // The demo script runs `trainer demo`: that command must exist too.
                if script == "scripts/demo" {
                    e2e::run_ok("trainer", &["demo", "--help"]);
                }
            }
            bin => {
                let name = bin.rsplit('/').next().unwrap_or(bin);
                e2e::run_ok(name, &[words[1], "--help"]);
            }
        }
    }
}

/// Every script that starts with `cd "$(dirname "$0")/..."` must land on the repository root
/// (a script moved to another folder depth and not edited would run from the wrong place).
#[test]
fn every_script_changes_to_the_repository_root() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let root = root().canonicalize().expect("root");
    let mut scripts = vec![root.join(".ci/run")];
    walk(&root.join("scripts"), &mut scripts);
    let marker = "cd \"$(dirname \"$0\")/";
    let mut checked = 0;
    for script in scripts {
        let Ok(text) = std::fs::read_to_string(&script) else {
            continue;
        };
        for line in text.lines().filter(|l| l.trim_start().starts_with(marker)) {
            let relative = line.trim_start()[marker.len()..].trim_end_matches('"');
            let target = script.parent().expect("folder").join(relative);
            assert_eq!(
                target.canonicalize().ok(),
                Some(root.clone()),
                "{}: `{line}` does not reach the repository root",
                script.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} scripts checked");
}

#[test]
fn no_document_tells_the_history_of_its_making() {
    let mut notes = vec![];
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable document");
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            // "session 7", "sessions so far", "this session": a working session, not MQTT's.
            let numbered = lower.match_indices("session ").any(|(i, m)| {
                lower[i + m.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            });
            let working_session =
                numbered || lower.contains("this session") || lower.contains("sessions so far");
            if working_session {
                notes.push(format!("{}:{}: {line}", doc.display(), n + 1));
            }
        }
    }
    assert!(notes.is_empty(), "working-session notes: {notes:#?}");
}
