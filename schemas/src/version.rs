//! The document version: the one rule by which every write is ordered
//! (DESIGN.md invariant 2). Every index and delete carries a version, with
//! `version_type=external_gte`, and `_tidemark.version` holds the same
//! number, which truncates and resnapshots delete below.
//!
//! The rule: `version = (timeline - 1) << 48 | LSN`.
//! - Within one PostgreSQL timeline, LSNs grow with commit order, so the
//!   commit LSN orders every change of a row.
//! - A new timeline (a promoted standby after a failover, a point-in-time
//!   restore) starts *below* LSNs the old primary may already have sent to
//!   Kafka from its lost tail. Those documents must not win over the new
//!   primary's changes, so the timeline is the epoch in the high bits: every
//!   change of a later timeline outranks every change of an earlier one.
//! - Timeline 1, where every cluster starts, gives `version = LSN`, the
//!   rule before the epoch existed: indices written before keep working.
//! - OpenSearch versions are below 2^63: LSNs must stay below 2^48 (256
//!   TiB of WAL) and timelines below 2^15 (32,768 promotions); anything else
//!   is refused with an error, never wrapped.
//!
//! A different cluster (a new system identifier) has no order with the old
//! one at all: its history goes into a new index, not under this rule.

use std::fmt;

use crate::Lsn;

/// The bits of the LSN; above them, the timeline epoch.
pub const LSN_BITS: u32 = 48;
/// The timelines the epoch can hold (1 to this).
pub const MAX_TIMELINE: u32 = 1 << (63 - LSN_BITS);

/// An OpenSearch document version, made only by the rule above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(u64);

/// A position the rule cannot turn into a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("LSN {0} is at or above 2^48, too large for a document version")]
    LsnTooLarge(Lsn),
    #[error("timeline {0} is outside 1..={MAX_TIMELINE}, the epochs a document version can hold")]
    BadTimeline(u32),
}

impl Version {
    /// The version of a change committed at `commit_lsn` on `timeline`.
    pub fn of_commit(timeline: u32, commit_lsn: Lsn) -> Result<Version, VersionError> {
        Self::at(timeline, commit_lsn)
    }

    /// The version of a row read at a snapshot consistent at `lsn` on
    /// `timeline`: every change committed after the snapshot outranks it,
    /// every change before does not.
    pub fn of_snapshot(timeline: u32, lsn: Lsn) -> Result<Version, VersionError> {
        Self::at(timeline, lsn)
    }

    /// The next version: a write that must win over one at `self`, and lose
    /// to every change committed after it (a delete of a row found vanished
    /// after a write at a snapshot: the delete that removed it committed
    /// after that snapshot, so at a version above it).
    pub fn superseding(self) -> Version {
        Version(self.0 + 1)
    }

    /// The number OpenSearch is given.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The LSN it was made from (the commit LSN of a change, the consistent
    /// point of a snapshot); `superseding` adds one to it.
    pub fn lsn(self) -> Lsn {
        Lsn(self.0 & ((1 << LSN_BITS) - 1))
    }

    fn at(timeline: u32, lsn: Lsn) -> Result<Version, VersionError> {
        if timeline == 0 || timeline > MAX_TIMELINE {
            return Err(VersionError::BadTimeline(timeline));
        }
        if lsn.0 >> LSN_BITS != 0 {
            return Err(VersionError::LsnTooLarge(lsn));
        }
        Ok(Version(u64::from(timeline - 1) << LSN_BITS | lsn.0))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_one_is_the_lsn_and_later_timelines_outrank_it() {
        let v = Version::of_commit(1, Lsn(0x1_2345_6789)).expect("version");
        assert_eq!(v.get(), 0x1_2345_6789, "timeline 1: the LSN itself");
        // The old primary's lost tail, far ahead, against a new primary's
        // first change, far behind: the new timeline wins.
        let tail = Version::of_commit(1, Lsn((1 << LSN_BITS) - 1)).expect("tail");
        let promoted = Version::of_commit(2, Lsn(0x10)).expect("promoted");
        assert!(promoted > tail);
        assert_eq!(promoted.get(), 1 << LSN_BITS | 0x10);
        assert_eq!(
            promoted.lsn(),
            Lsn(0x10),
            "the LSN comes back out of the epoch"
        );
        assert_eq!(tail.lsn(), Lsn((1 << LSN_BITS) - 1));
        let snapshot = Version::of_snapshot(2, Lsn(0x10)).expect("snapshot");
        assert!(snapshot.superseding() > snapshot);
        assert!(Version::of_commit(2, Lsn(0x11)).expect("later") >= snapshot.superseding());
        assert!(
            Version::of_commit(MAX_TIMELINE, Lsn((1 << LSN_BITS) - 1))
                .expect("max")
                .get()
                < 1 << 63
        );
    }

    #[test]
    fn positions_out_of_range_are_refused_not_wrapped() {
        assert_eq!(
            Version::of_commit(1, Lsn(1 << LSN_BITS)),
            Err(VersionError::LsnTooLarge(Lsn(1 << LSN_BITS)))
        );
        assert_eq!(
            Version::of_commit(0, Lsn(1)),
            Err(VersionError::BadTimeline(0))
        );
        assert_eq!(
            Version::of_commit(MAX_TIMELINE + 1, Lsn(1)),
            Err(VersionError::BadTimeline(MAX_TIMELINE + 1))
        );
    }
}
