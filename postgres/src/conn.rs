//! Connections to PostgreSQL: the URL parsed once into `ConnInfo`, and the
//! SQL and replication sessions opened from it with the same settings.
//! (The secured-connections work puts TLS here, for both sessions at once.)

use std::time::Duration;

use pgwire_replication::{ReplicationConfig, TlsConfig};
use tidemark_schemas::config::{Config, redact_url};
use tokio_postgres::{Client, NoTls};
use tracing::warn;

use crate::error::SourceError;

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
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl ConnInfo {
    pub fn from_config(config: &Config) -> Result<ConnInfo, SourceError> {
        let url = &config.postgres.url;
        let parsed: tokio_postgres::Config =
            url.parse().map_err(|e| SourceError::Url(format!("{e}")))?;
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
            .options(SESSION_OPTIONS);
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| SourceError::Connect {
                    url: self.display.clone(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                warn!(%error, "PostgreSQL connection ended");
            }
        });
        Ok(client)
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
        .with_tls(TlsConfig::disabled())
        .with_options(SESSION_OPTIONS)
        .with_application_name(what.application.to_owned())
        .with_status_interval(Duration::from_secs(1))
        .with_max_message_size(what.max_message_bytes)
    }
}
