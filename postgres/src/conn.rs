//! Connections to PostgreSQL: the URL parsed once into `ConnInfo`, and the
//! SQL and replication sessions opened from it with the same settings,
//! TLS included (`tls`: one parsed `sslmode` for both sessions).

use std::time::Duration;

use std::sync::Arc;

use pgwire_replication::ReplicationConfig;
use tidemark_schemas::config::{Config, redact_url};
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

use crate::error::SourceError;
use crate::tls::Tls;

/// Session settings that fix the text form of every value, so `values` can
/// map it exactly. The replication session and snapshot sessions use the
/// same ones, so snapshot rows and streamed rows look alike.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,MDY -c TimeZone=UTC -c IntervalStyle=iso_8601 \
     -c bytea_output=hex -c extra_float_digits=3";

/// Parsed connection settings, shared by the SQL and replication sessions.
#[derive(Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    /// The URL without its password, for messages.
    pub display: String,
    /// `sslmode` and its files, for both sessions.
    pub tls: Tls,
    /// The TLS client set up from `tls` (`None` for `sslmode=disable`).
    client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl ConnInfo {
    pub fn from_config(config: &Config) -> Result<ConnInfo, SourceError> {
        let url = &config.postgres.url;
        let (rest, tls) = Tls::split_url(url)?;
        let client_tls = tls.client_config()?;
        let parsed: tokio_postgres::Config =
            rest.parse().map_err(|e| SourceError::Url(format!("{e}")))?;
        let host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let password = match (&config.postgres.password, parsed.get_password()) {
            (Some(secret), _) => secret.0.clone(),
            (None, Some(p)) => String::from_utf8_lossy(p).into_owned(),
            (None, None) => String::new(),
        };
        let user = parsed.get_user().unwrap_or("postgres").to_owned();
        Ok(ConnInfo {
            host,
            port: parsed.get_ports().first().copied().unwrap_or(5432),
            database: parsed.get_dbname().unwrap_or(&user).to_owned(),
            user,
            password,
            display: redact_url(url),
            tls,
            client_tls,
        })
    }

    /// A new SQL session with the pinned output settings.
    pub async fn connect(&self, application: &str) -> Result<Client, SourceError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.database)
            .application_name(application)
            .options(SESSION_OPTIONS)
            .ssl_mode(self.tls.tokio_mode());
        let refused = |source| SourceError::Connect {
            url: self.display.clone(),
            source,
        };
        let client = match &self.client_tls {
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(refused)?;
                spawn_connection(connection);
                client
            }
            Some(tls) => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, connection) = config.connect(connector).await.map_err(refused)?;
                spawn_connection(connection);
                client
            }
        };
        Ok(client)
    }

    /// Whether `client`'s session is encrypted, as the server sees it
    /// (`pg_stat_ssl`): e.g. `TLSv1.3 (sslmode=verify-full)`, or
    /// `not encrypted (sslmode=prefer)`.
    pub async fn tls_state(&self, client: &Client) -> String {
        let row = client
            .query_opt(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await;
        let state = match row {
            Ok(Some(row)) if row.get::<_, bool>(0) => row
                .get::<_, Option<String>>(1)
                .unwrap_or_else(|| "TLS".into()),
            Ok(_) => "not encrypted".to_owned(),
            Err(_) => "unknown".to_owned(),
        };
        format!("{state} (sslmode={})", self.tls.mode.as_str())
    }

    /// Logs how a new SQL session is protected (once per process start).
    pub async fn log_tls(&self, client: &Client, session: &str) {
        let tls = self.tls_state(client).await;
        info!(server = %self.display, session, %tls, "PostgreSQL session");
    }
}

/// What a replication session is for: its slot, publication, name and the
/// largest message it accepts.
#[derive(Debug, Clone)]
pub struct Replication<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    pub application: &'a str,
    pub max_message_bytes: usize,
}

impl<'a> Replication<'a> {
    /// A replication session on the configured slot and publication
    /// (`producer.slot`, `producer.publication`); one change is one
    /// message, so `producer.max_message_bytes` bounds it.
    pub fn of(config: &'a Config, application: &'a str) -> Replication<'a> {
        Replication {
            slot: &config.producer.slot,
            publication: &config.producer.publication,
            application,
            max_message_bytes: config.producer.max_message_bytes,
        }
    }
}

impl ConnInfo {
    /// Settings of a replication session on this connection.
    pub fn replication(&self, what: &Replication<'_>) -> ReplicationConfig {
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.database.clone(),
            what.slot.to_owned(),
            what.publication.to_owned(),
        )
        .with_port(self.port)
        .with_tls(self.tls.replication(&self.host))
        .with_options(SESSION_OPTIONS)
        .with_application_name(what.application.to_owned())
        .with_status_interval(Duration::from_secs(1))
        .with_max_message_size(what.max_message_bytes)
    }
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            warn!(%error, "PostgreSQL connection ended");
        }
    });
}
