//! The API server's rule for updates of a pod's spec (`ValidatePodUpdate`):
//! once created, a pod's spec is immutable but for container and init
//! container images, `activeDeadlineSeconds`, additions to `tolerations`,
//! `terminationGracePeriodSeconds` and removals from `schedulingGates`;
//! `nodeName` is set only through the binding subresource. Anything else
//! (`schedulerName`, resources, the node, new gates) is refused with 422
//! `Invalid`, as a real server refuses it, so tests cannot lean on a pod
//! spec changing under a component's feet the way no real cluster allows.

use serde_json::Value;

use super::store::ApiError;

const FORBIDDEN: &str = "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

/// Refuses an update of pod `name` from spec `old` to spec `new` that a
/// real API server refuses.
pub(crate) fn check(name: &str, old: Option<&Value>, new: Option<&Value>) -> Result<(), ApiError> {
    let invalid = |what: &str| ApiError::invalid(format!("Pod \"{name}\" is invalid: {what}"));
    let (old, new) = (
        old.cloned().unwrap_or_default(),
        new.cloned().unwrap_or_default(),
    );
    let list = |spec: &Value, field: &str| -> Vec<Value> {
        spec.get(field)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (old_gates, new_gates) = (list(&old, "schedulingGates"), list(&new, "schedulingGates"));
    if new_gates.iter().any(|gate| !old_gates.contains(gate)) {
        return Err(invalid(
            "spec.schedulingGates: Forbidden: only deletion is allowed, but found new scheduling gate",
        ));
    }
    let (old_tolerations, new_tolerations) = (list(&old, "tolerations"), list(&new, "tolerations"));
    if old_tolerations.iter().any(|t| !new_tolerations.contains(t)) {
        return Err(invalid(FORBIDDEN));
    }
    if without_mutable(old) != without_mutable(new) {
        return Err(invalid(FORBIDDEN));
    }
    Ok(())
}

/// The spec with the fields an update may change taken out.
fn without_mutable(mut spec: Value) -> Value {
    if let Some(fields) = spec.as_object_mut() {
        for field in [
            "activeDeadlineSeconds",
            "tolerations",
            "terminationGracePeriodSeconds",
            "schedulingGates",
        ] {
            fields.remove(field);
        }
        for list in ["containers", "initContainers"] {
            if let Some(containers) = fields.get_mut(list).and_then(Value::as_array_mut) {
                for container in containers {
                    if let Some(c) = container.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra: Value) -> Value {
        let mut spec = json!({"schedulerName": "hami-scheduler", "nodeName": "n1",
            "containers": [{"name": "main", "image": "a:1"}],
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "schedulingGates": [{"name": "a"}, {"name": "b"}]});
        for (k, v) in extra.as_object().expect("object") {
            spec[k] = v.clone();
        }
        spec
    }

    fn refused(extra: Value) -> bool {
        check("p", Some(&spec(json!({}))), Some(&spec(extra))).is_err()
    }

    #[test]
    fn only_what_a_real_server_allows_changes() {
        // Allowed: images, gates removed, tolerations added, deadlines.
        assert!(!refused(
            json!({"containers": [{"name": "main", "image": "a:2"}]})
        ));
        assert!(!refused(json!({"schedulingGates": [{"name": "b"}]})));
        assert!(!refused(json!({"tolerations": [
            {"key": "gpu", "operator": "Exists"}, {"key": "x", "operator": "Exists"}]})));
        assert!(!refused(json!({"activeDeadlineSeconds": 60})));
        // Refused: the scheduler, the node, resources, new gates, tolerations removed.
        assert!(refused(json!({"schedulerName": "tessera-scheduler"})));
        assert!(refused(json!({"nodeName": "n2"})));
        assert!(refused(
            json!({"containers": [{"name": "main", "image": "a:1",
            "resources": {"limits": {"nvidia.com/gpumem": "1"}}}]})
        ));
        assert!(refused(
            json!({"schedulingGates": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
        ));
        assert!(refused(json!({"tolerations": []})));
        let error = check(
            "p",
            Some(&spec(json!({}))),
            Some(&spec(json!({"schedulerName": "x"}))),
        )
        .expect_err("refused");
        assert_eq!(error.code, 422);
        assert!(
            error
                .message
                .starts_with("Pod \"p\" is invalid: spec: Forbidden"),
            "{}",
            error.message
        );
    }
}
