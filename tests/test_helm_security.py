"""The Helm chart's least privilege, default-deny egress and names, rendered by the real Helm engine
(helm-python-sdk, offline; no cluster runs here):

- service-account tokens: no pod mounts one; only KubeRay's autoscaler sidecar gets a projected,
  short-lived token, and the chart's own ServiceAccount stays the head's (KubeRay binds its
  autoscaler Role to the head's service account);
- NetworkPolicies over a matrix of value combinations: no rule without peers (which would reach
  any address), refusals with a message where a needed peer list is missing, the KubeRay operator
  reaching only the head's dashboard and Serve health port;
- names for the longest release names Helm accepts, in every upgrade strategy, against
  Kubernetes' limits and KubeRay's (RayService name <= 47 characters);
- the registry values' pattern.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from test_helm_chart import CASES, CHART, FULL, KUBE_VERSIONS, NAMESPACE, RELEASE, all_pods, containers, documents, one

TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
AUTOSCALING = {
    "ray": {"autoscaling": {"enabled": True}},
    "networkPolicy": {"apiServerCidrs": ["10.0.0.1/32"]},
}


@pytest.fixture(scope="module")
def chart():
    loaded = helm_python.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(chart, values: dict, name: str = RELEASE) -> dict[str, str]:
    return chart.render(copy.deepcopy(values), name=name, namespace=NAMESPACE, is_install=True)


def docs_of(chart, values: dict, name: str = RELEASE) -> list[dict]:
    return documents(render(chart, values, name))


def refused(chart, values: dict, name: str = RELEASE) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, values, name)
    return str(caught.value)


def head_pod_as_kuberay_runs_it(rayservice: dict) -> dict:
    """The head Pod with the autoscaler container KubeRay injects (name `autoscaler`, the
    autoscalerOptions merged in), as far as the chart decides it."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    template = copy.deepcopy(cluster["headGroupSpec"]["template"])
    options = cluster.get("autoscalerOptions")
    if cluster.get("enableInTreeAutoscaling") and options:
        template["spec"]["containers"].append(
            {
                "name": "autoscaler",
                "image": options["image"],
                "imagePullPolicy": options["imagePullPolicy"],
                "command": ["/bin/bash", "-lc", "--"],
                "args": ["ray kuberay-autoscaler --cluster-name $(RAY_CLUSTER_NAME)"],
                "env": options.get("env", []),
                "resources": options["resources"],
                "securityContext": options["securityContext"],
                "volumeMounts": options.get("volumeMounts", []),
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{rayservice['metadata']['name']}-head", "namespace": NAMESPACE, **template["metadata"]},
        "spec": template["spec"],
    }


# --- service-account tokens ---------------------------------------------------------------------

TOKEN_CASES = {
    **CASES,
    "autoscaling": AUTOSCALING,
    "autoscaling-audience": merge(
        AUTOSCALING,
        {"ray": {"autoscaling": {"token": {"expirationSeconds": 900, "audience": "https://kubernetes.default.svc"}}}},
    ),
}


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_only_the_autoscaler_holds_a_token(chart, case):
    """No pod automounts a token; the Ray, ingress, engine, migrations and test containers mount
    none; with autoscaling the autoscaler container alone mounts a projected, short-lived one."""
    values = TOKEN_CASES[case]
    docs = docs_of(chart, values)
    rayservice = one(docs, "RayService")
    autoscaling = rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    pods = [(name, pod) for name, pod in all_pods(docs) if name != "head"]
    pods.append(("head", head_pod_as_kuberay_runs_it(rayservice)))
    pods += [(d["metadata"]["name"], d) for d in docs if d["kind"] == "Pod"]  # helm test pods
    token_holders = []
    for name, pod in pods:
        spec = pod["spec"]
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(spec):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (name, container["name"], mount)  # mounts resolve
                sources = volumes[mount["name"]].get("projected", {}).get("sources", [])
                if mount["mountPath"].startswith("/var/run/secrets") or any(
                    "serviceAccountToken" in s for s in sources
                ):
                    token_holders.append((name, container["name"], mount, sources))
    if not autoscaling:
        assert token_holders == []
        return
    assert [(n, c) for n, c, _, _ in token_holders] == [("head", "autoscaler")]
    _, _, mount, sources = token_holders[0]
    assert mount == {"name": "autoscaler-token", "mountPath": TOKEN_DIR, "readOnly": True}
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    wanted = values["ray"]["autoscaling"].get("token", {})
    assert token["path"] == "token"
    assert token["expirationSeconds"] == wanted.get("expirationSeconds", 600) <= 3600
    assert token.get("audience") == wanted.get("audience")  # unset: the API server's own audience
    ca = next(s["configMap"] for s in sources if "configMap" in s)
    assert ca == {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    namespace = next(s["downwardAPI"] for s in sources if "downwardAPI" in s)["items"]
    assert namespace == [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]


def test_the_head_with_its_autoscaler_validates_strictly(chart):
    """The head Pod KubeRay builds (autoscaler container injected, token volume) is a valid Pod."""
    for values in (AUTOSCALING, CASES["production"]):
        head = head_pod_as_kuberay_runs_it(one(docs_of(chart, values), "RayService"))
        assert [c["name"] for c in head["spec"]["containers"]] == ["ray-head", "autoscaler"]
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(head, version, strict=True)


@pytest.mark.parametrize("autoscaling", [False, True])
def test_the_chart_service_account_is_kept(chart, autoscaling):
    """The head runs as the chart's ServiceAccount (with its annotations) with or without
    autoscaling: KubeRay then binds its autoscaler Role to it instead of creating its own."""
    values = merge(AUTOSCALING if autoscaling else {}, {"serviceAccount": {"annotations": {"agency.gov/owner": "llm"}}})
    docs = docs_of(chart, values)
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {"agency.gov/owner": "llm"}
    assert account["automountServiceAccountToken"] is False
    for name, pod in all_pods(docs):
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"], name
    existing = merge(values, {"serviceAccount": {"create": False, "name": "agency-llm-sa"}})
    docs = docs_of(chart, existing)
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    assert {pod["spec"]["serviceAccountName"] for _, pod in all_pods(docs)} == {"agency-llm-sa"}


def test_autoscaling_never_binds_the_default_service_account(chart):
    message = refused(chart, merge(AUTOSCALING, {"serviceAccount": {"create": False}}))
    assert "ray.autoscaling.enabled needs a service account of the release's own" in message


# --- default-deny egress, narrow ingress --------------------------------------------------------

DB = {"none": {}, "peers": {"networkPolicy": {"database": {"peers": [{"ipBlock": {"cidr": "10.20.0.15/32"}}]}}}}
CNPG = {"external": {}, "cnpg": {"database": {"cloudnativepg": {"enabled": True}}}}
OIDC = {
    "no-oidc": {},
    "oidc": {
        "oidc": {"issuer": "https://sso.agency.gov/realms/agency"},
        "networkPolicy": {
            "keycloak": {"peers": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sso"}}}]}
        },
    },
}
SCALER = {"fixed": {}, "autoscaling": AUTOSCALING}
EXPOSED = {
    "closed": {},
    "api+metrics": {
        "networkPolicy": {"apiAllowedNamespaces": ["gateways"]},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "metrics": {"metrics": {"serviceMonitor": {"enabled": True}}},
}
EXTRA = {"none": {}, "extra": {"networkPolicy": {"extraEgress": [{"to": [{"ipBlock": {"cidr": "10.9.0.0/24"}}]}]}}}
COMBINATIONS = {
    "/".join(keys): [part[key] for part, key in zip((DB, CNPG, OIDC, SCALER, EXPOSED, EXTRA), keys, strict=True)]
    for keys in itertools.product(DB, CNPG, OIDC, SCALER, EXPOSED, EXTRA)
}


def _combined(parts: list[dict]) -> dict:
    values: dict = {}
    for part in parts:
        values = merge(values, part)
    return values


def _selects(policy: dict, labels: dict) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def _pod_labels(docs: list[dict]) -> dict[str, dict]:
    return {name: pod["metadata"]["labels"] for name, pod in all_pods(docs)}


@pytest.fixture(scope="module")
def combinations(chart) -> dict[str, list[dict]]:
    return {case: docs_of(chart, _combined(parts)) for case, parts in COMBINATIONS.items()}


@pytest.mark.parametrize("case", list(COMBINATIONS) + list(CASES))
def test_no_network_rule_reaches_any_address(chart, combinations, case):
    """Every NetworkPolicy rule names its peers, every peer selects something: no empty `to:` or
    `from:` and no port-only rule (which Kubernetes reads as any address)."""
    docs = combinations[case] if case in combinations else docs_of(chart, CASES[case])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["metadata"]["name"].endswith("-default-deny") for p in policies)
    for policy in policies:
        name, spec = policy["metadata"]["name"], policy["spec"]
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            if direction in spec:
                assert spec[direction], (name, direction)  # null or [] would mean "allow all" / nothing
            for rule in spec.get(direction) or []:
                assert rule.get(peers_key), (name, rule)
                for peer in rule[peers_key]:
                    assert peer and all(v is not None for v in peer.values()), (name, peer)
                    if "ipBlock" in peer:
                        assert not peer["ipBlock"]["cidr"].endswith("/0"), (name, peer)


@pytest.mark.parametrize("case", list(COMBINATIONS))
def test_egress_to_postgres_keycloak_and_the_api_server_only_where_listed(combinations, case):
    docs = combinations[case]
    values = _combined(COMBINATIONS[case])
    egress = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == f"{RELEASE}-egress")
    by_port: dict[int, list[dict]] = {}
    for rule in egress["spec"]["egress"]:
        for port in rule.get("ports", []):
            by_port.setdefault(port["port"], []).extend(rule["to"])
    db_peers = values.get("networkPolicy", {}).get("database", {}).get("peers", [])
    cnpg = values.get("database", {}).get("cloudnativepg", {}).get("enabled", False)
    expected_db = ([{"podSelector": {"matchLabels": {"cnpg.io/cluster": f"{RELEASE}-pg"}}}] if cnpg else []) + db_peers
    assert by_port.get(5432, []) == expected_db
    keycloak = values.get("networkPolicy", {}).get("keycloak", {}).get("peers", [])
    assert by_port.get(443, []) == (keycloak if values.get("oidc") else [])
    api = values.get("networkPolicy", {}).get("apiServerCidrs", [])
    autoscaler = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-autoscaler")]
    if values.get("ray", {}).get("autoscaling", {}).get("enabled"):
        (policy,) = autoscaler
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-head"
        assert policy["spec"]["egress"] == [
            {"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": c}} for c in api]}
        ]
    else:
        assert autoscaler == []


def test_postgres_without_peers_is_denied_and_said(chart):
    """Defaults name no Postgres: no egress to it at all (not any address), and NOTES says so."""
    docs = docs_of(chart, {})
    egress = next(d for d in docs if d["metadata"]["name"].endswith("-egress"))
    assert [p["port"] for r in egress["spec"]["egress"] for p in r["ports"]] == [53, 53]
    notes = render(chart, {})[f"{RELEASE}/templates/NOTES.txt"]
    assert "networkPolicy.database.peers is empty" in notes
    notes = render(chart, CASES["production"])[f"{RELEASE}/templates/NOTES.txt"]
    assert "networkPolicy.database.peers is empty" not in notes


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"oidc": {"issuer": "https://sso.agency.gov/realms/agency"}},
            "oidc.issuer needs networkPolicy.keycloak.peers",
        ),
        ({"ray": {"autoscaling": {"enabled": True}}}, "ray.autoscaling.enabled needs networkPolicy.apiServerCidrs"),
    ],
)
def test_missing_peers_are_refused(chart, values, message):
    assert message in refused(chart, values)
    # Without NetworkPolicies there is nothing to pin.
    docs = docs_of(chart, merge(values, {"networkPolicy": {"enabled": False}}))
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("case", ["peers/cnpg/oidc/autoscaling/api+metrics/extra", *CASES])
def test_kuberay_reaches_the_head_only(chart, combinations, case):
    """The KubeRay operator's namespace reaches the head's dashboard and Serve health port, and
    nothing on the workers (their Serve port would bypass the Ingress)."""
    if case in CASES:
        values, docs = CASES[case], docs_of(chart, CASES[case])
    else:
        values, docs = _combined(COMBINATIONS[case]), combinations[case]
    kuberay = values.get("networkPolicy", {}).get("kuberayNamespace", "kuberay-system")
    serve_port = values.get("serve", {}).get("port", 8000)
    labels = _pod_labels(docs)
    reachable: dict[str, set[int]] = {name: set() for name in labels}
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress") or []:
            from_kuberay = any(
                p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == kuberay
                for p in rule["from"]
            )
            if not from_kuberay:
                continue
            for name, pod_labels in labels.items():
                if _selects(policy, pod_labels):
                    reachable[name] |= {p["port"] for p in rule["ports"]}
    assert reachable.pop("head") == {8265, serve_port}
    assert all(ports == set() for ports in reachable.values()), reachable


def test_kuberay_follows_the_serve_port(chart):
    docs = docs_of(chart, {"serve": {"port": 8100}})
    policy = next(d for d in docs if d["metadata"]["name"].endswith("-kuberay"))
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == [8265, 8100]


# --- names --------------------------------------------------------------------------------------

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Kinds whose names Kubernetes (or the operator) checks as DNS-1035 labels: they become DNS names.
LABEL_NAMED = {"Service", "RayService"}
KUBERAY_RAYSERVICE_MAX = 47  # MaxRayServiceNameLength: 53 - 6 for the RayCluster's "-xxxxx" suffix
CNPG_CLUSTER_MAX = 44  # CloudNativePG refuses > 50; "-N-snapshot-recovery" Jobs need <= 44

LONG_NAMES = [
    "a" * 53,  # the longest Helm allows
    "x" * 44 + "agencyllm",  # contains the chart name: the release name alone
    "a" * 38 + "--" + "b" * 13,  # a cut right after dashes
    "a" * 39 + "-" + "b" * 13,
    "agency." + "llm." * 11 + "go",  # dots: Helm allows them, Service names do not
    "r" + "9" * 52,
    "a",
]
STRATEGIES = ["NewCluster", "Recreate"]


def test_helm_allows_release_names_up_to_53():
    for name in LONG_NAMES:
        helm_python.validate_release_name(name)
    with pytest.raises(helm_python.HelmError):
        helm_python.validate_release_name("a" * 54)


def _check_names(docs: list[dict], release: str) -> None:
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        name = meta["name"]
        assert len(name) <= 253 and DNS1123_SUBDOMAIN.match(name), (kind, name)
        if kind in LABEL_NAMED:
            assert len(name) <= 63 and DNS1035_LABEL.match(name), (kind, name)
        for key, value in meta.get("labels", {}).items():
            assert len(str(value)) <= 63 and LABEL_VALUE.match(str(value)), (kind, name, key, value)
        if kind == "RayService":
            assert len(name) <= KUBERAY_RAYSERVICE_MAX, name
            # What KubeRay names after it: the RayCluster (NAME-xxxxx) and its Services.
            cluster = f"{name}-abcde"
            for derived in (cluster, f"{cluster}-head-svc", f"{name}-head-svc", f"{name}-serve-svc"):
                assert len(derived) <= 63 and DNS1035_LABEL.match(derived), derived
            spec = doc["spec"]["rayClusterConfig"]
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                for key, value in group["template"]["metadata"]["labels"].items():
                    assert len(str(value)) <= 63 and LABEL_VALUE.match(str(value)), (key, value)
        if kind == "Cluster":
            assert len(name) <= CNPG_CLUSTER_MAX and DNS1035_LABEL.match(name), name
        if kind == "Pod":
            assert len(name) <= 63, name
    assert any(d["kind"] == "RayService" for d in docs)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("release", LONG_NAMES)
def test_longest_release_names_render_valid_names(chart, release, strategy):
    for base in ({}, FULL, CASES["production"]):
        values = merge(base, {"upgrade": {"strategy": strategy}})
        docs = docs_of(chart, values, name=release)
        _check_names(docs, release)
        rayservice = one(docs, "RayService")
        if strategy == "Recreate":
            assert re.search(r"-[0-9a-f]{8}$", rayservice["metadata"]["name"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_names_stay_valid_with_overrides(chart, strategy):
    values = {"upgrade": {"strategy": strategy}, "fullnameOverride": "l" * 40, "nameOverride": "n" * 40}
    _check_names(docs_of(chart, values, name="a" * 53), "a" * 53)


@pytest.mark.parametrize("release", ["1st", "9" * 53])
def test_release_names_kuberay_cannot_take_are_refused(chart, release):
    """Helm accepts a leading digit; Service and KubeRay names (DNS-1035) do not: refused with the
    way out."""
    helm_python.validate_release_name(release)
    message = refused(chart, {}, name=release)
    assert "is not a DNS-1035 label" in message and "fullnameOverride" in message
    _check_names(docs_of(chart, {"fullnameOverride": "agencyllm"}, name=release), release)


# --- schema: registries, tokens, peers ----------------------------------------------------------

REGISTRY_OK = ["", "registry.agency.gov", "mirror.agency.internal:5000", "localhost:5000/mirror/ray", "10.0.0.5:5000"]
REGISTRY_BAD = [
    "https://x",
    "http://registry.agency.gov",
    "registry.agency.gov/",
    "reg istry",
    "-reg.gov",
    "r.gov:port",
]


@pytest.mark.parametrize("registry", REGISTRY_OK)
def test_registry_values_accept_host_port_path(chart, registry):
    for values in (
        {"global": {"imageRegistry": registry}},
        {"image": {"registry": registry}},
        {"database": {"cloudnativepg": {"enabled": True, "image": {"registry": registry}}}},
    ):
        docs_of(chart, values)


@pytest.mark.parametrize("registry", REGISTRY_BAD)
def test_registry_values_refuse_schemes_and_junk(chart, registry):
    for values, where in (
        ({"global": {"imageRegistry": registry}}, "/global/imageRegistry"),
        ({"image": {"registry": registry}}, "/image/registry"),
        ({"database": {"cloudnativepg": {"image": {"registry": registry}}}}, "/database/cloudnativepg/image/registry"),
    ):
        assert where in refused(chart, values)


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"ray": {"autoscaling": {"token": {"expirationSeconds": 60}}}}, "/ray/autoscaling/token/expirationSeconds"),
        ({"ray": {"autoscaling": {"token": {"expirationSeconds": 600, "aud": "x"}}}}, "additional properties 'aud'"),
        ({"networkPolicy": {"extraEgress": [{"ports": [{"port": 443}]}]}}, "/networkPolicy/extraEgress/0"),
        ({"networkPolicy": {"extraEgress": [{"to": [], "ports": [{"port": 443}]}]}}, "/networkPolicy/extraEgress/0/to"),
        ({"networkPolicy": {"extraEgress": [{"to": [{}]}]}}, "/networkPolicy/extraEgress/0/to/0"),
        ({"networkPolicy": {"database": {"peers": [{}]}}}, "/networkPolicy/database/peers/0"),
        ({"networkPolicy": {"keycloak": {"peers": [{}]}}}, "/networkPolicy/keycloak/peers/0"),
        ({"networkPolicy": {"dns": {"podLabels": {"k8s-app": None}}}}, "/networkPolicy/dns/podLabels"),
        ({"fullnameOverride": "1st-llm"}, "/fullnameOverride"),
        ({"fullnameOverride": "LLM"}, "/fullnameOverride"),
        ({"nameOverride": "llm.ai"}, "/nameOverride"),
    ],
)
def test_schema_refuses_open_or_invalid_values(chart, bad, where):
    assert where in refused(chart, bad)


def test_values_documented_for_the_new_settings():
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["ray"]["autoscaling"]["token"] == {"expirationSeconds": 600, "audience": ""}
