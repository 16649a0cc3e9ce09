//! From policy to map contents, and the apply that gets the maps there. One way down:
//! `slot` (exempt keys, which map a prefix goes to, how entries merge) ← `desired` (the
//! state the maps should hold, from config and runtime entries) ← `index` (each user's
//! entries, the full build and per-change updates) and `apply` (writing a state to the maps
//! in an order that never opens port 25).

pub mod apply;
pub mod desired;
pub mod index;
pub mod slot;

pub use apply::{
    apply, apply_delta, check_fits, check_slots_fit, read_state, write_slots, Applied,
};
pub use desired::{expiry_ns, Clock, Desired};
pub use slot::Slot;
