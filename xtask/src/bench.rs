//! `cargo xtask bench`: builds everything, then runs the bench binary as root.

use std::process::Command;

use anyhow::Result;

use crate::build;

pub fn run() -> Result<()> {
    build::all()?;
    build::ensure_lab_tools()?;
    build::run(
        Command::new(build::release_bin("port25-bench")?)
            .env("PORT25_CTL", build::release_bin("port25-ctl")?),
    )
}
