//! `cargo xtask lab`: builds everything, then runs the namespace lab binary as root.

use std::process::Command;

use anyhow::Result;

use crate::build;

pub fn run(args: &[String]) -> Result<()> {
    build::all()?;
    build::ensure_lab_tools()?;
    build::run(
        Command::new(build::release_bin("port25-lab")?)
            .env("PORT25_CTL", build::release_bin("port25-ctl")?)
            .args(args),
    )
}
