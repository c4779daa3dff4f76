"""The Helm chart, rendered by the real Helm engine (helm-python-sdk, offline) and validated the way
a cluster would: Kubernetes' own schemas (kubernetes-validate --strict, oldest and newest supported
release), KubeRay's RayService CRD schema (pinned fixture, unknown fields refused), Ray's Serve
config schema and then our builder's own check, plus the platform's rules (Pod Security
"restricted", default deny, registry, no secrets in values). No cluster runs here. One module, long:
its checks share the chart rendered once per case.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python  # helm-python-sdk (test extra): Helm's Go engine, no binary
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "infra" / "helm" / "agencyllm"
EXAMPLES = ROOT / "examples"
CRD = Path(__file__).parent / "fixtures" / "kuberay-v1.7.0-ray.io_rayservices.yaml.gz"
# Chart.yaml's kubeVersion range: validated against its two ends.
KUBE_VERSIONS = ["1.29.0", "1.37.0"]
# Kinds served by operators, not by Kubernetes: validated by their own schema where we have one.
CUSTOM_KINDS = {"RayService", "Cluster", "ServiceMonitor", "HTTPRoute"}
RELEASE, NAMESPACE = "agencyllm", "llm"

# Every optional part switched on, with a mirror registry, a digest and a CA bundle.
FULL = {
    "global": {"imageRegistry": "mirror.agency.internal:5000", "imagePullSecrets": ["mirror-pull"]},
    "image": {"digest": "sha256:" + "ab" * 32},
    "database": {"cloudnativepg": {"enabled": True}},
    "oidc": {"issuer": "https://sso.agency.gov/realms/agency"},
    "bootstrapAdmin": {"existingSecret": "admin-key"},
    "caBundle": {"configMap": "agency-ca"},
    "gateway": {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateways"}],
        "hostnames": ["llm.agency.gov"],
    },
    "ray": {"autoscaling": {"enabled": True}},
    "networkPolicy": {
        "apiAllowedNamespaces": ["gateways"],
        "apiServerCidrs": ["10.0.0.1/32"],
        # oidc.issuer needs Keycloak's peers: a port-only egress rule would reach any address.
        "keycloak": {"peers": [{"ipBlock": {"cidr": "10.0.0.30/32"}}]},
    },
    "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "config": {"extraEnv": [{"name": "RAY_SERVE_ENABLE_DIRECT_INGRESS", "value": "0"}]},
}


# The staff chat (Open WebUI) beside the platform, exposed by an Ingress with TLS, from a mirror
# registry (tests/test_helm_chat.py checks it in detail; every check here runs on it too).
CHAT = {
    "global": {"imageRegistry": "registry.agency.gov", "imagePullSecrets": ["agency-registry"]},
    "oidc": {"issuer": "https://sso.agency.gov/realms/agency", "directory": {"existingSecret": "agencyllm-directory"}},
    "console": {"publicUrl": "https://llm.agency.gov"},
    "caBundle": {"configMap": "agency-ca"},
    "ingress": {"enabled": True, "className": "nginx", "host": "llm.agency.gov", "tlsSecretName": "llm-tls"},
    "networkPolicy": {
        "apiAllowedNamespaces": ["ingress-nginx"],
        "database": {"peers": [{"ipBlock": {"cidr": "10.20.0.15/32"}}]},
        "keycloak": {"peers": [{"ipBlock": {"cidr": "10.20.0.30/32"}}]},
    },
    "chat": {
        "enabled": True,
        "publicUrl": "https://chat.agency.gov",
        "existingSecret": "agencyllm-chat",
        "ingress": {"tlsSecretName": "chat-tls"},
    },
}


def _example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


CASES = {
    "defaults": {},
    "evaluation-one-gpu": _example("evaluation-one-gpu.yaml"),
    "production": _example("production.yaml"),
    "openshift": _example("openshift.yaml"),
    "full": FULL,
    "chat": CHAT,
}


@pytest.fixture(scope="module")
def chart():
    loaded = helm_python.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart, values: dict) -> dict[str, str]:
    return chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    return {case: documents(render(chart, values)) for case, values in CASES.items()}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def ray_pods(rayservice: dict) -> Iterator[tuple[str, dict]]:
    """Each pod template of a RayService as the Pod KubeRay would create (name, Pod)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        template = group["template"]
        yield (
            name,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{rayservice['metadata']['name']}-{name}",
                    "namespace": NAMESPACE,
                    **template.get("metadata", {}),
                },
                "spec": template["spec"],
            },
        )


def all_pods(docs: list[dict]) -> list[tuple[str, dict]]:
    """Every pod the release would run: Ray pods, Job pods and Deployment pods (Open WebUI), as Pods."""
    pods = [(name, pod) for d in docs if d["kind"] == "RayService" for name, pod in ray_pods(d)]
    for d in docs:
        if d["kind"] == "Deployment":
            template = d["spec"]["template"]
            name = d["metadata"]["name"]
            metadata = {"name": name, "namespace": d["metadata"]["namespace"], **template["metadata"]}
            pods.append((name, {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}))
        if d["kind"] == "Job":
            template = d["spec"]["template"]
            pods.append(
                (
                    d["metadata"]["name"],
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": d["metadata"]["name"], **template["metadata"]},
                        "spec": template["spec"],
                    },
                )
            )
    return pods


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


# --- the chart as Helm sees it ------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_lint_strict(kube_version):
    for values in CASES.values():
        result = helm_python.lint(
            str(CHART),
            copy.deepcopy(values),
            strict=True,
            with_subcharts=True,
            namespace=NAMESPACE,
            kube_version=kube_version,
        )
        assert result["errors"] == []
        # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
        assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_chart_is_self_contained():
    """No dependencies to fetch: the packaged chart installs offline as it is."""
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert not meta.get("dependencies")
    assert not (CHART / "requirements.yaml").exists()


def test_every_value_is_documented():
    """Each value in values.yaml has a comment right above it, or belongs to an object value
    documented as a whole (`# -- ...` above its key, e.g. `resources`)."""
    stack: list[tuple[int, bool]] = []  # (indent, documents its children) of the enclosing keys
    previous = block = ""  # the line above; the first line of the comment block above
    undocumented = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if not stripped.startswith(("#", "-")) and ":" in stripped:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            inherited = bool(stack) and stack[-1][1]
            if stripped.partition(":")[2].strip() and not (previous.startswith("#") or inherited):
                undocumented.append(stripped)
            stack.append((indent, inherited or (previous.startswith("#") and block.startswith("# --"))))
        if stripped.startswith("#") and not previous.startswith("#"):
            block = stripped
        previous = stripped
    assert undocumented == []


def test_packaged_chart_installs_offline(tmp_path):
    """`helm package`, then Helm's install action (client dry run, in-memory release storage, no
    cluster) on the archive: what the air-gap bundle ships is installable as it is."""
    archive = Path(helm_python.package(str(CHART), destination=str(tmp_path)))
    assert archive.name == "agencyllm-0.1.0.tgz"
    kubeconfig = tmp_path / "kubeconfig"  # never contacted: dry_run="client"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "none",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "users": [{"name": "none", "user": {}}],
            }
        )
    )
    packaged = helm_python.Chart.load_archive(archive.read_bytes())
    config = helm_python.Config(kubeconfig_path=str(kubeconfig), storage_driver="memory", namespace=NAMESPACE)
    try:
        for case in ("defaults", "production"):
            release = config.install(
                packaged, RELEASE, copy.deepcopy(CASES[case]), namespace=NAMESPACE, dry_run="client"
            )
            kinds = [d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d]
            assert "RayService" in kinds and "NetworkPolicy" in kinds
            assert "Job" not in kinds  # the migrations Job is a hook, not part of the release manifest
            assert release["notes"].startswith(f"agencyllm 0.1.0 is installing as RayService {RELEASE}")
    finally:
        config.close()
        packaged.close()


@pytest.mark.parametrize(
    "bad, where",
    [
        (
            {
                "ray": {
                    "workerGroups": [
                        {
                            "name": "gpu",
                            "replicas": "two",
                            "minReplicas": 1,
                            "maxReplicas": 2,
                            "gpus": 1,
                            "resources": {
                                "requests": {"cpu": "1", "memory": "1Gi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                        }
                    ]
                }
            },
            "/ray/workerGroups/0/replicas",
        ),
        ({"models": [{"id": "m", "path": "m", "replicas": "two"}]}, "/models/0/replicas"),
        ({"replicas": 2}, "additional properties 'replicas'"),
        ({"modles": []}, "additional properties 'modles'"),
        ({"ray": {"head": {"gpus": 1}}}, "additional properties 'gpus'"),
        ({"models": [{"id": "m", "path": "m", "engineArgs": {}}]}, "additional properties 'engineArgs'"),
        ({"models": [{"id": "m", "path": "m", "stream_coalesce_ms": "5"}]}, "/models/0/stream_coalesce_ms"),
        ({"models": [{"id": "m", "path": "m", "stream_coalesce_ms": 5000}]}, "/models/0/stream_coalesce_ms"),
        ({"models": [{"id": "m", "path": ""}]}, "/models/0/path"),
        ({"models": [{"id": "m", "path": "m", "fair_share": {"slot": 4}}]}, "additional properties 'slot'"),
        ({"models": [{"id": "m", "path": "m", "replicas": {"min": -1}}]}, "/models/0/replicas"),
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"image": {"digest": "sha256:short"}}, "/image/digest"),
        ({"upgrade": {"strategy": "None"}}, "/upgrade/strategy"),
        (
            {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
            "/containerSecurityContext/readOnlyRootFilesystem",
        ),
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
        ({"oidc": {"issuer": "https://sso.agency.gov/realms/agency/"}}, "/oidc/issuer"),
    ],
)
def test_schema_refuses_bad_values(chart, bad, where):
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, bad)
    assert where in str(caught.value)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ingress": {"enabled": True}, "gateway": {"enabled": True, "parentRefs": [{"name": "g"}]}}, "not both"),
        ({"models": [{"id": "m", "path": "a"}, {"id": "m", "path": "b"}]}, 'id "m" appears twice'),
        ({"database": {"existingSecret": ""}}, "database.existingSecret is required"),
    ],
)
def test_template_refuses_bad_combinations(chart, bad, message):
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, bad)
    assert message in str(caught.value)


# --- Kubernetes, KubeRay and Ray schemas ---------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_core_manifests_and_ray_pods_validate_strictly(rendered, case, kube_version):
    docs = rendered[case]
    custom = {d["kind"] for d in docs if d["kind"] in CUSTOM_KINDS}
    core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert "RayService" in custom and core
    for doc in core + [pod for _, pod in all_pods(docs)]:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {kube_version}): "
                f"{exc.message} at {list(exc.path)}"
            ) from None


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as KubeRay's API server would prune them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    # 1 MB of YAML: libyaml's loader reads it in a fraction of the pure-Python one's time.
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("case", CASES)
def test_rayservice_matches_kuberay_crd(rendered, rayservice_schema, case):
    rayservice = one(rendered[case], "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = sorted(jsonschema.Draft7Validator(rayservice_schema).iter_errors(rayservice), key=str)
    assert [f"{list(e.path)}: {e.message}" for e in errors] == []


def test_crd_check_catches_typos(rendered, rayservice_schema):
    """The strict schema is not a formality: a misspelt field or a string count fails it."""
    validator = jsonschema.Draft7Validator(rayservice_schema)
    rayservice = copy.deepcopy(one(rendered["defaults"], "RayService"))
    rayservice["spec"]["serveConfigv2"] = rayservice["spec"].pop("serveConfigV2")
    assert not validator.is_valid(rayservice)
    rayservice = copy.deepcopy(one(rendered["defaults"], "RayService"))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "1"
    assert not validator.is_valid(rayservice)
    rayservice = copy.deepcopy(one(rendered["defaults"], "RayService"))
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = (
        "Always"
    )
    assert not validator.is_valid(rayservice)


def _with_local_weights(models: list[dict], mount: str, tmp_path: Path) -> list[dict]:
    """The models with their weights directories recreated under tmp_path (config.json only)."""
    local = []
    for model in models:
        assert model["path"].startswith(mount + "/"), "model paths must sit under weights.mountPath"
        directory = tmp_path / model["path"].removeprefix(mount + "/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
        local.append({**model, "path": str(directory)})
        if model.get("chat_template"):
            template = tmp_path / model["chat_template"].removeprefix(mount + "/")
            template.parent.mkdir(parents=True, exist_ok=True)
            template.write_text("{{ messages }}")
            local[-1]["chat_template"] = str(template)
    return local


@pytest.mark.parametrize("case", CASES)
def test_serve_config_passes_ray_and_our_builder(rendered, case, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from agencyllm.serving.rayserve.app import application_config

    rayservice = one(rendered[case], "RayService")
    serve = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    assert [app.name for app in serve.applications] == ["agencyllm"]
    app = serve.applications[0]
    assert app.import_path == "agencyllm.serving.rayserve.app:build_app"
    assert app.route_prefix == "/"
    assert set(app.args) == {"models"}
    values = CASES[case]
    mount = values.get("weights", {}).get("mountPath", "/models")
    config = application_config({"models": _with_local_weights(app.args["models"], mount, tmp_path)})
    expected = values.get("models") or yaml.safe_load((CHART / "values.yaml").read_text())["models"]
    assert [m.id for m in config.models] == [m["id"] for m in expected]
    # Nothing but models reaches the custom resource: no settings, no secrets.
    assert "AGENCYLLM" not in rayservice["spec"]["serveConfigV2"]
    assert "postgresql://" not in rayservice["spec"]["serveConfigV2"]


# Every setting of the models configuration, none at its default.
EVERY_MODEL_SETTING = {
    "id": "every-setting",
    "path": "every-setting",
    "task": "embed",
    "engine_args": {"max_model_len": 4096, "max_num_seqs": 64},
    "replicas": {"min": 0, "max": 3, "target_ongoing_requests": 8},
    "accelerator": {"type": "L4", "gpus": 2, "cpus": 4, "strategy": "STRICT_PACK"},
    "max_ongoing_requests": 32,
    "fair_share": {
        "slots": 48,
        "interactive_reserve": 4,
        "burst": 2,
        "max_wait_seconds": 30.0,
        "max_queued_per_tenant": 16,
    },
    "stream_coalesce_ms": 12.5,
    "tool_call_parser": "llama3_json",
    "auto_tool_choice": False,
    "reasoning_parser": "qwen3",
    "chat_template": "templates/tools.jinja",
}


def test_values_schema_models_generated_from_the_models_config():
    """`models` in values.schema.json is the models configuration's own schema (one source; that
    the committed file is current is tests/test_generated_schemas.py's check)."""
    from agencyllm.serving.config import ModelSpec

    item = json.loads((CHART / "values.schema.json").read_text())["properties"]["models"]["items"]
    assert set(item["properties"]) == set(ModelSpec.model_fields) == set(EVERY_MODEL_SETTING)


def test_every_model_setting_reaches_the_serve_config(chart, tmp_path):
    from agencyllm.serving.config import ModelSpec
    from agencyllm.serving.rayserve.app import application_config

    rayservice = one(documents(render(chart, {"models": [EVERY_MODEL_SETTING]})), "RayService")
    (served,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["models"]
    assert served == {
        **EVERY_MODEL_SETTING,
        "path": "/models/every-setting",
        "chat_template": "/models/templates/tools.jinja",  # resolved under weights.mountPath too
    }
    (spec,) = application_config({"models": _with_local_weights([served], "/models", tmp_path)}).models
    defaults = ModelSpec.model_construct()
    for name in EVERY_MODEL_SETTING:
        if name != "path":
            assert getattr(spec, name) != getattr(defaults, name, None), f"{name} left at its default"


def test_builder_names_the_bad_field(tmp_path):
    from agencyllm.serving.config import ConfigError
    from agencyllm.serving.rayserve.app import application_config

    with pytest.raises(ConfigError, match=r"models\.0\.replicas"):
        application_config(
            {"models": _with_local_weights([{"id": "m", "path": "/models/m", "replicas": "two"}], "/models", tmp_path)}
        )
    with pytest.raises(ConfigError, match="unknown field.*database_url"):
        application_config({"models": [], "database_url": "postgresql://x"})
    with pytest.raises(ConfigError, match="'models' is required"):
        application_config({})
    with pytest.raises(ConfigError, match=r"models\.0\.path: .*config\.json not found"):
        application_config({"models": [{"id": "m", "path": str(tmp_path / "absent")}]})


# --- the platform's rules ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_pod_is_restricted_with_resources(rendered, case):
    pods = all_pods(rendered[case])
    assert {name for name, _ in pods} >= {"head", f"{RELEASE}-migrations"}
    for name, pod in pods:
        spec = pod["spec"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected"}, (name, volume)
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault" and not sc.get("privileged"), where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), where
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, where
    for doc in rendered[case]:
        if doc["kind"] == "RayService" and doc["spec"]["rayClusterConfig"].get("autoscalerOptions"):
            options = doc["spec"]["rayClusterConfig"]["autoscalerOptions"]
            assert options["securityContext"]["readOnlyRootFilesystem"] is True
            assert options["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(options["resources"]["limits"])


@pytest.mark.parametrize("case", CASES)
def test_ray_pods_share_weights_and_run_offline(rendered, case):
    values = CASES[case]
    mount = values.get("weights", {}).get("mountPath", "/models")
    rayservice = one(rendered[case], "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster["authOptions"] == {"mode": "token"}
    head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group, (name, pod) in zip(groups, ray_pods(rayservice), strict=True):
        spec = pod["spec"]
        claims = {v["name"]: v for v in spec["volumes"]}
        assert claims["weights"]["persistentVolumeClaim"]["readOnly"] is True
        assert claims["dshm"]["emptyDir"]["medium"] == "Memory"
        shm = claims["dshm"]["emptyDir"]["sizeLimit"]
        shm_bytes = int(shm[:-2]) * units[shm[-2:]]
        # Ray's object store must fit in /dev/shm, or Ray moves it to the slow /tmp.
        assert 0.5 * shm_bytes <= int(group["rayStartParams"]["object-store-memory"]) <= shm_bytes, name
        ray = spec["containers"][0]
        mounts = {m["mountPath"]: m for m in ray["volumeMounts"]}
        assert mounts[mount]["name"] == "weights" and mounts[mount]["readOnly"] is True, name
        assert mounts["/dev/shm"]["name"] == "dshm" and mounts["/tmp"]["name"] == "tmp", name
        env = {e["name"]: e for e in ray["env"]}
        for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS"):
            assert env[offline]["value"] == "1", name
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        assert "secretKeyRef" in env["AGENCYLLM_DATABASE_URL"]["valueFrom"]
        wait = spec["initContainers"][0]
        assert wait["command"][:3] == ["agencyllm", "db", "wait"], name


@pytest.mark.parametrize("case", CASES)
def test_default_deny_and_narrow_egress(rendered, case):
    policies = [d for d in rendered[case] if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["metadata"]["name"].endswith("-default-deny")]
    assert len(deny) == 1
    spec = deny[0]["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in spec and "egress" not in spec
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    api_ports = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if any("namespaceSelector" in peer for peer in rule.get("from", [])):
                api_ports |= {p["port"] for p in rule.get("ports", [])}
        for rule in policy["spec"].get("egress", []):
            # Every egress rule outside the release names its ports: nothing is open-ended.
            if not all(list(peer) == ["podSelector"] for peer in rule.get("to", [{}])):
                assert rule.get("ports"), (policy["metadata"]["name"], rule)
    assert api_ports <= {8000, 8265, 52365, 8080}


def test_egress_pinned_to_listed_peers(rendered):
    egress = next(d for d in rendered["production"] if d["metadata"]["name"].endswith("-egress"))
    rules = egress["spec"]["egress"]
    by_port = {rule["ports"][0]["port"]: rule for rule in rules}
    assert by_port[5432]["to"] == [{"ipBlock": {"cidr": "10.20.0.15/32"}}]
    assert by_port[443]["to"] == [{"ipBlock": {"cidr": "10.20.0.30/32"}}]
    assert by_port[53]["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def _images(docs: list[dict]) -> list[str]:
    images = []
    for d in docs:
        if d["kind"] == "Cluster":
            images.append(d["spec"]["imageName"])
        if d["kind"] == "RayService" and "autoscalerOptions" in d["spec"]["rayClusterConfig"]:
            images.append(d["spec"]["rayClusterConfig"]["autoscalerOptions"]["image"])
    for _, pod in all_pods(docs):
        images.extend(c["image"] for c in containers(pod["spec"]))
    return images


@pytest.mark.parametrize("case", CASES)
def test_images_pinned_and_under_the_registry(rendered, case):
    registry = CASES[case].get("global", {}).get("imageRegistry")
    images = _images(rendered[case])
    assert images
    for image in images:
        name = image.rsplit("/", 1)[-1]
        assert "@sha256:" in name or (":" in name and not name.endswith(":latest")), image
        if registry:
            assert image.startswith(registry + "/"), image
    if CASES[case].get("image", {}).get("digest"):
        assert all("@sha256:" in i for i in images if "agencyllm/agencyllm" in i)


def test_global_registry_and_pull_secrets_reach_every_image(chart):
    values = {**FULL, "global": {"imageRegistry": "registry.agency.gov", "imagePullSecrets": ["a", "b"]}}
    docs = documents(render(chart, values))
    images = _images(docs)
    assert len(images) >= 6 and all(i.startswith("registry.agency.gov/") for i in images)
    for name, pod in all_pods(docs):
        assert pod["spec"]["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}], name
    assert one(docs, "Cluster")["spec"]["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]


@pytest.mark.parametrize("case", CASES)
def test_no_secret_from_values(rendered, case):
    """Secrets are only referenced: the chart renders no Secret and no credential literal."""
    docs = rendered[case]
    assert [d for d in docs if d["kind"] == "Secret"] == []
    text = json.dumps(docs)
    assert "postgresql://" not in text and "sk-agency-" not in text
    for _, pod in all_pods(docs):
        for container in containers(pod["spec"]):
            for env in container.get("env", []):
                if any(word in env["name"] for word in ("DATABASE_URL", "PASSWORD", "TOKEN", "KEY")):
                    assert "valueFrom" in env and "value" not in env, env["name"]


def test_cloudnativepg_database_is_reached_through_its_rw_service(rendered):
    """With the evaluation CloudNativePG cluster, every process reads the database URL from the
    operator's `<cluster>-app` Secret (`uri`, which names the `<cluster>-rw` Service: the primary,
    whichever instance that is after a failover), never from a value or a single pod."""
    docs = rendered["evaluation-one-gpu"]
    cluster = one(docs, "Cluster")["metadata"]["name"]
    seen = 0
    for _, pod in all_pods(docs):
        for container in containers(pod["spec"]):
            for env in container.get("env", []):
                if env["name"] == "AGENCYLLM_DATABASE_URL":
                    assert env["valueFrom"]["secretKeyRef"] == {"name": f"{cluster}-app", "key": "uri"}, env
                    seen += 1
    assert seen >= 3  # the head, the GPU workers and the migrations Job


def test_only_the_api_is_exposed(rendered):
    service = next(d for d in rendered["defaults"] if d["kind"] == "Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    assert service["spec"]["selector"]["ray.io/serve"] == "true"
    ingress = one(rendered["production"], "Ingress")
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1", "/admin/v1"]
    assert {
        p["backend"]["service"]["port"]["name"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]
    } == {"http"}
    route = one(rendered["full"], "HTTPRoute")
    matches = [m["path"]["value"] for rule in route["spec"]["rules"] for m in rule["matches"]]
    assert matches == ["/v1", "/admin/v1"]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": RELEASE, "port": 8000}]


def test_migrations_hook_job(rendered):
    job = one(rendered["full"], "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,pre-upgrade"
    spec = job["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["command"] == ["agencyllm", "db", "upgrade"]
    assert spec["containers"][0]["command"][:3] == ["agencyllm", "db", "bootstrap-admin"]
    secret = next(v for v in spec["volumes"] if v["name"] == "bootstrap-admin")["secret"]
    assert secret["secretName"] == "admin-key"
    plain = one(rendered["defaults"], "Job")["spec"]["template"]["spec"]
    assert "initContainers" not in plain and plain["containers"][0]["command"] == ["agencyllm", "db", "upgrade"]


def test_pod_disruption_budgets(rendered):
    budgets = {d["metadata"]["name"]: d["spec"] for d in rendered["production"] if d["kind"] == "PodDisruptionBudget"}
    assert budgets[f"{RELEASE}-head"]["maxUnavailable"] == 1  # a drain proceeds (values: podDisruptionBudget)
    assert budgets[f"{RELEASE}-h100"]["maxUnavailable"] == 1 and budgets[f"{RELEASE}-l4"]["maxUnavailable"] == 1


def test_upgrade_strategies_roll_the_cluster(chart):
    def rayservice(values):
        return one(documents(render(chart, values)), "RayService")

    new_cluster = rayservice({})
    assert new_cluster["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert new_cluster["metadata"]["name"] == RELEASE

    recreate = {"upgrade": {"strategy": "Recreate"}}
    base = rayservice(recreate)
    assert base["spec"]["upgradeStrategy"] == {"type": "None"}
    name = base["metadata"]["name"]
    assert name.startswith(f"{RELEASE}-") and name != RELEASE
    # A new image or cluster shape gets a new RayService (Helm deletes the old one).
    assert rayservice({**recreate, "image": {"tag": "0.1.1-ray2.60.0"}})["metadata"]["name"] != name
    assert rayservice({**recreate, "ray": {"head": {"rayCpus": 3}}})["metadata"]["name"] != name
    assert rayservice({**recreate, "config": {"quotaTimezone": "Europe/Paris"}})["metadata"]["name"] != name
    # Serve config and worker counts change in place.
    models = [{"id": "other", "path": "other", "accelerator": {"gpus": 1}}]
    assert rayservice({**recreate, "models": models})["metadata"]["name"] == name
    groups = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["workerGroups"])
    groups[0].update(replicas=2, maxReplicas=3)
    assert rayservice({**recreate, "ray": {"workerGroups": groups}})["metadata"]["name"] == name


def test_dashboard_and_monitoring(rendered):
    docs = rendered["full"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    metrics = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert metrics["spec"]["selector"]["agencyllm.io/ray"] == "true"
    dashboard = json.loads(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["agencyllm.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "agencyllm_requests_admitted_total",
        "agencyllm_tokens_charged_total",
        "agencyllm_requests_refused_total",
        "time_to_first_token_seconds",
        "num_requests_waiting",
        "kv_cache_usage_perc",
    ):
        assert metric in exprs
    assert "by (tenant" in exprs


def test_notes_render(chart):
    notes = render(chart, CASES["production"])[f"{RELEASE}/templates/NOTES.txt"]
    assert "https://llm.agency.gov/v1" in notes and "kubectl -n llm get rayservice agencyllm" in notes


# --- checkov ------------------------------------------------------------------------------------

CHECKOV_VERSION = "3.3.30"
# checkov pins packaging<24 and networkx<3 (among others), which would downgrade what torch and
# vLLM run on: it gets a virtualenv of its own, created once and cached.
CHECKOV_HOME = Path(
    os.environ.get("AGENCYLLM_CHECKOV_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agencyllm" / f"checkov-{CHECKOV_VERSION}"
)

# Findings we accept, each with the reason; anything else fails the test.
ACCEPTED = {
    "CKV_K8S_8": (
        "Liveness probe",
        lambda kind, name: kind == "Pod" or kind == "Job",
        "Ray pods: KubeRay injects its own liveness and readiness probes into every Ray container; "
        "the migrations Job and the `helm test` pod run to completion and have nothing to probe.",
    ),
    "CKV_K8S_9": ("Readiness probe", lambda kind, name: kind == "Pod" or kind == "Job", "as CKV_K8S_8"),
    "CKV_K8S_15": (
        "Pull policy Always",
        lambda kind, name: True,
        "IfNotPresent by default (image.pullPolicy): air-gapped nodes are often pre-loaded and the "
        "tag or digest is pinned, so Always would only add a registry round trip.",
    ),
    "CKV_K8S_35": (
        "Secrets as environment variables",
        lambda kind, name: True,
        "AGENCYLLM_DATABASE_URL is read from the environment (the platform's one settings object); "
        "it comes from a Secret by secretKeyRef, never a literal. The bootstrap key is a file. Open "
        "WebUI reads its keys and database URL only from its environment: each by secretKeyRef too.",
    ),
    "CKV_K8S_40": (
        "High UID",
        lambda kind, name: True,
        "Ray's image runs as its `ray` user (1000:100), which owns the Ray installation; "
        "restricted Pod Security needs non-root, not a UID range. podSecurityContext.runAsUser overrides it; "
        "on OpenShift (examples/openshift.yaml) none is set and the SCC assigns one from the project's range. "
        "Open WebUI's image runs as root upstream; the chart runs it as 1000:1000 (chat.podSecurityContext).",
    ),
    "CKV_K8S_43": (
        "Image digest",
        lambda kind, name: True,
        "Images are pinned by tag by default and by digest when image.digest (chat.image.digest) is set "
        "(the schema refuses `latest`); the production example says how to pin the digest.",
    ),
}


def checkov() -> Path:
    exe = CHECKOV_HOME / "bin" / "checkov"
    if not exe.exists():
        import subprocess
        import venv

        venv.create(CHECKOV_HOME, with_pip=True, clear=True)
        done = subprocess.run(
            [str(CHECKOV_HOME / "bin" / "pip"), "install", "-q", f"checkov=={CHECKOV_VERSION}"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            pytest.fail(f"could not install checkov {CHECKOV_VERSION} into {CHECKOV_HOME}:\n{done.stderr[-2000:]}")
    return exe


def checkov_report(rendered: dict[str, list[dict]], directory: Path) -> dict:
    """checkov's report on each case's rendered objects (the RayService's pod templates as Pods)."""
    import subprocess

    for case, docs in rendered.items():
        core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
        # checkov never looks inside a RayService: its pod templates go in as Pods (a Job's and a
        # Deployment's it reads itself).
        ray = {name for d in docs if d["kind"] == "RayService" for name, _ in ray_pods(d)}
        pods = [pod for name, pod in all_pods(docs) if name in ray]
        (directory / f"{case}.yaml").write_text(yaml.safe_dump_all(core + pods))
    done = subprocess.run(
        [str(checkov()), "-d", str(directory), "--framework", "kubernetes", "--skip-download", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0
    return report


def unexplained_findings(report: dict) -> list[str]:
    """checkov's failed checks that ACCEPTED does not explain."""
    unexplained = []
    for failed in report["results"]["failed_checks"]:
        kind, _, name = failed["resource"].partition(".")
        name = name.partition(".")[2]
        accepted = ACCEPTED.get(failed["check_id"])
        if accepted is None or not accepted[1](kind, name):
            unexplained.append(
                f"{failed['check_id']} {failed['check_name']}: {failed['resource']} ({failed['file_path']})"
            )
    return unexplained


def test_checkov_has_no_unexplained_findings(rendered, tmp_path):
    report = checkov_report(rendered, tmp_path)
    assert report["summary"]["resource_count"] >= 40 and report["summary"]["passed"] > 500
    assert unexplained_findings(report) == []


# --- versions agree across the chart, the image and the package -------------------------------


def test_chart_image_and_package_agree():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray[")).split("==")[1]
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert meta["appVersion"] == project["version"]
    assert values["ray"]["version"] == ray_pin
    assert values["image"]["tag"] == f"{project['version']}-ray{ray_pin}"
    containerfile = (ROOT / "infra" / "image" / "Containerfile").read_text()
    base = re.search(r"^ARG RAY_LLM_IMAGE=(\S+)$", containerfile, re.M).group(1)
    assert f":{ray_pin}-" in base
    users = re.findall(r"^USER (\S+)$", containerfile, re.M)
    assert users[-1] == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    constraints = (ROOT / "infra" / "image" / "constraints.txt").read_text()
    gpu_extra = project["optional-dependencies"]["gpu"]
    for pin in gpu_extra:
        assert pin in constraints, pin
