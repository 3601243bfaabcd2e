//! The `DevicePlugin` gRPC service kubelet calls: options, the device list
//! (`ListAndWatch`, re-sent whenever card health changes), a preferred
//! allocation on the cards the scheduler gave the pod being admitted (so the
//! device IDs kubelet records, and reports through its PodResources API to
//! tools such as dcgm-exporter, name the container's real cards), `Allocate`
//! (delegated to [`crate::allocate::Allocator`]) and a no-op
//! `PreStartContainer`.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::allocate::{AllocateError, Allocator};
use crate::gpu::GpuInfo;
use crate::health::HealthSnapshot;
use crate::inventory::{card_of_device_id, kubelet_device_ids};
use crate::proto::device_plugin_server::DevicePlugin;
use crate::proto::{
    AllocateRequest, AllocateResponse, ContainerPreferredAllocationResponse, Device,
    DevicePluginOptions, Empty, ListAndWatchResponse, NumaNode, PreStartContainerRequest,
    PreStartContainerResponse, PreferredAllocationRequest, PreferredAllocationResponse,
    TopologyInfo, HEALTHY, UNHEALTHY,
};

/// The devices kubelet sees: `split_count` per card, with the card's
/// health and NUMA node.
pub fn kubelet_devices(
    cards: &[GpuInfo],
    split_count: u32,
    health: &HealthSnapshot,
) -> Vec<Device> {
    cards
        .iter()
        .flat_map(|card| {
            let healthy = health.get(&card.uuid).map_or(card.healthy, |h| h.healthy);
            kubelet_device_ids(card, split_count).map(move |id| Device {
                id,
                health: if healthy { HEALTHY } else { UNHEALTHY }.to_owned(),
                topology: Some(TopologyInfo {
                    nodes: vec![NumaNode {
                        id: i64::from(card.numa),
                    }],
                }),
            })
        })
        .collect()
}

/// The device-plugin service of this node.
#[derive(Debug, Clone)]
pub struct DevicePluginService {
    cards: Arc<[GpuInfo]>,
    split_count: u32,
    health: watch::Receiver<HealthSnapshot>,
    allocator: Allocator,
    /// Resolves when the server stops, so `ListAndWatch` streams end with it.
    stopping: watch::Receiver<bool>,
}

impl DevicePluginService {
    /// A service over `cards`, split `split_count` ways.
    pub fn new(
        cards: Arc<[GpuInfo]>,
        split_count: u32,
        health: watch::Receiver<HealthSnapshot>,
        allocator: Allocator,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cards,
            split_count,
            health,
            allocator,
            stopping,
        }
    }
}

fn to_status(error: &AllocateError) -> Status {
    let message = error.to_string();
    match error {
        AllocateError::UnknownDevice(_) => Status::invalid_argument(message),
        AllocateError::NoMatch(_) | AllocateError::Unusable { .. } => {
            Status::failed_precondition(message)
        }
        AllocateError::Api(_) | AllocateError::TooMuchContention | AllocateError::SealKey(_) => {
            Status::unavailable(message)
        }
        AllocateError::HostFiles(_) => Status::internal(message),
    }
}

/// Prefers devices of distinct cards, after the ones kubelet must include.
fn preferred(available: &[String], must_include: &[String], size: usize) -> Vec<String> {
    let mut chosen: Vec<String> = must_include.iter().take(size).cloned().collect();
    let mut used_cards: HashSet<String> = chosen
        .iter()
        .filter_map(|id| card_of_device_id(id).map(str::to_owned))
        .collect();
    let mut rest: VecDeque<&String> = available.iter().filter(|id| !chosen.contains(id)).collect();
    let mut second_pass = Vec::new();
    while chosen.len() < size {
        let Some(id) = rest.pop_front() else { break };
        match card_of_device_id(id) {
            Some(card) if !used_cards.contains(card) => {
                used_cards.insert(card.to_owned());
                chosen.push(id.clone());
            }
            _ => second_pass.push(id),
        }
    }
    for id in second_pass {
        if chosen.len() >= size {
            break;
        }
        chosen.push(id.clone());
    }
    chosen
}

/// Device IDs on `cards` (one per card, in order), after the ones kubelet
/// must include; `None` when a card has no free ID left in `available`.
fn preferred_on_cards(
    available: &[String],
    must_include: &[String],
    size: usize,
    cards: &[String],
) -> Option<Vec<String>> {
    if cards.len() != size {
        return None;
    }
    let mut chosen: Vec<String> = Vec::with_capacity(size);
    for card in cards {
        let on_card = |id: &&String| card_of_device_id(id) == Some(card.as_str());
        let pick = must_include.iter().find(on_card).or_else(|| {
            available
                .iter()
                .filter(|id| !chosen.contains(id))
                .find(on_card)
        })?;
        chosen.push(pick.clone());
    }
    Some(chosen)
}

type DeviceStream =
    Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl DevicePlugin for DevicePluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let cards = Arc::clone(&self.cards);
        let split_count = self.split_count;
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let stream = WatchStream::new(self.health.clone())
            .map(move |health| {
                Ok(ListAndWatchResponse {
                    devices: kubelet_devices(&cards, split_count, &health),
                })
            })
            .take_until(stopped);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let mut container_responses = Vec::new();
        for c in &request.into_inner().container_requests {
            let size = usize::try_from(c.allocation_size).unwrap_or(0);
            let on_cards = match self.allocator.preferred_cards(size).await {
                Ok(cards) => preferred_on_cards(
                    &c.available_device_i_ds,
                    &c.must_include_device_i_ds,
                    size,
                    &cards,
                )
                .or_else(|| {
                    tracing::warn!(?cards, "no free device ID on the pod's cards; kubelet's record of this container's devices will name other cards (the container still gets its own)");
                    None
                }),
                Err(error) => {
                    tracing::debug!(%error, "no pod to prefer devices for; spreading over cards");
                    None
                }
            };
            let device_i_ds = on_cards.unwrap_or_else(|| {
                preferred(&c.available_device_i_ds, &c.must_include_device_i_ds, size)
            });
            container_responses.push(ContainerPreferredAllocationResponse { device_i_ds });
        }
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let requests: Vec<Vec<String>> = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| c.devices_ids)
            .collect();
        match self.allocator.allocate(&requests).await {
            Ok(container_responses) => Ok(Response::new(AllocateResponse {
                container_responses,
            })),
            Err(e) => {
                tracing::warn!(error = %e, "Allocate refused");
                Err(to_status(&e))
            }
        }
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_on_cards_names_the_given_cards_in_order() {
        let ids: Vec<String> = ["A-0", "A-1", "B-0", "C-0"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            preferred_on_cards(&ids, &[], 2, &["C".into(), "A".into()]),
            Some(vec!["C-0".to_owned(), "A-0".to_owned()])
        );
        assert_eq!(
            preferred_on_cards(&ids, &["A-1".to_owned()], 1, &["A".into()]),
            Some(vec!["A-1".to_owned()])
        );
        assert_eq!(preferred_on_cards(&ids, &[], 1, &["D".into()]), None);
        assert_eq!(preferred_on_cards(&ids, &[], 2, &["A".into()]), None);
    }

    #[test]
    fn preferred_spreads_over_cards_after_must_include() {
        let ids: Vec<String> = ["A-0", "A-1", "B-0", "B-1", "C-0"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(preferred(&ids, &[], 3), vec!["A-0", "B-0", "C-0"]);
        assert_eq!(preferred(&ids, &["B-1".to_owned()], 2), vec!["B-1", "A-0"]);
        assert_eq!(preferred(&ids[..2], &[], 2), vec!["A-0", "A-1"]);
    }
}
