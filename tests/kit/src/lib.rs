//! The test kit of wasm-ecds: one copy of everything the unit tests, the integration tests and the
//! benchmarks share.
//!
//! - [`proto`]: prost types for the ECDS messages (field numbers from the upstream `.proto` files named there).
//! - [`ecds`]: builders of responses and Wasm filters, readers of converted responses, a metric reader.
//! - [`server`]: a real HTTP/1.1 and HTTPS server on 127.0.0.1, configured per path.
//! - [`archives`]: hand-built tar records and streamed gzip for hostile-archive tests.
//! - [`proxy`]: a tiny HTTP proxy on 127.0.0.1 that records what it is asked for and tunnels only to 127.0.0.1.
//! - [`registry`]: the real distribution registry on 127.0.0.1 (plain, TLS, htpasswd, token, proxy modes),
//!   with request counts.
//! - [`images`]: Wasm images in every OCI/Docker format, pushed through the registry API or served by
//!   [`server::TestServer`].
//! - [`token`]: the bearer-token server of the registry's token mode.
//! - [`logs`]: captures the library's log lines.

pub mod archives;
pub mod ecds;
pub mod images;
pub mod logs;
mod loopback;
pub mod memory;
pub mod proto;
pub mod proxy;
pub mod registry;
pub mod server;
pub mod token;
