//! Helpers shared by the integration tests: `mod common;` then `use common::server::{TestServer, Route, ...};`.
#![allow(dead_code)]

pub mod ecds;
pub mod server;
