"""Checks the manifests of deploy/k8s/ (tests/tests/k8s.rs runs it; so can an operator who
edits them): every object against its schema, and what the schemas cannot see.

  python deploy/k8s/validate.py --defaults DEFAULTS.toml [MANIFEST.yaml ...]

DEFAULTS.toml is `dancegrpo-coordinator config --print-defaults` (the job config's keys); the
manifests default to every *.yaml beside this file, and must include coordinator.yaml, since
the worker manifests are checked against it. Prints one line per object and every problem,
and exits 1 if there is any.

Schemas: core, apps and batch kinds against Kubernetes' own JSON schemas (the
kubernetes-validate package, strict: an unknown field is an error), for every Kubernetes
version in K8S_VERSIONS. PyTorchJob strictly against the models of the Kubeflow training SDK
(kubeflow-training: each model's openapi_types and attribute_map), recursively. Volcano Job
and AscendJob: no registry package publishes their schema, so their top level is checked
against the small schemas below; in every case the pod templates are checked against
Kubernetes' PodTemplateSpec.

Semantics: each variable a container sets is one its program reads (the binaries' clap `env`
names and constants, read from their sources; the job config's keys as DANCEGRPO_<KEY>, on the
coordinator only; deploy/k8s/node.sh's; the CANN/HCCL ones deploy/launch.sh exports); the
probes use the gRPC health service on the port the coordinator listens on, with a service
name it reports SERVING; ports, names and sizes agree across manifests; ranks come from the pod
index; accelerators are requested under their device plugins' resource names.
"""

import argparse
import glob
import os
import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The oldest Kubernetes these manifests support (gRPC probes are GA from 1.27, the Job's
# completion-index annotation from 1.21), and the newest the schema package has.
K8S_VERSIONS = ["1.28", "1.37"]
ACCELERATORS = {"cuda": "nvidia.com/gpu", "npu": "huawei.com/Ascend910"}
NODE_SH = "/opt/dancegrpo/deploy/k8s/node.sh"

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ---- what the programs read, from their sources ------------------------------------------

def env_names(*patterns):
    names = set()
    for pat in patterns:
        for path in glob.glob(os.path.join(ROOT, pat), recursive=True):
            text = open(path, encoding="utf-8").read()
            names |= set(re.findall(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"', text))
            names |= set(re.findall(r'env::var(?:_os)?\("([A-Z][A-Z0-9_]*)"\)', text))
            names |= set(re.findall(r'const \w*ENV: &str = "([A-Z][A-Z0-9_]*)"', text))
    return names


def process_env():
    text = read("coordinator/src/config.rs")
    block = re.search(r"const PROCESS_ENV: &\[&str\] = &\[(.*?)\];", text, re.S)
    return {"DANCEGRPO_" + k.upper() for k in re.findall(r'"([a-z_]+)"', block.group(1))}


def healthy_services():
    """Service names the coordinator's health service reports SERVING ("" is the server)."""
    server = read("coordinator/src/server.rs")
    names = {""}
    for proto in glob.glob(os.path.join(ROOT, "proto/dancegrpo/v1/*.proto")):
        text = open(proto, encoding="utf-8").read()
        package = re.search(r"^package ([\w.]+);", text, re.M).group(1)
        for svc in re.findall(r"^service (\w+)", text, re.M):
            snake = re.sub(r"(?<!^)([A-Z])", r"_\1", svc).lower()
            if f"set_serving::<pb::{snake}_server::{svc}Server" in server:
                names.add(f"{package}.{svc}")
    return names


def script_env(rel):
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", read(rel)))


def launch_npu_env():
    text = read("deploy/launch.sh")
    npu = text[text.index("  npu)"):text.index("  cuda)")]
    return set(re.findall(r"export ([A-Z][A-Z0-9_]*)=", npu))


# ---- schemas ------------------------------------------------------------------------------

def k8s(doc, where):
    for v in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            problem(where, f"Kubernetes {v} schema: {path}: {e.message}")
            return
        except kubernetes_validate.SchemaNotFoundError as e:
            problem(where, e.message)
            return


def pod_template(tpl, where):
    if not isinstance(tpl, dict):
        problem(where, "pod template is not an object")
        return
    k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl},
        where)


def kubeflow(value, type_name, where):
    """Strict check of `value` against a Kubeflow training SDK model type, recursively."""
    import kubeflow.training.models as models

    if type_name == "V1PodTemplateSpec":
        pod_template(value, where)
        return
    if type_name == "V1ObjectMeta":
        k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": value}, where)
        return
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        if not isinstance(value, dict):
            problem(where, f"expected a map, got {value!r}")
            return
        for k, v in value.items():
            kubeflow(v, m.group(1), f"{where}.{k}")
        return
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            problem(where, f"expected a list, got {value!r}")
            return
        for i, v in enumerate(value):
            kubeflow(v, m.group(1), f"{where}[{i}]")
        return
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in scalars:
        ok = isinstance(value, scalars[type_name]) and not (
            type_name == "int" and isinstance(value, bool))
        if not ok:
            problem(where, f"expected {type_name}, got {value!r}")
        return
    if type_name.startswith("V1"):
        problem(where, f"no check for Kubernetes type {type_name}")
        return
    cls = getattr(models, type_name)
    if not isinstance(value, dict):
        problem(where, f"expected a {type_name} object, got {value!r}")
        return
    by_json = {j: a for a, j in cls.attribute_map.items()}
    kwargs = {}
    for key, v in value.items():
        if key not in by_json:
            problem(where, f"unknown field `{key}` of {type_name} (fields: "
                    f"{', '.join(sorted(by_json))})")
            continue
        kubeflow(v, cls.openapi_types[by_json[key]], f"{where}.{key}")
        kwargs[by_json[key]] = v
    try:
        # The generated setters refuse a missing required field.
        cls(**kwargs)
    except ValueError as e:
        problem(where, f"{type_name}: {e}")


def obj(props, required=()):
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": False}


INT = {"type": "integer"}
STR = {"type": "string"}
TEMPLATE = {"type": "object"}  # checked against PodTemplateSpec separately
META = {"type": "object"}      # checked against ObjectMeta separately

# batch.volcano.sh/v1alpha1 Job: the fields of Volcano's JobSpec and TaskSpec, written here.
VOLCANO_POLICY = obj({"event": STR, "events": {"type": "array", "items": STR}, "action": STR,
                      "exitCode": INT, "timeout": STR})
VOLCANO_JOB = obj({
    "apiVersion": {"const": "batch.volcano.sh/v1alpha1"}, "kind": {"const": "Job"},
    "metadata": META,
    "spec": obj({
        "schedulerName": STR, "minAvailable": INT, "minSuccess": INT, "queue": STR,
        "maxRetry": INT, "ttlSecondsAfterFinished": INT, "priorityClassName": STR,
        "runningEstimate": STR, "volumes": {"type": "array"},
        "networkTopology": {"type": "object"},
        "plugins": {"type": "object", "additionalProperties": {"type": "array", "items": STR}},
        "policies": {"type": "array", "items": VOLCANO_POLICY},
        "tasks": {"type": "array", "minItems": 1, "items": obj({
            "name": STR, "replicas": INT, "minAvailable": INT, "template": TEMPLATE,
            "policies": {"type": "array", "items": VOLCANO_POLICY},
            "topologyPolicy": STR, "maxRetry": INT, "dependsOn": {"type": "object"},
        }, required=["name", "replicas", "template"])},
    }, required=["tasks"]),
}, required=["apiVersion", "kind", "metadata", "spec"])

# mindxdl.gitee.com/v1 AscendJob: the fields MindCluster documents for acjob, written here.
ASCEND_REPLICA = obj({"replicas": INT, "template": TEMPLATE,
                      "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]}},
                     required=["template"])
ASCEND_JOB = obj({
    "apiVersion": {"const": "mindxdl.gitee.com/v1"}, "kind": {"const": "AscendJob"},
    "metadata": META,
    "spec": obj({
        "schedulerName": STR, "successPolicy": STR,
        "runPolicy": obj({
            "backoffLimit": INT, "activeDeadlineSeconds": INT, "cleanPodPolicy": STR,
            "ttlSecondsAfterFinished": INT,
            "schedulingPolicy": obj({"minAvailable": INT, "minResources": {"type": "object"},
                                     "priorityClass": STR, "queue": STR}),
        }),
        "replicaSpecs": {"type": "object", "minProperties": 1,
                         "propertyNames": {"enum": ["Master", "Worker", "Scheduler", "Chief"]},
                         "additionalProperties": ASCEND_REPLICA},
    }, required=["replicaSpecs"]),
}, required=["apiVersion", "kind", "metadata", "spec"])


def own_schema(doc, schema, where):
    for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
        path = "/".join(str(p) for p in e.absolute_path)
        problem(where, f"schema: {path}: {e.message}")
    k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}, where)


# ---- the pods -----------------------------------------------------------------------------

def pod_templates(doc):
    """(label, pod template) of every pod an object makes, and its kind of worker group."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if doc["apiVersion"] in ("apps/v1", "batch/v1"):
        return [("template", spec.get("template", {}))]
    if kind == "PyTorchJob":
        return [(r, s.get("template", {})) for r, s in spec.get("pytorchReplicaSpecs", {}).items()]
    if kind == "AscendJob":
        return [(r, s.get("template", {})) for r, s in spec.get("replicaSpecs", {}).items()]
    if doc["apiVersion"].startswith("batch.volcano.sh/"):
        return [(t.get("name"), t.get("template", {})) for t in spec.get("tasks", [])]
    return []


def expand(s, env):
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)


def port_of(addr):
    m = re.fullmatch(r".*:(\d+)", addr or "")
    return int(m.group(1)) if m else None


class Reads:
    def __init__(self, defaults):
        self.job_keys = set(tomllib.loads(defaults))
        proto = env_names("proto/src/**/*.rs")
        self.coordinator = env_names("coordinator/src/**/*.rs") | proto
        self.worker = env_names("worker/src/**/*.rs") | proto
        self.process = process_env()
        # node.sh runs deploy/launch.sh, which reads the rest.
        self.node_sh = (script_env("deploy/k8s/node.sh") | script_env("deploy/launch.sh")
                        | launch_npu_env())
        self.health = healthy_services()


def check_env(c, where, reads, role):
    env = {}
    for e in c.get("env", []):
        name = e.get("name", "")
        env[name] = e.get("value")
        if role == "coordinator":
            if name in reads.coordinator:
                continue
            if name.startswith("DANCEGRPO_") and name not in reads.process:
                key = name[len("DANCEGRPO_"):].lower()
                if key.split("__")[0] in reads.job_keys:
                    continue
                problem(where, f"env {name}: `{key}` is not a job config key "
                        "(dancegrpo-coordinator config --print-defaults)")
                continue
            problem(where, f"env {name}: dancegrpo-coordinator does not read it")
        else:
            if name in reads.worker or name in reads.node_sh:
                continue
            if name.startswith("DANCEGRPO_") and name not in reads.process:
                problem(where, f"env {name}: workers take the job's keys from the coordinator; "
                        "set it there")
                continue
            problem(where, f"env {name}: neither dancegrpo-worker nor node.sh (launch.sh) reads it")
    return env


def check_token(spec, c, env, where):
    path = env.get("DANCEGRPO_AUTH_TOKEN_FILE")
    if not path:
        problem(where, "no DANCEGRPO_AUTH_TOKEN_FILE: off loopback the job needs its token")
        return
    vols = {v.get("name"): v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = vols.get(m.get("name"), {})
        if path.startswith(m.get("mountPath", "").rstrip("/") + "/") and "secret" in v:
            if v["secret"].get("secretName") != "dancegrpo-token":
                problem(where, "the token must come from the Secret dancegrpo-token")
            return
    problem(where, f"DANCEGRPO_AUTH_TOKEN_FILE={path} is not in a mounted Secret")


def check_volumes(spec, c, where, claims):
    vols = {v.get("name"): v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if m.get("name") not in vols:
            problem(where, f"volumeMount {m.get('name')} names no volume")
    for v in vols.values():
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and claim not in claims:
            problem(where, f"claimName {claim}: no such PersistentVolumeClaim in coordinator.yaml")


def check_coordinator(doc, svc, reads, claims, where):
    spec = doc["spec"]
    if spec.get("replicas", 1) != 1 or spec.get("strategy", {}).get("type") != "Recreate":
        problem(where, "one coordinator per job database: replicas 1, strategy Recreate")
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    env = check_env(c, where, reads, "coordinator")
    check_token(pod, c, env, where)
    check_volumes(pod, c, where, claims)
    argv = [expand(a, env) for a in c.get("command", []) + c.get("args", [])]
    if argv[:2] != ["dancegrpo-coordinator", "serve"]:
        problem(where, f"command {argv[:2]} is not `dancegrpo-coordinator serve`")
    listen = next((a.split("=", 1)[1] for a in argv if a.startswith("--listen=")), None)
    if not listen or listen.startswith("127.") or listen.startswith("localhost"):
        problem(where, "--listen=0.0.0.0:PORT is needed to serve the pod network")
    grpc = port_of(listen)
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    if ports.get("grpc") != grpc:
        problem(where, f"containerPort grpc {ports.get('grpc')} is not the listen port {grpc}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe, {}).get("grpc")
        if p is None:
            problem(where, f"{probe}: not a gRPC health probe")
            continue
        if p.get("port") != grpc:
            problem(where, f"{probe}: port {p.get('port')} is not the gRPC port {grpc}")
        if p.get("service", "") not in reads.health:
            problem(where, f"{probe}: service {p.get('service')!r} is not reported SERVING "
                    f"(served: {sorted(reads.health)})")
    metrics = port_of(env.get("DANCEGRPO_METRICS_LISTEN"))
    if metrics is not None and ports.get("metrics") != metrics:
        problem(where, f"containerPort metrics {ports.get('metrics')} is not the "
                f"DANCEGRPO_METRICS_LISTEN port {metrics}")
    ann = spec["template"]["metadata"].get("annotations", {})
    if metrics is not None and ann.get("prometheus.io/port") != str(metrics):
        problem(where, "prometheus.io/port is not the metrics port")
    labels = spec["template"]["metadata"].get("labels", {})
    if svc is None:
        problem(where, "no Service for the coordinator")
    else:
        sel = svc["spec"].get("selector", {})
        if any(labels.get(k) != v for k, v in sel.items()):
            problem(where, "the Service's selector does not select the coordinator's pods")
        by_name = {p.get("name"): p for p in svc["spec"]["ports"]}
        for name, want in (("grpc", grpc), ("metrics", metrics)):
            p = by_name.get(name)
            if p and p.get("targetPort") not in (name, want):
                problem(where, f"Service port {name} targets {p.get('targetPort')}, not {want}")
    return {"service": svc["metadata"]["name"] if svc else None,
            "grpc_port": (by_name.get("grpc") or {}).get("port") if svc else None,
            "nnodes": int(env.get("NNODES", 1)), "npus": int(env.get("NPUS_PER_NODE", 8)),
            "image": c.get("image")}


def check_workers(doc, coord, reads, claims, where):
    kind, spec = doc["kind"], doc["spec"]
    pods = pod_templates(doc)
    replicas = {}
    for label, tpl in pods:
        w = f"{where} {label}"
        pod = tpl.get("spec", {})
        cs = pod.get("containers", [])
        if len(cs) != 1:
            problem(w, "one container per worker pod")
            continue
        c = cs[0]
        env = check_env(c, w, reads, "worker")
        check_token(pod, c, env, w)
        check_volumes(pod, c, w, claims)
        if c.get("command") != [NODE_SH]:
            problem(w, f"command must be {NODE_SH} (one worker per accelerator, ranks from the "
                    "pod index)")
        if c.get("image") != coord["image"]:
            problem(w, f"image {c.get('image')} differs from the coordinator's {coord['image']}")
        target = f"{coord['service']}:{coord['grpc_port']}"
        if env.get("DANCEGRPO_COORDINATOR") != target:
            problem(w, f"DANCEGRPO_COORDINATOR={env.get('DANCEGRPO_COORDINATOR')} is not the "
                    f"coordinator's Service {target}")
        for k, want in (("NNODES", coord["nnodes"]), ("NPUS_PER_NODE", coord["npus"])):
            if env.get(k) != str(want):
                problem(w, f"{k}={env.get(k)} but the coordinator's is {want}")
        device = env.get("DEVICE", "cuda")
        res = c.get("resources", {})
        for section in ("limits", "requests"):
            for name in res.get(section, {}):
                if "/" in name and name not in ACCELERATORS.values():
                    problem(w, f"resources.{section}: unknown device resource {name} "
                            f"(known: {', '.join(ACCELERATORS.values())})")
        want = ACCELERATORS.get(device)
        if want is None:
            problem(w, f"DEVICE={device}: the worker pods run on cuda or npu")
        elif str(res.get("limits", {}).get(want)) != str(coord["npus"]):
            problem(w, f"resources.limits[{want}] must be NPUS_PER_NODE={coord['npus']} "
                    f"(DEVICE={device})")
        # The node rank: from the pod index, by each kind's own mechanism.
        rank_vars = {"NODE_RANK", "JOB_COMPLETION_INDEX", "VC_TASK_INDEX", "RANK", "LOCAL_RANK"}
        set_vars = {e["name"]: e for e in c.get("env", []) if e["name"] in rank_vars}
        if kind == "Job" and doc["apiVersion"] == "batch/v1":
            ref = set_vars.get("NODE_RANK", {}).get("valueFrom", {}).get("fieldRef", {})
            if ref.get("fieldPath") != \
                    "metadata.annotations['batch.kubernetes.io/job-completion-index']" \
                    or len(set_vars) != 1:
                problem(w, "NODE_RANK must come from the pod's job-completion-index annotation")
        elif set_vars:
            problem(w, f"{', '.join(sorted(set_vars))} set by hand: the operator gives each pod "
                    "its index, which node.sh reads")
        if kind == "PyTorchJob" and c.get("name") != "pytorch":
            problem(w, "the training operator injects RANK only into a container named pytorch")
        if kind == "AscendJob":
            if c.get("name") != "ascend":
                problem(w, "ascend-operator injects RANK only into a container named ascend")
            if "ascendjob-port" not in {p.get("name") for p in c.get("ports", [])}:
                problem(w, "ascend-operator wants a port named ascendjob-port")
    nnodes = coord["nnodes"]
    if doc["apiVersion"] == "batch/v1":
        if spec.get("completionMode") != "Indexed":
            problem(where, "completionMode must be Indexed: the pod index is the node rank")
        if spec.get("completions") != nnodes or spec.get("parallelism") != nnodes:
            problem(where, f"completions and parallelism must be NNODES={nnodes}")
    elif kind == "PyTorchJob" or kind == "AscendJob":
        specs = spec.get("pytorchReplicaSpecs" if kind == "PyTorchJob" else "replicaSpecs", {})
        replicas = {r: s.get("replicas", 1) for r, s in specs.items()}
        if replicas.get("Master") != 1 or sum(replicas.values()) != nnodes:
            problem(where, f"Master 1 + Worker replicas must be NNODES={nnodes} (got {replicas})")
        if kind == "PyTorchJob" and spec.get("nprocPerNode") != str(coord["npus"]):
            problem(where, f"nprocPerNode must be NPUS_PER_NODE={coord['npus']}")
        if kind == "AscendJob":
            if doc["metadata"].get("labels", {}).get("framework") != "pytorch":
                problem(where, "label framework: pytorch makes ascend-operator inject RANK")
            if spec.get("runPolicy", {}).get("schedulingPolicy", {}).get("minAvailable") != nnodes:
                problem(where, f"schedulingPolicy.minAvailable must be NNODES={nnodes}")
    else:  # Volcano
        tasks = spec.get("tasks", [])
        if len(tasks) != 1 or tasks[0].get("replicas") != nnodes:
            problem(where, f"one task with replicas NNODES={nnodes}: its index is the node rank")
        if "env" not in spec.get("plugins", {}):
            problem(where, "the env plugin gives each pod VC_TASK_INDEX, the node rank")
        if spec.get("minAvailable") != nnodes:
            problem(where, f"minAvailable must be NNODES={nnodes} (all ranks or none)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--defaults", required=True)
    ap.add_argument("manifests", nargs="*")
    a = ap.parse_args()
    files = a.manifests or sorted(glob.glob(os.path.join(HERE, "*.yaml")))
    reads = Reads(open(a.defaults, encoding="utf-8").read())
    docs = []
    for f in files:
        name = os.path.basename(f)
        try:
            for i, d in enumerate(yaml.safe_load_all(open(f, encoding="utf-8"))):
                if d is not None:
                    docs.append((f"{name}#{i} {d.get('kind')}/"
                                 f"{(d.get('metadata') or {}).get('name')}", d))
        except yaml.YAMLError as e:
            problem(name, f"not YAML: {e}")
    for where, d in docs:
        api = d.get("apiVersion", "")
        if api in ("v1", "apps/v1", "batch/v1"):
            k8s(d, where)
        elif api == "kubeflow.org/v1" and d.get("kind") == "PyTorchJob":
            kubeflow(d, "KubeflowOrgV1PyTorchJob", where)
        elif api == "batch.volcano.sh/v1alpha1" and d.get("kind") == "Job":
            own_schema(d, VOLCANO_JOB, where)
        elif api == "mindxdl.gitee.com/v1" and d.get("kind") == "AscendJob":
            own_schema(d, ASCEND_JOB, where)
        else:
            problem(where, f"no schema for {api} {d.get('kind')}")
            continue
        for label, tpl in pod_templates(d):
            pod_template(tpl, f"{where} {label}")
    if problems:
        # Semantics are checked only on schema-valid manifests.
        report()
    claims = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    svcs = [d for _, d in docs if d["kind"] == "Service"]
    coords = [(w, d) for w, d in docs if d["kind"] == "Deployment"]
    if len(coords) != 1:
        problem("manifests", "exactly one coordinator Deployment (coordinator.yaml) is needed")
        report()
    where, dep = coords[0]
    svc = next((s for s in svcs if s["metadata"]["name"] == dep["metadata"]["name"]), None)
    coord = check_coordinator(dep, svc, reads, claims, where)
    for w, d in docs:
        if pod_templates(d) and d["kind"] != "Deployment":
            check_workers(d, coord, reads, claims, w)
    for w, _ in docs:
        print(f"checked {w}")
    report()


def report():
    for p in problems:
        print(f"problem: {p}")
    print(f"{len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
