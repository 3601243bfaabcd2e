//! Facts about a pod object every component asks the same way: its
//! `namespace/name` key, whether it has ended, its annotations, and where
//! it stands in the allocation handshake ([`BindPhase`], the state machine
//! of `hami.io/bind-phase`).
//!
//! The handshake: the scheduler binds a pod in [`BindPhase::Allocating`];
//! the node agent moves it to [`BindPhase::Success`] once every GPU
//! container got its devices, or to [`BindPhase::Failed`] when it cannot
//! apply them; the scheduler also fails a pod no kubelet admitted in time.
//! `success` and `failed` are final.

use k8s_openapi::api::core::v1::Pod;

use crate::names::allocation as keys;

/// `namespace/name` of a pod (`default` when the namespace is unset).
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Whether the pod has ended (`Succeeded` or `Failed`): its resources are free.
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Whether the pod still runs or may run: not ended, not being deleted.
pub fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && !is_terminal(pod)
}

/// The value of one annotation.
pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Where a pod stands in the allocation handshake (`hami.io/bind-phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BindPhase {
    /// Bound by the scheduler; the node agent has not applied it yet.
    Allocating,
    /// Every GPU container got its devices.
    Success,
    /// The allocation could not be applied (or was never admitted).
    Failed,
}

impl BindPhase {
    /// The annotation value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allocating => keys::PHASE_ALLOCATING,
            Self::Success => keys::PHASE_SUCCESS,
            Self::Failed => keys::PHASE_FAILED,
        }
    }

    /// Parses an annotation value; anything else is no phase.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            keys::PHASE_ALLOCATING => Some(Self::Allocating),
            keys::PHASE_SUCCESS => Some(Self::Success),
            keys::PHASE_FAILED => Some(Self::Failed),
            _ => None,
        }
    }

    /// The pod's phase, if it carries a known one.
    pub fn of(pod: &Pod) -> Option<Self> {
        annotation(pod, keys::BIND_PHASE).and_then(Self::parse)
    }

    /// Whether moving from `self` to `next` is a step of the handshake.
    pub const fn can_become(self, next: Self) -> bool {
        matches!(
            (self, next),
            (Self::Allocating, Self::Success | Self::Failed)
        )
    }

    /// Whether the handshake is over.
    pub const fn is_final(self) -> bool {
        !matches!(self, Self::Allocating)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn phases_round_trip_and_only_allocating_moves_on() {
        let all = [BindPhase::Allocating, BindPhase::Success, BindPhase::Failed];
        for phase in all {
            assert_eq!(BindPhase::parse(phase.as_str()), Some(phase));
            for next in all {
                let step = phase == BindPhase::Allocating && next != BindPhase::Allocating;
                assert_eq!(phase.can_become(next), step, "{phase:?} -> {next:?}");
            }
        }
        assert!(!BindPhase::Allocating.is_final());
        assert!(BindPhase::Success.is_final() && BindPhase::Failed.is_final());
        assert_eq!(BindPhase::parse("Success"), None);
    }

    #[test]
    fn pod_facts() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": {"hami.io/bind-phase": "failed"}},
            "status": {"phase": "Succeeded"}}))
        .expect("pod");
        assert_eq!(pod_key(&pod), "default/p");
        assert!(is_terminal(&pod) && !is_live(&pod));
        assert_eq!(BindPhase::of(&pod), Some(BindPhase::Failed));
        assert_eq!(annotation(&pod, "x"), None);
    }
}
