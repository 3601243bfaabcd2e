//! Cluster-default topology spread, as kube-scheduler's PodTopologySpread
//! `defaultingType` applies it: a pod that sets no
//! `topologySpreadConstraints` gets the configured defaults
//! ([`DefaultTopologySpread`], kube-scheduler's system defaults unless
//! configured otherwise), each selecting the pods that the same Services,
//! ReplicationControllers, ReplicaSets and StatefulSets select (their
//! selectors merged, as kube-scheduler's `DefaultSelector`). A pod nothing
//! selects gets no constraints, and so keeps the single-pass placement.
//!
//! [`DefaultTopologySpread`]: tessera_api::config::DefaultTopologySpread

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ReplicationController, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use tessera_api::config::DefaultSpreadMode;

use super::labels::Selector;
use super::requirements::PodRequirements;
use super::state::ClusterState;
use super::topology_spread::SpreadConstraint;

/// The kinds whose selectors default a pod's spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    /// `v1` Service (`spec.selector`, a label map).
    Service,
    /// `v1` ReplicationController (`spec.selector`, a label map).
    ReplicationController,
    /// `apps/v1` ReplicaSet (`spec.selector`).
    ReplicaSet,
    /// `apps/v1` StatefulSet (`spec.selector`).
    StatefulSet,
}

#[derive(Debug, Clone)]
struct WorkloadSelector {
    selector: LabelSelector,
    compiled: Selector,
}

/// Selectors of the workloads that can select pods, per namespace.
#[derive(Debug, Clone, Default)]
pub struct WorkloadSelectors {
    by_namespace: HashMap<String, BTreeMap<(WorkloadKind, String), WorkloadSelector>>,
}

fn map_selector(labels: Option<&BTreeMap<String, String>>) -> Option<LabelSelector> {
    // A nil map selects nothing (kube-scheduler skips such Services).
    labels.map(|labels| LabelSelector {
        match_labels: Some(labels.clone()),
        match_expressions: None,
    })
}

impl ClusterState {
    /// Records (or, with `None`, forgets) a workload's selector. Returns
    /// whether that changed anything (status updates do not).
    pub fn upsert_workload_selector(
        &mut self,
        kind: WorkloadKind,
        metadata: &ObjectMeta,
        selector: Option<LabelSelector>,
    ) -> bool {
        let namespace = metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = metadata.name.clone().unwrap_or_default();
        let entries = self
            .workload_selectors
            .by_namespace
            .entry(namespace.clone())
            .or_default();
        // Selectors that select everything or nothing add nothing (kube-scheduler skips them).
        let key = (kind, name);
        let changed = match selector.filter(|s| {
            s.match_labels.as_ref().is_some_and(|m| !m.is_empty())
                || s.match_expressions.as_ref().is_some_and(|e| !e.is_empty())
        }) {
            Some(selector) if entries.get(&key).is_some_and(|w| w.selector == selector) => false,
            Some(selector) => {
                let compiled = Selector::from_label_selector(Some(&selector));
                entries.insert(key, WorkloadSelector { selector, compiled });
                true
            }
            None => entries.remove(&key).is_some(),
        };
        if entries.is_empty() {
            self.workload_selectors.by_namespace.remove(&namespace);
        }
        changed
    }

    /// Forgets a workload; returns whether it was known.
    pub fn remove_workload_selector(&mut self, kind: WorkloadKind, metadata: &ObjectMeta) -> bool {
        self.upsert_workload_selector(kind, metadata, None)
    }

    /// Records a Service's selector (whether it changed).
    pub fn upsert_service(&mut self, service: &Service) -> bool {
        let selector = map_selector(service.spec.as_ref().and_then(|s| s.selector.as_ref()));
        self.upsert_workload_selector(WorkloadKind::Service, &service.metadata, selector)
    }

    /// Records a ReplicationController's selector.
    pub fn upsert_replication_controller(&mut self, controller: &ReplicationController) -> bool {
        let selector = map_selector(controller.spec.as_ref().and_then(|s| s.selector.as_ref()));
        self.upsert_workload_selector(
            WorkloadKind::ReplicationController,
            &controller.metadata,
            selector,
        )
    }

    /// Records a ReplicaSet's selector.
    pub fn upsert_replica_set(&mut self, set: &ReplicaSet) -> bool {
        let selector = set.spec.as_ref().map(|s| s.selector.clone());
        self.upsert_workload_selector(WorkloadKind::ReplicaSet, &set.metadata, selector)
    }

    /// Records a StatefulSet's selector.
    pub fn upsert_stateful_set(&mut self, set: &StatefulSet) -> bool {
        let selector = set.spec.as_ref().map(|s| s.selector.clone());
        self.upsert_workload_selector(WorkloadKind::StatefulSet, &set.metadata, selector)
    }

    /// kube-scheduler's `DefaultSelector`: the selectors of every workload
    /// in the pod's namespace that selects it, merged; `None` when none
    /// does.
    fn default_selector(&self, pod: &PodRequirements) -> Option<Selector> {
        let entries = self
            .workload_selectors
            .by_namespace
            .get(&pod.info.namespace)?;
        let mut merged = LabelSelector::default();
        let mut any = false;
        for workload in entries.values() {
            if !workload.compiled.matches(&pod.info.labels) {
                continue;
            }
            any = true;
            for (key, value) in workload.selector.match_labels.iter().flatten() {
                merged
                    .match_labels
                    .get_or_insert_with(Default::default)
                    .insert(key.clone(), value.clone());
            }
            for expression in workload.selector.match_expressions.iter().flatten() {
                merged
                    .match_expressions
                    .get_or_insert_with(Default::default)
                    .push(expression.clone());
            }
        }
        any.then(|| Selector::from_label_selector(Some(&merged)))
    }

    /// The pod with the cluster-default spread constraints, when it sets
    /// none, defaults are on and a workload selects it; `None` otherwise
    /// (the pod is placed as it is).
    pub(crate) fn with_default_spread(&self, pod: &PodRequirements) -> Option<PodRequirements> {
        let defaults = &self.config.default_topology_spread;
        if !pod.spread.is_empty()
            || defaults.mode == DefaultSpreadMode::Off
            || self.workload_selectors.by_namespace.is_empty()
        {
            return None;
        }
        let selector = self.default_selector(pod)?;
        let system = defaults.mode == DefaultSpreadMode::System;
        let mut defaulted = pod.clone();
        defaulted.spread = defaults
            .constraints_in_force()
            .iter()
            .map(|c| SpreadConstraint::defaulted(c, selector.clone(), &pod.info.labels, system))
            .collect();
        Some(defaulted)
    }
}
