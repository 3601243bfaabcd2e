//! The seam between the node agent and the interceptor as one value:
//! [`ContainerEnv`] is everything the agent sets in a GPU container's
//! environment. The agent writes it with [`ContainerEnv::to_env`]; the
//! interceptor (and anything else reading a container's environment) reads
//! it back with [`ContainerEnv::from_vars`]. The names and value codecs
//! live in [`crate::container_env`] and are spelled nowhere else; a
//! round-trip property test below keeps the two directions in step.

use thiserror::Error;

use crate::container_env::{
    format_memory_limit_mib, memory_limit_var, parse_memory_limit, parse_sm_limit,
    parse_task_priority, sm_limit_var, ComputeEnvError, MemoryLimitError, TaskPriority,
    CARD_TENANTS_DIR, PID_SOCKET, SHARED_CACHE, SM_LIMIT, TASK_PRIORITY, TENANT_ID,
    VISIBLE_DEVICES,
};
use crate::visible_cards::{format_visible_uuids, parse_visible_uuids, VISIBLE_UUIDS};

/// One card a container sees, with its caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardEnv {
    /// The card's UUID.
    pub uuid: String,
    /// Memory cap in MiB; `None` = no cap.
    pub memory_mib: Option<u64>,
    /// SM share in percent (1–99); `None` = no cap (0 or 100 written).
    pub sm_percent: Option<u8>,
}

/// A GPU container's environment as the node agent sets it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerEnv {
    /// The cards, in the order the per-card variables number them.
    pub cards: Vec<CardEnv>,
    /// `CUDA_DEVICE_MEMORY_SHARED_CACHE`: the container's accounting region.
    pub shared_cache: Option<String>,
    /// `TESSERA_CARD_TENANTS_DIR`: the agent's read-only tenant tables.
    pub card_tenants_dir: Option<String>,
    /// `TESSERA_TENANT_ID`: the container's id in those tables.
    pub tenant_id: Option<String>,
    /// `CUDA_TASK_PRIORITY`, from the pod's `nvidia.com/priority`.
    pub priority: Option<TaskPriority>,
    /// `TESSERA_PID_SOCKET`: the agent's host-pid socket.
    pub pid_socket: Option<String>,
}

/// Why an environment does not read as a [`ContainerEnv`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContainerEnvError {
    /// The card list is empty or malformed.
    #[error("{VISIBLE_UUIDS} = `{0}` is not a comma-separated list of card UUIDs")]
    BadCardList(String),
    /// A memory cap does not parse.
    #[error("{var}: {source}")]
    Memory {
        /// The variable.
        var: String,
        /// What is wrong.
        source: MemoryLimitError,
    },
    /// An SM cap or the priority does not parse.
    #[error("{var}: {source}")]
    Compute {
        /// The variable.
        var: String,
        /// What is wrong.
        source: ComputeEnvError,
    },
}

fn priority_value(priority: TaskPriority) -> &'static str {
    match priority {
        TaskPriority::High => "0",
        TaskPriority::Low => "1",
    }
}

impl ContainerEnv {
    /// The variables to set, in a stable order.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        let uuids = || self.cards.iter().map(|c| c.uuid.as_str());
        if !self.cards.is_empty() {
            env.push((
                VISIBLE_DEVICES.to_owned(),
                uuids().collect::<Vec<_>>().join(","),
            ));
            // The same list for the interceptor alone: the per-card
            // variables are numbered by it, matched to CUDA ordinals by UUID
            // (the runtime may rewrite NVIDIA_VISIBLE_DEVICES).
            env.push((VISIBLE_UUIDS.to_owned(), format_visible_uuids(uuids())));
        }
        for (i, card) in self.cards.iter().enumerate() {
            if let Some(mib) = card.memory_mib {
                env.push((memory_limit_var(i), format_memory_limit_mib(mib)));
            }
        }
        let sm = |card: &CardEnv| card.sm_percent.unwrap_or(0).to_string();
        if let Some(first) = self.cards.first() {
            env.push((SM_LIMIT.to_owned(), sm(first)));
        }
        for (i, card) in self.cards.iter().enumerate() {
            env.push((sm_limit_var(i), sm(card)));
        }
        let optional = [
            (CARD_TENANTS_DIR, self.card_tenants_dir.as_deref()),
            (TENANT_ID, self.tenant_id.as_deref()),
            (SHARED_CACHE, self.shared_cache.as_deref()),
            (TASK_PRIORITY, self.priority.map(priority_value)),
            (PID_SOCKET, self.pid_socket.as_deref()),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                env.push((name.to_owned(), value.to_owned()));
            }
        }
        env
    }

    /// Reads the environment back through `var` (a lookup such as
    /// `std::env::var(name).ok()`). Cards come from `TESSERA_VISIBLE_UUIDS`,
    /// else `NVIDIA_VISIBLE_DEVICES`; a container without either has none.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ContainerEnvError> {
        let list = var(VISIBLE_UUIDS).or_else(|| var(VISIBLE_DEVICES));
        let uuids = match list {
            None => Vec::new(),
            Some(list) if list.trim().is_empty() => Vec::new(),
            Some(list) => parse_visible_uuids(&list).ok_or(ContainerEnvError::BadCardList(list))?,
        };
        let first_sm = var(SM_LIMIT);
        let mut cards = Vec::with_capacity(uuids.len());
        for (i, uuid) in uuids.into_iter().enumerate() {
            let memory_var = memory_limit_var(i);
            let memory_mib = var(&memory_var)
                .map(|v| {
                    parse_memory_limit(&v)
                        .map(|bytes| bytes >> 20)
                        .map_err(|source| ContainerEnvError::Memory {
                            var: memory_var.clone(),
                            source,
                        })
                })
                .transpose()?;
            let sm_var = sm_limit_var(i);
            let sm_value = var(&sm_var).or_else(|| first_sm.clone());
            let sm_percent = match sm_value {
                None => None,
                Some(v) => parse_sm_limit(&v).map_err(|source| ContainerEnvError::Compute {
                    var: sm_var,
                    source,
                })?,
            };
            cards.push(CardEnv {
                uuid,
                memory_mib,
                sm_percent,
            });
        }
        let priority = var(TASK_PRIORITY)
            .map(|v| {
                parse_task_priority(&v).map_err(|source| ContainerEnvError::Compute {
                    var: TASK_PRIORITY.to_owned(),
                    source,
                })
            })
            .transpose()?;
        Ok(Self {
            cards,
            shared_cache: var(SHARED_CACHE),
            card_tenants_dir: var(CARD_TENANTS_DIR),
            tenant_id: var(TENANT_ID),
            priority,
            pid_socket: var(PID_SOCKET),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn lookup(env: &[(String, String)]) -> impl Fn(&str) -> Option<String> + '_ {
        let map: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        move |name| map.get(name).map(|v| (*v).to_owned())
    }

    #[test]
    fn what_the_agent_writes_is_what_the_interceptor_reads() {
        let written = ContainerEnv {
            cards: vec![
                CardEnv {
                    uuid: "GPU-a".into(),
                    memory_mib: Some(7500),
                    sm_percent: Some(30),
                },
                CardEnv {
                    uuid: "GPU-b".into(),
                    memory_mib: Some(100),
                    sm_percent: None,
                },
            ],
            shared_cache: Some("/usr/local/tessera/shared/region".into()),
            card_tenants_dir: Some("/usr/local/tessera/cards".into()),
            tenant_id: Some("uid_main".into()),
            priority: Some(TaskPriority::High),
            pid_socket: None,
        };
        let env = written.to_env();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("NVIDIA_VISIBLE_DEVICES"), Some("GPU-a,GPU-b"));
        assert_eq!(get("CUDA_DEVICE_MEMORY_LIMIT_0"), Some("7500m"));
        assert_eq!(get("CUDA_DEVICE_SM_LIMIT"), Some("30"));
        assert_eq!(get("CUDA_DEVICE_SM_LIMIT_1"), Some("0"));
        assert_eq!(get("CUDA_TASK_PRIORITY"), Some("0"));
        assert_eq!(get("TESSERA_PID_SOCKET"), None);
        assert_eq!(ContainerEnv::from_vars(lookup(&env)), Ok(written));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let env = vec![
            ("TESSERA_VISIBLE_UUIDS".to_owned(), "GPU-a".to_owned()),
            ("CUDA_DEVICE_MEMORY_LIMIT_0".to_owned(), "lots".to_owned()),
        ];
        let error = ContainerEnv::from_vars(lookup(&env)).expect_err("bad cap");
        assert!(
            error.to_string().contains("CUDA_DEVICE_MEMORY_LIMIT_0"),
            "{error}"
        );
        assert_eq!(
            ContainerEnv::from_vars(|_| None),
            Ok(ContainerEnv::default())
        );
    }

    proptest! {
        #[test]
        fn every_environment_round_trips(
            cards in proptest::collection::vec(
                ("GPU-[a-f0-9]{8}", proptest::option::of(1u64..200_000), proptest::option::of(1u8..100)),
                0..6),
            shared in proptest::option::of("/[a-z/]{1,20}"),
            tenants in proptest::option::of("/[a-z/]{1,20}"),
            tenant_id in proptest::option::of("[a-z0-9_-]{1,20}"),
            high in proptest::option::of(any::<bool>()),
            socket in proptest::option::of("/[a-z/.]{1,20}"),
        ) {
            let written = ContainerEnv {
                cards: cards.into_iter().map(|(uuid, memory_mib, sm_percent)| CardEnv { uuid, memory_mib, sm_percent }).collect(),
                shared_cache: shared,
                card_tenants_dir: tenants,
                tenant_id,
                priority: high.map(|h| if h { TaskPriority::High } else { TaskPriority::Low }),
                pid_socket: socket,
            };
            let env = written.to_env();
            prop_assert_eq!(ContainerEnv::from_vars(lookup(&env)), Ok(written));
        }
    }
}
