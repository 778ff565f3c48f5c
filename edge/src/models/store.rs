//! The device's models on disk: the active one, earlier ones to roll back to, and the trial
//! state of a freshly switched model. `state.json` is replaced atomically (write, fsync,
//! rename), so a power loss leaves either the old or the new state, never a mix.

use std::path::{Path, PathBuf};

use protocol::package::{Manifest, Package, VerifyingKey, write_atomic};
use protocol::{ModelRef, unix_now};
use serde::{Deserialize, Serialize};

/// One installed package.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub id: String,
    pub version: u64,
    /// SHA-256 of the weights.
    pub sha256: String,
    /// File name under `packages/`.
    pub file: String,
    pub installed_unix: u64,
}

impl Installed {
    pub fn model_ref(&self) -> ModelRef {
        ModelRef {
            id: self.id.clone(),
            version: self.version,
            sha256: self.sha256.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Daemon starts since the switch.
    pub boots: u32,
    pub since_unix: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreState {
    pub active: Option<Installed>,
    /// Newest first.
    pub previous: Vec<Installed>,
    pub trial: Option<Trial>,
    pub last_event: Option<String>,
    /// `issued_ms` of the last command obeyed (replay protection).
    pub last_command_ms: u64,
    /// Versions a signed rollback command left: offers of them are refused until a signed
    /// `allow` command re-admits them.
    #[serde(default)]
    pub refused_versions: std::collections::BTreeSet<u64>,
}

pub struct ModelStore {
    dir: PathBuf,
    keep: usize,
    pub state: StoreState,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("model state {path}: {message}")]
    State { path: String, message: String },
    #[error("{0}")]
    Rollback(String),
}

impl ModelStore {
    pub fn open(dir: &Path, keep: usize) -> Result<Self, StoreError> {
        let packages = dir.join("packages");
        std::fs::create_dir_all(&packages).map_err(|e| StoreError::State {
            path: packages.display().to_string(),
            message: e.to_string(),
        })?;
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::State {
                path: path.display().to_string(),
                message: format!("unreadable ({e}); move it away to start without models"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreState::default(),
            Err(e) => {
                return Err(StoreError::State {
                    path: path.display().to_string(),
                    message: e.to_string(),
                });
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            keep: keep.max(2),
            state,
        })
    }

    pub fn save(&self) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        write_atomic(&self.dir.join("state.json"), &bytes)?;
        Ok(())
    }

    pub fn path_of(&self, m: &Installed) -> PathBuf {
        self.dir.join("packages").join(&m.file)
    }

    /// Reads and verifies an installed package (a file changed on disk fails here).
    pub fn read(
        &self,
        m: &Installed,
        trusted: &[VerifyingKey],
    ) -> Result<(Manifest, Package), StoreError> {
        let package = Package::read(&self.path_of(m))?;
        let manifest = package.verify(trusted)?;
        Ok((manifest, package))
    }

    /// Writes a verified package next to the others; not active yet.
    pub fn install(&self, manifest: &Manifest, package: &Package) -> Result<Installed, StoreError> {
        let file = format!("{:012}-{}.edgepkg", manifest.version, manifest.id);
        package.write(&self.dir.join("packages").join(&file))?;
        Ok(Installed {
            id: manifest.id.clone(),
            version: manifest.version,
            sha256: manifest.weights.sha256.clone(),
            file,
            installed_unix: unix_now(),
        })
    }

    /// Makes `new` active (on trial unless `trial` is false); the old active model becomes the
    /// newest rollback candidate; models beyond `keep` are deleted.
    pub fn switch_to(&mut self, new: Installed, trial: bool) -> Result<(), StoreError> {
        if let Some(old) = self.state.active.take()
            && old.file != new.file
        {
            self.state.previous.insert(0, old);
        }
        self.state.previous.retain(|m| m.file != new.file);
        self.state.active = Some(new);
        self.state.trial = trial.then(|| Trial {
            boots: 0,
            since_unix: unix_now(),
        });
        let dropped: Vec<Installed> = self
            .state
            .previous
            .drain((self.keep - 1).min(self.state.previous.len())..)
            .collect();
        self.save()?;
        for m in dropped {
            let _ = std::fs::remove_file(self.path_of(&m));
        }
        Ok(())
    }

    /// Leaves the active model for a kept one (the newest, or `to_version`); the abandoned model
    /// is deleted so it cannot come back by accident. Returns (abandoned, now active).
    pub fn rollback(
        &mut self,
        to_version: Option<u64>,
        reason: &str,
    ) -> Result<(Option<Installed>, Installed), StoreError> {
        let at = match to_version {
            None if self.state.previous.is_empty() => {
                return Err(StoreError::Rollback(format!(
                    "cannot roll back ({reason}): no earlier model is kept"
                )));
            }
            None => 0,
            Some(v) => self
                .state
                .previous
                .iter()
                .position(|m| m.version == v)
                .ok_or_else(|| {
                    StoreError::Rollback(format!(
                        "cannot roll back to v{v}: kept versions are {:?}",
                        self.state
                            .previous
                            .iter()
                            .map(|m| m.version)
                            .collect::<Vec<_>>()
                    ))
                })?,
        };
        let target = self.state.previous.remove(at);
        let abandoned = self.state.active.replace(target.clone());
        self.state.trial = None;
        self.state.last_event = Some(format!(
            "rolled back from {} to v{}: {reason}",
            abandoned
                .as_ref()
                .map(|m| format!("v{}", m.version))
                .unwrap_or_else(|| "no model".into()),
            target.version
        ));
        self.save()?;
        if let Some(a) = &abandoned {
            let _ = std::fs::remove_file(self.path_of(a));
        }
        Ok((abandoned, target))
    }

    /// Called once per daemon start: counts starts of a trial model. Returns the number of
    /// starts when it exceeds `max_boots` (the caller then rolls back).
    pub fn count_boot(&mut self, max_boots: u32) -> Result<Option<u32>, StoreError> {
        let Some(trial) = self.state.trial.as_mut() else {
            return Ok(None);
        };
        trial.boots += 1;
        let boots = trial.boots;
        self.save()?;
        Ok((boots > max_boots).then_some(boots))
    }

    /// The trial model ran long enough: it stays.
    pub fn confirm(&mut self) -> Result<bool, StoreError> {
        if self.state.trial.take().is_some() {
            self.save()?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn set_event(&mut self, event: String) -> Result<(), StoreError> {
        self.state.last_event = Some(event);
        self.save()
    }

    /// Drops a package that was installed but never activated (failed self-test).
    pub fn discard(&self, m: &Installed) {
        let is_kept = self.state.active.as_ref() == Some(m) || self.state.previous.contains(m);
        if !is_kept {
            let _ = std::fs::remove_file(self.path_of(m));
        }
    }
}
