//! The allocation seal: proof that a pod's `hami.io/*` allocation was written
//! by Tessera's scheduler. A pod can patch its own annotations, so the
//! annotations alone prove nothing; the scheduler therefore adds
//! `tessera.io/allocation-seal`, an HMAC-SHA256 over the pod's UID, the node
//! and the allocated devices, keyed by a secret only Tessera's
//! ServiceAccounts can read (the Secret `tessera-allocation-key`). The node
//! agent (before handing a pod its cards) and the scheduler (before charging
//! an observed pod) accept an allocation only if its seal verifies.
//!
//! What the seal binds, and why that is enough: the UID makes a seal useless
//! on any other pod (UIDs are never reused, so a seal copied to another pod,
//! or kept across delete-and-recreate, fails); the node makes it useless
//! elsewhere; the devices string is what the agent hands out and the
//! scheduler charges, so editing a card, a cap or a container's share breaks
//! it. `hami.io/vgpu-devices-to-allocate` and `hami.io/bind-phase` are not
//! sealed (the node agent rewrites them): the agent accepts a
//! `to-allocate` entry only when it equals the sealed entry, so they can
//! only withhold a pod's own devices, never add any.
//!
//! Adoption: pods HAMi placed before Tessera was installed carry HAMi's
//! annotations and no seal. [`SealKey::adoption`] names the ones Tessera
//! takes over as they are: created before the key (the Secret's
//! `creationTimestamp`; both timestamps are the API server's own and
//! immutable), bound to the node their allocation names, and not sent to
//! Tessera's scheduler (`spec.schedulerName` is immutable too, and the
//! webhook sends every GPU pod created since to Tessera). The scheduler
//! seals them at first sight; until then the scheduler and the node
//! agent's enforcement believe them through
//! [`AllocationTrust::allocation_adopting`]. No pod created after the key
//! can ever qualify, whatever its annotations say.
//!
//! Format: `v1.<base64url(HMAC-SHA256(key, "tessera-allocation-seal/v1\0" uid "\0" node "\0" devices))>`.
//! No I/O here: loading the key from the Secret belongs to the binaries.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

use crate::allocation::{decode_pod_devices, PodDevices};
use crate::names::allocation as keys;

/// Name of the Secret holding the key, in Tessera's namespace.
pub const KEY_SECRET_NAME: &str = "tessera-allocation-key";
/// The Secret's data key holding the raw key bytes.
pub const KEY_SECRET_FIELD: &str = "key";
/// Bytes of a generated key; shorter keys are refused.
pub const KEY_LEN: usize = 32;

const VERSION_PREFIX: &str = "v1.";
const DOMAIN: &[u8] = b"tessera-allocation-seal/v1\0";

/// Why a seal key could not be made or read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealKeyError {
    /// The key material is too short to be a real key.
    #[error("the allocation key has {len} bytes, at least {KEY_LEN} are needed; delete the Secret `{KEY_SECRET_NAME}` so the scheduler generates a new one")]
    TooShort {
        /// Bytes found.
        len: usize,
    },
    /// The system's random source failed.
    #[error("the system random source failed while generating the allocation key")]
    Random,
}

/// Why a pod's allocation is not accepted.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SealError {
    /// The pod has an allocation but no seal.
    #[error("its hami.io allocation annotations carry no {} seal, so Tessera's scheduler did not write them (they were set by hand or by another scheduler since Tessera was installed; placements made before that are adopted); delete the pod so Tessera places it", keys::SEAL)]
    Missing,
    /// The seal is not of a known format.
    #[error("its {} annotation is not a Tessera seal (`v1.` followed by base64url); delete the pod so Tessera places it again", keys::SEAL)]
    Malformed,
    /// The seal does not match the allocation.
    #[error("its {} seal does not match its allocation: the hami.io annotations were changed after Tessera's scheduler wrote them, or copied from another pod; delete the pod so Tessera places it again", keys::SEAL)]
    Mismatch,
    /// The pod has no UID (not from an API server).
    #[error("it has no metadata.uid, so its allocation cannot be checked")]
    NoUid,
    /// The allocation annotation does not decode (the seal matched, so the
    /// scheduler wrote it: a bug, not a forgery).
    #[error("its sealed allocation does not decode: {0}")]
    Corrupt(String),
}

/// The HMAC key shared by Tessera's components.
#[derive(Clone)]
pub struct SealKey {
    /// Shared: the key is cloned into every trust decision.
    key: std::sync::Arc<hmac::Key>,
    bytes: Vec<u8>,
    /// When the key came to be (its Secret's `creationTimestamp`): pods
    /// created before it may be adopted ([`SealKey::adoption`]).
    issued_at: Option<Time>,
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl PartialEq for SealKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl SealKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, SealKeyError> {
        let mut bytes = vec![0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealKeyError::Random)?;
        Self::from_bytes(&bytes)
    }

    /// The key from its raw bytes (the Secret's `key` field).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealKeyError> {
        if bytes.len() < KEY_LEN {
            return Err(SealKeyError::TooShort { len: bytes.len() });
        }
        Ok(Self {
            key: std::sync::Arc::new(hmac::Key::new(hmac::HMAC_SHA256, bytes)),
            bytes: bytes.to_vec(),
            issued_at: None,
        })
    }

    /// The same key, issued at `time` (its Secret's `creationTimestamp`).
    pub fn issued_at(mut self, time: Option<Time>) -> Self {
        self.issued_at = time;
        self
    }

    /// The key stored in the Secret `tessera-allocation-key` (its data
    /// field `key`).
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Result<Self, SealKeyError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KEY_SECRET_FIELD))
            .map(|b| b.0.as_slice())
            .unwrap_or_default();
        Ok(Self::from_bytes(bytes)?.issued_at(secret.metadata.creation_timestamp.clone()))
    }

    /// The raw bytes, for storing in the Secret.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn message(uid: &str, node: &str, devices: &str) -> Vec<u8> {
        let mut message =
            Vec::with_capacity(DOMAIN.len() + uid.len() + node.len() + devices.len() + 2);
        message.extend_from_slice(DOMAIN);
        message.extend_from_slice(uid.as_bytes());
        message.push(0);
        message.extend_from_slice(node.as_bytes());
        message.push(0);
        message.extend_from_slice(devices.as_bytes());
        message
    }

    /// The seal for the allocation `devices` (the exact
    /// `hami.io/vgpu-devices-allocated` value) of pod `uid` on `node`.
    pub fn seal(&self, uid: &str, node: &str, devices: &str) -> String {
        let tag = hmac::sign(&self.key, &Self::message(uid, node, devices));
        format!("{VERSION_PREFIX}{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks `seal` against the allocation, in constant time.
    pub fn check(&self, uid: &str, node: &str, devices: &str, seal: &str) -> Result<(), SealError> {
        let tag = seal
            .strip_prefix(VERSION_PREFIX)
            .and_then(|b64| URL_SAFE_NO_PAD.decode(b64).ok())
            .ok_or(SealError::Malformed)?;
        hmac::verify(&self.key, &Self::message(uid, node, devices), &tag)
            .map_err(|_| SealError::Mismatch)
    }

    /// The pod's allocation if its seal verifies: `Ok(None)` when the pod
    /// carries no allocation at all.
    pub fn verify_pod(&self, pod: &Pod) -> Result<Option<SealedAllocation>, SealError> {
        let Some(annotations) = pod.metadata.annotations.as_ref() else {
            return Ok(None);
        };
        let (Some(node), Some(devices)) = (
            annotations.get(keys::VGPU_NODE),
            annotations.get(keys::DEVICES_ALLOCATED),
        ) else {
            return Ok(None);
        };
        let seal = annotations.get(keys::SEAL).ok_or(SealError::Missing)?;
        let uid = pod.metadata.uid.as_deref().ok_or(SealError::NoUid)?;
        self.check(uid, node, devices, seal)?;
        let devices = decode_pod_devices(devices).map_err(|e| SealError::Corrupt(e.to_string()))?;
        Ok(Some(SealedAllocation {
            node: node.clone(),
            devices,
        }))
    }
}

/// A pre-install placement Tessera takes over ([`SealKey::adoption`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoption {
    /// The seal to write as `tessera.io/allocation-seal`.
    pub seal: String,
    /// The allocation it seals.
    pub allocation: SealedAllocation,
}

impl SealKey {
    /// Whether `pod` is a placement made before Tessera was installed that
    /// Tessera adopts, and the seal that makes it Tessera's: the pod has an
    /// allocation and no seal, a UID, a `creationTimestamp` strictly
    /// before the key's (timestamps have one-second resolution: a pod of
    /// the key's own second is not adopted), `spec.nodeName` equal to
    /// `hami.io/vgpu-node`, a `spec.schedulerName` other than
    /// `own_scheduler`, and its allocation decodes. `None` otherwise, or
    /// when the key's issue time is unknown.
    pub fn adoption(&self, pod: &Pod, own_scheduler: &str) -> Option<Adoption> {
        let issued = self.issued_at.as_ref()?;
        let created = pod.metadata.creation_timestamp.as_ref()?;
        let annotations = pod.metadata.annotations.as_ref()?;
        let spec = pod.spec.as_ref()?;
        let node = annotations.get(keys::VGPU_NODE)?;
        let devices = annotations.get(keys::DEVICES_ALLOCATED)?;
        let uid = pod.metadata.uid.as_deref()?;
        let eligible = created.0 < issued.0
            && !annotations.contains_key(keys::SEAL)
            && spec.node_name.as_ref() == Some(node)
            && spec.scheduler_name.as_deref() != Some(own_scheduler);
        if !eligible {
            return None;
        }
        let decoded = decode_pod_devices(devices).ok()?;
        Some(Adoption {
            seal: self.seal(uid, node, devices),
            allocation: SealedAllocation {
                node: node.clone(),
                devices: decoded,
            },
        })
    }
}

/// An allocation whose seal verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedAllocation {
    /// `hami.io/vgpu-node`.
    pub node: String,
    /// `hami.io/vgpu-devices-allocated`, decoded.
    pub devices: PodDevices,
}

/// Which allocations a component believes.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum AllocationTrust {
    /// Every allocation annotation as written: for `tessera simulate`, whose
    /// cluster file is the user's own, and for tests of placement alone.
    #[default]
    Annotations,
    /// Only allocations sealed with this key: every component in a cluster.
    Sealed(SealKey),
}

impl AllocationTrust {
    /// [`AllocationTrust::allocation`], also believing a placement Tessera
    /// adopts but has not sealed yet ([`SealKey::adoption`]): what the
    /// scheduler charges and the node agent enforces. Handing out cards
    /// (`Allocate`) believes sealed allocations only.
    pub fn allocation_adopting(
        &self,
        pod: &Pod,
        own_scheduler: &str,
    ) -> Result<Option<SealedAllocation>, SealError> {
        match (self.allocation(pod), self) {
            (Err(SealError::Missing), Self::Sealed(key)) => key
                .adoption(pod, own_scheduler)
                .map(|adopted| Some(adopted.allocation))
                .ok_or(SealError::Missing),
            (believed, _) => believed,
        }
    }

    /// The pod's allocation if it is believed. `Ok(None)`: no allocation.
    pub fn allocation(&self, pod: &Pod) -> Result<Option<SealedAllocation>, SealError> {
        match self {
            Self::Sealed(key) => key.verify_pod(pod),
            Self::Annotations => {
                let annotations = pod.metadata.annotations.as_ref();
                // Hand-written cluster files often leave out the node
                // annotation: the pod's own node stands in for it.
                let node = annotations
                    .and_then(|a| a.get(keys::VGPU_NODE))
                    .or(pod.spec.as_ref().and_then(|s| s.node_name.as_ref()));
                let devices = annotations.and_then(|a| a.get(keys::DEVICES_ALLOCATED));
                match (node, devices) {
                    (Some(node), Some(devices)) => Ok(Some(SealedAllocation {
                        node: node.clone(),
                        devices: decode_pod_devices(devices)
                            .map_err(|e| SealError::Corrupt(e.to_string()))?,
                    })),
                    _ => Ok(None),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn key(byte: u8) -> SealKey {
        SealKey::from_bytes(&[byte; KEY_LEN]).expect("key")
    }

    fn pod(uid: &str, node: &str, devices: &str, seal: Option<String>) -> Pod {
        let mut annotations = json!({
            keys::VGPU_NODE: node,
            keys::DEVICES_ALLOCATED: devices,
        });
        if let Some(seal) = seal {
            annotations[keys::SEAL] = json!(seal);
        }
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "n", "uid": uid,
            "annotations": annotations}}),
        )
        .expect("pod")
    }

    const DEVICES: &str = "GPU-a,NVIDIA,7500,30:;";

    #[test]
    fn a_sealed_pod_verifies_and_decodes() {
        let k = key(7);
        let seal = k.seal("uid-1", "node-a", DEVICES);
        let got = k
            .verify_pod(&pod("uid-1", "node-a", DEVICES, Some(seal)))
            .expect("verifies")
            .expect("has an allocation");
        assert_eq!(got.node, "node-a");
        assert_eq!(got.devices[0][0].memory_mib, 7500);
    }

    #[test]
    fn forged_copied_or_edited_allocations_are_refused() {
        let k = key(7);
        let seal = k.seal("uid-1", "node-a", DEVICES);
        // No seal at all: written by hand or by another scheduler.
        assert_eq!(
            k.verify_pod(&pod("uid-1", "node-a", DEVICES, None)),
            Err(SealError::Missing)
        );
        // Copied onto another pod.
        assert_eq!(
            k.verify_pod(&pod("uid-2", "node-a", DEVICES, Some(seal.clone()))),
            Err(SealError::Mismatch)
        );
        // Moved to another node.
        assert_eq!(
            k.verify_pod(&pod("uid-1", "node-b", DEVICES, Some(seal.clone()))),
            Err(SealError::Mismatch)
        );
        // A bigger cap.
        assert_eq!(
            k.verify_pod(&pod(
                "uid-1",
                "node-a",
                "GPU-a,NVIDIA,75000,30:;",
                Some(seal.clone())
            )),
            Err(SealError::Mismatch)
        );
        // Sealed with another key (someone who guessed the format).
        assert_eq!(
            key(8).verify_pod(&pod("uid-1", "node-a", DEVICES, Some(seal))),
            Err(SealError::Mismatch)
        );
        assert_eq!(
            k.verify_pod(&pod("uid-1", "node-a", DEVICES, Some("v1.!!".into()))),
            Err(SealError::Malformed)
        );
        assert_eq!(
            k.verify_pod(&pod("uid-1", "node-a", DEVICES, Some("hmac".into()))),
            Err(SealError::Malformed)
        );
    }

    fn time(text: &str) -> Time {
        Time(text.parse().expect("timestamp"))
    }

    /// A pod placed by `scheduler` on `node-a`, created at `created`.
    fn placed(created: &str, scheduler: &str, bound_to: &str) -> Pod {
        let mut placed = pod("uid-1", "node-a", DEVICES, None);
        placed.metadata.creation_timestamp = Some(time(created));
        placed.spec = Some(
            serde_json::from_value(json!({"schedulerName": scheduler, "nodeName": bound_to,
                "containers": [{"name": "c"}]}))
            .expect("spec"),
        );
        placed
    }

    #[test]
    fn only_placements_made_before_the_key_by_another_scheduler_are_adopted() {
        let k = key(7).issued_at(Some(time("2026-12-01T10:00:00Z")));
        let before = placed("2026-12-01T09:59:59Z", "hami-scheduler", "node-a");
        let adopted = k.adoption(&before, "tessera-scheduler").expect("adopted");
        // The seal it gets is the one Tessera's scheduler would write.
        assert_eq!(adopted.seal, k.seal("uid-1", "node-a", DEVICES));
        assert_eq!(adopted.allocation.devices[0][0].memory_mib, 7500);
        let trust = AllocationTrust::Sealed(k.clone());
        assert_eq!(
            trust.allocation_adopting(&before, "tessera-scheduler"),
            Ok(Some(adopted.allocation.clone()))
        );
        // Strict `allocation` (what Allocate hands out) still refuses it.
        assert_eq!(trust.allocation(&before), Err(SealError::Missing));

        let refused = |pod: &Pod, why: &str| {
            assert_eq!(k.adoption(pod, "tessera-scheduler"), None, "{why}");
            assert_eq!(
                trust.allocation_adopting(pod, "tessera-scheduler"),
                Err(SealError::Missing),
                "{why}"
            );
        };
        for (created, scheduler, bound_to, why) in [
            (
                "2026-12-01T10:00:00Z",
                "hami-scheduler",
                "node-a",
                "created in the key's own second",
            ),
            (
                "2026-12-01T10:05:00Z",
                "hami-scheduler",
                "node-a",
                "created after the key",
            ),
            (
                "2026-12-01T09:00:00Z",
                "tessera-scheduler",
                "node-a",
                "sent to Tessera's scheduler",
            ),
            (
                "2026-12-01T09:00:00Z",
                "hami-scheduler",
                "node-b",
                "bound elsewhere than its allocation names",
            ),
        ] {
            refused(&placed(created, scheduler, bound_to), why);
        }
        let mut corrupt = placed("2026-12-01T09:00:00Z", "hami-scheduler", "node-a");
        corrupt
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(keys::DEVICES_ALLOCATED.into(), "GPU-a,NVIDIA,lots".into());
        assert_eq!(k.adoption(&corrupt, "tessera-scheduler"), None);
        // A pod that carries a seal is judged by it: a wrong seal is a
        // mismatch, never adopted.
        let mut resealed = before.clone();
        resealed
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(keys::SEAL.into(), key(8).seal("uid-1", "node-a", DEVICES));
        assert_eq!(k.adoption(&resealed, "tessera-scheduler"), None);
        assert_eq!(
            trust.allocation_adopting(&resealed, "tessera-scheduler"),
            Err(SealError::Mismatch)
        );
        // Without the key's issue time nothing is adopted.
        assert_eq!(key(7).adoption(&before, "tessera-scheduler"), None);
        // Trusting annotations (the simulator) believes it either way.
        assert!(AllocationTrust::Annotations
            .allocation_adopting(&before, "tessera-scheduler")
            .expect("believed")
            .is_some());
    }

    #[test]
    fn the_key_read_from_its_secret_carries_the_secrets_creation_time() {
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "metadata": {"name": KEY_SECRET_NAME, "creationTimestamp": "2026-12-01T10:00:00Z"},
            "data": {KEY_SECRET_FIELD: base64::engine::general_purpose::STANDARD.encode([3u8; KEY_LEN])}}))
        .expect("secret");
        let k = SealKey::from_secret(&secret).expect("key");
        let before = placed("2026-12-01T09:00:00Z", "hami-scheduler", "node-a");
        assert!(k.adoption(&before, "tessera-scheduler").is_some());
    }

    #[test]
    fn pods_without_an_allocation_are_not_errors() {
        let plain: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p", "uid": "u"}})).expect("pod");
        assert_eq!(key(1).verify_pod(&plain), Ok(None));
    }

    #[test]
    fn short_keys_are_refused_and_generated_keys_differ() {
        assert_eq!(
            SealKey::from_bytes(&[1; 8]).map(drop),
            Err(SealKeyError::TooShort { len: 8 })
        );
        let a = SealKey::generate().expect("random");
        let b = SealKey::generate().expect("random");
        assert_ne!(a, b);
        assert_eq!(a.as_bytes().len(), KEY_LEN);
    }

    #[test]
    fn annotation_trust_believes_what_is_written() {
        let trust = AllocationTrust::Annotations;
        let got = trust
            .allocation(&pod("u", "node-a", DEVICES, None))
            .expect("believed")
            .expect("has one");
        assert_eq!(got.devices.len(), 1);
    }

    proptest! {
        #[test]
        fn any_change_to_a_sealed_field_breaks_the_seal(
            uid in "[a-z0-9-]{1,36}", node in "[a-z0-9.-]{1,40}", devices in "[A-Za-z0-9,:;-]{0,80}",
            which in 0usize..3, extra in "[a-z0-9]{1,4}",
        ) {
            let k = key(3);
            let seal = k.seal(&uid, &node, &devices);
            prop_assert!(k.check(&uid, &node, &devices, &seal).is_ok());
            let (mut u, mut n, mut d) = (uid.clone(), node.clone(), devices.clone());
            match which { 0 => u.push_str(&extra), 1 => n.push_str(&extra), _ => d.push_str(&extra) }
            prop_assert_eq!(k.check(&u, &n, &d, &seal), Err(SealError::Mismatch));
        }
    }
}
