//! Integration tests of the API server stand-in, driven through the real
//! kube-rs client: CRUD, patches, optimistic concurrency, watches, binding,
//! the status subresource, pod spec immutability, selectors and fault
//! injection.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::events::v1::Event as EventsV1;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{json, Value};
use tessera_testkit::ApiServer;

const WAIT: Duration = Duration::from_secs(10);

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "demo"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .unwrap()
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"capacity": {"cpu": "4"}}
    }))
    .unwrap()
}

fn binding(pod: &str, node: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod, "annotations": annotations},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}
    })
}

/// The HTTP status and reason of a kube API error; panics on anything else.
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv_of(pod: &Pod) -> u64 {
    pod.metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

async fn bind(api: &Api<Pod>, pod: &str, node: &str, annotations: Value) -> kube::Result<Value> {
    api.create_subresource(
        "binding",
        pod,
        &PostParams::default(),
        &binding(pod, node, annotations),
    )
    .await
}

/// Every event of a watch until the server ends it; fails if it does not end.
async fn collect_watch(api: &Api<Pod>, params: &WatchParams, rv: &str) -> Vec<WatchEvent<Pod>> {
    let stream = api.watch(params, rv).await.unwrap();
    tokio::time::timeout(WAIT, stream.try_collect())
        .await
        .expect("the watch ends by itself")
        .unwrap()
}

#[tokio::test]
async fn create_get_list_delete_pods() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");

    let created = pods
        .create(&PostParams::default(), &pod("a"))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert!(meta.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(rv_of(&created), server.resource_version());
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));

    let (code, reason) = api_error(pods.create(&PostParams::default(), &pod("a")).await);
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let mut generated = pod("");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = pods
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let generated_name = generated.metadata.name.unwrap();
    assert!(generated_name.starts_with("gen-") && generated_name.len() > 4);

    let fetched = pods.get("a").await.unwrap();
    assert_eq!(fetched.metadata.uid, created.metadata.uid);

    let list = pods.list(&ListParams::default()).await.unwrap();
    let mut names: Vec<_> = list
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a".to_owned(), generated_name]);
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    let deleted = pods.delete("a", &DeleteParams::default()).await.unwrap();
    let deleted = deleted.left().expect("delete returns the object");
    assert_eq!(deleted.metadata.name.as_deref(), Some("a"));
    let (code, reason) = api_error(pods.get("a").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let (code, _) = api_error(pods.delete("a", &DeleteParams::default()).await);
    assert_eq!(code, 404);
    assert!(server.get::<Pod>(Some("default"), "a").is_none());
}

#[tokio::test]
async fn merge_and_json_patches() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let created = pods
        .create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();

    let merge = json!({"metadata": {"labels": {"tier": "gpu", "app": null}}});
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap();
    let labels = patched.metadata.labels.clone().unwrap();
    assert_eq!(
        labels,
        BTreeMap::from([("tier".to_owned(), "gpu".to_owned())])
    );
    assert!(rv_of(&patched) > rv_of(&created));

    // A merge patch carrying a stale resourceVersion is a failed precondition.
    let stale = json!({"metadata": {"resourceVersion": created.metadata.resource_version, "labels": {"x": "y"}}});
    let (code, reason) = api_error(
        pods.patch("p", &PatchParams::default(), &Patch::Merge(&stale))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/tier", "value": "gpu"},
        {"op": "add", "path": "/metadata/annotations", "value": {"k": "v"}}
    ]))
    .unwrap();
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .unwrap();
    assert_eq!(patched.metadata.annotations.unwrap()["k"], "v");

    let failing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/tier", "value": "cpu"},
        {"op": "add", "path": "/metadata/labels/z", "value": "z"}
    ]))
    .unwrap();
    let (code, _) = api_error(
        pods.patch("p", &PatchParams::default(), &Patch::<()>::Json(failing))
            .await,
    );
    assert_eq!(code, 422);
    let stored = pods.get("p").await.unwrap();
    assert!(
        !stored.metadata.labels.unwrap().contains_key("z"),
        "a failed JSON patch changes nothing"
    );

    // Server-side apply creates missing objects and merges into existing ones.
    let applied = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q", "labels": {"a": "1"}}, "spec": {"containers": []}});
    let params = PatchParams::apply("test");
    pods.patch("q", &params, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(
        server
            .get::<Pod>(Some("default"), "q")
            .unwrap()
            .metadata
            .labels
            .unwrap()["a"],
        "1"
    );

    let (code, _) = api_error(
        pods.patch("missing", &PatchParams::default(), &Patch::Merge(&merge))
            .await,
    );
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_pods_spec_changes_only_where_a_real_server_allows() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    pods.create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    // Its scheduler (what Tessera's adoption of pre-install pods relies on),
    // node and resources are fixed at creation.
    for change in [
        json!({"spec": {"schedulerName": "hami-scheduler"}}),
        json!({"spec": {"nodeName": "n1"}}),
    ] {
        let (code, reason) = api_error(
            pods.patch("p", &PatchParams::default(), &Patch::Merge(&change))
                .await,
        );
        assert_eq!((code, reason.as_str()), (422, "Invalid"), "{change}");
    }
    let mut replaced = pods.get("p").await.unwrap();
    if let Some(spec) = replaced.spec.as_mut() {
        spec.containers[0].resources =
            serde_json::from_value(json!({"limits": {"nvidia.com/gpumem": "1000"}})).unwrap();
    }
    let (code, _) = api_error(pods.replace("p", &PostParams::default(), &replaced).await);
    assert_eq!(code, 422);
    // An image may change.
    let image = json!({"spec": {"containers": [{"name": "main", "image": "busybox:2"}]}});
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Merge(&image))
        .await
        .unwrap();
    assert_eq!(
        patched.spec.unwrap().containers[0].image.as_deref(),
        Some("busybox:2")
    );
}

#[tokio::test]
async fn replace_with_stale_resource_version_conflicts() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let first = pods
        .create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();

    let mut update = first.clone();
    update.metadata.labels = Some(BTreeMap::from([("v".to_owned(), "2".to_owned())]));
    let second = pods
        .replace("p", &PostParams::default(), &update)
        .await
        .unwrap();
    assert!(rv_of(&second) > rv_of(&first));

    // Replaying the write based on the old version must fail.
    let (code, reason) = api_error(pods.replace("p", &PostParams::default(), &update).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    // Without a resourceVersion the update is unconditional.
    let mut unconditional = second.clone();
    unconditional.metadata.resource_version = None;
    unconditional.metadata.labels = Some(BTreeMap::from([("v".to_owned(), "3".to_owned())]));
    let third = pods
        .replace("p", &PostParams::default(), &unconditional)
        .await
        .unwrap();
    assert_eq!(third.metadata.labels.unwrap()["v"], "3");
    assert_eq!(
        third.metadata.uid, first.metadata.uid,
        "identity survives a replace"
    );
}

#[tokio::test]
async fn watcher_sees_add_modify_delete() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    server.insert(&pod("before"));

    let mut events = watcher(pods.clone(), watcher::Config::default()).boxed();
    // The initial list: Init, InitApply(before), InitDone.
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(p) => initial.push(p.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(initial, vec!["before"]);

    pods.create(&PostParams::default(), &pod("live"))
        .await
        .unwrap();
    let merge = json!({"metadata": {"labels": {"changed": "yes"}}});
    pods.patch("live", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap();
    pods.delete("live", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Apply(p) => {
                let changed = p
                    .metadata
                    .labels
                    .unwrap_or_default()
                    .contains_key("changed");
                seen.push(if changed { "modified" } else { "added" });
            }
            watcher::Event::Delete(p) => {
                assert_eq!(p.metadata.name.as_deref(), Some("live"));
                seen.push("deleted");
            }
            _ => {}
        }
    }
    assert_eq!(seen, ["added", "modified", "deleted"]);
}

#[tokio::test]
async fn watch_replays_history_and_honours_selectors() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    pods.create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    let start = server.resource_version().to_string();
    pods.create(&PostParams::default(), &pod("q"))
        .await
        .unwrap();
    bind(&pods, "p", "n1", json!({})).await.unwrap();
    pods.delete("q", &DeleteParams::default()).await.unwrap();

    // Everything after `start`, already in the past, then the stream ends on its timeout.
    let all = collect_watch(&pods, &WatchParams::default().timeout(1), &start).await;
    let summary: Vec<(String, String)> = all
        .iter()
        .map(|e| match e {
            WatchEvent::Added(p) => ("ADDED".into(), p.metadata.name.clone().unwrap()),
            WatchEvent::Modified(p) => ("MODIFIED".into(), p.metadata.name.clone().unwrap()),
            WatchEvent::Deleted(p) => ("DELETED".into(), p.metadata.name.clone().unwrap()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let expect = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        summary,
        expect(&[("ADDED", "q"), ("MODIFIED", "p"), ("DELETED", "q")])
    );

    // An unscheduled-pods watch sees the bound pod leave its selection.
    let unscheduled = WatchParams::default().fields("spec.nodeName=").timeout(1);
    let events = collect_watch(&pods, &unscheduled, &start).await;
    let kinds: Vec<_> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p) => {
                let kind = match e {
                    WatchEvent::Added(_) => "ADDED",
                    WatchEvent::Modified(_) => "MODIFIED",
                    _ => "DELETED",
                };
                (kind.to_owned(), p.metadata.name.clone().unwrap())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        expect(&[("ADDED", "q"), ("DELETED", "p"), ("DELETED", "q")])
    );

    // rv "0" starts from now with the current objects as ADDED.
    let from_now = collect_watch(&pods, &WatchParams::default().timeout(1), "0").await;
    assert!(
        matches!(from_now.as_slice(), [WatchEvent::Added(p)] if p.metadata.name.as_deref() == Some("p"))
    );
}

#[tokio::test]
async fn binding_sets_node_copies_annotations_and_refuses_rebinding() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    pods.create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    let before = server.resource_version();

    let status = bind(
        &pods,
        "p",
        "gpu-node-1",
        json!({"hami.io/vgpu-devices-allocated": "GPU-1,NVIDIA,7500,30:;"}),
    )
    .await
    .unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["status"], "Success");

    let bound = pods.get("p").await.unwrap();
    assert_eq!(
        bound.spec.as_ref().unwrap().node_name.as_deref(),
        Some("gpu-node-1")
    );
    let annotations = bound.metadata.annotations.clone().unwrap();
    assert_eq!(
        annotations["hami.io/vgpu-devices-allocated"],
        "GPU-1,NVIDIA,7500,30:;"
    );
    let conditions = bound.status.clone().unwrap().conditions.unwrap();
    assert!(conditions
        .iter()
        .any(|c| c.type_ == "PodScheduled" && c.status == "True"));
    assert_eq!(rv_of(&bound), before + 1);

    let (code, reason) = api_error(bind(&pods, "p", "gpu-node-2", json!({})).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        pods.get("p")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .as_deref(),
        Some("gpu-node-1"),
        "a refused binding changes nothing"
    );

    let (code, _) = api_error(bind(&pods, "missing", "gpu-node-1", json!({})).await);
    assert_eq!(code, 404);
    assert_eq!(server.write_count("POST", "pods/binding"), 3);
}

#[tokio::test]
async fn node_status_subresource_is_separate_from_the_main_resource() {
    let server = ApiServer::start().await.unwrap();
    let nodes: Api<Node> = Api::all(server.client());
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();

    // Status writes change only .status.
    let status_patch = json!({
        "metadata": {"labels": {"ignored": "yes"}},
        "status": {"capacity": {"cpu": "8", "nvidia.com/gpu": "2"}}
    });
    let patched = nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(&status_patch))
        .await
        .unwrap();
    let capacity = patched.status.clone().unwrap().capacity.unwrap();
    assert_eq!(capacity["nvidia.com/gpu"].0, "2");
    assert!(patched.metadata.labels.unwrap_or_default().is_empty());

    // Main-resource writes keep the stored status.
    let main_patch =
        json!({"metadata": {"labels": {"gpu": "true"}}, "status": {"capacity": {"cpu": "1"}}});
    let patched = nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&main_patch))
        .await
        .unwrap();
    assert_eq!(patched.metadata.labels.unwrap()["gpu"], "true");
    assert_eq!(patched.status.unwrap().capacity.unwrap()["cpu"].0, "8");

    let mut replaced = nodes.get("n1").await.unwrap();
    replaced.status = None;
    let replaced = nodes
        .replace("n1", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(replaced.status.unwrap().capacity.unwrap()["cpu"].0, "8");

    assert_eq!(server.write_count("PATCH", "nodes/status"), 1);
    assert_eq!(server.write_count("PATCH", "nodes"), 1);
}

#[tokio::test]
async fn field_and_label_selectors_filter_lists() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client();
    for (ns, name, node, app) in [
        ("a", "p1", "n1", "x"),
        ("b", "p2", "n1", "y"),
        ("a", "p3", "n2", "x"),
        ("b", "p4", "", "y"),
    ] {
        let mut p = pod(name);
        p.metadata.labels = Some(BTreeMap::from([("app".to_owned(), app.to_owned())]));
        if !node.is_empty() {
            p.spec.as_mut().unwrap().node_name = Some(node.to_owned());
        }
        Api::<Pod>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &p)
            .await
            .unwrap();
    }
    let names = |list: kube::core::ObjectList<Pod>| {
        let mut n: Vec<_> = list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        n.sort();
        n
    };
    let all: Api<Pod> = Api::all(client.clone());
    let on_n1 = all
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(names(on_n1), ["p1", "p2"]);
    let unbound = all
        .list(&ListParams::default().fields("spec.nodeName="))
        .await
        .unwrap();
    assert_eq!(names(unbound), ["p4"]);
    let bound_in_a = all
        .list(&ListParams::default().fields("spec.nodeName!=,metadata.namespace=a"))
        .await
        .unwrap();
    assert_eq!(names(bound_in_a), ["p1", "p3"]);
    let labelled = all
        .list(&ListParams::default().labels("app in (y),app!=x"))
        .await
        .unwrap();
    assert_eq!(names(labelled), ["p2", "p4"]);
    let in_b = Api::<Pod>::namespaced(client.clone(), "b")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(names(in_b), ["p2", "p4"]);

    let (code, _) = api_error(
        all.list(&ListParams::default().fields("spec.bogus=1"))
            .await,
    );
    assert_eq!(code, 400);
}

#[tokio::test]
async fn injected_faults_fail_then_clear() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    pods.create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();

    server.fail_next("POST", "pods/binding", 500, 1);
    server.fail_next("*", "pods", 409, 1);
    let (code, reason) = api_error(bind(&pods, "p", "n1", json!({})).await);
    assert_eq!((code, reason.as_str()), (500, "InternalError"));
    assert!(server
        .get::<Pod>(Some("default"), "p")
        .unwrap()
        .spec
        .unwrap()
        .node_name
        .is_none());

    let (code, _) = api_error(pods.get("p").await);
    assert_eq!(code, 409, "the second fault matches any method on pods");
    pods.get("p").await.unwrap();

    bind(&pods, "p", "n1", json!({})).await.unwrap();
    assert_eq!(server.write_count("POST", "pods/binding"), 2);
    let counts = server.write_counts();
    assert_eq!(counts[&("POST".to_owned(), "pods".to_owned())], 1);
    let failed: Vec<u16> = server.writes().iter().map(|r| r.status).collect();
    assert_eq!(failed, [201, 500, 201]);
}

#[tokio::test]
async fn group_resources_and_cluster_scoped_objects() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client();

    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let lease = serde_json::from_value(
        json!({"metadata": {"name": "tessera-scheduler"}, "spec": {"holderIdentity": "a"}}),
    )
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let stored = server
        .get_value(
            "coordination.k8s.io/v1",
            "leases",
            Some("kube-system"),
            "tessera-scheduler",
        )
        .unwrap();
    assert_eq!(
        (stored["apiVersion"].as_str(), stored["kind"].as_str()),
        (Some("coordination.k8s.io/v1"), Some("Lease"))
    );

    let events: Api<EventsV1> = Api::namespaced(client.clone(), "default");
    let event = serde_json::from_value(json!({"metadata": {"name": "e1"}, "eventTime": "2025-01-01T00:00:00.000000Z", "reason": "Scheduled"})).unwrap();
    events.create(&PostParams::default(), &event).await.unwrap();
    assert_eq!(
        server.list_values("events.k8s.io/v1", "events", None).len(),
        1
    );
    assert!(server.list_values("v1", "events", None).is_empty());

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": "gpu-jobs"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(
        namespaces
            .get("gpu-jobs")
            .await
            .unwrap()
            .metadata
            .name
            .as_deref(),
        Some("gpu-jobs")
    );

    // Typed hooks.
    server.insert(&node("hooked"));
    let nodes: Api<Node> = Api::all(client);
    assert_eq!(
        nodes
            .get("hooked")
            .await
            .unwrap()
            .status
            .unwrap()
            .capacity
            .unwrap()["cpu"]
            .0,
        "4"
    );
    assert_eq!(server.list::<Node>().len(), 1);
    assert!(server.delete_value("v1", "nodes", None, "hooked").is_some());
    assert_eq!(api_error(nodes.get("hooked").await).0, 404);
}

#[tokio::test]
async fn malformed_requests_get_status_errors() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client();
    let request = |method: &str, path: &str, body: &str| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(body.as_bytes().to_vec())
            .unwrap()
    };
    let bad_json = client
        .request::<Value>(request(
            "POST",
            "/api/v1/namespaces/default/pods",
            "{not json",
        ))
        .await;
    assert_eq!(api_error(bad_json), (400, "BadRequest".to_owned()));
    let no_name = client
        .request::<Value>(request(
            "POST",
            "/api/v1/namespaces/default/pods",
            "{\"metadata\":{}}",
        ))
        .await;
    assert_eq!(api_error(no_name).0, 422);
    let bad_rv = client
        .request::<Value>(request(
            "GET",
            "/api/v1/pods?watch=true&resourceVersion=abc",
            "",
        ))
        .await;
    assert_eq!(api_error(bad_rv).0, 400);
    let unknown = client
        .request::<Value>(request("GET", "/nothing/here", ""))
        .await;
    assert_eq!(api_error(unknown).0, 404);
    assert!(server.list_values("v1", "pods", None).is_empty());
}

#[tokio::test]
async fn dropping_the_server_ends_open_watches() {
    let server = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let mut stream = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    server.insert(&pod("p"));
    let first = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first, Some(WatchEvent::Added(_))));
    drop(server);
    let end = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .expect("the watch ends when the server is dropped");
    assert!(matches!(end, Ok(None)), "got {end:?}");
}

#[tokio::test]
async fn eviction_respects_pod_disruption_budgets() {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let server = ApiServer::start().await.expect("server");
    let running = |name: &str, app: &str| -> Value {
        json!({"metadata": {"name": name, "namespace": "ml", "labels": {"app": app}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running"}})
    };
    for (name, app) in [("db-0", "db"), ("db-1", "db"), ("web-0", "web")] {
        server.insert_value("v1", "pods", running(name, app));
    }
    server.insert_value("policy/v1", "poddisruptionbudgets", json!({"metadata": {"name": "db", "namespace": "ml"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "minAvailable": 1},
        "status": {"disruptionsAllowed": 1, "currentHealthy": 2, "desiredHealthy": 1, "expectedPods": 2}}));
    // kube-rs retries 429 with backoff for minutes by default; see the
    // stand-in's own answer at once.
    let mut config = kube::Config::new(server.url().parse().expect("url"));
    config.default_retry = false;
    let client = kube::Client::try_from(config).expect("client");
    let pods: Api<Pod> = Api::namespaced(client, "ml");
    // Allowed once: the pod goes and the budget is spent.
    pods.evict("db-0", &kube::api::EvictParams::default())
        .await
        .expect("first eviction allowed");
    assert!(server.get::<Pod>(Some("ml"), "db-0").is_none());
    let budget = server
        .get::<PodDisruptionBudget>(Some("ml"), "db")
        .expect("budget");
    assert_eq!(budget.status.expect("status").disruptions_allowed, 0);
    // Then refused with 429.
    match pods.evict("db-1", &kube::api::EvictParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 429, "{status:?}"),
        other => panic!("expected 429, got {other:?}"),
    }
    assert!(server.get::<Pod>(Some("ml"), "db-1").is_some());
    // A pod no budget selects goes at once; a missing one is 404.
    pods.evict("web-0", &kube::api::EvictParams::default())
        .await
        .expect("unprotected");
    assert!(matches!(
        pods.evict("nope", &kube::api::EvictParams::default()).await,
        Err(kube::Error::Api(status)) if status.code == 404
    ));
    // A pod that is not running is not protected.
    let mut pending = running("db-2", "db");
    pending["status"] = json!({"phase": "Pending"});
    server.insert_value("v1", "pods", pending);
    pods.evict("db-2", &kube::api::EvictParams::default())
        .await
        .expect("not running: budgets not consulted");
}
