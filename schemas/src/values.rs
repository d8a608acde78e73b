//! What JSON each PostgreSQL type becomes on the wire ([`Mapping`]): the
//! contract between the producer, which encodes values by it
//! (`tidemark_postgres::values`), and the index layer, which derives an
//! index's field types from it (`tidemark_index::derive`). The one table of
//! built-in type OIDs.

/// How one column's text becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    Bool,
    Integer,
    Float,
    Numeric,
    Bytea,
    Json,
    Timestamp,
    TimestampTz,
    /// PostgreSQL's text output, unchanged.
    Text,
    Array(Box<Mapping>),
}

impl Mapping {
    /// The mapping of a built-in type, by OID; `None` for types that need a
    /// catalog look-up (enums, domains, arrays of those, extension types).
    pub fn builtin(oid: u32) -> Option<Mapping> {
        use Mapping::*;
        let scalar = match oid {
            16 => Bool,
            20 | 21 | 23 | 26 => Integer,
            700 | 701 => Float,
            1700 => Numeric,
            17 => Bytea,
            114 | 3802 => Json,
            1114 => Timestamp,
            1184 => TimestampTz,
            // text, varchar, bpchar, char, name, uuid, date, time, timetz,
            // interval, inet, cidr, macaddr, money, xml, bit, varbit.
            25 | 1043 | 1042 | 18 | 19 | 2950 | 1082 | 1083 | 1266 | 1186 | 869 | 650 | 829
            | 790 | 142 | 1560 | 1562 => Text,
            _ => return Self::builtin_array(oid).map(|elem| Array(Box::new(elem))),
        };
        Some(scalar)
    }

    fn builtin_array(oid: u32) -> Option<Mapping> {
        Self::builtin(array_element(oid)?)
    }
}

/// The element type of a built-in array type, by OID (`_int4` -> `int4`);
/// `None` for any other type.
pub fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => 16,
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1028 => 26,
        1021 => 700,
        1022 => 701,
        1231 => 1700,
        1001 => 17,
        199 => 114,
        3807 => 3802,
        1115 => 1114,
        1185 => 1184,
        1009 => 25,
        1015 => 1043,
        1014 => 1042,
        1002 => 18,
        1003 => 19,
        2951 => 2950,
        1182 => 1082,
        1183 => 1083,
        1270 => 1266,
        1187 => 1186,
        1041 => 869,
        651 => 650,
        _ => return None,
    })
}
