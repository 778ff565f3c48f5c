//! `trainer rollback`: send a signed rollback command: devices go back to a kept earlier model.

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
    /// Secret key from `trainer keygen` (devices accept commands signed by a trusted key).
    #[arg(long)]
    key: PathBuf,
    #[command(flatten)]
    broker: BrokerArgs,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        to,
        version,
        key,
        broker,
    } = args;

    let key = protocol::package::read_signing_key(&key)?;
    let command = protocol::Command {
        action: protocol::CommandAction::Rollback {
            to_version: version,
        },
        target: to.clone(),
        issued_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64,
    };
    let signed = protocol::SignedCommand::sign(&command, &key);
    let topics = protocol::Topics::new(&broker.site)?;
    let broker = broker.config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        use protocol::messages::Message;
        let options = broker.options(&format!("rollback-{}", std::process::id()))?;
        let mut conn = protocol::mqtt::Connection::start(options, vec![]);
        conn.wait_connected(std::time::Duration::from_secs(15))
            .await?;
        conn.publish(
            topics.down(&to, protocol::topics::DownKind::Command),
            signed.encode(),
            false,
        )
        .await?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        conn.close().await;
        anyhow::Ok(())
    })?;
    println!("rollback command sent to {to}");
    Ok(())
}
