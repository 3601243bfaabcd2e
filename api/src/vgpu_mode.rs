//! The `nvidia.com/vgpu-mode` pod annotation: which device mode a pod's
//! cards must be in. HAMi knows three modes, `hami-core` (a card shared
//! under memory and compute caps), `mig` (a MIG slice) and `mps` (an MPS
//! share), and keeps a card when the annotation's text contains the card's
//! mode. Tessera shares cards the `hami-core` way only, so a request it can
//! honour names `hami-core`; one that names only `mig` or `mps` is refused
//! with a message that says what to do.

use std::fmt;

/// The mode Tessera shares cards in (and writes in its inventory).
pub const SUPPORTED_MODE: &str = crate::inventory::DEFAULT_MODE;

/// Every mode HAMi knows.
pub const HAMI_MODES: [&str; 3] = ["hami-core", "mig", "mps"];

/// A parsed `nvidia.com/vgpu-mode` value Tessera can honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgpuMode {
    /// The value as written (trimmed), matched against card modes as HAMi
    /// does: a card is kept when this text contains its mode.
    text: String,
}

impl VgpuMode {
    /// Whether a card in `card_mode` satisfies the request (HAMi's rule: the
    /// annotation's text contains the card's mode).
    pub fn allows(&self, card_mode: &str) -> bool {
        !card_mode.is_empty() && self.text.contains(card_mode)
    }

    /// The value as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for VgpuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A `nvidia.com/vgpu-mode` value Tessera cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VgpuModeError {
    /// It names only modes Tessera does not run (MIG, MPS).
    #[error("asks for device mode `{value}`, which Tessera does not provide: Tessera shares cards in `hami-core` mode only (memory and compute caps enforced per container), it has no MIG or MPS mode. Remove the annotation, or set it to `hami-core`, and size the share with nvidia.com/gpumem and nvidia.com/gpucores")]
    Unsupported {
        /// The value as written.
        value: String,
    },
    /// A name that is no device mode at all.
    #[error("names `{name}`, which is not a device mode; HAMi's modes are hami-core, mig and mps, and Tessera provides hami-core: remove the annotation or set it to `hami-core`")]
    Unknown {
        /// The unknown name.
        name: String,
    },
}

impl std::str::FromStr for VgpuMode {
    type Err = VgpuModeError;

    /// Reads the value as a comma list of modes (HAMi only checks that the
    /// text contains a card's mode, so a list works there too).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let text = value.trim();
        let mut names = text.split(',').map(str::trim).filter(|n| !n.is_empty());
        if let Some(unknown) = names
            .clone()
            .find(|n| !HAMI_MODES.contains(&n.to_ascii_lowercase().as_str()))
        {
            return Err(VgpuModeError::Unknown {
                name: unknown.to_owned(),
            });
        }
        if !names.any(|n| n == SUPPORTED_MODE) {
            return Err(VgpuModeError::Unsupported {
                value: text.to_owned(),
            });
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hami_core_is_honoured_and_matches_only_hami_core_cards() {
        let mode: VgpuMode = "hami-core".parse().expect("supported");
        assert!(mode.allows("hami-core"));
        assert!(!mode.allows("mig"));
        assert!(!mode.allows(""));
        let listed: VgpuMode = " mig,hami-core ".parse().expect("a list naming hami-core");
        assert!(listed.allows("hami-core"));
        assert!(listed.allows("mig"));
        assert_eq!(listed.as_str(), "mig,hami-core");
    }

    #[test]
    fn mig_and_mps_are_refused_with_what_to_do() {
        for value in ["mig", "mps", "mig,mps", "", "  "] {
            let error = value.parse::<VgpuMode>().expect_err(value);
            let text = error.to_string();
            assert!(text.contains("hami-core"), "{value}: {text}");
            assert!(text.contains("Remove the annotation"), "{value}: {text}");
        }
        let error = "hami".parse::<VgpuMode>().expect_err("unknown");
        assert!(error.to_string().contains("`hami`"), "{error}");
        assert!("HAMi-core".parse::<VgpuMode>().is_err());
    }
}
