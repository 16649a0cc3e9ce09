//! `cargo xtask bench`: builds everything, then runs the bench binary as root.

use std::process::Command;

use anyhow::Result;

use crate::build::{self, root};

pub fn run() -> Result<()> {
    build::all()?;
    build::ensure_lab_tools()?;
    build::run(
        Command::new(root().join("target/release/port25-bench"))
            .env("PORT25_CTL", root().join("target/release/port25-ctl")),
    )
}
