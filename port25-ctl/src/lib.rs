//! The port25 controller library; `main.rs` is the binary's edge.
//!
//! The folders are the architecture, and depend one way only (README, "Layout"):
//! `cli` → `control` → `policy` → `bpf`, with `registry` (rules and store) beside `policy`,
//! and `config`/`net` as the vocabulary everyone shares. `metrics` is served by `control`
//! and reads `bpf` and `registry`.

pub mod alloc;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod control;
pub mod fleet;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod registry;
