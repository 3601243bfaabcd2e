//! The seam between the node agent and the interceptor, guarded from the
//! reading side: whatever [`ContainerEnv::to_env`] writes (what the agent
//! sets in every GPU container), the interceptor's own readers
//! ([`Config::from_vars`], [`ComputeConfig::from_vars`]) understand as the
//! same caps, cards, paths and priority. Test-only module.

use proptest::prelude::*;
use tessera_api::container_contract::{CardEnv, ContainerEnv};
use tessera_api::container_env::TaskPriority;
use tessera_api::shared_region::MAX_DEVICES;

use crate::config::Config;
use crate::sm_config::ComputeConfig;

fn card() -> impl Strategy<Value = CardEnv> {
    (
        "GPU-[a-f0-9]{8}",
        proptest::option::of(1u64..200_000),
        proptest::option::of(1u8..100),
    )
        .prop_map(|(uuid, memory_mib, sm_percent)| CardEnv {
            uuid,
            memory_mib,
            sm_percent,
        })
}

proptest! {
    #[test]
    fn what_the_agent_writes_the_interceptor_reads(
        cards in proptest::collection::vec(card(), 1..MAX_DEVICES),
        shared in proptest::option::of("/[a-z]{1,12}/region"),
        tenant_id in proptest::option::of("[a-z0-9_-]{1,20}"),
        high in proptest::option::of(any::<bool>()),
        socket in proptest::option::of("/[a-z]{1,12}/pid.sock"),
    ) {
        let env = ContainerEnv {
            cards,
            shared_cache: shared,
            card_tenants_dir: Some("/usr/local/tessera/cards".into()),
            tenant_id,
            priority: high.map(|h| if h { TaskPriority::High } else { TaskPriority::Low }),
            pid_socket: socket,
        };
        let vars = env.to_env();
        let memory = Config::from_vars(vars.clone()).expect("the interceptor accepts the agent's env");
        let compute = ComputeConfig::from_vars(vars).expect("the interceptor accepts the agent's env");
        let uuids: Vec<String> = env.cards.iter().map(|c| c.uuid.clone()).collect();
        prop_assert_eq!(memory.visible_uuids.as_ref(), Some(&uuids));
        prop_assert!(memory.visible_uuids_from_agent);
        for (i, card) in env.cards.iter().enumerate() {
            prop_assert_eq!(memory.limits[i], card.memory_mib.map(|m| m << 20));
            prop_assert_eq!(compute.sm_limits[i], card.sm_percent);
        }
        prop_assert_eq!(memory.shared_region.as_ref().map(|p| p.to_string_lossy().into_owned()), env.shared_cache.clone());
        prop_assert_eq!(memory.pid_socket.as_ref().map(|p| p.to_string_lossy().into_owned()), env.pid_socket.clone());
        prop_assert_eq!(compute.priority, env.priority);
        prop_assert_eq!(compute.tenant_id.clone(), env.tenant_id.clone());
        prop_assert_eq!(compute.tenants_dir.as_ref().map(|p| p.to_string_lossy().into_owned()), env.card_tenants_dir.clone());
        prop_assert!(memory.warnings.is_empty() && compute.warnings.is_empty());
    }
}
