//! Throwaway PostgreSQL clusters for tests that need a server configured
//! differently from the shared stack (`wal_level=replica`, a standby, TLS
//! only), which must never be reconfigured under other tests.
//!
//! A cluster lives in its own directory under /var/tmp, listens on a free
//! loopback port, runs as the `postgres` OS user when we are root (it
//! refuses root), and is stopped and deleted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::unique_name;

/// The superuser's password in every scratch cluster.
pub const PASSWORD: &str = "scratch";

#[derive(Debug)]
pub struct ScratchPostgres {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// The certificates of a secured cluster ([`ScratchPostgres::secured`]).
    pub certs: Option<Certs>,
}

/// The certificates a secured cluster was made with, made at start-up with
/// `openssl` (never committed): a CA, the server's certificate signed by it
/// for `127.0.0.1` only (so `verify-full` to `localhost` is a name
/// mismatch), and a second, unrelated CA (the wrong one).
#[derive(Debug, Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub other_ca: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server packages under /usr/lib/postgresql (dev/stack up installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// A command running `program` as the cluster owner (`postgres` when we
/// are root), with `env` set.
fn as_owner(program: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "env"]);
        c.args(env.iter().map(|(k, v)| format!("{k}={v}")));
        c.arg(program);
        c
    } else {
        let mut c = Command::new(program);
        c.envs(env.iter().copied());
        c
    };
    command.stdin(std::process::Stdio::null());
    command
}

/// Runs a PostgreSQL program as the cluster owner.
fn run(program: &Path, args: &[&str]) {
    let status = as_owner(program, &[])
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        status.success(),
        "{} {args:?} failed: {status}",
        program.display()
    );
}

fn owned_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from("/var/tmp").join(unique_name(name));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "chown {}", dir.display());
    }
    dir
}

impl ScratchPostgres {
    /// A new primary with the given `postgresql.conf` settings.
    pub fn primary(settings: &[(&str, &str)]) -> ScratchPostgres {
        Self::create(settings, false)
    }

    /// A new primary with logical WAL that accepts TCP connections only over
    /// TLS (`ssl = on`, `hostssl` lines only; password authentication), with
    /// certificates made for it ([`Certs`]). The local socket
    /// ([`ScratchPostgres::socket_url`]) serves test set-up.
    pub fn secured() -> ScratchPostgres {
        Self::create(&[("wal_level", "logical")], true)
    }

    fn create(settings: &[(&str, &str)], secured: bool) -> ScratchPostgres {
        let bin = pg_bin();
        let dir = owned_dir("scratch_pg");
        let data = dir.join("data");
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, PASSWORD).expect("pwfile");
        if is_root() {
            let _ = Command::new("chown")
                .args(["postgres"])
                .arg(&pwfile)
                .status();
        }
        let data_arg = data.display().to_string();
        let pw_arg = format!("--pwfile={}", pwfile.display());
        run(
            &bin.join("initdb"),
            &[
                "-D",
                &data_arg,
                "-U",
                "postgres",
                &pw_arg,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
            ],
        );
        let mut conf = String::from("\n# scratch cluster\nlisten_addresses = '127.0.0.1'\n");
        conf.push_str(&format!("unix_socket_directories = '{}'\n", dir.display()));
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{value}'\n"));
        }
        let certs = if secured {
            let certs = make_certs(&dir);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                dir.join("server.pem").display(),
                dir.join("server.key").display()
            ));
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl replication all 127.0.0.1/32 scram-sha-256\n",
            )
            .expect("pg_hba.conf");
            Some(certs)
        } else {
            append(
                &data.join("pg_hba.conf"),
                "host replication all 127.0.0.1/32 scram-sha-256\n",
            );
            None
        };
        append(&data.join("postgresql.conf"), &conf);
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status();
        }
        let mut cluster = ScratchPostgres {
            dir,
            port: 0,
            bin,
            certs,
        };
        cluster.start();
        cluster
    }

    /// A streaming standby of this cluster (read-only, in recovery).
    pub fn standby(&self) -> ScratchPostgres {
        let dir = owned_dir("scratch_standby");
        let data = dir.join("data");
        let data_arg = data.display().to_string();
        let port = self.port.to_string();
        let status = as_owner(&self.bin.join("pg_basebackup"), &[("PGPASSWORD", PASSWORD)])
            .args([
                "-D",
                &data_arg,
                "-R",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
            ])
            .status()
            .expect("pg_basebackup");
        assert!(status.success(), "pg_basebackup failed: {status}");
        append(
            &data.join("postgresql.conf"),
            &format!("\nunix_socket_directories = '{}'\n", dir.display()),
        );
        let mut standby = ScratchPostgres {
            dir,
            port: 0,
            bin: self.bin.clone(),
            certs: None,
        };
        standby.start();
        standby
    }

    fn start(&mut self) {
        self.port = crate::ports::free();
        let data = self.dir.join("data").display().to_string();
        let log = self.dir.join("postgres.log").display().to_string();
        let options = format!("-p {}", self.port);
        run(
            &self.bin.join("pg_ctl"),
            &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
        );
    }

    /// Stops the server cleanly, as a restart would, keeps it down for
    /// `down`, and starts it again on the same port.
    pub fn restart(&self, down: std::time::Duration) {
        self.stop("fast");
        std::thread::sleep(down);
        self.start_again();
    }

    /// Stops the server: `fast` (clean) or `immediate` (a crash).
    pub fn stop(&self, mode: &str) {
        let data = self.dir.join("data").display().to_string();
        run(
            &self.bin.join("pg_ctl"),
            &["-D", &data, "-m", mode, "-w", "stop"],
        );
    }

    /// Starts a stopped server again on its port.
    pub fn start_again(&self) {
        let data = self.dir.join("data").display().to_string();
        let log = self.dir.join("postgres.log").display().to_string();
        let options = format!("-p {}", self.port);
        run(
            &self.bin.join("pg_ctl"),
            &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
        );
    }

    /// Promotes a standby to a primary (a new timeline), waiting until done.
    pub fn promote(&self) {
        let data = self.dir.join("data").display().to_string();
        run(&self.bin.join("pg_ctl"), &["-D", &data, "-w", "promote"]);
    }

    /// Superuser URL.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Superuser connection string over the cluster's local socket (no TLS
    /// needed), for test set-up.
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=postgres password={PASSWORD} dbname=postgres",
            self.dir.display(),
            self.port
        )
    }
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and another CA.
fn make_certs(dir: &Path) -> Certs {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_ext = [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ];
    for (name, subject) in [
        ("ca", "/CN=Tidemark test CA"),
        ("other_ca", "/CN=Another CA"),
    ] {
        let key = format!("{name}.key");
        let cert = format!("{name}.pem");
        let mut args = vec![
            "req", "-x509", "-days", "2", "-subj", subject, "-keyout", &key, "-out", &cert,
        ];
        args.extend(ec);
        args.extend(ca_ext);
        openssl(dir, &args);
    }
    let mut args = vec![
        "req",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ];
    args.extend(ec);
    openssl(dir, &args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n",
    )
    .expect("server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("server.key mode");
    Certs {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other_ca.pem"),
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open conf");
    file.write_all(text.as_bytes()).expect("append conf");
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let _ = as_owner(&self.bin.join("pg_ctl"), &[])
            .args(["-D", &data, "-m", "immediate", "stop"])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway OpenSearch node (`dev/stack opensearch-up` with a state
/// directory and ports of its own), for tests that stop and restart
/// OpenSearch: the shared node serves other tests meanwhile. Its data
/// survives `stop`/`start`; the directory is deleted when dropped.
#[derive(Debug)]
pub struct ScratchOpenSearch {
    pub dir: PathBuf,
    pub port: u16,
    transport_port: u16,
    /// With the security plugin (`dev/stack`'s
    /// `TIDEMARK_STACK_OPENSEARCH_SECURED=1`): HTTPS only, basic auth and
    /// client certificates.
    pub secured: bool,
}

impl ScratchOpenSearch {
    /// Starts a node on a free port in 9260..9299 (the runner only serves
    /// 9201..9299) and waits until it answers.
    pub fn start() -> ScratchOpenSearch {
        Self::create(false)
    }

    /// Starts a node with the security plugin: HTTPS with a CA made at
    /// start-up ([`ScratchOpenSearch::ca`]), users `admin` (all access)
    /// and `tidemark` (passwords `<user>-dev`), and a client certificate
    /// for the user `tidemark-consumer` ([`ScratchOpenSearch::client_certificate`]).
    pub fn secured() -> ScratchOpenSearch {
        Self::create(true)
    }

    fn create(secured: bool) -> ScratchOpenSearch {
        let dir = PathBuf::from("/var/tmp").join(unique_name("tidemark_scratch_os"));
        std::fs::create_dir_all(&dir).expect("scratch OpenSearch dir");
        // From a random place in the range: two tests starting nodes at
        // once would otherwise both find the same first free port.
        let start = uuid::Uuid::new_v4().as_u128() as u16 % 40;
        let port = (0..40)
            .map(|i| 9260 + (start + i) % 40)
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .expect("a free port in 9260..9299 for a scratch OpenSearch");
        let transport_port = crate::ports::free();
        let node = ScratchOpenSearch {
            dir,
            port,
            transport_port,
            secured,
        };
        node.up();
        node
    }

    pub fn url(&self) -> String {
        let scheme = if self.secured { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn config_file(&self, name: &str) -> PathBuf {
        self.dir.join("opensearch/node_1/config").join(name)
    }

    /// The CA that signed a secured node's certificate (for 127.0.0.1).
    pub fn ca(&self) -> PathBuf {
        self.config_file("ca.pem")
    }

    /// A client certificate and key for the user `tidemark-consumer`.
    pub fn client_certificate(&self) -> (PathBuf, PathBuf) {
        (
            self.config_file("tidemark-consumer.pem"),
            self.config_file("tidemark-consumer-key.pem"),
        )
    }

    fn stack(&self, command: &str) -> std::process::ExitStatus {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../stack"))
            .arg(command)
            .env("TIDEMARK_STACK_DIR", &self.dir)
            .env("TIDEMARK_STACK_OPENSEARCH_PORT", self.port.to_string())
            .env(
                "TIDEMARK_STACK_OPENSEARCH_TRANSPORT_PORT",
                self.transport_port.to_string(),
            )
            .env(
                "TIDEMARK_STACK_OPENSEARCH_SECURED",
                if self.secured { "1" } else { "0" },
            )
            .stdin(std::process::Stdio::null())
            .status()
            .expect("run dev/stack")
    }

    /// Starts the node again (same data) and waits until it answers.
    pub fn up(&self) {
        let status = self.stack("opensearch-up");
        assert!(
            status.success(),
            "scratch OpenSearch did not start; see {}/opensearch/opensearch.log",
            self.dir.display()
        );
    }

    /// Stops the node (SIGTERM, then SIGKILL after 30 s).
    pub fn stop(&self) {
        let _ = self.stack("opensearch-down");
    }
}

impl Drop for ScratchOpenSearch {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A scratch OpenSearch cluster of three nodes, each in its own JVM
/// (`dev/stack opensearch-cluster-up`), for the tests that kill a node.
/// Plaintext. Dropping it stops every node.
#[derive(Debug)]
pub struct ScratchOpenSearchCluster {
    pub dir: PathBuf,
    /// Node 1's HTTP port; node i serves `port + i - 1`.
    pub port: u16,
    transport_port: u16,
}

impl ScratchOpenSearchCluster {
    pub const NODES: u16 = 3;

    /// Starts the cluster on free ports (HTTP in 9260..9299, which the
    /// runner serves) and waits until every node answers.
    pub fn start() -> ScratchOpenSearchCluster {
        let dir = PathBuf::from("/var/tmp").join(unique_name("tidemark_scratch_os_cluster"));
        std::fs::create_dir_all(&dir).expect("scratch OpenSearch cluster dir");
        let start = uuid::Uuid::new_v4().as_u128() as u16 % 38;
        let port = (0..38)
            .map(|i| 9260 + (start + i) % 38)
            .find(|p| {
                (*p..*p + Self::NODES)
                    .all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok())
            })
            .expect("three free ports in 9260..9299 for a scratch OpenSearch cluster");
        let transport_port = crate::ports::free_run(Self::NODES);
        let cluster = ScratchOpenSearchCluster {
            dir,
            port,
            transport_port,
        };
        assert!(
            cluster.stack(&["opensearch-cluster-up"]).success(),
            "scratch OpenSearch cluster did not start; see {}/opensearch-*/opensearch.log",
            cluster.dir.display()
        );
        cluster
    }

    /// Node `i`'s URL (1-based).
    pub fn node_url(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}", self.port + i - 1)
    }

    /// Every node's URL, as `opensearch.url` takes them.
    pub fn urls(&self) -> String {
        (1..=Self::NODES)
            .map(|i| self.node_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// kill -9 node `i`, as a crash would.
    pub fn kill(&self, i: u16) {
        assert!(
            self.stack(&["opensearch-node-kill", &i.to_string()])
                .success(),
            "could not kill node {i}"
        );
    }

    /// Starts node `i` again and waits until the cluster has a majority.
    pub fn start_node(&self, i: u16) {
        assert!(
            self.stack(&["opensearch-node-up", &i.to_string()])
                .success(),
            "node {i} did not start again; see {}/opensearch-{i}/opensearch.log",
            self.dir.display()
        );
    }

    fn stack(&self, args: &[&str]) -> std::process::ExitStatus {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../stack"))
            .args(args)
            .env("TIDEMARK_STACK_DIR", &self.dir)
            .env("TIDEMARK_STACK_OPENSEARCH_PORT", self.port.to_string())
            .env(
                "TIDEMARK_STACK_OPENSEARCH_TRANSPORT_PORT",
                self.transport_port.to_string(),
            )
            .env("TIDEMARK_STACK_OPENSEARCH_NODES", Self::NODES.to_string())
            .stdin(std::process::Stdio::null())
            .status()
            .expect("run dev/stack")
    }
}

impl Drop for ScratchOpenSearchCluster {
    fn drop(&mut self) {
        let _ = self.stack(&["opensearch-cluster-down"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
