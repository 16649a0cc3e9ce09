//! The daemon's control plane: the wire protocol (requests and their typed replies and
//! errors), the socket server and the ops it runs.

pub mod error;
pub mod proto;
pub mod reply;
pub mod server;
pub mod testing;
