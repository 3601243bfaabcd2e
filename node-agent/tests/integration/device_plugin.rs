//! The agent driven end to end: a kubelet stand-in over real unix sockets
//! (registration, ListAndWatch, Allocate, kubelet restart, odd
//! `:authority` values) against the API stand-in, with fake cards.

use crate::common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{EnvVar, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use tessera_api::config::Config;
use tessera_api::inventory::decode_inventory;
use tessera_api::names::{
    allocation as keys, NODE_PAIR_SCORE_ANNOTATION, NODE_REGISTER_ANNOTATION,
};
use tessera_api::pair_scores::decode_pair_scores;
use tessera_node_agent::gpu::{HealthEvent, HealthEventKind};
use tessera_node_agent::proto::device_plugin_client::DevicePluginClient;
use tessera_node_agent::proto::{
    AllocateResponse, ContainerAllocateResponse, Empty, ListAndWatchResponse, Mount,
};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

type PluginClient = DevicePluginClient<Channel>;

const PRELOAD_PATH: &str = "/etc/ld.so.preload";
const SHARED_DIR_PATH: &str = "/usr/local/tessera/shared";

fn config(split: u32) -> Config {
    Config::from_yaml(&format!(
        "sharing:\n  splitCount: {split}\n  memoryScaling: 1.5\n"
    ))
    .expect("config")
}

fn pod_of(cluster: &Cluster, name: &str) -> Pod {
    cluster
        .api
        .get::<Pod>(Some("default"), name)
        .expect("pod exists")
}

/// The bind phase the agent left on pod `name`.
fn bind_phase(cluster: &Cluster, name: &str) -> Option<String> {
    annotation(&pod_of(cluster, name), keys::BIND_PHASE)
}

/// Pod `name` is fully allocated: phase success and nothing left to hand out.
fn assert_pod_done(cluster: &Cluster, name: &str) {
    let pod = pod_of(cluster, name);
    assert_eq!(
        annotation(&pod, keys::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert_eq!(
        annotation(&pod, keys::DEVICES_TO_ALLOCATE).as_deref(),
        Some(";;")
    );
}

/// The inventory annotation on the Node, if any.
fn inventory_annotation(api: &ApiServer) -> Option<String> {
    api.get::<Node>(None, NODE)?
        .metadata
        .annotations?
        .get(NODE_REGISTER_ANNOTATION)
        .cloned()
}

/// Opens ListAndWatch.
async fn watch_devices(client: &mut PluginClient) -> Streaming<ListAndWatchResponse> {
    client
        .list_and_watch(Empty {})
        .await
        .expect("ListAndWatch")
        .into_inner()
}

/// Allocate for one container holding kubelet device `ids`; `what` names the call.
async fn allocate(client: &mut PluginClient, ids: Vec<String>, what: &str) -> AllocateResponse {
    client
        .allocate(allocate_request(&[ids]))
        .await
        .expect(what)
        .into_inner()
}

/// Allocate for one container holding `ids`, expected to be refused; `what` names the call.
async fn allocate_refused(client: &mut PluginClient, ids: Vec<String>, what: &str) -> Status {
    client
        .allocate(allocate_request(&[ids]))
        .await
        .expect_err(what)
}

/// The refusal has `code` and its message says `says`.
fn assert_refused(err: &Status, code: Code, says: &str) {
    assert_eq!(err.code(), code);
    assert!(err.message().contains(says), "{}", err.message());
}

/// Card `uuid` stops answering and reports `kind`.
fn make_unhealthy(cluster: &Cluster, uuid: &str, kind: HealthEventKind) {
    cluster.agent().control.set_responsive(uuid, false);
    cluster.agent().control.inject(HealthEvent {
        uuid: uuid.to_owned(),
        kind,
    });
}

/// The mount at `container_path`, if the response has one.
fn mount_at<'a>(
    response: &'a ContainerAllocateResponse,
    container_path: &str,
) -> Option<&'a Mount> {
    response
        .mounts
        .iter()
        .find(|m| m.container_path == container_path)
}

/// The host directory mounted as the container's shared region directory.
fn shared_dir(response: &ContainerAllocateResponse) -> String {
    mount_at(response, SHARED_DIR_PATH)
        .expect("shared dir")
        .host_path
        .clone()
}

#[tokio::test]
async fn registers_lists_devices_and_follows_health() {
    let cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let registration = &cluster.kubelet.registrations()[0];
    assert_eq!(registration.version, "v1beta1");
    assert_eq!(registration.resource_name, "nvidia.com/gpu");
    assert_eq!(registration.endpoint, PLUGIN_SOCKET);
    assert!(
        registration
            .options
            .as_ref()
            .expect("options")
            .get_preferred_allocation_available
    );

    let mut client = cluster.kubelet.plugin_client().await;
    let mut stream = watch_devices(&mut client).await;
    let first = stream.message().await.expect("stream").expect("first list");
    assert_eq!(first.devices.len(), 8, "2 cards x split 4");
    assert!(first.devices.iter().all(|d| d.health == "Healthy"));
    assert_eq!(
        first
            .devices
            .iter()
            .filter(|d| d.id.starts_with(&cluster.card(1)))
            .count(),
        4
    );

    let sick = cluster.card(0);
    make_unhealthy(&cluster, &sick, HealthEventKind::Xid(79));
    let update = stream.message().await.expect("stream").expect("update");
    let unhealthy: Vec<_> = update
        .devices
        .iter()
        .filter(|d| d.health == "Unhealthy")
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(unhealthy.len(), 4);
    assert!(unhealthy.iter().all(|id| id.starts_with(&sick)));

    // The inventory follows.
    eventually("the inventory to mark the card unhealthy", || {
        let value = inventory_annotation(&cluster.api)?;
        let devices = decode_inventory(&value).ok()?;
        devices
            .iter()
            .any(|d| d.id == sick && !d.health)
            .then_some(())
    })
    .await;

    // Once it answers again after the quiet period, it is back.
    cluster.agent().control.set_responsive(&sick, true);
    let recovered = stream.message().await.expect("stream").expect("recovery");
    assert!(recovered.devices.iter().all(|d| d.health == "Healthy"));
}

#[tokio::test]
async fn inventory_is_published_rewritten_when_wiped_and_not_rewritten_when_steady() {
    let cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let read = || inventory_annotation(&cluster.api);
    let value = eventually("the inventory annotation", read).await;
    let devices = decode_inventory(&value).expect("our annotation decodes");
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0].count, 4);
    assert_eq!(devices[0].devmem, 34542, "23028 MiB x 1.5");
    assert_eq!(devices[0].devcore, 100);
    assert_eq!(devices[0].device_type, "NVIDIA-NVIDIA A10G");
    assert!(devices.iter().all(|d| d.health));
    // The link scores come with it: the two fake cards sit on different
    // NUMA nodes, linked across sockets (HAMi's score 10).
    let scores_of = || {
        cluster
            .api
            .get::<Node>(None, NODE)?
            .metadata
            .annotations?
            .get(NODE_PAIR_SCORE_ANNOTATION)
            .cloned()
    };
    let scores = decode_pair_scores(&scores_of().expect("published with the inventory"))
        .expect("our score annotation decodes");
    assert_eq!(scores.len(), 2);
    assert_eq!(scores[0].scores[&devices[1].id], 10);

    // Steady: several periods pass without a write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = cluster.api.write_count("PATCH", "nodes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cluster.api.write_count("PATCH", "nodes"),
        writes,
        "no rewrite while nothing changed"
    );

    // Wiped or replaced by something foreign: it comes back.
    let mut node = node_object();
    node.metadata.annotations = Some(
        [(
            NODE_REGISTER_ANNOTATION.to_owned(),
            "{garbage,,:".to_owned(),
        )]
        .into(),
    );
    cluster.api.insert(&node);
    eventually("the annotation to be restored", || {
        (read()? == value).then_some(())
    })
    .await;
    cluster.api.insert(&node_object());
    eventually("the wiped annotation to come back", || {
        (read()? == value).then_some(())
    })
    .await;
    eventually("the wiped link scores to come back", scores_of).await;
}

#[tokio::test]
async fn allocate_gives_one_pod_its_cards_and_marks_it_done() {
    let cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let (a, b) = (cluster.card(0), cluster.card(1));
    let pod = bound_pod(
        "train",
        &vec![vec![], vec![device(&a, 7500, 30), device(&b, 7500, 30)]],
    );
    cluster.api.insert(&pod);

    let mut client = cluster.kubelet.plugin_client().await;
    let ids = vec![cluster.ids(0, 1)[0].clone(), cluster.ids(1, 1)[0].clone()];
    let response = allocate(&mut client, ids, "Allocate").await;
    assert_eq!(response.container_responses.len(), 1);
    let c = &response.container_responses[0];
    assert_eq!(c.envs["NVIDIA_VISIBLE_DEVICES"], format!("{a},{b}"));
    assert_eq!(c.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "7500m");
    assert_eq!(c.envs["CUDA_DEVICE_MEMORY_LIMIT_1"], "7500m");
    assert_eq!(c.envs["CUDA_DEVICE_SM_LIMIT"], "30");
    assert_eq!(
        c.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"],
        "/usr/local/tessera/shared/region.cache"
    );
    let preload = mount_at(c, PRELOAD_PATH).expect("preload mount");
    assert!(preload.read_only);
    let shared = shared_dir(c);
    let uid = pod_of(&cluster, "train").metadata.uid.expect("uid");
    assert!(shared.ends_with(&format!("{uid}_c1")), "{shared}");
    assert!(std::path::Path::new(&shared).join("region.cache").exists());

    assert_pod_done(&cluster, "train");

    // Nothing is left for a second call of the same shape.
    let err = allocate_refused(&mut client, cluster.ids(0, 2), "no pod waits").await;
    assert_refused(&err, Code::FailedPrecondition, "no pod bound to node");
}

fn visible(response: &ContainerAllocateResponse) -> String {
    response.envs["NVIDIA_VISIBLE_DEVICES"].clone()
}

#[tokio::test]
async fn pods_of_different_shapes_bound_at_once_each_get_their_own_cards() {
    let cluster = Cluster::start("4x NVIDIA A10G 23028", config(4)).await;
    let cards: Vec<String> = (0..4).map(|i| cluster.card(i)).collect();
    // The scheduler keeps one unacknowledged pod per shape on a node; pods
    // of different shapes wait together, created in the same second.
    insert_same_second(
        &cluster.api,
        &[
            bound_pod("single", &vec![vec![device(&cards[0], 1000, 10)]]),
            bound_pod(
                "pair",
                &vec![vec![
                    device(&cards[1], 2000, 20),
                    device(&cards[2], 2000, 20),
                ]],
            ),
            bound_pod(
                "triple",
                &vec![vec![
                    device(&cards[1], 3000, 30),
                    device(&cards[2], 3000, 30),
                    device(&cards[3], 3000, 30),
                ]],
            ),
        ],
    )
    .await;

    let client = cluster.kubelet.plugin_client().await;
    let call = |ids: Vec<String>| {
        let mut client = client.clone();
        async move {
            client
                .allocate(allocate_request(&[ids]))
                .await
                .map(|r| r.into_inner().container_responses.remove(0))
        }
    };
    // Kubelet's device IDs name whatever cards it picked; the pod's own
    // cards and caps are what the container gets.
    let (single, pair, triple) = tokio::join!(
        call(cluster.ids(3, 1)),
        call(vec![
            cluster.ids(0, 2)[1].clone(),
            cluster.ids(3, 2)[1].clone()
        ]),
        call(vec![
            cluster.ids(0, 3)[2].clone(),
            cluster.ids(1, 3)[2].clone(),
            cluster.ids(2, 3)[2].clone()
        ]),
    );
    let (single, pair, triple) = (single.expect("1"), pair.expect("2"), triple.expect("3"));
    assert_eq!(visible(&single), cards[0]);
    assert_eq!(single.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
    assert_eq!(visible(&pair), format!("{},{}", cards[1], cards[2]));
    assert_eq!(pair.envs["CUDA_DEVICE_MEMORY_LIMIT_1"], "2000m");
    assert_eq!(
        visible(&triple),
        format!("{},{},{}", cards[1], cards[2], cards[3])
    );
    assert_eq!(triple.envs["CUDA_DEVICE_MEMORY_LIMIT_2"], "3000m");
    for name in ["single", "pair", "triple"] {
        assert_eq!(
            bind_phase(&cluster, name).as_deref(),
            Some("success"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn an_admitted_pod_set_back_to_allocating_never_takes_a_later_pods_call() {
    let cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let (a, b) = (cluster.card(0), cluster.card(1));
    // Running for a while (kubelet wrote its container statuses); its owner
    // patched the bind phase back to `allocating` to catch the next call.
    let mut replay = bound_pod("replay", &vec![vec![device(&a, 20000, 0)]]);
    replay.status = Some(
        serde_json::from_value(
            serde_json::json!({"phase": "Running", "containerStatuses": [
            {"name": "c0", "image": "cuda", "imageID": "", "ready": true, "restartCount": 0}]}),
        )
        .expect("status"),
    );
    insert_in_order(
        &cluster.api,
        &[replay, bound_pod("later", &vec![vec![device(&b, 2000, 0)]])],
    )
    .await;
    let mut client = cluster.kubelet.plugin_client().await;
    let got = allocate(&mut client, cluster.ids(0, 1), "later").await;
    assert_eq!(visible(&got.container_responses[0]), b);
    assert_eq!(
        got.container_responses[0].envs["CUDA_DEVICE_MEMORY_LIMIT_0"],
        "2000m"
    );
    assert_eq!(bind_phase(&cluster, "later").as_deref(), Some("success"));
    assert_eq!(
        bind_phase(&cluster, "replay").as_deref(),
        Some("allocating")
    );
}

#[tokio::test]
async fn undecidable_request_fails_instead_of_guessing() {
    let cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let (a, b) = (cluster.card(0), cluster.card(1));
    insert_same_second(
        &cluster.api,
        &[
            bound_pod("twin-a", &vec![vec![device(&a, 1000, 0)]]),
            bound_pod("twin-b", &vec![vec![device(&b, 1000, 0)]]),
        ],
    )
    .await;
    let mut client = cluster.kubelet.plugin_client().await;
    let err = allocate_refused(&mut client, cluster.ids(0, 1), "ambiguous").await;
    assert_refused(&err, Code::FailedPrecondition, "cannot tell which pod");
    for name in ["twin-a", "twin-b"] {
        assert_eq!(bind_phase(&cluster, name).as_deref(), Some("allocating"));
    }
    // Unknown device IDs are refused outright.
    let err = allocate_refused(&mut client, vec!["GPU-nope-0".into()], "unknown id").await;
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn corrupt_and_foreign_annotations_never_crash_and_fail_only_their_pod() {
    let cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let a = cluster.card(0);
    let mut corrupt = bound_pod("corrupt", &vec![vec![device(&a, 1000, 0)]]);
    corrupt
        .metadata
        .annotations
        .as_mut()
        .expect("annotations")
        .insert(
            keys::DEVICES_TO_ALLOCATE.into(),
            "GPU-x,NVIDIA,lots;;;".into(),
        );
    cluster.api.insert(&corrupt);
    let foreign = bound_pod(
        "foreign",
        &vec![vec![device("GPU-not-on-this-node", 1000, 0)]],
    );
    cluster.api.insert(&foreign);
    let mut garbage = bound_pod("garbage", &vec![vec![device(&a, 1000, 0)]]);
    garbage
        .metadata
        .annotations
        .as_mut()
        .expect("annotations")
        .insert(keys::DEVICES_ALLOCATED.into(), "\u{0}\u{ffff}".into());
    cluster.api.insert(&garbage);
    let mut client = cluster.kubelet.plugin_client().await;

    // The foreign pod is the only candidate: its card is not here.
    let err = allocate_refused(&mut client, cluster.ids(0, 1), "card not here").await;
    assert_refused(&err, Code::FailedPrecondition, "not on this node");
    assert_eq!(bind_phase(&cluster, "corrupt").as_deref(), Some("failed"));
    assert_eq!(bind_phase(&cluster, "foreign").as_deref(), Some("failed"));
    assert_eq!(bind_phase(&cluster, "garbage").as_deref(), Some("failed"));
    let events: Vec<Event> = cluster.api.list();
    assert!(events
        .iter()
        .any(|e| e.reason.as_deref() == Some("GPUAllocationFailed")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("corrupt")));

    // A good pod still gets its cards.
    cluster
        .api
        .insert(&bound_pod("good", &vec![vec![device(&a, 1000, 0)]]));
    let ok = allocate(&mut client, cluster.ids(0, 1), "good pod").await;
    assert_eq!(visible(&ok.container_responses[0]), a);
}

#[tokio::test]
async fn unhealthy_card_fails_its_pod_with_an_event() {
    let cluster = Cluster::start("1x NVIDIA A10G 23028", config(4)).await;
    let a = cluster.card(0);
    make_unhealthy(&cluster, &a, HealthEventKind::UncorrectableEcc);
    cluster
        .api
        .insert(&bound_pod("victim", &vec![vec![device(&a, 1000, 0)]]));
    let mut client = cluster.kubelet.plugin_client().await;
    let mut stream = watch_devices(&mut client).await;
    loop {
        let list = stream.message().await.expect("stream").expect("list");
        if list.devices.iter().all(|d| d.health == "Unhealthy") {
            break;
        }
    }
    let err = allocate_refused(&mut client, cluster.ids(0, 1), "unhealthy").await;
    assert!(err.message().contains("unhealthy"), "{}", err.message());
    assert_eq!(bind_phase(&cluster, "victim").as_deref(), Some("failed"));
    // The Event on the pod says why, for `kubectl describe pod`.
    let event = eventually("the GPUAllocationFailed event on the victim", || {
        cluster.api.list::<Event>().into_iter().find(|e| {
            e.reason.as_deref() == Some("GPUAllocationFailed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("victim")
        })
    })
    .await;
    let note = event.note.unwrap_or_default();
    assert!(note.contains(&a) && note.contains("unhealthy"), "{note}");
}

#[tokio::test]
async fn kubelet_restart_leads_to_a_new_registration_and_a_working_socket() {
    let mut cluster = Cluster::start("1x NVIDIA A10G 23028", config(2)).await;
    cluster.kubelet.restart().await;
    cluster.kubelet.wait_registrations(2, WAIT).await;
    let mut client = cluster.kubelet.plugin_client().await;
    let mut stream = watch_devices(&mut client).await;
    assert_eq!(
        stream
            .message()
            .await
            .expect("stream")
            .expect("list")
            .devices
            .len(),
        2
    );
    // And once more.
    cluster.kubelet.restart().await;
    cluster.kubelet.wait_registrations(3, WAIT).await;
    let mut client = cluster.kubelet.plugin_client().await;
    client
        .get_device_plugin_options(Empty {})
        .await
        .expect("options after the second restart");
}

#[tokio::test]
async fn agent_restart_keeps_allocations_from_pod_annotations() {
    let mut cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let (a, b) = (cluster.card(0), cluster.card(1));
    insert_in_order(
        &cluster.api,
        &[
            bound_pod(
                "two-step",
                &vec![vec![device(&a, 1000, 0)], vec![device(&b, 2000, 0)]],
            ),
            // Another shape may wait beside it (one pod per shape and node).
            bound_pod(
                "newer",
                &vec![vec![device(&a, 3000, 0), device(&b, 3000, 0)]],
            ),
        ],
    )
    .await;
    let mut client = cluster.kubelet.plugin_client().await;
    let first = allocate(&mut client, cluster.ids(0, 1), "container 0").await;
    assert_eq!(visible(&first.container_responses[0]), a);
    assert_eq!(
        bind_phase(&cluster, "two-step").as_deref(),
        Some("allocating")
    );

    // Restart the agent between the pod's two containers.
    cluster.agent.take().expect("agent").stop().await;
    cluster.start_agent("2x NVIDIA A10G 23028", config(4));
    cluster.kubelet.wait_registrations(2, WAIT).await;
    let mut client = cluster.kubelet.plugin_client().await;
    let second = allocate(&mut client, cluster.ids(1, 1), "container 1").await;
    assert_eq!(visible(&second.container_responses[0]), b);
    assert_eq!(
        second.container_responses[0].envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m",
        "the partly applied pod comes first"
    );
    assert_eq!(bind_phase(&cluster, "two-step").as_deref(), Some("success"));
    assert_eq!(bind_phase(&cluster, "newer").as_deref(), Some("allocating"));
}

#[tokio::test]
async fn accepts_every_authority_real_kubelets_send() {
    let cluster = Cluster::start("1x NVIDIA A10G 23028", config(2)).await;
    let socket = cluster.kubelet.dir().join(PLUGIN_SOCKET);
    let path = socket.to_string_lossy().into_owned();
    let encoded = path.replace('/', "%2F");
    for authority in [
        path.as_bytes(),
        encoded.as_bytes(),
        b"localhost",
        b"unix",
        b"tessera-nvidia.sock",
    ] {
        let outcome = raw_h2::unary(
            &socket,
            authority,
            "/v1beta1.DevicePlugin/GetDevicePluginOptions",
            &[],
        )
        .await;
        assert_eq!(
            outcome.grpc_status().as_deref(),
            Some("0"),
            "{}: {outcome:?}",
            String::from_utf8_lossy(authority)
        );
        if let raw_h2::Outcome::Answered { body, .. } = outcome {
            // A DevicePluginOptions with get_preferred_allocation_available = true.
            assert_eq!(body, vec![0, 0, 0, 0, 2, 0x10, 0x01]);
        }
    }
}

#[tokio::test]
async fn without_the_repair_a_path_authority_is_refused() {
    // The control for the test above: a plain tonic server resets the stream.
    let temp = tempfile::tempdir().expect("tempdir");
    let socket = temp.path().join("plain.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    #[derive(Debug, Default)]
    struct Registrar;
    #[tonic::async_trait]
    impl tessera_node_agent::proto::registration_server::Registration for Registrar {
        async fn register(
            &self,
            _: tonic::Request<tessera_node_agent::proto::RegisterRequest>,
        ) -> Result<tonic::Response<Empty>, tonic::Status> {
            Ok(tonic::Response::new(Empty {}))
        }
    }
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                tessera_node_agent::proto::registration_server::RegistrationServer::new(Registrar),
            )
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let outcome = raw_h2::unary(
        &socket,
        socket.to_string_lossy().as_bytes(),
        "/v1beta1.Registration/Register",
        &[],
    )
    .await;
    assert!(matches!(outcome, raw_h2::Outcome::Reset(_)), "{outcome:?}");
    let outcome = raw_h2::unary(&socket, b"localhost", "/v1beta1.Registration/Register", &[]).await;
    assert_eq!(outcome.grpc_status().as_deref(), Some("0"));
}

/// A pod as the scheduler leaves it when an init container asks for a GPU:
/// the annotation lists the init container first, then the app container.
fn pod_with_gpu_init_container(init_card: &str, app_card: &str) -> Pod {
    let mut pod = bound_pod(
        "warmed",
        &vec![
            vec![device(init_card, 2000, 10)],
            vec![device(app_card, 6000, 50)],
        ],
    );
    let spec = pod.spec.as_mut().expect("spec");
    let mut init = spec.containers.remove(0);
    init.name = "warm-cache".into();
    init.env = Some(vec![EnvVar {
        name: "CUDA_DISABLE_CONTROL".into(),
        value: Some("true".into()),
        ..EnvVar::default()
    }]);
    spec.containers[0].name = "serve".into();
    spec.init_containers = Some(vec![init]);
    pod
}

#[tokio::test]
async fn gpu_init_container_gets_its_own_devices_and_opt_out_first() {
    let cluster = Cluster::start("2x NVIDIA A10G 23028", config(4)).await;
    let (init_card, app_card) = (cluster.card(0), cluster.card(1));
    cluster
        .api
        .insert(&pod_with_gpu_init_container(&init_card, &app_card));
    let uid = pod_of(&cluster, "warmed").metadata.uid.expect("uid");
    let mut client = cluster.kubelet.plugin_client().await;
    let has_preload = |c: &ContainerAllocateResponse| mount_at(c, PRELOAD_PATH).is_some();

    // Kubelet admits the init container first.
    let init = allocate(
        &mut client,
        cluster.ids(0, 1),
        "Allocate for the init container",
    )
    .await
    .container_responses
    .remove(0);
    assert_eq!(visible(&init), init_card);
    assert_eq!(init.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m");
    assert_eq!(init.envs["CUDA_DEVICE_SM_LIMIT"], "10");
    assert!(!has_preload(&init), "the init container opted out");
    assert!(
        shared_dir(&init).ends_with(&format!("{uid}_warm-cache")),
        "{}",
        shared_dir(&init)
    );
    assert_eq!(
        bind_phase(&cluster, "warmed").as_deref(),
        Some("allocating"),
        "the app container still waits"
    );

    // Then the app container, which did not opt out.
    let app = allocate(
        &mut client,
        cluster.ids(1, 1),
        "Allocate for the app container",
    )
    .await
    .container_responses
    .remove(0);
    assert_eq!(visible(&app), app_card);
    assert_eq!(app.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "6000m");
    assert_eq!(app.envs["CUDA_DEVICE_SM_LIMIT"], "50");
    assert!(has_preload(&app), "the app container keeps the interceptor");
    assert!(
        shared_dir(&app).ends_with(&format!("{uid}_serve")),
        "{}",
        shared_dir(&app)
    );
    assert_pod_done(&cluster, "warmed");
}

/// `GET path` over plain HTTP/1.0: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// `GET path` every 25 ms, at most `tries` times, until an answer satisfies
/// `done`: the last answer.
async fn http_get_until(
    addr: std::net::SocketAddr,
    path: &str,
    tries: usize,
    done: impl Fn(&(u16, String)) -> bool,
) -> Option<(u16, String)> {
    let mut answer = None;
    for _ in 0..tries {
        answer = http_get(addr, path).await;
        if answer.as_ref().is_some_and(&done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    answer
}

#[tokio::test]
async fn probes_report_alive_at_once_and_ready_after_registration_and_inventory() {
    let api = ApiServer::start().await.expect("API stand-in");
    api.insert(&node_object());
    let temp = tempfile::tempdir().expect("tempdir");
    let kubelet_dir = temp.path().join("kubelet");
    std::fs::create_dir_all(&kubelet_dir).expect("dir");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let gpus =
        tessera_node_agent::gpu::fake::FakeGpus::parse("1x NVIDIA A10G 23028", NODE).expect("fake");
    let setup = tessera_node_agent::agent::AgentSetup {
        metrics_addr: Some(addr),
        ..tessera_node_agent::testing::fake_agent_setup(
            NODE,
            &gpus,
            api.client(),
            &temp.path().join("host"),
            kubelet_dir.join("kubelet.sock"),
        )
    };
    let agent = RunningAgent::spawn(&gpus, setup);

    // No kubelet yet: alive, not ready, and it says why.
    let healthz = http_get_until(addr, "/healthz", 200, |_| true).await;
    assert_eq!(healthz, Some((200, "ok".to_owned())));
    let (status, body) = http_get(addr, "/readyz").await.expect("readyz answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not registered with kubelet"), "{body}");

    // Kubelet comes up: the agent registers, publishes, and turns ready.
    let kubelet = KubeletStandIn::start(&kubelet_dir);
    kubelet.wait_registrations(1, WAIT).await;
    let ready = http_get_until(addr, "/readyz", 400, |(status, _)| *status == 200).await;
    assert_eq!(ready, Some((200, "ok".to_owned())));
    assert!(
        inventory_annotation(&api).is_some(),
        "ready only after the inventory is on the Node"
    );
    let (status, metrics) = http_get(addr, "/metrics").await.expect("metrics answer");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("hami_host_gpu_memory_used_bytes"),
        "{metrics}"
    );
    agent.stop().await;
}
