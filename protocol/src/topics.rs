//! MQTT topic layout.
//!
//! Upward (device -> fleet manager), one subtree per device:
//! `edgeinsp/{site}/{line}/{device}/status` (retained), `.../verdict`, `.../report`.
//!
//! Downward (publisher -> devices), addressed to one device, a group or the whole site:
//! `edgeinsp/{site}/down/device/{id}/{kind}`, `edgeinsp/{site}/down/group/{name}/{kind}`,
//! `edgeinsp/{site}/down/fleet/{kind}` with kind = `offer` | `chunk` | `complete` | `command`.
//!
//! A transfer under way has its own topics, `edgeinsp/{site}/down/transfer/{id16}/{kind}` (the
//! first 16 hex digits of the transfer id; kind = `chunk` | `complete`): a device subscribes
//! while it receives that package, so one publish reaches exactly the devices that need it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

pub const ROOT: &str = "edgeinsp";

/// Who a downward message is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    Device(String),
    Group(String),
    Fleet,
}

impl FromStr for Target {
    type Err = ProtocolError;
    /// `device:ID`, `group:NAME` or `fleet`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ProtocolError::Invalid(format!(
                "target `{s}`: expected device:ID, group:NAME or fleet"
            ))
        };
        if s == "fleet" {
            return Ok(Target::Fleet);
        }
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        check_segment(name, "target name")?;
        match kind {
            "device" => Ok(Target::Device(name.to_string())),
            "group" => Ok(Target::Group(name.to_string())),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for Target {
    type Error = ProtocolError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.to_string()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Device(id) => write!(f, "device:{id}"),
            Target::Group(g) => write!(f, "group:{g}"),
            Target::Fleet => write!(f, "fleet"),
        }
    }
}

impl Target {
    /// Whether a device with this id and these groups is addressed.
    pub fn includes(&self, device: &str, groups: &[String]) -> bool {
        match self {
            Target::Device(id) => id == device,
            Target::Group(g) => groups.iter().any(|x| x == g),
            Target::Fleet => true,
        }
    }

    fn path(&self) -> String {
        match self {
            Target::Device(id) => format!("device/{id}"),
            Target::Group(g) => format!("group/{g}"),
            Target::Fleet => "fleet".to_string(),
        }
    }
}

/// Topics a device publishes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpKind {
    Status,
    Verdict,
    Report,
}

impl UpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpKind::Status => "status",
            UpKind::Verdict => "verdict",
            UpKind::Report => "report",
        }
    }
}

/// Topics a publisher sends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownKind {
    Offer,
    Chunk,
    Complete,
    Command,
}

impl DownKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DownKind::Offer => "offer",
            DownKind::Chunk => "chunk",
            DownKind::Complete => "complete",
            DownKind::Command => "command",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "offer" => DownKind::Offer,
            "chunk" => DownKind::Chunk,
            "complete" => DownKind::Complete,
            "command" => DownKind::Command,
            _ => return None,
        })
    }
}

/// A name used as one topic level: no wildcards, separators or control characters.
pub fn check_segment(name: &str, what: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::Invalid(format!(
            "{what} `{name}`: use 1-64 of A-Z a-z 0-9 - _ ."
        )))
    }
}

/// The topic tree of one site.
#[derive(Clone, Debug)]
pub struct Topics {
    site: String,
}

impl Topics {
    pub fn new(site: &str) -> Result<Self, ProtocolError> {
        check_segment(site, "site")?;
        Ok(Self {
            site: site.to_string(),
        })
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn up(&self, line: &str, device: &str, kind: UpKind) -> String {
        format!("{ROOT}/{}/{line}/{device}/{}", self.site, kind.as_str())
    }

    /// Subscription filter for one kind from every device of the site.
    pub fn up_all(&self, kind: UpKind) -> String {
        format!("{ROOT}/{}/+/+/{}", self.site, kind.as_str())
    }

    pub fn down(&self, target: &Target, kind: DownKind) -> String {
        format!(
            "{ROOT}/{}/down/{}/{}",
            self.site,
            target.path(),
            kind.as_str()
        )
    }

    /// Subscription filter for everything sent to `target`.
    pub fn down_filter(&self, target: &Target) -> String {
        format!("{ROOT}/{}/down/{}/+", self.site, target.path())
    }

    /// Topic of one kind for the devices receiving a transfer (hex id).
    pub fn transfer(&self, transfer_hex: &str, kind: DownKind) -> String {
        format!(
            "{ROOT}/{}/down/transfer/{}/{}",
            self.site,
            &transfer_hex[..transfer_hex.len().min(16)],
            kind.as_str()
        )
    }

    /// Subscription filter for everything sent to the devices receiving a transfer.
    pub fn transfer_filter(&self, transfer_hex: &str) -> String {
        format!(
            "{ROOT}/{}/down/transfer/{}/+",
            self.site,
            &transfer_hex[..transfer_hex.len().min(16)]
        )
    }

    /// Splits a transfer topic into (id prefix, kind).
    pub fn parse_transfer<'a>(&self, topic: &'a str) -> Option<(&'a str, DownKind)> {
        let rest = topic
            .strip_prefix(ROOT)?
            .strip_prefix('/')?
            .strip_prefix(self.site.as_str())?
            .strip_prefix("/down/transfer/")?;
        let (id, kind) = rest.split_once('/')?;
        if id.is_empty() || kind.contains('/') {
            return None;
        }
        Some((id, DownKind::parse(kind)?))
    }

    /// Splits an upward topic into (line, device, kind).
    pub fn parse_up<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str, UpKind)> {
        let rest = topic
            .strip_prefix(ROOT)?
            .strip_prefix('/')?
            .strip_prefix(self.site.as_str())?
            .strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [line, device, kind] = parts[..] else {
            return None;
        };
        let kind = match kind {
            "status" => UpKind::Status,
            "verdict" => UpKind::Verdict,
            "report" => UpKind::Report,
            _ => return None,
        };
        Some((line, device, kind))
    }

    /// Splits a downward topic into (target, kind).
    pub fn parse_down(&self, topic: &str) -> Option<(Target, DownKind)> {
        let rest = topic
            .strip_prefix(ROOT)?
            .strip_prefix('/')?
            .strip_prefix(self.site.as_str())?
            .strip_prefix("/down/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            ["fleet", kind] => Some((Target::Fleet, DownKind::parse(kind)?)),
            ["device", id, kind] => Some((Target::Device(id.into()), DownKind::parse(kind)?)),
            ["group", g, kind] => Some((Target::Group(g.into()), DownKind::parse(kind)?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print() {
        for s in ["device:cam-01", "group:line_3", "fleet"] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
        for bad in ["device:", "group:a/b", "group:+", "robot:x", "device:#", ""] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn topics_round_trip() {
        let t = Topics::new("plant1").unwrap();
        let up = t.up("l2", "cam7", UpKind::Report);
        assert_eq!(up, "edgeinsp/plant1/l2/cam7/report");
        assert_eq!(t.parse_up(&up), Some(("l2", "cam7", UpKind::Report)));
        for target in [
            Target::Fleet,
            Target::Device("a".into()),
            Target::Group("g".into()),
        ] {
            let topic = t.down(&target, DownKind::Chunk);
            assert_eq!(t.parse_down(&topic), Some((target, DownKind::Chunk)));
        }
        assert_eq!(t.parse_down("edgeinsp/other/down/fleet/offer"), None);
        assert_eq!(t.parse_down("edgeinsp/plant1/down/fleet/explode"), None);
        assert!(Topics::new("a/b").is_err());
        let hex = "0123456789abcdef0123";
        let chunk = t.transfer(hex, DownKind::Chunk);
        assert_eq!(
            chunk,
            "edgeinsp/plant1/down/transfer/0123456789abcdef/chunk"
        );
        assert_eq!(
            t.parse_transfer(&chunk),
            Some(("0123456789abcdef", DownKind::Chunk))
        );
        assert_eq!(t.parse_down(&chunk), None);
        assert_eq!(
            t.parse_transfer("edgeinsp/plant1/down/transfer/x/y/chunk"),
            None
        );
    }
}
