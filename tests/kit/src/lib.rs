//! The test kit of wasm-ecds: one copy of everything the unit tests, the integration tests and the
//! benchmarks share.
//!
//! - [`proto`]: prost types for the ECDS messages (field numbers from the upstream `.proto` files named there).
//! - [`ecds`]: builders of responses and Wasm filters, readers of converted responses, a metric reader.
//! - [`server`]: a real HTTP/1.1 and HTTPS server on 127.0.0.1, configured per path.
//! - [`archives`]: hand-built tar records and streamed gzip for hostile-archive tests.
//! - [`proxy`]: a tiny HTTP proxy on 127.0.0.1 that records what it is asked for and tunnels only to 127.0.0.1.

pub mod archives;
pub mod ecds;
pub mod proto;
pub mod proxy;
pub mod server;
