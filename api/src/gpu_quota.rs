//! Namespace GPU quotas as HAMi v2.10 reads them: which `ResourceQuota`
//! keys count (`limits.nvidia.com/gpumem` in MiB and
//! `limits.nvidia.com/gpucores` in percent of a card, with the configured
//! resource names), how several quota objects in one namespace combine (the
//! tightest wins; an explicit 0 forbids), how much a pod takes from a quota
//! (what its cards are charged: `gpumem` × cards, a percentage as MiB of the
//! card chosen, cores × cards), what admission can already tell (the part of
//! a request known before a card is chosen), and the verdict with a message
//! that names the quota, the resource and the figures.
//!
//! `nvidia.com/gpumem-percentage` has no quota key of its own in HAMi: a
//! percentage request counts against the `gpumem` quota in MiB of the card
//! it lands on. Keys with the `requests.` prefix (or none) are left to
//! Kubernetes' own quota controller, which knows nothing of card counts.
//! Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::ResourceQuota;

use crate::config::RequestDefaults;
use crate::names::ResourceNames;
use crate::quantity::parse_quantity;
use crate::request::{MemoryRequest, PodGpuRequest};

/// The prefix of the `ResourceQuota` keys HAMi (and Tessera) enforce.
pub const QUOTA_KEY_PREFIX: &str = "limits.";

/// HAMi's word for a quota refusal (its `FailedScheduling` reason counter),
/// kept in Tessera's messages so searches and alerts written for HAMi match.
pub const RESOURCE_QUOTA_NOT_FIT: &str = "ResourceQuotaNotFit";

/// A GPU resource a namespace quota can limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuotaResource {
    /// GPU memory, MiB (`nvidia.com/gpumem`).
    Memory,
    /// GPU compute, percent of a card (`nvidia.com/gpucores`).
    Cores,
}

impl QuotaResource {
    /// Both, in the order metrics and messages list them.
    pub const ALL: [QuotaResource; 2] = [QuotaResource::Memory, QuotaResource::Cores];

    /// The extended resource name (`nvidia.com/gpumem`, as configured),
    /// HAMi's `quota_name` metric label.
    pub fn resource_name(self, names: &ResourceNames) -> &str {
        match self {
            Self::Memory => &names.memory,
            Self::Cores => &names.cores,
        }
    }

    /// The `ResourceQuota` key that limits it (`limits.nvidia.com/gpumem`).
    pub fn quota_key(self, names: &ResourceNames) -> String {
        format!("{QUOTA_KEY_PREFIX}{}", self.resource_name(names))
    }

    /// The unit its figures are in, for messages.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Memory => "MiB",
            Self::Cores => "% of a card",
        }
    }
}

/// Amounts of the quota-limited resources: MiB and percent of a card.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct QuotaAmounts {
    /// GPU memory, MiB.
    pub memory_mib: u64,
    /// GPU compute, percent of one card (200 = two whole cards).
    pub cores: u64,
}

impl QuotaAmounts {
    /// The amount of one resource.
    pub fn get(&self, resource: QuotaResource) -> u64 {
        match resource {
            QuotaResource::Memory => self.memory_mib,
            QuotaResource::Cores => self.cores,
        }
    }

    /// Whether both amounts are zero.
    pub fn is_zero(&self) -> bool {
        self.memory_mib == 0 && self.cores == 0
    }

    /// Adds one card share.
    pub fn add_share(&mut self, memory_mib: u64, cores: u32) {
        self.memory_mib = self.memory_mib.saturating_add(memory_mib);
        self.cores = self.cores.saturating_add(u64::from(cores));
    }

    /// `self + other`, saturating.
    #[must_use]
    pub fn plus(&self, other: &QuotaAmounts) -> QuotaAmounts {
        QuotaAmounts {
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            cores: self.cores.saturating_add(other.cores),
        }
    }

    /// `self - other`, stopping at zero.
    #[must_use]
    pub fn minus(&self, other: &QuotaAmounts) -> QuotaAmounts {
        QuotaAmounts {
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            cores: self.cores.saturating_sub(other.cores),
        }
    }

    /// The larger of each amount.
    #[must_use]
    pub fn max(&self, other: &QuotaAmounts) -> QuotaAmounts {
        QuotaAmounts {
            memory_mib: self.memory_mib.max(other.memory_mib),
            cores: self.cores.max(other.cores),
        }
    }
}

/// What one `ResourceQuota` object limits (`None`: it does not mention the
/// resource).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectLimits {
    /// `limits.nvidia.com/gpumem`, MiB.
    pub memory_mib: Option<u64>,
    /// `limits.nvidia.com/gpucores`, percent of a card.
    pub cores: Option<u64>,
}

impl ObjectLimits {
    /// The limit on one resource.
    pub fn get(&self, resource: QuotaResource) -> Option<u64> {
        match resource {
            QuotaResource::Memory => self.memory_mib,
            QuotaResource::Cores => self.cores,
        }
    }

    /// Whether it limits neither resource.
    pub fn is_empty(&self) -> bool {
        self.memory_mib.is_none() && self.cores.is_none()
    }
}

/// A quota value that cannot be read (it is then not enforced).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ResourceQuota `{namespace}/{quota}`: {key} = `{value}` is not a whole non-negative number ({expected}); it is not enforced until it is fixed")]
pub struct QuotaValueError {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub quota: String,
    /// The key, e.g. `limits.nvidia.com/gpumem`.
    pub key: String,
    /// The value as written.
    pub value: String,
    /// What to write instead.
    pub expected: &'static str,
}

/// Reads the GPU limits of one `ResourceQuota` (`spec.hard`), with an
/// error for each GPU key whose value cannot be read.
pub fn object_limits(
    quota: &ResourceQuota,
    names: &ResourceNames,
) -> (ObjectLimits, Vec<QuotaValueError>) {
    let mut limits = ObjectLimits::default();
    let mut errors = Vec::new();
    let Some(hard) = quota.spec.as_ref().and_then(|s| s.hard.as_ref()) else {
        return (limits, errors);
    };
    for resource in QuotaResource::ALL {
        let key = resource.quota_key(names);
        let Some(value) = hard.get(&key) else {
            continue;
        };
        let parsed = parse_quantity(&value.0).ok();
        let (amount, expected) = match resource {
            QuotaResource::Memory => (
                parsed.and_then(|q| q.to_mebibytes()),
                "MiB, e.g. 16384, or a size such as 16Gi",
            ),
            QuotaResource::Cores => (
                parsed
                    .and_then(|q| q.to_integer())
                    .and_then(|v| u64::try_from(v).ok()),
                "percent of a card, e.g. 200 for two whole cards",
            ),
        };
        match (resource, amount) {
            (QuotaResource::Memory, Some(mib)) => limits.memory_mib = Some(mib),
            (QuotaResource::Cores, Some(cores)) => limits.cores = Some(cores),
            (_, None) => errors.push(QuotaValueError {
                namespace: quota.metadata.namespace.clone().unwrap_or_default(),
                quota: quota.metadata.name.clone().unwrap_or_default(),
                key,
                value: value.0.clone(),
                expected,
            }),
        }
    }
    (limits, errors)
}

/// The limit in force on one resource and the object that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaLimit {
    /// The limit (MiB or percent of a card).
    pub limit: u64,
    /// The `ResourceQuota` that sets it (the first by name among equals).
    pub quota_name: String,
}

/// The GPU quota objects of one namespace. Kubernetes enforces every
/// `ResourceQuota` of a namespace, so the tightest limit on a resource is
/// the one in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceQuota {
    objects: BTreeMap<String, ObjectLimits>,
}

impl NamespaceQuota {
    /// Records (or replaces) what the object `name` limits; an object that
    /// limits no GPU resource is forgotten.
    pub fn set_object(&mut self, name: &str, limits: ObjectLimits) {
        if limits.is_empty() {
            self.objects.remove(name);
        } else {
            self.objects.insert(name.to_owned(), limits);
        }
    }

    /// Forgets the object `name`.
    pub fn remove_object(&mut self, name: &str) {
        self.objects.remove(name);
    }

    /// Whether no object limits a GPU resource.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The limit in force on `resource`, if any object sets one.
    pub fn limit(&self, resource: QuotaResource) -> Option<QuotaLimit> {
        let mut best: Option<QuotaLimit> = None;
        for (name, limits) in &self.objects {
            if let Some(limit) = limits.get(resource) {
                if best.as_ref().is_none_or(|b| limit < b.limit) {
                    best = Some(QuotaLimit {
                        limit,
                        quota_name: name.clone(),
                    });
                }
            }
        }
        best
    }

    /// Whether `requested` more fits beside `used` under every limit; the
    /// first resource (memory, then cores) that does not, otherwise. A
    /// request of zero for a resource always fits (a pod that takes no
    /// memory is not refused because others overran a lowered limit).
    pub fn check(
        &self,
        namespace: &str,
        used: QuotaAmounts,
        requested: QuotaAmounts,
        names: &ResourceNames,
    ) -> Result<(), QuotaExceeded> {
        for resource in QuotaResource::ALL {
            let asked = requested.get(resource);
            if asked == 0 {
                continue;
            }
            let Some(limit) = self.limit(resource) else {
                continue;
            };
            let in_use = used.get(resource);
            if in_use.saturating_add(asked) > limit.limit {
                return Err(QuotaExceeded {
                    namespace: namespace.to_owned(),
                    quota_name: limit.quota_name,
                    resource,
                    resource_name: resource.resource_name(names).to_owned(),
                    used: in_use,
                    requested: asked,
                    limit: limit.limit,
                });
            }
        }
        Ok(())
    }
}

/// A pod that does not fit its namespace's GPU quota. The message names the
/// quota, the resource, and the used, requested and limit figures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct QuotaExceeded {
    /// The pod's namespace.
    pub namespace: String,
    /// The `ResourceQuota` whose limit is exceeded.
    pub quota_name: String,
    /// Which resource.
    pub resource: QuotaResource,
    /// Its resource name (`nvidia.com/gpumem`).
    pub resource_name: String,
    /// Already taken in the namespace.
    pub used: u64,
    /// What this pod takes.
    pub requested: u64,
    /// The limit.
    pub limit: u64,
}

impl QuotaExceeded {
    /// Whether the pod could never fit, even with nothing else running.
    pub fn never_fits(&self) -> bool {
        self.requested > self.limit
    }

    /// The quota key to raise (`limits.nvidia.com/gpumem`).
    pub fn quota_key(&self) -> String {
        format!("{QUOTA_KEY_PREFIX}{}", self.resource_name)
    }
}

impl fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = self.resource.unit();
        write!(
            f,
            "{RESOURCE_QUOTA_NOT_FIT}: namespace `{}` ResourceQuota `{}` limits {} to {} {unit}; ",
            self.namespace, self.quota_name, self.resource_name, self.limit
        )?;
        if self.never_fits() {
            write!(
                f,
                "this pod alone asks for {} {unit} ({} {unit} in use), more than the whole quota, so it can never fit: lower the pod's request or raise `{}`",
                self.requested,
                self.used,
                self.quota_key()
            )
        } else {
            write!(
                f,
                "{} {unit} in use + {} {unit} requested by this pod = {} {unit}: it waits until pods of the namespace release enough, or raise `{}`",
                self.used,
                self.requested,
                self.used.saturating_add(self.requested),
                self.quota_key()
            )
        }
    }
}

/// What admission knows a pod will take from its namespace's quota before
/// any card is chosen: per app container `gpumem` × cards and `gpucores` ×
/// cards, summed; init containers run one at a time, so the pod takes at
/// least the larger of the app sum and each init container. A percentage
/// of memory counts 0 here (its MiB depend on the card chosen); the
/// scheduler counts it in full. Never more than the scheduler charges.
pub fn known_demand(request: &PodGpuRequest, defaults: &RequestDefaults) -> QuotaAmounts {
    let of_container = |container: &crate::request::ContainerGpuRequest| {
        let mut amounts = QuotaAmounts::default();
        if let Some(resolved) = container.resolve(defaults) {
            let cards = u64::from(resolved.count);
            if let MemoryRequest::MiB(mib) = resolved.memory {
                amounts.memory_mib = mib.saturating_mul(cards);
            }
            amounts.cores = u64::from(resolved.cores).saturating_mul(cards);
        }
        amounts
    };
    let app = request
        .containers
        .iter()
        .map(of_container)
        .fold(QuotaAmounts::default(), |sum, c| sum.plus(&c));
    request
        .init_containers
        .iter()
        .map(of_container)
        .fold(app, |peak, c| peak.max(&c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn names() -> ResourceNames {
        ResourceNames::default()
    }

    fn quota(name: &str, hard: serde_json::Value) -> ResourceQuota {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"hard": hard}
        }))
        .expect("quota")
    }

    fn namespace(objects: &[(&str, serde_json::Value)]) -> NamespaceQuota {
        let mut ns = NamespaceQuota::default();
        for (name, hard) in objects {
            let (limits, errors) = object_limits(&quota(name, hard.clone()), &names());
            assert!(errors.is_empty(), "{errors:?}");
            ns.set_object(name, limits);
        }
        ns
    }

    #[test]
    fn only_limits_keys_count_as_hami_reads_them() {
        let (limits, errors) = object_limits(
            &quota(
                "gpu",
                json!({
                    "limits.nvidia.com/gpumem": "8192",
                    "limits.nvidia.com/gpucores": "150",
                    "requests.nvidia.com/gpumem": "1",
                    "nvidia.com/gpucores": "1",
                    "limits.nvidia.com/gpumem-percentage": "50",
                    "limits.nvidia.com/gpu": "2",
                    "pods": "10"
                }),
            ),
            &names(),
        );
        assert!(errors.is_empty());
        assert_eq!(
            limits,
            ObjectLimits {
                memory_mib: Some(8192),
                cores: Some(150)
            }
        );
    }

    #[test]
    fn memory_limits_read_like_gpumem_requests() {
        let (limits, _) = object_limits(
            &quota("gpu", json!({"limits.nvidia.com/gpumem": "16Gi"})),
            &names(),
        );
        assert_eq!(limits.memory_mib, Some(16384));
    }

    #[test]
    fn unreadable_values_are_reported_and_not_enforced() {
        let (limits, errors) = object_limits(
            &quota(
                "gpu",
                json!({"limits.nvidia.com/gpucores": "1.5", "limits.nvidia.com/gpumem": "-3"}),
            ),
            &names(),
        );
        assert!(limits.is_empty());
        assert_eq!(errors.len(), 2);
        assert!(errors[0].to_string().contains("limits.nvidia.com/gpumem"));
        assert!(errors[0].to_string().contains("team/gpu"));
    }

    #[test]
    fn configured_resource_names_give_the_keys() {
        let mut custom = names();
        custom.memory = "example.com/vmem".into();
        let (limits, _) = object_limits(
            &quota(
                "gpu",
                json!({"limits.example.com/vmem": "100", "limits.nvidia.com/gpumem": "5"}),
            ),
            &custom,
        );
        assert_eq!(limits.memory_mib, Some(100));
    }

    #[test]
    fn the_tightest_object_wins_and_is_named() {
        let ns = namespace(&[
            ("b-wide", json!({"limits.nvidia.com/gpumem": "8000"})),
            (
                "a-tight",
                json!({"limits.nvidia.com/gpumem": "4000", "limits.nvidia.com/gpucores": "300"}),
            ),
        ]);
        assert_eq!(
            ns.limit(QuotaResource::Memory),
            Some(QuotaLimit {
                limit: 4000,
                quota_name: "a-tight".into()
            })
        );
        assert_eq!(ns.limit(QuotaResource::Cores).map(|l| l.limit), Some(300));
        let mut ns = ns;
        ns.remove_object("a-tight");
        assert_eq!(ns.limit(QuotaResource::Memory).map(|l| l.limit), Some(8000));
        assert_eq!(ns.limit(QuotaResource::Cores), None);
    }

    #[test]
    fn an_explicit_zero_forbids_and_a_missing_key_allows() {
        let ns = namespace(&[("none", json!({"limits.nvidia.com/gpucores": "0"}))]);
        let ask = QuotaAmounts {
            memory_mib: 1_000_000,
            cores: 10,
        };
        let err = ns
            .check("team", QuotaAmounts::default(), ask, &names())
            .expect_err("zero cores forbid");
        assert_eq!(err.resource, QuotaResource::Cores);
        let memory_only = QuotaAmounts {
            memory_mib: 1_000_000,
            cores: 0,
        };
        assert!(ns
            .check("team", QuotaAmounts::default(), memory_only, &names())
            .is_ok());
    }

    #[test]
    fn the_message_names_quota_resource_and_figures() {
        let ns = namespace(&[("gpu-quota", json!({"limits.nvidia.com/gpumem": "8192"}))]);
        let used = QuotaAmounts {
            memory_mib: 6144,
            cores: 0,
        };
        let ask = QuotaAmounts {
            memory_mib: 4096,
            cores: 0,
        };
        let message = ns
            .check("team", used, ask, &names())
            .expect_err("over")
            .to_string();
        for part in [
            "ResourceQuotaNotFit",
            "`team`",
            "`gpu-quota`",
            "nvidia.com/gpumem",
            "8192 MiB",
            "6144 MiB in use",
            "4096 MiB requested",
            "limits.nvidia.com/gpumem",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message}");
        }
        let alone = ns
            .check(
                "team",
                QuotaAmounts::default(),
                QuotaAmounts {
                    memory_mib: 9000,
                    cores: 0,
                },
                &names(),
            )
            .expect_err("never");
        assert!(alone.never_fits());
        assert!(alone.to_string().contains("can never fit"), "{alone}");
    }

    fn pod_request(containers: serde_json::Value, init: serde_json::Value) -> PodGpuRequest {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "team"},
            "spec": {"containers": containers, "initContainers": init}
        }))
        .expect("pod");
        PodGpuRequest::from_pod(&pod, &names()).expect("request")
    }

    fn limits(values: serde_json::Value) -> serde_json::Value {
        json!({"limits": values})
    }

    #[test]
    fn known_demand_multiplies_by_cards_and_skips_percentages() {
        let request = pod_request(
            json!([
                {"name": "a", "resources": limits(json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "3000", "nvidia.com/gpucores": "30"}))},
                {"name": "b", "resources": limits(json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "50"}))},
                {"name": "c"}
            ]),
            json!([
                {"name": "i", "resources": limits(json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "7000", "nvidia.com/gpucores": "10"}))}
            ]),
        );
        let defaults = RequestDefaults::default();
        assert_eq!(
            known_demand(&request, &defaults),
            QuotaAmounts {
                memory_mib: 7000,
                cores: 60 + u64::from(defaults.cores)
            }
        );
    }

    #[test]
    fn a_whole_card_by_default_is_exclusive_and_its_memory_unknown() {
        let request = pod_request(
            json!([{"name": "a", "resources": limits(json!({"nvidia.com/gpu": "2"}))}]),
            json!([]),
        );
        let defaults = RequestDefaults::default();
        let demand = known_demand(&request, &defaults);
        assert_eq!(demand.cores, 200);
        assert_eq!(
            demand.memory_mib, 0,
            "the whole card's MiB depend on the card"
        );
    }

    proptest! {
        /// The limit in force is the minimum over the objects, whatever
        /// order they are recorded in, and removing objects only loosens it.
        #[test]
        fn limit_is_the_minimum_in_any_order(values in proptest::collection::vec(0u64..100_000, 1..6), rotate in 0usize..6) {
            let mut ns = NamespaceQuota::default();
            let n = values.len();
            for i in 0..n {
                let j = (i + rotate) % n;
                ns.set_object(&format!("q{j}"), ObjectLimits { memory_mib: Some(values[j]), cores: None });
            }
            let min = *values.iter().min().unwrap();
            prop_assert_eq!(ns.limit(QuotaResource::Memory).map(|l| l.limit), Some(min));
            ns.remove_object("q0");
            let rest = values[1..].iter().min().copied();
            prop_assert_eq!(ns.limit(QuotaResource::Memory).map(|l| l.limit), rest);
            if let Some(rest) = rest { prop_assert!(rest >= min); }
        }

        /// check() admits exactly when used + requested stays within the
        /// limit for every resource the pod asks for.
        #[test]
        fn check_is_used_plus_requested_within_limit(
            limit_mem in 0u64..20_000, limit_cores in 0u64..400,
            used_mem in 0u64..20_000, used_cores in 0u64..400,
            ask_mem in 0u64..20_000, ask_cores in 0u64..400,
        ) {
            let mut ns = NamespaceQuota::default();
            ns.set_object("q", ObjectLimits { memory_mib: Some(limit_mem), cores: Some(limit_cores) });
            let used = QuotaAmounts { memory_mib: used_mem, cores: used_cores };
            let ask = QuotaAmounts { memory_mib: ask_mem, cores: ask_cores };
            let fits = (ask_mem == 0 || used_mem + ask_mem <= limit_mem)
                && (ask_cores == 0 || used_cores + ask_cores <= limit_cores);
            let verdict = ns.check("n", used, ask, &ResourceNames::default());
            prop_assert_eq!(verdict.is_ok(), fits);
            if let Err(e) = verdict {
                prop_assert_eq!(e.used + e.requested > e.limit, true);
                prop_assert_eq!(e.never_fits(), e.requested > e.limit);
            }
        }
    }
}
