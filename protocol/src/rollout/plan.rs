//! The rollout plan: the target's devices split into waves.

use std::collections::{BTreeMap, BTreeSet};

use super::Wave;
use crate::messages::Status;
use crate::sha256_hex;
use crate::topics::Target;

/// Splits the target's devices into waves.
pub(super) fn plan_waves(
    members: &[String],
    waves: &[Wave],
    statuses: &BTreeMap<String, Status>,
) -> Vec<Vec<String>> {
    // Percent waves take devices in the order of a hash of their ids: spread over lines and
    // sites, the same on every run.
    let mut order: Vec<&String> = members.iter().collect();
    order.sort_by_key(|id| sha256_hex(id.as_bytes()));
    let mut taken: BTreeSet<String> = BTreeSet::new();
    let mut plan = vec![];
    let n = members.len() as f64;
    let mut cumulative = 0.0;
    for wave in waves {
        let ids: Vec<String> = match wave {
            Wave::Percent(p) => {
                cumulative += p;
                let upto = ((cumulative / 100.0 * n).round() as usize).min(members.len());
                let free: Vec<&String> = order
                    .iter()
                    .copied()
                    .filter(|id| !taken.contains(*id))
                    .collect();
                let want = upto.saturating_sub(taken.len());
                free.into_iter().take(want).cloned().collect()
            }
            Wave::Target(t) => order
                .iter()
                .copied()
                .filter(|id| !taken.contains(*id))
                .filter(|id| {
                    statuses
                        .get(*id)
                        .is_some_and(|s| t.includes(&s.device, &s.groups))
                        || matches!(t, Target::Device(d) if d == *id)
                })
                .cloned()
                .collect(),
        };
        taken.extend(ids.iter().cloned());
        plan.push(ids);
    }
    let rest: Vec<String> = order
        .iter()
        .filter(|id| !taken.contains(**id))
        .map(|id| (*id).clone())
        .collect();
    if !rest.is_empty() || plan.is_empty() {
        plan.push(rest);
    }
    for ids in &mut plan {
        ids.sort();
    }
    plan
}

pub(super) fn wave_labels(waves: &[Wave], planned: usize) -> Vec<String> {
    (0..planned)
        .map(|i| {
            let what = match waves.get(i) {
                Some(Wave::Percent(p)) => format!(" ({p}%)"),
                Some(Wave::Target(t)) => format!(" ({t})"),
                None if !waves.is_empty() => " (the rest)".into(),
                None => String::new(),
            };
            format!("wave {}/{planned}{what}", i + 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str, groups: &[&str]) -> Status {
        Status {
            device: id.into(),
            line: "l".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            edge_version: "0".into(),
            online: true,
            active: None,
            previous: vec![],
            on_trial: false,
            last_event: None,
            updated_unix: 0,
        }
    }

    #[test]
    fn waves_split_by_percent_and_by_target() {
        let ids: Vec<String> = (0..100).map(|i| format!("d{i:03}")).collect();
        let statuses: BTreeMap<String, Status> = ids
            .iter()
            .map(|id| {
                let g: &[&str] = if id.ends_with('7') { &["canary"] } else { &[] };
                (id.clone(), status(id, g))
            })
            .collect();
        let plan = plan_waves(
            &ids,
            &[
                "5%".parse().unwrap(),
                "15%".parse().unwrap(),
                "80%".parse().unwrap(),
            ],
            &statuses,
        );
        assert_eq!(
            plan.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![5, 15, 80]
        );
        let all: BTreeSet<&String> = plan.iter().flatten().collect();
        assert_eq!(all.len(), 100);
        let plan = plan_waves(&ids, &["group:canary".parse().unwrap()], &statuses);
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 90]);
        assert!(plan[0].iter().all(|id| id.ends_with('7')));
        let plan = plan_waves(&ids, &[], &statuses);
        assert_eq!(plan.len(), 1);
        assert!("0%".parse::<Wave>().is_err());
        assert!("x%".parse::<Wave>().is_err());
        assert!("robot:1".parse::<Wave>().is_err());
    }
}
