//! Per-node attachable-volume limits as kube-scheduler's NodeVolumeLimits
//! (CSI) plugin decides them: a node's CSINode lists, per CSI driver, how
//! many volumes it can attach (`spec.drivers[].allocatable.count`); the
//! unique volumes of the pods on the node are counted per driver (a claim
//! bound to a PV through the PV's driver and volume handle; an unbound
//! claim through its StorageClass's provisioner), and a pod whose new
//! volumes would take a driver over its count is refused there. In-tree
//! volume types and provisioners count under the CSI driver they migrate
//! to (`awsElasticBlockStore` as `ebs.csi.aws.com`, …).

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::CSINode;

use super::state::NodeState;
use super::volumes::Storage;

/// `FailedScheduling` reason: the node cannot attach another volume of a driver.
pub const MAX_VOLUME_COUNT_REASON: &str = "node(s) exceed max volume count";

/// In-tree provisioners and their CSI drivers (CSI migration).
const MIGRATED_PROVISIONERS: [(&str, &str); 4] = [
    ("kubernetes.io/aws-ebs", "ebs.csi.aws.com"),
    ("kubernetes.io/gce-pd", "pd.csi.storage.gke.io"),
    ("kubernetes.io/azure-disk", "disk.csi.azure.com"),
    ("kubernetes.io/cinder", "cinder.csi.openstack.org"),
];

/// Per node, per CSI driver: how many volumes it can attach.
pub type NodeVolumeLimits = HashMap<String, BTreeMap<String, i64>>;

fn driver_of_provisioner(provisioner: &str) -> &str {
    MIGRATED_PROVISIONERS
        .iter()
        .find(|(in_tree, _)| *in_tree == provisioner)
        .map_or(provisioner, |(_, driver)| driver)
}

/// The driver and unique handle a PV attaches as, if it is attachable.
fn attached_as(volume: &PersistentVolume) -> Option<(String, String)> {
    let spec = volume.spec.as_ref()?;
    if let Some(csi) = &spec.csi {
        return Some((csi.driver.clone(), csi.volume_handle.clone()));
    }
    let in_tree = [
        spec.aws_elastic_block_store
            .as_ref()
            .map(|v| ("ebs.csi.aws.com", v.volume_id.clone())),
        spec.gce_persistent_disk
            .as_ref()
            .map(|v| ("pd.csi.storage.gke.io", v.pd_name.clone())),
        spec.azure_disk
            .as_ref()
            .map(|v| ("disk.csi.azure.com", v.disk_uri.clone())),
        spec.cinder
            .as_ref()
            .map(|v| ("cinder.csi.openstack.org", v.volume_id.clone())),
    ];
    in_tree
        .into_iter()
        .flatten()
        .next()
        .map(|(driver, handle)| (driver.to_owned(), handle))
}

impl Storage {
    /// Records a CSINode's per-driver attach limits.
    pub fn upsert_csi_node(&mut self, csi_node: &CSINode) {
        let Some(name) = &csi_node.metadata.name else {
            return;
        };
        let limits: BTreeMap<String, i64> = csi_node
            .spec
            .drivers
            .iter()
            .filter_map(|d| {
                let count = d.allocatable.as_ref()?.count?;
                Some((d.name.clone(), i64::from(count)))
            })
            .collect();
        if limits.is_empty() {
            self.node_volume_limits.remove(name);
        } else {
            self.node_volume_limits.insert(name.clone(), limits);
        }
    }

    /// Forgets a CSINode.
    pub fn remove_csi_node(&mut self, name: &str) {
        self.node_volume_limits.remove(name);
    }

    /// The driver and unique volume a claim attaches as: a bound claim's
    /// PV, an unbound claim's class provisioner (one volume per claim).
    fn claim_attaches_as(&self, namespace: &str, claim_name: &str) -> Option<(String, String)> {
        let claim = self.claim(namespace, claim_name)?;
        let spec = claim.spec.as_ref()?;
        match spec.volume_name.as_deref().filter(|v| !v.is_empty()) {
            Some(volume) => attached_as(self.volume(volume)?),
            None => {
                let class = self.class(spec.storage_class_name.as_deref()?)?;
                Some((
                    driver_of_provisioner(&class.provisioner).to_owned(),
                    format!("{namespace}/{claim_name}"),
                ))
            }
        }
    }
}

/// The incoming pod's attachable volumes, read once per decision.
#[derive(Debug)]
pub struct AttachLimits<'a> {
    storage: &'a Storage,
    /// (driver, unique volume) of each of the pod's claims that attaches.
    volumes: Vec<(String, String)>,
}

impl<'a> AttachLimits<'a> {
    /// `None` when no node has limits or none of the pod's claims attaches
    /// through a driver (nothing to check).
    pub fn new(storage: &'a Storage, namespace: &str, claims: &[String]) -> Option<Self> {
        if storage.node_volume_limits.is_empty() {
            return None;
        }
        let mut volumes: Vec<(String, String)> = claims
            .iter()
            .filter_map(|c| storage.claim_attaches_as(namespace, c))
            .collect();
        volumes.sort();
        volumes.dedup();
        (!volumes.is_empty()).then_some(Self { storage, volumes })
    }

    /// `None` when the node can attach the pod's new volumes; otherwise
    /// kube-scheduler's reason.
    pub fn rejects(&self, node: &NodeState) -> Option<&'static str> {
        let limits = self.storage.node_volume_limits.get(&node.facts.name)?;
        let limited: Vec<&(String, String)> = self
            .volumes
            .iter()
            .filter(|(driver, _)| limits.contains_key(driver))
            .collect();
        if limited.is_empty() {
            return None;
        }
        let mut attached: HashSet<(String, String)> = HashSet::new();
        for resident in node.residents() {
            for claim in &resident.claims {
                if let Some(volume) = self
                    .storage
                    .claim_attaches_as(&resident.namespace, claim)
                    .filter(|(driver, _)| limits.contains_key(driver))
                {
                    attached.insert(volume);
                }
            }
        }
        let mut per_driver: HashMap<&str, i64> = HashMap::new();
        for (driver, _) in &attached {
            *per_driver.entry(driver.as_str()).or_default() += 1;
        }
        for volume in limited {
            if !attached.contains(volume) {
                *per_driver.entry(volume.0.as_str()).or_default() += 1;
            }
        }
        per_driver
            .iter()
            .any(|(driver, count)| limits.get(*driver).is_some_and(|limit| count > limit))
            .then_some(MAX_VOLUME_COUNT_REASON)
    }
}
