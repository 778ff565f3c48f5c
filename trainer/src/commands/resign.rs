//! `trainer resign`: sign an existing package with another key (key rotation): the manifest and
//! weights stay byte for byte, only the signature changes. The package must verify against the
//! key it was signed with (`--old-key-pub`) unless `--unverified` says its old key is lost.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use protocol::Package;
use protocol::package::{parse_public_key, public_key_hex, read_signing_key};

#[derive(clap::Args)]
pub struct Args {
    /// The package to sign again (.edgepkg).
    package: PathBuf,
    /// Secret key to sign with (from `trainer keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Public key the package is signed with now: it must verify before it is signed again.
    #[arg(long, required_unless_present = "unverified")]
    old_key_pub: Option<PathBuf>,
    /// The old key is lost: check only the weights against the manifest, not the old signature.
    #[arg(long)]
    unverified: bool,
    /// Package file to write (may be the input).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let package = Package::read(&args.package)?;
    let manifest = match &args.old_key_pub {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            package.verify(&[parse_public_key(&text)?])?
        }
        None => {
            let manifest = protocol::Manifest::from_json(&package.manifest_bytes)?;
            protocol::package::check_weights(&manifest, &package.weights)?;
            manifest
        }
    };
    let key = read_signing_key(&args.key)?;
    let resigned = package.resigned(&key);
    if resigned.verify(&[key.verifying_key()]).is_err() {
        bail!("the new signature does not verify: {}", args.key.display());
    }
    resigned.write(&args.out)?;
    println!(
        "wrote {} ({} v{}, signed by {})",
        args.out.display(),
        manifest.id,
        manifest.version,
        public_key_hex(&key.verifying_key())
    );
    Ok(())
}
