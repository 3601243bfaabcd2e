//! Namespace GPU quotas in the scheduler's picture: the limits of every
//! namespace (from its `ResourceQuota` objects, read by
//! [`tessera_api::gpu_quota`]) and what each namespace's pods take (the sum
//! of their card charges, bound and assumed alike, so replicas decided one
//! after another each see the ones before), and the filter step that
//! refuses a node where the pod's cards would take the namespace past a
//! limit. What a pod takes is what its cards are charged: `gpumem` × cards,
//! a percentage as MiB of the card picked on that node, cores × cards.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::ResourceQuota;
use tessera_api::allocation::{ContainerDevice, NVIDIA_VENDOR};
use tessera_api::gpu_quota::{
    object_limits, NamespaceQuota, QuotaAmounts, QuotaResource, QuotaValueError,
};
use tessera_api::names::ResourceNames;
use tessera_api::request::MemoryRequest;

use super::cards::CardState;
use super::gpu_fit::{NodeFit, PodPicks};
use super::requirements::PodRequirements;
use super::resources::ResourceAmounts;
use super::state::{ClusterState, PodCharge};

/// Every namespace's GPU quota and usage.
#[derive(Debug, Clone, Default)]
pub struct QuotaBook {
    limits: BTreeMap<String, NamespaceQuota>,
    usage: HashMap<String, QuotaAmounts>,
}

/// One namespace's figures on one resource, as HAMi's quota metrics show
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaFigure {
    /// The namespace.
    pub namespace: String,
    /// The resource.
    pub resource: QuotaResource,
    /// Taken by its pods (MiB or percent of a card).
    pub used: u64,
    /// The limit in force, `None` when no quota limits the resource.
    pub limit: Option<u64>,
}

impl QuotaBook {
    /// The quota objects of `namespace`, if any limits a GPU resource.
    pub fn namespace(&self, namespace: &str) -> Option<&NamespaceQuota> {
        self.limits.get(namespace).filter(|q| !q.is_empty())
    }

    /// What `namespace`'s pods take now, assumed placements included.
    pub fn used(&self, namespace: &str) -> QuotaAmounts {
        self.usage.get(namespace).copied().unwrap_or_default()
    }

    /// Figures for metrics, by namespace then resource: every resource a
    /// quota limits, and every resource a namespace uses (limit `None`,
    /// as HAMi reports usage with `limit="0"` where no quota is set).
    pub fn figures(&self) -> Vec<QuotaFigure> {
        let mut namespaces: Vec<&String> = self.limits.keys().chain(self.usage.keys()).collect();
        namespaces.sort();
        namespaces.dedup();
        let mut figures = Vec::new();
        for namespace in namespaces {
            let used = self.used(namespace);
            for resource in QuotaResource::ALL {
                let limit = self
                    .namespace(namespace)
                    .and_then(|q| q.limit(resource))
                    .map(|l| l.limit);
                if limit.is_none() && used.get(resource) == 0 {
                    continue;
                }
                figures.push(QuotaFigure {
                    namespace: namespace.clone(),
                    resource,
                    used: used.get(resource),
                    limit,
                });
            }
        }
        figures
    }

    /// Adds (or takes back) a pod's charge to its namespace's usage.
    pub(crate) fn count(&mut self, key: &str, charge: &PodCharge, add: bool) {
        let amounts = charge_amounts(charge);
        if amounts.is_zero() {
            return;
        }
        let namespace = key.split_once('/').map_or(key, |(ns, _)| ns);
        if add {
            let entry = self.usage.entry(namespace.to_owned()).or_default();
            *entry = entry.plus(&amounts);
        } else if let Some(entry) = self.usage.get_mut(namespace) {
            *entry = entry.minus(&amounts);
            if entry.is_zero() {
                self.usage.remove(namespace);
            }
        }
    }
}

/// What a charge takes from its namespace's quota: the sum over its cards.
pub fn charge_amounts(charge: &PodCharge) -> QuotaAmounts {
    let mut amounts = QuotaAmounts::default();
    for card in &charge.cards {
        amounts.add_share(card.memory_mib, card.cores);
    }
    amounts
}

impl ClusterState {
    /// Records a `ResourceQuota`'s GPU limits; returns the values that
    /// could not be read (those are not enforced).
    pub fn upsert_resource_quota(&mut self, quota: &ResourceQuota) -> Vec<QuotaValueError> {
        let (limits, errors) = object_limits(quota, &self.config.resources);
        let namespace = quota.metadata.namespace.clone().unwrap_or_default();
        let name = quota.metadata.name.as_deref().unwrap_or_default();
        let entry = self.quotas.limits.entry(namespace.clone()).or_default();
        entry.set_object(name, limits);
        if entry.is_empty() {
            self.quotas.limits.remove(&namespace);
        }
        errors
    }

    /// Forgets a deleted `ResourceQuota`.
    pub fn remove_resource_quota(&mut self, quota: &ResourceQuota) {
        let namespace = quota.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(entry) = self.quotas.limits.get_mut(namespace) {
            entry.remove_object(quota.metadata.name.as_deref().unwrap_or_default());
            if entry.is_empty() {
                self.quotas.limits.remove(namespace);
            }
        }
    }

    /// Namespace GPU quotas and usage.
    pub fn quotas(&self) -> &QuotaBook {
        &self.quotas
    }
}

/// The quota step of one decision: present only when the pod asks for a
/// GPU and its namespace has a GPU quota.
#[derive(Debug)]
pub(super) struct QuotaCheck<'a> {
    namespace: &'a str,
    quota: &'a NamespaceQuota,
    used: QuotaAmounts,
    names: &'a ResourceNames,
    /// The pod's demand when no card choice changes it (no percentage of
    /// memory, no GPU init container); otherwise counted from the picks.
    fixed_demand: Option<QuotaAmounts>,
}

impl<'a> QuotaCheck<'a> {
    pub(super) fn new(state: &'a ClusterState, pod: &'a PodRequirements) -> Option<Self> {
        if !pod.needs_gpu() {
            return None;
        }
        let namespace = pod.info.namespace.as_str();
        let quota = state.quotas.namespace(namespace)?;
        let depends_on_card = pod.annotates_init_containers()
            || pod
                .containers
                .iter()
                .filter_map(|c| c.gpu.as_ref())
                .any(|g| matches!(g.memory, MemoryRequest::Percent(_)));
        let fixed_demand = (!depends_on_card).then(|| {
            let mut demand = QuotaAmounts::default();
            for gpu in pod.containers.iter().filter_map(|c| c.gpu.as_ref()) {
                let mib = match gpu.memory {
                    MemoryRequest::MiB(mib) => mib,
                    MemoryRequest::Percent(_) | MemoryRequest::Unspecified => 0,
                };
                for _ in 0..gpu.count {
                    demand.add_share(mib, gpu.cores);
                }
            }
            demand
        });
        Some(Self {
            namespace,
            quota,
            used: state.quotas.used(namespace),
            names: &state.config.resources,
            fixed_demand,
        })
    }

    /// Whether the fit must produce picks for the demand to be counted.
    pub(super) fn needs_picks(&self) -> bool {
        self.fixed_demand.is_none()
    }

    /// Ok when the pod's cards on this node keep the namespace within its
    /// quota; the reason in words otherwise.
    pub(super) fn admits(
        &self,
        cards: &[CardState],
        pod: &PodRequirements,
        fit: &NodeFit,
    ) -> Result<(), String> {
        let demand = match self.fixed_demand {
            Some(demand) => demand,
            None => picked_demand(cards, pod, fit),
        };
        self.quota
            .check(self.namespace, self.used, demand, self.names)
            .map_err(|exceeded| exceeded.to_string())
    }
}

/// What the picks would be charged, computed as the placement's charge is.
fn picked_demand(cards: &[CardState], pod: &PodRequirements, fit: &NodeFit) -> QuotaAmounts {
    let devices = |picks: Option<&PodPicks>| -> Vec<Vec<ContainerDevice>> {
        picks
            .into_iter()
            .flatten()
            .map(|container| {
                container
                    .iter()
                    .flatten()
                    .map(|p| ContainerDevice {
                        uuid: cards[p.card].device.id.clone(),
                        vendor: NVIDIA_VENDOR.to_owned(),
                        memory_mib: p.memory_mib,
                        cores: p.cores,
                    })
                    .collect()
            })
            .collect()
    };
    let app = devices(fit.containers.as_ref());
    let init = if pod.annotates_init_containers() {
        devices(fit.init_containers.as_ref())
    } else {
        Vec::new()
    };
    let charge =
        PodCharge::from_devices(String::new(), ResourceAmounts::default(), &init, &app, true);
    charge_amounts(&charge)
}
