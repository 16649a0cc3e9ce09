//! The binary's edge: everything lives in [`port25_ctl::cli`].

// mimalloc for the daemon and the heavy verbs, glibc's for the rest (see the module).
#[global_allocator]
static ALLOC: port25_ctl::alloc::PerVerb = port25_ctl::alloc::PerVerb;

fn main() -> std::process::ExitCode {
    port25_ctl::cli::main()
}
