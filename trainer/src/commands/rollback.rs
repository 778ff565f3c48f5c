//! `trainer rollback` and `trainer allow`: signed commands to devices. A rollback sends devices
//! back to a kept earlier model and has them refuse the version they left; `allow` admits that
//! version again. Each command is signed with its target, site, issue time and expiry.

use std::path::PathBuf;

use anyhow::Result;

use super::BrokerArgs;

#[derive(clap::Args)]
pub struct Args {
    /// device:ID, group:NAME or fleet.
    #[arg(long)]
    to: protocol::Target,
    /// Version to go back to (default: the newest kept one).
    #[arg(long)]
    version: Option<u64>,
    #[command(flatten)]
    signing: SigningArgs,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(clap::Args)]
pub struct AllowArgs {
    /// device:ID, group:NAME or fleet.
    #[arg(long)]
    to: protocol::Target,
    /// The version a rollback made the devices refuse, to admit again.
    #[arg(long)]
    version: u64,
    #[command(flatten)]
    signing: SigningArgs,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(clap::Args)]
pub struct SigningArgs {
    /// Secret key from `trainer keygen` (devices accept commands signed by a trusted key).
    #[arg(long)]
    key: PathBuf,
    /// Seconds the command stays valid (devices refuse it after; at most a day): a device
    /// offline longer never obeys it late.
    #[arg(long, default_value_t = 600)]
    ttl_s: u64,
}

pub fn run(args: Args) -> Result<()> {
    let action = protocol::CommandAction::Rollback {
        to_version: args.version,
    };
    send(action, &args.to, &args.signing, &args.broker)?;
    println!("rollback command sent to {}", args.to);
    Ok(())
}

pub fn run_allow(args: AllowArgs) -> Result<()> {
    let action = protocol::CommandAction::Allow {
        version: args.version,
    };
    send(action, &args.to, &args.signing, &args.broker)?;
    println!("allow command for v{} sent to {}", args.version, args.to);
    Ok(())
}

fn send(
    action: protocol::CommandAction,
    to: &protocol::Target,
    signing: &SigningArgs,
    broker: &BrokerArgs,
) -> Result<()> {
    let ttl_ms = signing.ttl_s.saturating_mul(1000);
    anyhow::ensure!(
        (1..=protocol::messages::MAX_COMMAND_TTL_MS).contains(&ttl_ms),
        "--ttl-s {}: must be 1 to {} (a day)",
        signing.ttl_s,
        protocol::messages::MAX_COMMAND_TTL_MS / 1000
    );
    let key = protocol::package::read_signing_key(&signing.key)?;
    let issued_ms = protocol::unix_now_ms();
    let command = protocol::Command {
        action,
        target: to.clone(),
        site: broker.site.clone(),
        issued_ms,
        expires_ms: issued_ms + ttl_ms,
    };
    let signed = protocol::SignedCommand::sign(&command, &key);
    let topics = protocol::Topics::new(&broker.site)?;
    let broker = broker.config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        use protocol::messages::Message;
        let options = broker.options(&format!("command-{}", std::process::id()))?;
        let mut conn = protocol::mqtt::Connection::start(options, vec![]);
        conn.wait_connected(std::time::Duration::from_secs(15))
            .await?;
        conn.publish(
            topics.down(to, protocol::topics::DownKind::Command),
            signed.encode(),
            false,
        )
        .await?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        conn.close().await;
        anyhow::Ok(())
    })
}
