//! The workspace's layering, read from `cargo metadata`: every crate depends
//! only downward, so a stage never reaches into another stage.
//!
//! ```text
//! stages:      tidemark-producer   tidemark-consumer   tidemark-replay
//! layers:      tidemark-postgres   tidemark-index   tidemark-kafka
//! foundation:  tidemark-schemas    tidemark-process
//! ```
//!
//! Tests and benches may use anything (`[dev-dependencies]` are not checked):
//! a pipeline test needs a producer to feed a consumer.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

const STAGES: [&str; 3] = ["tidemark-producer", "tidemark-consumer", "tidemark-replay"];

/// What each workspace crate may depend on among the workspace's crates,
/// and which outside crates it must not (a layer that talks to one server
/// does not link the client of another).
fn rules() -> BTreeMap<&'static str, (Vec<&'static str>, Vec<&'static str>)> {
    let foundation = vec!["tidemark-schemas", "tidemark-process"];
    let layers = [
        foundation.clone(),
        vec!["tidemark-postgres", "tidemark-index", "tidemark-kafka"],
    ]
    .concat();
    BTreeMap::from([
        (
            "tidemark-schemas",
            (vec![], vec!["tokio-postgres", "rdkafka", "opensearch"]),
        ),
        (
            "tidemark-process",
            (vec![], vec!["tokio-postgres", "rdkafka", "opensearch"]),
        ),
        // Layers are libraries: typed errors (thiserror), no anyhow.
        (
            "tidemark-postgres",
            (
                vec!["tidemark-schemas"],
                vec!["rdkafka", "opensearch", "anyhow"],
            ),
        ),
        (
            "tidemark-index",
            (
                vec!["tidemark-schemas"],
                vec!["rdkafka", "tokio-postgres", "pgwire-replication", "anyhow"],
            ),
        ),
        (
            "tidemark-kafka",
            (
                vec!["tidemark-schemas"],
                vec![
                    "opensearch",
                    "tokio-postgres",
                    "pgwire-replication",
                    "anyhow",
                ],
            ),
        ),
        ("tidemark-producer", (layers.clone(), vec!["opensearch"])),
        (
            "tidemark-consumer",
            (layers.clone(), vec!["tokio-postgres", "pgwire-replication"]),
        ),
        ("tidemark-replay", (layers, vec![])),
        ("tidemark-testkit", (foundation, vec![])),
    ])
}

/// (crate, its normal and build dependencies) for every workspace member.
fn workspace() -> Vec<(String, Vec<String>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata is JSON");
    metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|package| {
            let deps = package["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().expect("name").to_owned())
                .collect();
            (package["name"].as_str().expect("name").to_owned(), deps)
        })
        .collect()
}

#[test]
fn every_crate_depends_only_downward() {
    let rules = rules();
    let members = workspace();
    let mut broken = Vec::new();
    for (name, deps) in &members {
        let Some((allowed, forbidden)) = rules.get(name.as_str()) else {
            broken.push(format!(
                "{name} is not placed in a layer: add it to rules() in {}",
                file!()
            ));
            continue;
        };
        for dep in deps {
            let inside = dep.starts_with("tidemark-");
            if inside && !allowed.contains(&dep.as_str()) {
                broken.push(format!("{name} depends on {dep}, which is not below it"));
            }
            if forbidden.contains(&dep.as_str()) {
                broken.push(format!(
                    "{name} depends on {dep}, which its layer must not link (another layer's client, or anyhow in a library)"
                ));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
    for stage in STAGES {
        assert!(
            members.iter().any(|(name, _)| name == stage),
            "{stage} is missing from the workspace"
        );
    }
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A stage crate links anyhow for its binary, so `cargo metadata` cannot
/// tell its library apart: read the sources. Library code returns typed
/// errors (thiserror); `anyhow` lives only in `src/bin/` and `main.rs`.
#[test]
fn libraries_return_typed_errors() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut offenders = Vec::new();
    for stage in STAGES {
        let src = root.join(stage.trim_start_matches("tidemark-")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        assert!(
            !files.is_empty(),
            "{stage}: no sources under {}",
            src.display()
        );
        for file in files {
            let relative = file.strip_prefix(&src).unwrap_or(&file);
            if relative.starts_with("bin") || relative == std::path::Path::new("main.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("a source file reads");
            let uses = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains("anyhow::") || l.contains("anyhow!"));
            if uses {
                offenders.push(format!("{stage}: src/{}", relative.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "library code uses anyhow (return the crate's error type instead):\n{}",
        offenders.join("\n")
    );
}
