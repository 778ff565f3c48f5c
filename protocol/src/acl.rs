//! Broker access control for a site: a mosquitto ACL file, generated from the fleet list, in
//! which each device (logged in with its id as user name) may publish only under its own
//! topics and read only what is addressed to it, its groups, the fleet and transfers; the
//! rollout publisher may write downward and read statuses and reports; verdict consumers may
//! read verdicts (shared subscriptions included).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::ProtocolError;
use crate::topics::{ROOT, check_segment};

/// One device of the fleet list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetEntry {
    pub id: String,
    pub line: String,
    pub groups: Vec<String>,
}

/// Reads a fleet list: one device per line, `ID LINE [GROUP ...]` separated by blanks; `#`
/// starts a comment. `origin` names the list in errors (a path).
pub fn parse_fleet_list(text: &str, origin: &str) -> Result<Vec<FleetEntry>, ProtocolError> {
    let mut out = vec![];
    let mut seen = BTreeSet::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |e: ProtocolError| ProtocolError::Invalid(format!("{origin} line {}: {e}", n + 1));
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, l, groups @ ..] = &fields[..] else {
            return Err(at(ProtocolError::Invalid(
                "expected `ID LINE [GROUP ...]`".into(),
            )));
        };
        check_segment(id, "device id").map_err(at)?;
        check_segment(l, "line").map_err(at)?;
        for g in groups {
            check_segment(g, "group").map_err(at)?;
        }
        if !seen.insert(id.to_string()) {
            return Err(at(ProtocolError::Invalid(format!(
                "device `{id}` is listed twice"
            ))));
        }
        out.push(FleetEntry {
            id: id.to_string(),
            line: l.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        });
    }
    if out.is_empty() {
        return Err(ProtocolError::Invalid(format!("{origin}: no devices")));
    }
    Ok(out)
}

/// The mosquitto ACL (`acl_file`) for `site`: `publishers` and `consumers` are broker user
/// names; each device logs in with its id.
pub fn mosquitto_acl(
    site: &str,
    fleet: &[FleetEntry],
    publishers: &[String],
    consumers: &[String],
) -> Result<String, ProtocolError> {
    check_segment(site, "site")?;
    for u in publishers.iter().chain(consumers) {
        check_segment(u, "user name")?;
    }
    let base = format!("{ROOT}/{site}");
    let mut out = format!(
        "# mosquitto acl_file for site {site}: {} device(s), written by `trainer fleet acl`.\n\
         # Devices log in with their id as user name. Anyone not named here may do nothing.\n",
        fleet.len()
    );
    for p in publishers {
        let _ = write!(
            out,
            "\n# rollout publisher\nuser {p}\ntopic write {base}/down/#\n\
             topic read {base}/+/+/status\ntopic read {base}/+/+/report\n"
        );
    }
    for c in consumers {
        let _ = write!(
            out,
            "\n# verdict consumer (plain or shared subscription)\nuser {c}\n\
             topic read {base}/+/+/verdict\ntopic read {base}/+/+/status\n"
        );
    }
    for d in fleet {
        let _ = write!(out, "\n# device on line {}\nuser {}\n", d.line, d.id);
        for kind in ["status", "verdict", "report"] {
            let _ = writeln!(out, "topic write {base}/{}/{}/{kind}", d.line, d.id);
        }
        let _ = writeln!(out, "topic read {base}/down/device/{}/+", d.id);
        for g in &d.groups {
            let _ = writeln!(out, "topic read {base}/down/group/{g}/+");
        }
        let _ = writeln!(out, "topic read {base}/down/fleet/+");
        let _ = writeln!(out, "topic read {base}/down/transfer/+/+");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_lists_are_checked_line_by_line() {
        let list =
            parse_fleet_list("# site 1\ncam1 l1 canary\n\ncam2 l2  # no groups\n", "f").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].groups, vec!["canary".to_string()]);
        assert!(list[1].groups.is_empty());
        for (bad, what) in [
            ("cam1\n", "line 1: expected"),
            ("cam1 l1\ncam/2 l1\n", "line 2: device id `cam/2`"),
            (
                "cam1 l1\ncam1 l2\n",
                "line 2: device `cam1` is listed twice",
            ),
            ("cam1 l1 g+\n", "line 1: group `g+`"),
            ("# nothing\n", "no devices"),
        ] {
            let e = parse_fleet_list(bad, "f").unwrap_err().to_string();
            assert!(e.contains(what), "{bad:?}: {e}");
        }
        let acl = mosquitto_acl("s", &list, &["pub".into()], &["mes".into()]).unwrap();
        assert!(
            acl.contains("user cam1\ntopic write edgeinsp/s/l1/cam1/status\n"),
            "{acl}"
        );
        assert!(
            acl.contains("topic read edgeinsp/s/down/group/canary/+"),
            "{acl}"
        );
        assert!(mosquitto_acl("s", &list, &["p u".into()], &[]).is_err());
    }
}
