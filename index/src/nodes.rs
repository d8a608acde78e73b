//! The nodes of the one OpenSearch cluster a process talks to:
//! `opensearch.url`'s list, each request sent to the next in turn.
//!
//! The client crate's only pool holds a single node. This one spreads the
//! requests over every node named, so a node that is down (killed,
//! restarting, partitioned) costs the requests that reach it: each fails
//! as "no answer", which every caller already waits out (the apply path
//! retries it with backoff, never dead-letters it), and the retry goes to
//! the next node. Nothing is sent to a node that was not configured (no
//! sniffing: a node's published address may not be reachable from here).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use opensearch::http::Url;
use opensearch::http::transport::{Connection, ConnectionPool};

#[derive(Debug, Clone)]
pub struct Nodes {
    connections: Arc<Vec<Connection>>,
    next: Arc<AtomicUsize>,
}

impl Nodes {
    /// `urls` must not be empty (the config's validation sees to it).
    pub fn new(urls: Vec<Url>) -> Nodes {
        assert!(!urls.is_empty(), "at least one OpenSearch node");
        Nodes {
            connections: Arc::new(urls.into_iter().map(Connection::new).collect()),
            next: Arc::default(),
        }
    }

    fn position(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len()
    }
}

impl ConnectionPool for Nodes {
    fn next(&self) -> Connection {
        self.connections[self.position()].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_goes_to_the_next_node_in_turn() {
        let urls = ["http://a:9200", "http://b:9200", "http://c:9200"]
            .iter()
            .map(|u| Url::parse(u).expect("URL"))
            .collect();
        let nodes = Nodes::new(urls);
        let turns: Vec<usize> = (0..7).map(|_| nodes.position()).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2, 0]);
        // Clones (the transport holds one) share the turn.
        let clone = nodes.clone();
        assert_eq!(clone.position(), 1);
        assert_eq!(nodes.position(), 2);
    }
}
