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

/// How local tools (`edge detect`, `trainer eval`) trust a model package: its weights' digest is
/// always checked; its signature against the given keys, the project's release key (which signs
/// the factory model) when none is given.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PackageTrust {
    /// Public key (hex, as `trainer keygen` writes it) a model package must be signed with;
    /// repeatable. Default: the release key that signs the factory model.
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<std::path::PathBuf>,
    /// Accept a package whatever key signed it (its weights' digest is still checked).
    #[arg(long)]
    pub no_signature_check: bool,
}

impl PackageTrust {
    /// The keys to check signatures with; empty: digest only.
    pub fn keys(&self) -> Result<Vec<protocol::VerifyingKey>, String> {
        if self.no_signature_check {
            return Ok(vec![]);
        }
        if self.trusted_keys.is_empty() {
            let key = protocol::package::parse_public_key(crate::FACTORY_KEY_HEX)
                .map_err(|e| format!("the built-in release key: {e}"))?;
            return Ok(vec![key]);
        }
        self.trusted_keys
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("trusted key {}: {e}", p.display()))?;
                protocol::package::parse_public_key(&text)
                    .map_err(|e| format!("trusted key {}: {e}", p.display()))
            })
            .collect()
    }
}
