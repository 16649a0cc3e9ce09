//! The port25 controller library; `main.rs` is the CLI edge.

pub mod cli_parse;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod detached;
pub mod incremental;
pub mod linkinfo;
pub mod livemaps;
pub mod net;
pub mod pins;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod report;
pub mod store;
pub mod sys;
