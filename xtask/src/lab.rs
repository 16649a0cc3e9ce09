//! `cargo xtask lab`: builds everything, then runs the namespace lab binary as root.

use std::process::Command;

use anyhow::Result;

use crate::build::{self, root};

pub fn run(args: &[String]) -> Result<()> {
    build::all()?;
    build::ensure_lab_tools()?;
    build::run(
        Command::new(root().join("target/release/port25-lab"))
            .env("PORT25_CTL", root().join("target/release/port25-ctl"))
            .args(args),
    )
}
