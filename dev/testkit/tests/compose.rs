//! docker-compose.yml cannot run here (no Docker engine), so this checks what
//! can be checked without one: it parses, and offers the same three services
//! with the settings Tidemark depends on and the ports `dev/stack env` prints.

use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn compose() -> Yaml {
    let text = std::fs::read_to_string(format!("{ROOT}/docker-compose.yml"))
        .expect("docker-compose.yml at the repository root");
    let mut docs = YamlLoader::load_from_str(&text).expect("docker-compose.yml is valid YAML");
    assert_eq!(docs.len(), 1, "one YAML document");
    docs.remove(0)
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn names_the_three_services() {
    let doc = compose();
    let services = doc["services"].as_hash().expect("a services map");
    let mut names: Vec<&str> = services.keys().filter_map(Yaml::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["kafka", "opensearch", "postgres"]);
}

#[test]
fn postgres_has_logical_replication_and_the_replication_role() {
    let doc = compose();
    let postgres = &doc["services"]["postgres"];
    let command = strings(&postgres["command"]);
    assert!(
        command.iter().any(|c| c == "wal_level=logical"),
        "{command:?}"
    );
    assert_eq!(strings(&postgres["ports"]), ["127.0.0.1:55432:5432"]);
    let volumes = strings(&postgres["volumes"]);
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let host_path = volumes[0].split(':').next().expect("a host path");
    let sql =
        std::fs::read_to_string(format!("{ROOT}/{host_path}")).expect("the init script exists");
    assert!(
        sql.contains("tidemark_repl WITH LOGIN REPLICATION"),
        "{sql}"
    );
}

#[test]
fn kafka_is_kraft_and_opensearch_has_no_security_plugin() {
    let doc = compose();
    let kafka = &doc["services"]["kafka"]["environment"];
    assert_eq!(
        kafka["KAFKA_PROCESS_ROLES"].as_str(),
        Some("broker,controller")
    );
    assert_eq!(
        kafka["KAFKA_ADVERTISED_LISTENERS"].as_str(),
        Some("PLAINTEXT://127.0.0.1:59092")
    );
    let opensearch = &doc["services"]["opensearch"];
    assert_eq!(
        opensearch["environment"]["DISABLE_SECURITY_PLUGIN"].as_str(),
        Some("true")
    );
    assert_eq!(strings(&opensearch["ports"]), ["127.0.0.1:9250:9200"]);
}
