#!/usr/bin/env python3
"""Cross-checks manifests/admission-policies.yaml with a second CEL
implementation, Google's cel-cpp (through the cel-expr-python wheel): every
expression compiles with dyn inputs, as the API server's runtime declares
them, and sample requests get the verdicts that testkit/tests/manifests.rs
expects from the Rust `cel` interpreter. Not run in CI (it needs the wheel);
run it after editing the policies:

    python3 -m venv /tmp/celpy && /tmp/celpy/bin/pip install cel-expr-python pyyaml
    /tmp/celpy/bin/python hack/check-admission-policies-cel.py manifests/admission-policies.yaml

Prints one line per case and `N passed, N failed`; exits 1 on a failure.
"""
import sys, yaml
from cel_expr_python import cel

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
env = cel.NewEnv(variables={n: cel.Type.DYN for n in ["object", "oldObject", "request", "variables"]})

def run(expr, data):
    r = env.compile(expr).eval(data=data)
    v = r.plain_value()
    assert isinstance(v, (bool, list, str, dict)), (expr, r.type(), v)
    return v

def verdict(policy, op, resource, user, obj, old=None):
    spec = policy["spec"]
    sub = resource.split("/", 1)[1] if "/" in resource else ""
    data = {"object": obj, "oldObject": old,
            "request": {"operation": op, "subResource": sub, "userInfo": {"username": user}}}
    for c in spec.get("matchConditions", []):
        if not run(c["expression"], data):
            return "NotMatched"
    variables = {}
    for v in spec.get("variables", []):
        data["variables"] = dict(variables)
        variables[v["name"]] = run(v["expression"], data)
    data["variables"] = variables
    for v in spec["validations"]:
        if not run(v["expression"], data):
            return "Denied: " + run(v["messageExpression"], data)
    return "Allowed"

for name, p in policies.items():
    exprs = [c["expression"] for c in p["spec"].get("matchConditions", [])]
    exprs += [v["expression"] for v in p["spec"].get("variables", [])]
    exprs += [x for v in p["spec"]["validations"] for x in (v["expression"], v["messageExpression"])]
    for e in exprs:
        env.compile(e)
    print(f"{name}: {len(exprs)} expressions compile")

def pod(annotations=None, spec=None):
    p = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ml-team"},
         "spec": {"containers": [{"name": "trainer", "image": "x"}]}}
    if annotations is not None:
        p["metadata"]["annotations"] = annotations
    if spec:
        p["spec"].update(spec)
    return p

a = policies["tessera-allocation-annotations"]
sched = "system:serviceaccount:tessera-system:tessera-scheduler"
bound = pod({"hami.io/vgpu-node": "n1", "hami.io/bind-phase": "allocating", "team": "ml"})
cases = [
    (a, "CREATE", "pods", "jane", pod({"hami.io/vgpu-node": "n1"}), None, "Denied"),
    (a, "CREATE", "pods", "jane", pod({"tessera.io/x": "1"}), None, "Denied"),
    (a, "CREATE", "pods", "jane", pod({"team": "ml"}), None, "Allowed"),
    (a, "CREATE", "pods", "jane", pod(), None, "Allowed"),
    (a, "UPDATE", "pods", "jane", pod({"hami.io/vgpu-node": "n1", "team": "ml"}), bound, "Denied"),
    (a, "UPDATE", "pods", "jane", pod({"hami.io/vgpu-node": "n2", "hami.io/bind-phase": "allocating", "team": "ml"}), bound, "Denied"),
    (a, "UPDATE", "pods", "jane", pod({"hami.io/vgpu-node": "n1", "hami.io/bind-phase": "allocating", "team": "x"}), bound, "Allowed"),
    (a, "UPDATE", "pods", sched, pod({"hami.io/vgpu-node": "n2"}), bound, "NotMatched"),
    (a, "CREATE", "pods/binding", "jane", {"kind": "Binding", "metadata": {"name": "p", "annotations": {"hami.io/vgpu-node": "n"}}, "target": {"name": "n"}}, None, "Denied"),
    (a, "CREATE", "pods/binding", "jane", {"kind": "Binding", "metadata": {"name": "p"}, "target": {"name": "n"}}, None, "Allowed"),
]
n = policies["tessera-nvidia-env"]
env_all = [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]
cases += [
    (n, "CREATE", "pods", "jane", pod(spec={"containers": [{"name": "c", "env": env_all}]}), None, "Denied"),
    (n, "CREATE", "pods", "jane", pod(spec={"initContainers": [{"name": "i", "env": [{"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "all"}]}]}), None, "Denied"),
    (n, "UPDATE", "pods/ephemeralcontainers", "jane", pod(spec={"ephemeralContainers": [{"name": "e", "env": env_all}]}), pod(), "Denied"),
    (n, "CREATE", "pods", "jane", pod(spec={"containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/var/run/nvidia-container-devices/all"}]}]}), None, "Denied"),
    (n, "CREATE", "pods", "jane", pod(spec={"containers": [{"name": "c", "env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0"}], "volumeMounts": [{"name": "v", "mountPath": "/var/run/nvidia-container-devices-x"}]}]}), None, "Allowed"),
    (n, "CREATE", "pods", "jane", pod(), None, "Allowed"),
]
o = policies["tessera-scheduler-requires-webhook"]
def labelled(labels, scheduler):
    p = pod()
    if labels is not None:
        p["metadata"]["labels"] = labels
    if scheduler:
        p["spec"]["schedulerName"] = scheduler
    return p
cases += [
    (o, "CREATE", "pods", "jane", labelled({"hami.io/webhook": "ignore"}, "tessera-scheduler"), None, "Denied"),
    (o, "CREATE", "pods", "jane", labelled({"hami.io/webhook": "ignore"}, None), None, "Allowed"),
    (o, "CREATE", "pods", "jane", labelled({"app": "x"}, "tessera-scheduler"), None, "Allowed"),
    (o, "CREATE", "pods", "jane", labelled(None, "tessera-scheduler"), None, "Allowed"),
]
failed = 0
for policy, op, res, user, obj, old, want in cases:
    got = verdict(policy, op, res, user, obj, old)
    ok = got.startswith(want)
    failed += not ok
    print(("ok  " if ok else "BAD ") + f"{policy['metadata']['name']} {op} {res} {user}: {got[:150]}")
print(f"{len(cases) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
