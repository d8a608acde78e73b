//! The types every Tidemark stage agrees on: what a position in the source
//! log is ([`Lsn`]), how a document version is made from it ([`Version`]), and the change-event envelope ([`ChangeEvent`]) that
//! travels through Kafka, whose JSON Schema is `schemas/envelope.schema.json`.
//!
//! This crate does no I/O, so the producer, the consumer and the replay tools
//! can all depend on it and unit tests of wire formats stay fast.

pub mod commit_time;
pub mod config;
mod dead_letter;
mod envelope;
pub mod identity;
mod lsn;
pub mod partition;
pub mod state;
pub mod values;
mod version;

pub use dead_letter::{DeadLetter, Origin, Stage};
pub use envelope::{
    ChangeEvent, EnvelopeError, EventHead, FORMAT_VERSION, Operation, Row, Source, record_key,
};
pub use lsn::{Lsn, ParseLsnError};
pub use version::{LSN_BITS, MAX_TIMELINE, Version, VersionError};
