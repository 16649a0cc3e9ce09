//! The daemon's control plane: the wire protocol, the socket server and the ops it runs.

pub mod proto;
pub mod server;
pub mod testing;
