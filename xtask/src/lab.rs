pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("lab: not yet")
}
