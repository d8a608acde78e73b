//! Free loopback ports for the services and endpoints tests start.
//!
//! A port the kernel hands out for `bind(:0)` comes from the ephemeral
//! range, the same range it picks source ports from for outgoing
//! connections. Between the moment a test learns such a port and the
//! moment a JVM that takes seconds to start binds it, one of the hundreds
//! of connections the parallel tests open can take it (CI saw a scratch
//! Kafka's controller fail to bind this way). So ports here are picked
//! below the ephemeral range, at random, and checked free.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;

/// The lowest port tests pick.
const LOW: u16 = 15000;

/// A free loopback port below the ephemeral range.
///
/// # Panics
/// When none is free after many tries.
pub fn free() -> u16 {
    pick(1)
}

/// A free loopback port `p` whose neighbour `p + 1` is free too (a Kafka
/// broker and its controller).
///
/// # Panics
/// When no such pair is free after many tries.
pub fn free_pair() -> u16 {
    pick(2)
}

/// A free loopback port `p` with `p + 1 .. p + count` free too (a Kafka
/// cluster's brokers and controllers).
///
/// # Panics
/// When no such run is free after many tries.
pub fn free_run(count: u16) -> u16 {
    pick(count)
}

fn pick(count: u16) -> u16 {
    let high = ephemeral_low().saturating_sub(count).max(LOW + 1000);
    let span = u64::from(high - LOW);
    let seed = std::collections::hash_map::RandomState::new();
    for attempt in 0..500u64 {
        let mut hasher = seed.build_hasher();
        hasher.write_u64(attempt);
        let port = LOW + (hasher.finish() % span) as u16;
        if (port..port + count).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return port;
        }
    }
    panic!("no {count} free neighbouring loopback port(s) between {LOW} and {high}");
}

/// The first port of the kernel's ephemeral range (32768 when unknown).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_free() {
        let low = ephemeral_low();
        for _ in 0..20 {
            let port = free_pair();
            assert!((LOW..low).contains(&port), "{port} not in {LOW}..{low}");
            TcpListener::bind(("127.0.0.1", port)).expect("free");
            TcpListener::bind(("127.0.0.1", port + 1)).expect("neighbour free");
        }
    }
}
