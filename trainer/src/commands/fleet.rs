//! `trainer fleet`: the fleet as the broker sees it (`status`), the broker ACL for it (`acl`),
//! and a verdict consumer that can share the load with others (`verdicts --share GROUP`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use protocol::messages::Message;

use super::BrokerArgs;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Every device's retained status: online, active model, trial, last event; a summary by
    /// version.
    Status(StatusArgs),
    /// Write a mosquitto ACL file from a fleet list: each device (user name = its id) may
    /// publish only under its own topics and read only what is addressed to it.
    Acl(AclArgs),
    /// Print the fleet's verdicts as JSON lines, each acknowledged to the broker after it is
    /// written; with --share, consumers of one group split the verdicts between them.
    Verdicts(VerdictsArgs),
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Output: table, json (the statuses), or list (a fleet list for `fleet acl`).
    #[arg(long, value_enum, default_value_t = StatusFormat::Table)]
    format: StatusFormat,
    /// Longest wait for the statuses, seconds.
    #[arg(long, default_value_t = 5.0)]
    wait_s: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StatusFormat {
    Table,
    Json,
    List,
}

#[derive(clap::Args)]
pub struct AclArgs {
    /// Fleet list: one device per line, `ID LINE [GROUP ...]` (`#` comments); `fleet status
    /// --format list` writes one from the live fleet.
    #[arg(long)]
    fleet: PathBuf,
    /// Site: the first topic level under `edgeinsp/`.
    #[arg(long, default_value = "site1")]
    site: String,
    /// Broker user of the rollout publisher (`trainer publish`, rollback); repeatable.
    #[arg(long = "publisher", default_value = "publisher")]
    publishers: Vec<String>,
    /// Broker user allowed to read verdicts (a MES, a dashboard); repeatable.
    #[arg(long = "consumer")]
    consumers: Vec<String>,
    /// Where to write the ACL (stdout when absent).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct VerdictsArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Shared subscription group (`$share/GROUP/...`): each verdict goes to one consumer of
    /// the group.
    #[arg(long)]
    share: Option<String>,
    /// MQTT client id. With it the broker keeps this consumer's session (and its verdicts)
    /// while it is away; without it the session ends with the process.
    #[arg(long)]
    client_id: Option<String>,
    /// Exit after this many verdicts.
    #[arg(long)]
    count: Option<u64>,
}

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Status(a) => status(a),
        Command::Acl(a) => acl(a),
        Command::Verdicts(a) => verdicts(a),
    }
}

fn status(args: StatusArgs) -> Result<()> {
    let broker = args.broker.config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let statuses = runtime.block_on(protocol::rollout::fleet_statuses(
        &broker,
        &args.broker.site,
        Duration::from_secs_f64(args.wait_s),
    ))?;
    let now = protocol::unix_now_ms() / 1000;
    match args.format {
        StatusFormat::Json => {
            let all: Vec<&protocol::Status> = statuses.values().collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        StatusFormat::List => {
            for s in statuses.values() {
                println!("{} {} {}", s.device, s.line, s.groups.join(" "));
            }
        }
        StatusFormat::Table => print!("{}", status_table(&statuses, now)),
    }
    Ok(())
}

fn model(m: &Option<protocol::messages::ModelRef>) -> String {
    m.as_ref()
        .map(|m| format!("{} v{}", m.id, m.version))
        .unwrap_or_else(|| "none".into())
}

/// One row per device, then the summary: online, and devices per active model.
fn status_table(
    statuses: &std::collections::BTreeMap<String, protocol::Status>,
    now: u64,
) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<20} {:<10} {:<16} {:<7} {:<20} {:<5} {:>8}  {}\n",
        "device", "line", "groups", "online", "active", "trial", "updated", "last event"
    );
    let mut versions: std::collections::BTreeMap<String, usize> = Default::default();
    let mut online = 0;
    for s in statuses.values() {
        online += s.online as usize;
        *versions.entry(model(&s.active)).or_default() += 1;
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:<16} {:<7} {:<20} {:<5} {:>7}s  {}",
            s.device,
            s.line,
            if s.groups.is_empty() {
                "-".to_string()
            } else {
                s.groups.join(",")
            },
            if s.online { "yes" } else { "no" },
            model(&s.active),
            if s.on_trial { "yes" } else { "no" },
            now.saturating_sub(s.updated_unix),
            s.last_event.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(
        out,
        "{} device(s), {online} online; active: {}",
        statuses.len(),
        versions
            .iter()
            .map(|(m, n)| format!("{m} on {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}

fn acl(args: AclArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.fleet)
        .with_context(|| format!("reading the fleet list {}", args.fleet.display()))?;
    let fleet = protocol::acl::parse_fleet_list(&text, &args.fleet.display().to_string())?;
    let acl = protocol::acl::mosquitto_acl(&args.site, &fleet, &args.publishers, &args.consumers)?;
    match &args.out {
        Some(path) => {
            protocol::package::write_atomic(path, acl.as_bytes())?;
            eprintln!(
                "{}: {} device(s), {} publisher(s), {} consumer(s)",
                path.display(),
                fleet.len(),
                args.publishers.len(),
                args.consumers.len()
            );
        }
        None => print!("{acl}"),
    }
    Ok(())
}

fn verdicts(args: VerdictsArgs) -> Result<()> {
    use rumqttc::{Event, Packet, QoS};
    let topics = protocol::Topics::new(&args.broker.site)?;
    let filter = match &args.share {
        Some(g) => {
            protocol::topics::check_segment(g, "--share group")?;
            format!(
                "$share/{g}/{}",
                topics.up_all(protocol::topics::UpKind::Verdict)
            )
        }
        None => topics.up_all(protocol::topics::UpKind::Verdict),
    };
    let persistent = args.client_id.is_some();
    let client_id = args.client_id.clone().unwrap_or_else(|| {
        format!(
            "verdicts-{}-{}",
            std::process::id(),
            protocol::unix_now_ms()
        )
    });
    let mut options = args.broker.config()?.options(&client_id)?;
    options.set_clean_session(!persistent);
    options.set_manual_acks(true);
    let (client, mut connection) = rumqttc::Client::new(options, 64);
    let stdout = std::io::stdout();
    let mut written = 0u64;
    let mut attempt = 0;
    // Acknowledgements waiting for room in the client's request queue. This thread also drives
    // the connection, so it must never block on a full queue (the event loop hands out up to
    // ten received messages per network read, and would never get to the queued acks).
    let mut unacked: std::collections::VecDeque<rumqttc::Publish> = Default::default();
    let ack = |unacked: &mut std::collections::VecDeque<rumqttc::Publish>| -> Result<()> {
        while let Some(p) = unacked.front() {
            match client.try_ack(p) {
                Ok(()) => {
                    unacked.pop_front();
                }
                Err(rumqttc::ClientError::TryRequest(_)) => break,
                Err(e) => return Err(e).context("acknowledging"),
            }
        }
        Ok(())
    };
    // --count reached; then the disconnect asked for (after the acks in the request queue, so
    // the connection sends them first: the loop runs on until it has sent the disconnect).
    let mut finished = false;
    let mut leaving = false;
    for event in connection.iter() {
        ack(&mut unacked)?;
        if finished && !leaving && unacked.is_empty() {
            let _ = client.disconnect();
            leaving = true;
        }
        match event {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Err(_) if leaving => break,
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                // A new session: what the last one did not acknowledge is the broker's to
                // send again (a persistent session) or gone with it (a clean one).
                unacked.clear();
                client
                    .subscribe(filter.as_str(), QoS::AtLeastOnce)
                    .context("subscribing")?;
            }
            // Consuming from the broker's acknowledgement on, not from the request.
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                if suback
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    anyhow::bail!(
                        "the broker refused the subscription to {filter} (is this user allowed to read verdicts? see `trainer fleet acl`)"
                    );
                }
                eprintln!("consuming {filter}");
            }
            // Past --count: left unacknowledged for the broker to hand to another consumer.
            Ok(Event::Incoming(Packet::Publish(_))) if finished => {}
            Ok(Event::Incoming(Packet::Publish(p))) => {
                match protocol::Verdict::decode(&p.payload) {
                    Ok(v)
                        if topics
                            .parse_up(&p.topic)
                            .is_some_and(|(_, d, _)| d == v.device) =>
                    {
                        let mut out = stdout.lock();
                        serde_json::to_writer(&mut out, &v)?;
                        out.write_all(b"\n")?;
                        out.flush().context("writing a verdict to stdout")?;
                        written += 1;
                    }
                    Ok(v) => eprintln!("{}: verdict names device {}: skipped", p.topic, v.device),
                    Err(e) => eprintln!("{}: {e}: skipped", p.topic),
                }
                // Written (or refused for good): the broker may forget it.
                unacked.push_back(p);
                ack(&mut unacked)?;
                if args.count.is_some_and(|c| written >= c) {
                    finished = true;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("broker: {e}; reconnecting");
                std::thread::sleep(protocol::mqtt::reconnect_delay(attempt));
                attempt += 1;
            }
        }
    }
    Ok(())
}
