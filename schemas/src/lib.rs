//! The types every Tidemark stage agrees on: what a position in the source
//! log is ([`Lsn`]), and (as the stages come to exist) the change-event
//! envelope that travels through Kafka.
//!
//! This crate does no I/O, so the producer, the consumer and the replay tools
//! can all depend on it and unit tests of wire formats stay fast.

mod lsn;

pub use lsn::{Lsn, ParseLsnError};
