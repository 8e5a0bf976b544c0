fn main() -> std::process::ExitCode {
    fal_cli::main(std::env::args_os())
}
