//! `cargo xtask fuzz --frames N [--seed S]`: builds everything, then runs the differential
//! fuzz binary as root (see tests/src/fuzz.rs).

use std::process::Command;

use anyhow::Result;

use crate::build;

pub fn run(args: &[String]) -> Result<()> {
    build::all()?;
    build::ensure_root()?;
    build::run(Command::new(build::release_bin("port25-fuzz")?).args(args))
}
