//! The binary's edge: everything lives in [`port25_ctl::cli`].

fn main() -> std::process::ExitCode {
    port25_ctl::cli::main()
}
