//! Shared by the kernel programs (`port25-ebpf`), the controller and the tests.
//!
//! The verdict is written once, here: [`parse`] turns a frame into a [`parse::Packet`],
//! [`verdict::decide`] turns a packet and the policy maps into a [`Reason`]. The kernel, the
//! controller's `check` (on the live pinned maps) and the in-memory reference model all call
//! the same two functions; they differ only in how they read bytes and maps.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod addr;
pub mod maps;
pub mod parse;
pub mod plain;
pub mod reason;
pub mod reject;
pub mod verdict;

#[cfg(feature = "user")]
pub mod model;

pub use addr::Addr;
pub use reason::{Reason, NUM_REASONS};
