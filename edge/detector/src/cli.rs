//! What the `edge` and `trainer` command lines share besides the `--device` flag: the check
//! that every flag explains itself.

/// Flags and arguments of `command` and its subcommands that have no help text, as
/// "tool subcommand flag" (empty when `--help` explains everything).
pub fn undocumented_args(command: &clap::Command) -> Vec<String> {
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" && arg.get_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(command, command.get_name(), &mut missing);
    missing
}
