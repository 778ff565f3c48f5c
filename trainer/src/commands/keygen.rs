//! `trainer keygen`: create an ed25519 signing key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub
//! (put its contents in the edge config's models.trusted_keys).

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Folder for the two key files.
    #[arg(long)]
    out: PathBuf,
    /// File name of the pair (NAME.key, NAME.pub).
    #[arg(long, default_value = "signing")]
    name: String,
}

pub fn run(args: Args) -> Result<()> {
    let Args { out, name } = args;

    let key = protocol::package::generate_key()?;
    let (secret, public) = protocol::package::write_key_pair(&out, &name, &key)?;
    println!(
        "secret key: {}\npublic key: {} ({})",
        secret.display(),
        public.display(),
        protocol::package::public_key_hex(&key.verifying_key())
    );
    Ok(())
}
