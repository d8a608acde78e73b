//! Decoder for PostgreSQL's `pgoutput` logical replication messages
//! (protocol version 1), as carried in the replication stream's XLogData.
//!
//! It only turns bytes into typed messages: no I/O, no catalog lookups, no
//! value mapping (that is `values`). Every read is bounds-checked, so a
//! truncated or malformed message is a [`DecodeError`] that says what was
//! being read and where, never a panic; the fuzz-style property test below
//! feeds it arbitrary bytes.
//!
//! Message layouts: PostgreSQL documentation, "Logical Replication Message
//! Formats".

use bytes::Bytes;
use tidemark_schemas::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_time_micros: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_micros: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        /// The old key (`K`) or whole old row (`O`, replica identity FULL),
        /// when PostgreSQL sends one.
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: Tuple,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// A table's shape as pgoutput describes it before its first change.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Part of the replica identity (the key).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Column values of one row, in the relation's column order.
pub type Tuple = Vec<Datum>;

/// One column value as sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value the change did not touch; PostgreSQL did not send it.
    UnchangedToast,
    /// PostgreSQL's text output of the value.
    Text(Bytes),
    /// Binary send format (only with the `binary` option, which we do not use).
    Binary(Bytes),
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownMessage(u8),
    #[error(
        "pgoutput message truncated: needed {needed} bytes for {what} at offset {offset}, {left} left"
    )]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        left: usize,
    },
    #[error("invalid {what} at offset {offset}: {detail}")]
    Invalid {
        what: &'static str,
        offset: usize,
        detail: String,
    },
}

/// Decodes one pgoutput message.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { data, pos: 0 };
    let tag = r.u8("message type").map_err(|_| DecodeError::Empty)?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64("begin final LSN")?),
            commit_time_micros: r.i64("begin commit time")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => {
            let _flags = r.u8("commit flags")?;
            Message::Commit {
                commit_lsn: Lsn(r.u64("commit LSN")?),
                end_lsn: Lsn(r.u64("commit end LSN")?),
                commit_time_micros: r.i64("commit time")?,
            }
        }
        b'O' => Message::Origin {
            lsn: Lsn(r.u64("origin LSN")?),
            name: r.cstring("origin name")?,
        },
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            namespace: r.cstring("type namespace")?,
            name: r.cstring("type name")?,
        },
        b'I' => {
            let relation = r.u32("insert relation")?;
            r.expect(b'N', "insert new-tuple marker")?;
            Message::Insert {
                relation,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            let relation = r.u32("update relation")?;
            let mut marker = r.u8("update tuple marker")?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                old = Some(tuple(&mut r)?);
                marker = r.u8("update new-tuple marker")?;
            }
            if marker != b'N' {
                return Err(r.invalid(
                    "update tuple marker",
                    format!("{marker:#04x}, expected K, O or N"),
                ));
            }
            Message::Update {
                relation,
                old,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            let relation = r.u32("delete relation")?;
            let marker = r.u8("delete tuple marker")?;
            if marker != b'K' && marker != b'O' {
                return Err(r.invalid(
                    "delete tuple marker",
                    format!("{marker:#04x}, expected K or O"),
                ));
            }
            Message::Delete {
                relation,
                old: tuple(&mut r)?,
            }
        }
        b'T' => {
            let count = r.u32("truncate relation count")? as usize;
            let options = r.u8("truncate options")?;
            // Four bytes per relation id; check before allocating.
            r.ensure(count.saturating_mul(4), "truncate relation ids")?;
            let relations = (0..count)
                .map(|_| r.u32("truncate relation id"))
                .collect::<Result<_, _>>()?;
            Message::Truncate {
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = Lsn(r.u64("message LSN")?);
            let prefix = r.cstring("message prefix")?;
            let len = r.u32("message length")? as usize;
            Message::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    if r.pos != data.len() {
        return Err(r.invalid(
            "message end",
            format!("{} trailing bytes", data.len() - r.pos),
        ));
    }
    Ok(message)
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("relation oid")?;
    let namespace = r.cstring("relation namespace")?;
    let name = r.cstring("relation name")?;
    let replica_identity = r.u8("relation replica identity")?;
    let count = r.i16("relation column count")?;
    let count = usize::try_from(count)
        .map_err(|_| r.invalid("relation column count", format!("{count}")))?;
    let mut columns = Vec::with_capacity(count.min(1600));
    for _ in 0..count {
        columns.push(Column {
            key: r.u8("column flags")? & 1 != 0,
            name: r.cstring("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = r.i16("tuple column count")?;
    let count =
        usize::try_from(count).map_err(|_| r.invalid("tuple column count", format!("{count}")))?;
    // PostgreSQL tables have at most 1600 columns; never pre-allocate more.
    let mut values = Vec::with_capacity(count.min(1600));
    for _ in 0..count {
        let datum = match r.u8("column kind")? {
            b'n' => Datum::Null,
            b'u' => Datum::UnchangedToast,
            b't' => {
                let len = r.u32("text value length")? as usize;
                Datum::Text(r.bytes(len, "text value")?)
            }
            b'b' => {
                let len = r.u32("binary value length")? as usize;
                Datum::Binary(r.bytes(len, "binary value")?)
            }
            other => {
                return Err(r.invalid(
                    "column kind",
                    format!("{other:#04x}, expected n, u, t or b"),
                ));
            }
        };
        values.push(datum);
    }
    Ok(values)
}

/// A cursor over one message that never reads past its end.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn ensure(&self, needed: usize, what: &'static str) -> Result<(), DecodeError> {
        let left = self.data.len() - self.pos;
        if needed > left {
            return Err(DecodeError::Truncated {
                what,
                offset: self.pos,
                needed,
                left,
            });
        }
        Ok(())
    }

    fn invalid(&self, what: &'static str, detail: String) -> DecodeError {
        DecodeError::Invalid {
            what,
            offset: self.pos,
            detail,
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        self.ensure(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.data[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn expect(&mut self, want: u8, what: &'static str) -> Result<(), DecodeError> {
        let got = self.u8(what)?;
        if got != want {
            return Err(self.invalid(what, format!("{got:#04x}, expected {:?}", char::from(want))));
        }
        Ok(())
    }

    /// A slice of the message, shared rather than copied.
    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.ensure(len, what)?;
        let out = self.data.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    fn cstring(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Truncated {
                what,
                offset: self.pos,
                needed: rest.len() + 1,
                left: rest.len(),
            });
        };
        let text = std::str::from_utf8(&rest[..nul])
            .map_err(|e| self.invalid(what, format!("not UTF-8: {e}")))?
            .to_owned();
        self.pos += nul + 1;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Builds messages the way PostgreSQL's pgoutput writes them.
    #[derive(Default)]
    struct W(Vec<u8>);
    impl W {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn cstr(mut self, s: &str) -> Self {
            self.0.extend(s.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, s: &str) -> Self {
            let mut w = self.u8(b't').u32(s.len() as u32);
            w.0.extend(s.as_bytes());
            w
        }
        fn done(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    #[test]
    fn begin_and_commit() {
        let begin = W::default().u8(b'B').u64(0x10).u64(5).u32(77).done();
        assert_eq!(
            decode(&begin),
            Ok(Message::Begin {
                final_lsn: Lsn(0x10),
                commit_time_micros: 5,
                xid: 77
            })
        );
        let commit = W::default()
            .u8(b'C')
            .u8(0)
            .u64(0x10)
            .u64(0x18)
            .u64(5)
            .done();
        assert_eq!(
            decode(&commit),
            Ok(Message::Commit {
                commit_lsn: Lsn(0x10),
                end_lsn: Lsn(0x18),
                commit_time_micros: 5
            })
        );
    }

    #[test]
    fn relation_with_key_flags() {
        let data = W::default()
            .u8(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("users")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .cstr("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .cstr("name")
            .u32(25)
            .i32(-1)
            .done();
        let Ok(Message::Relation(rel)) = decode(&data) else {
            panic!("not a relation: {:?}", decode(&data));
        };
        assert_eq!(
            (rel.oid, rel.namespace.as_str(), rel.name.as_str()),
            (16384, "public", "users")
        );
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].type_oid, 25);
    }

    #[test]
    fn update_with_old_key_and_unchanged_toast() {
        let data = W::default()
            .u8(b'U')
            .u32(16384)
            .u8(b'K')
            .i16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .text("2")
            .u8(b'u')
            .done();
        assert_eq!(
            decode(&data),
            Ok(Message::Update {
                relation: 16384,
                old: Some(vec![Datum::Text(Bytes::from_static(b"1")), Datum::Null]),
                new: vec![Datum::Text(Bytes::from_static(b"2")), Datum::UnchangedToast],
            })
        );
    }

    #[test]
    fn update_without_old_tuple_and_delete() {
        let update = W::default()
            .u8(b'U')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .text("x")
            .done();
        assert!(matches!(
            decode(&update),
            Ok(Message::Update { old: None, .. })
        ));
        let delete = W::default()
            .u8(b'D')
            .u32(1)
            .u8(b'O')
            .i16(1)
            .text("x")
            .done();
        assert!(matches!(
            decode(&delete),
            Ok(Message::Delete { relation: 1, .. })
        ));
    }

    #[test]
    fn truncate_and_logical_message() {
        let truncate = W::default().u8(b'T').u32(2).u8(3).u32(10).u32(11).done();
        assert_eq!(
            decode(&truncate),
            Ok(Message::Truncate {
                relations: vec![10, 11],
                cascade: true,
                restart_identity: true
            })
        );
        let message = W::default()
            .u8(b'M')
            .u8(1)
            .u64(9)
            .cstr("app")
            .u32(2)
            .u8(b'h')
            .u8(b'i')
            .done();
        assert_eq!(
            decode(&message),
            Ok(Message::Message {
                transactional: true,
                lsn: Lsn(9),
                prefix: "app".into(),
                content: Bytes::from_static(b"hi")
            })
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decode(&Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownMessage(b'Z'))
        );
        let short = W::default()
            .u8(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .u32(100)
            .done();
        let err = decode(&short).expect_err("truncated");
        assert_eq!(
            err.to_string(),
            "pgoutput message truncated: needed 100 bytes for text value at offset 13, 0 left"
        );
        let trailing = W::default().u8(b'B').u64(1).u64(1).u32(1).u8(0).done();
        assert!(
            decode(&trailing)
                .expect_err("trailing")
                .to_string()
                .contains("1 trailing bytes")
        );
    }

    proptest! {
        /// The decoder is total: arbitrary bytes give a message or an error,
        /// never a panic or an outsized allocation.
        #[test]
        fn never_panics_on_arbitrary_bytes(tag in prop::sample::select(b"BCORYIUDTMZ".to_vec()),
                                           body in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut data = vec![tag];
            data.extend(body);
            let _ = decode(&Bytes::from(data));
        }

        /// Insert messages round-trip whatever their text values.
        #[test]
        fn insert_round_trip(values in prop::collection::vec(prop::option::of(".{0,40}"), 0..20)) {
            let mut w = W::default().u8(b'I').u32(7).u8(b'N').i16(values.len() as i16);
            for v in &values {
                w = match v { Some(s) => w.text(s), None => w.u8(b'n') };
            }
            let expected: Tuple = values.iter().map(|v| match v {
                Some(s) => Datum::Text(Bytes::from(s.clone().into_bytes())),
                None => Datum::Null,
            }).collect();
            prop_assert_eq!(decode(&w.done()), Ok(Message::Insert { relation: 7, new: expected }));
        }
    }
}
