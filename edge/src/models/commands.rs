//! Signed commands to the device (rollback to a kept model): verified against the trusted
//! keys, refused when replayed or stale, obeyed, reported.

use protocol::package::verify_signature;
use protocol::{Command, CommandAction, Report, ReportState, SignedCommand};

use super::ModelLifecycle;

impl ModelLifecycle {
    pub(super) fn on_command(&mut self, signed: SignedCommand) {
        let device = self.identity.id.clone();
        let refuse = |this: &mut Self, reason: String| {
            tracing::warn!("command refused: {reason}");
            this.report(Report {
                device: device.clone(),
                transfer: None,
                version: None,
                state: ReportState::Refused,
                have: 0,
                missing: vec![],
                reason: Some(format!("command: {reason}")),
            });
        };
        let signature = match hex::decode(&signed.signature) {
            Ok(s) => s,
            Err(e) => return refuse(self, format!("signature: {e}")),
        };
        if let Err(e) = verify_signature(signed.command.as_bytes(), &signature, &self.trusted) {
            return refuse(self, e.to_string());
        }
        let command: Command = match serde_json::from_str(&signed.command) {
            Ok(c) => c,
            Err(e) => return refuse(self, format!("malformed: {e}")),
        };
        if !command
            .target
            .includes(&self.identity.id, &self.identity.groups)
        {
            return;
        }
        if command.site != self.identity.site {
            return refuse(
                self,
                format!(
                    "for site `{}`, this device is at `{}`",
                    command.site, self.identity.site
                ),
            );
        }
        let now = protocol::unix_now_ms();
        if now > command.expires_ms {
            return refuse(
                self,
                format!(
                    "expired {} s ago (issued {} ms, expires {} ms)",
                    (now - command.expires_ms) / 1000,
                    command.issued_ms,
                    command.expires_ms
                ),
            );
        }
        if command.expires_ms.saturating_sub(command.issued_ms)
            > protocol::messages::MAX_COMMAND_TTL_MS
        {
            return refuse(self, "valid for more than a day".into());
        }
        if command.issued_ms <= self.store.state.last_command_ms {
            return refuse(
                self,
                format!(
                    "replayed or stale (issued {} ms, last obeyed {} ms)",
                    command.issued_ms, self.store.state.last_command_ms
                ),
            );
        }
        self.store.state.last_command_ms = command.issued_ms;
        match command.action {
            CommandAction::Rollback { to_version } => {
                match self.store.rollback(to_version, "rollback command") {
                    Ok((left, to)) => {
                        if let Some(left) = left {
                            self.store.state.refused_versions.insert(left.version);
                            if let Err(e) = self.store.save() {
                                tracing::error!("model state: {e}");
                            }
                        }
                        tracing::warn!("rollback command: back to v{}", to.version);
                        self.load_active();
                        self.report(Report {
                            device,
                            transfer: None,
                            version: Some(to.version),
                            state: ReportState::RolledBack,
                            have: 0,
                            missing: vec![],
                            reason: Some("rollback command".into()),
                        });
                        self.publish_status();
                    }
                    Err(e) => {
                        let _ = self.store.save();
                        refuse(self, e.to_string())
                    }
                }
            }
            CommandAction::Allow { version } => {
                let was = self.store.state.refused_versions.remove(&version);
                self.store.state.last_event = Some(format!("allow command: v{version}"));
                if let Err(e) = self.store.save() {
                    tracing::error!("model state: {e}");
                }
                tracing::warn!(
                    "allow command: v{version} {}",
                    if was {
                        "may be installed again"
                    } else {
                        "was not refused"
                    }
                );
                self.publish_status();
            }
        }
    }
}
