"""The staff chat (Open WebUI, `chat.enabled`) in the Helm chart, rendered by the real Helm engine
(helm-python-sdk, offline; no cluster runs here):

- its environment is `agencyllm.serving.ops.chat_env`'s: the fixed part and the history switch
  read from the generated files/open-webui.yaml (written nowhere else in the chart), and the
  per-install part equal to `install_environment` for this release, secrets by secretKeyRef only;
- the pod is "restricted" (non-root although the upstream image runs as root, read-only root
  filesystem with its data directory and /tmp on emptyDirs), its image under global.imageRegistry
  at the tag of the generated version;
- NetworkPolicies: staff reach it from the allowed namespaces only, it reaches DNS, the API (and
  the API admits it), Keycloak and Postgres, nothing else; the release-wide policies skip it;
- exposure on the host of chat.publicUrl (Ingress or HTTPRoute), the realm import's client, the
  gateway's directory client, refusals with a message, Kubernetes' schemas and checkov.

The chart's generic checks (tests/test_helm_chart.py and the others) also run on the `chat` case.
"""

from __future__ import annotations

import copy
import json
import re

import helm_python
import kubernetes_validate
import pytest
import test_helm_chart as chart_tests
import yaml
from test_helm_chart import CHART, CHAT, KUBE_VERSIONS, NAMESPACE, RELEASE, all_pods, containers, documents, one
from test_helm_security import _check_names, merge

from agencyllm.serving.ops import chat_env

OPEN_WEBUI = yaml.safe_load((CHART / "files" / "open-webui.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
CHAT_NAME = f"{RELEASE}-chat"
DATA_DIR = "/app/backend/data"
ISSUER = CHAT["oidc"]["issuer"]
PUBLIC_URL = CHAT["chat"]["publicUrl"]
# Key of chat.existingSecret each secret variable reads.
SECRET_KEYS = {
    "OPENAI_API_KEY": "frontend-key",
    "FORWARD_USER_INFO_HEADER_JWT_SECRET": "frontend-key",
    "OAUTH_CLIENT_SECRET": "client-secret",
    "WEBUI_SECRET_KEY": "secret-key",
    "DATABASE_URL": "database-url",
}
# Variables of the pod's layout, beside chat_env's: Open WebUI's port, HOME on /tmp, the CA bundle.
LAYOUT = {"PORT", "HOME", "STATIC_DIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"}
GATEWAY = {
    "gateway": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}]},
    "ingress": {"enabled": False},
    "networkPolicy": {"apiAllowedNamespaces": ["gateways"]},
}


@pytest.fixture(scope="module")
def chart():
    loaded = helm_python.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart, values: dict, name: str = RELEASE) -> list[dict]:
    return documents(chart.render(copy.deepcopy(values), name=name, namespace=NAMESPACE, is_install=True))


def refused(chart, values: dict) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, values)
    return str(caught.value)


@pytest.fixture(scope="module")
def docs(chart) -> list[dict]:
    return render(chart, CHAT)


def named(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def open_webui(docs: list[dict]) -> dict:
    (container,) = named(docs, "Deployment", CHAT_NAME)["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), "a variable set twice"
    return {e["name"]: e for e in container["env"]}


# --- one source: chat_env -> files/open-webui.yaml -> the chart ----------------------------------


def test_generated_file_is_chat_env():
    """files/open-webui.yaml holds chat_env's facts (that it is current is also
    tests/test_generated_schemas.py's check)."""
    assert OPEN_WEBUI == {
        "version": chat_env.OPEN_WEBUI_VERSION,
        "image": chat_env.OPEN_WEBUI_IMAGE,
        "port": chat_env.OPEN_WEBUI_PORT,
        "fixed": chat_env.FIXED_ENVIRONMENT,
        "history_off": chat_env.HISTORY_OFF,
        "history_on": chat_env.HISTORY_ON,
    }


def test_image_is_the_generated_release():
    image = VALUES["chat"]["image"]
    assert image["tag"] == f"v{OPEN_WEBUI['version']}"
    assert f"{image['registry']}/{image['repository']}" == OPEN_WEBUI["image"]
    assert not image["digest"] and image["pullPolicy"] == "IfNotPresent"
    listed = yaml.safe_load(yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"]["artifacthub.io/images"])
    assert {"name": "open-webui", "image": f"{OPEN_WEBUI['image']}:v{OPEN_WEBUI['version']}"} in listed


def test_fixed_environment_is_written_nowhere_else():
    """The fixed variables reach the pod from the generated file only: neither the chat's template
    nor its values name one (the platform's own containers set HF_HUB_OFFLINE and the like, apart)."""
    written = [(CHART / "templates" / "chat.yaml").read_text(), json.dumps(VALUES["chat"])]
    for name in [*OPEN_WEBUI["fixed"], *OPEN_WEBUI["history_off"]]:
        assert not any(name in text for text in written), name


def test_fixed_environment_reaches_the_container(docs):
    env = env_of(open_webui(docs))
    for name, value in OPEN_WEBUI["fixed"].items():
        assert env[name] == {"name": name, "value": value}, name


@pytest.mark.parametrize("history", [None, False, True], ids=["default", "off", "on"])
def test_history_switch(chart, history):
    values = copy.deepcopy(CHAT)
    if history is not None:
        values["chat"]["history"] = history
    env = env_of(open_webui(render(chart, values)))
    wanted = OPEN_WEBUI["history_on" if history else "history_off"]
    assert set(OPEN_WEBUI["history_on"]) == set(OPEN_WEBUI["history_off"])
    for name, value in wanted.items():
        assert env[name]["value"] == value, name
    # Off: every chat is temporary, enforced.
    assert env["USER_PERMISSIONS_CHAT_TEMPORARY_ENFORCED"]["value"] == ("false" if history else "true")


def test_environment_is_install_environment(docs):
    """The container's environment is chat_env.install_environment for this release: the same
    variables (beside the pod's layout), plain values equal, secrets from chat.existingSecret."""
    env = env_of(open_webui(docs))
    placeholders = {"frontend_key": "<frontend-key>", "client_secret": "<client-secret>"}
    placeholders |= {"secret_key": "<secret-key>", "database_url": "<database-url>"}
    install = chat_env.ChatInstall(
        api_base_url=f"http://{RELEASE}:{VALUES['service']['port']}/v1",
        public_url=PUBLIC_URL,
        oidc_issuer=ISSUER,
        data_dir=DATA_DIR,
        **placeholders,
    )
    expected = chat_env.install_environment(install)
    assert set(env) == set(expected) | LAYOUT
    for name, value in expected.items():
        if name in SECRET_KEYS:
            assert value == f"<{SECRET_KEYS[name]}>"
            ref = {"name": CHAT["chat"]["existingSecret"], "key": SECRET_KEYS[name]}
            assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": ref}}, name
        else:
            assert env[name] == {"name": name, "value": value}, name
    assert env["OAUTH_CLIENT_ID"]["value"] == chat_env.OPEN_WEBUI_CLIENT_ID
    assert env["PORT"]["value"] == str(OPEN_WEBUI["port"])
    # The API's own Service and port.
    service = named(docs, "Service", RELEASE)
    assert (
        env["OPENAI_API_BASE_URL"]["value"]
        == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/v1"
    )


def test_secrets_only_by_reference(docs):
    """No Secret is rendered and no credential is a literal; every secret variable of the chat and
    the gateway's directory secret come from existing Secrets by secretKeyRef."""
    assert [d for d in docs if d["kind"] == "Secret"] == []
    for name, entry in env_of(open_webui(docs)).items():
        if any(word in name for word in ("KEY", "SECRET", "PASSWORD", "TOKEN", "DATABASE_URL")):
            assert set(entry) == {"name", "valueFrom"} and "secretKeyRef" in entry["valueFrom"], name


def test_the_gateway_gets_the_directory_client(chart, docs):
    """Every platform container (Ray pods, the migrations Job) gets the directory client, so the
    gateway accepts Open WebUI's front-end key; without its Secret or without an issuer, none."""
    platform = [(n, p) for n, p in all_pods(docs) if n != CHAT_NAME]
    assert len(platform) >= 3
    for name, pod in platform:
        for container in containers(pod["spec"]):
            env = env_of(container)
            assert env["AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID"]["value"] == "agencyllm-directory", name
            ref = env["AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "agencyllm-directory", "key": "client-secret"}, name
    custom = merge(CHAT, {"oidc": {"directory": {"clientId": "llm-directory"}}})
    head = dict(all_pods(render(chart, custom)))["head"]["spec"]["containers"][0]
    assert env_of(head)["AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID"]["value"] == "llm-directory"
    for values in (
        merge(CHAT, {"chat": {"enabled": False}, "oidc": {"directory": {"existingSecret": ""}}}),
        {"oidc": {"directory": {"existingSecret": "agencyllm-directory"}}},  # no issuer
    ):
        for _, pod in all_pods(render(chart, values)):
            for container in containers(pod["spec"]):
                assert not {e["name"] for e in container["env"]} & {
                    "AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID",
                    "AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET",
                }


# --- the pod -------------------------------------------------------------------------------------


def test_pod_is_restricted_with_writable_dirs_on_emptydirs(docs):
    deployment = named(docs, "Deployment", CHAT_NAME)
    assert deployment["spec"]["replicas"] == 1
    spec = deployment["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    container = open_webui(docs)
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000  # the upstream image would run as root
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
    # Open WebUI writes its data directory and HOME's caches: each on an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert env_of(container)["DATA_DIR"]["value"] == DATA_DIR and env_of(container)["HOME"]["value"] == "/tmp"
    assert volumes[mounts[DATA_DIR]]["emptyDir"] == {"sizeLimit": VALUES["chat"]["dataSizeLimit"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # The agency CA bundle (caBundle.configMap), read-only, for TLS to Keycloak and Postgres.
    assert volumes[mounts["/etc/agencyllm/ca"]]["configMap"]["name"] == "agency-ca"
    # Its port and probes, from the generated file's port.
    assert container["ports"] == [{"name": "http", "containerPort": OPEN_WEBUI["port"], "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe


def test_openshift_can_leave_ids_to_the_scc(chart):
    """With the IDs set to null (Helm deletes them), the SCC picks them; the rest stays restricted."""
    ids = {"runAsUser": None, "runAsGroup": None}
    values = merge(CHAT, {"chat": {"podSecurityContext": {**ids, "fsGroup": None}, "containerSecurityContext": ids}})
    deployment = named(render(chart, values), "Deployment", CHAT_NAME)
    spec = deployment["spec"]["template"]["spec"]
    for context in (spec["securityContext"], spec["containers"][0]["securityContext"]):
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context)
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_image_under_the_registry(chart, docs):
    version = OPEN_WEBUI["version"]
    assert open_webui(docs)["image"] == f"registry.agency.gov/open-webui/open-webui:v{version}"
    spec = named(docs, "Deployment", CHAT_NAME)["spec"]["template"]["spec"]
    assert spec["imagePullSecrets"] == [{"name": "agency-registry"}]
    upstream = merge(CHAT, {"global": {"imageRegistry": "", "imagePullSecrets": []}})
    assert open_webui(render(chart, upstream))["image"] == f"{OPEN_WEBUI['image']}:v{version}"
    digest = "sha256:" + "cd" * 32
    pinned = merge(CHAT, {"chat": {"image": {"digest": digest}}})
    assert open_webui(render(chart, pinned))["image"] == f"registry.agency.gov/open-webui/open-webui@{digest}"


def test_scheduling_values_reach_the_pod(chart):
    toleration = {"key": "pool", "operator": "Equal", "value": "web", "effect": "NoSchedule"}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["web"]}]}]
            }
        }
    }
    values = merge(
        CHAT,
        {"chat": {"nodeSelector": {"pool": "web"}, "tolerations": [toleration], "affinity": affinity}},
    )
    spec = named(render(chart, values), "Deployment", CHAT_NAME)["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"pool": "web"} and spec["tolerations"] == [toleration]
    assert spec["affinity"] == affinity
    extra = merge(CHAT, {"chat": {"extraEnv": [{"name": "GLOBAL_LOG_LEVEL", "value": "INFO"}]}})
    assert env_of(open_webui(render(chart, extra)))["GLOBAL_LOG_LEVEL"]["value"] == "INFO"


# --- NetworkPolicies -----------------------------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def peer_selects(peer: dict, labels: dict) -> bool:
    """Whether a peer picks a pod of the release's own namespace with these labels."""
    return set(peer) == {"podSelector"} and selects(peer["podSelector"], labels)


def policies_of(docs: list[dict]) -> list[dict]:
    """The release's NetworkPolicies (not the `helm test` hooks')."""
    hooks = {d["metadata"]["name"] for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})}
    return [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] not in hooks]


def pod_labels(docs: list[dict]) -> dict[str, dict]:
    return {name: pod["metadata"]["labels"] for name, pod in all_pods(docs)}


def ports(rule: dict) -> set[int]:
    return {p["port"] for p in rule["ports"]}


def test_release_wide_policies_skip_the_chat(docs):
    """Only the default deny and the chat's own policy select its pods: not the release-internal
    rule (Ray's ports) nor the shared egress (extraEgress)."""
    labels = pod_labels(docs)
    chat = labels[CHAT_NAME]
    selecting = {p["metadata"]["name"] for p in policies_of(docs) if selects(p["spec"]["podSelector"], chat)}
    assert selecting == {f"{RELEASE}-default-deny", CHAT_NAME}
    # The internal policy still joins the Ray pods and the Job, and admits no chat pod.
    internal = named(docs, "NetworkPolicy", f"{RELEASE}-internal")
    platform = {name: lab for name, lab in labels.items() if name != CHAT_NAME}
    assert platform and all(selects(internal["spec"]["podSelector"], lab) for lab in platform.values())
    for rule in internal["spec"]["ingress"]:
        assert not any(peer_selects(peer, chat) for peer in rule["from"])
        assert all(any(peer_selects(peer, lab) for peer in rule["from"]) for lab in platform.values())


def test_chat_reaches_dns_the_api_keycloak_and_postgres_only(docs):
    labels = pod_labels(docs)
    policy = named(docs, "NetworkPolicy", CHAT_NAME)["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "chat"
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    dns, api, keycloak, database = policy["egress"]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"} and ports(dns) == {53, 5353}
    # The API: the Serve port of the Ray pods the API Service selects, nothing else of theirs.
    service = named(docs, "Service", RELEASE)
    assert ports(api) == {VALUES["serve"]["port"]} and len(api["to"]) == 1
    selected = {name for name, lab in labels.items() if peer_selects(api["to"][0], lab)}
    serving = {name for name, lab in labels.items() if selects({"matchLabels": service["spec"]["selector"]}, lab)}
    assert selected == {name for name, lab in labels.items() if lab.get("agencyllm.io/ray") == "true"}
    assert selected >= {"head"} and CHAT_NAME not in selected and f"{RELEASE}-migrations" not in selected
    assert serving <= selected  # every pod the Service may pick (KubeRay adds ray.io/serve=true)
    assert keycloak["to"] == CHAT["networkPolicy"]["keycloak"]["peers"] and ports(keycloak) == {443}
    assert database["to"] == CHAT["networkPolicy"]["database"]["peers"] and ports(database) == {5432}
    # Staff come in through the ingress controller's namespace, on Open WebUI's port only.
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert ports(rule) == {OPEN_WEBUI["port"]}


def test_the_api_admits_the_chat_on_the_serve_port(docs):
    labels = pod_labels(docs)
    reachable: dict[str, set[int]] = {name: set() for name in labels}
    for policy in policies_of(docs):
        for rule in policy["spec"].get("ingress") or []:
            if any(peer_selects(peer, labels[CHAT_NAME]) for peer in rule["from"]):
                for name, lab in labels.items():
                    if selects(policy["spec"]["podSelector"], lab):
                        reachable[name] |= ports(rule)
    serve = VALUES["serve"]["port"]
    assert reachable.pop("head") == {serve}
    assert reachable.pop(f"{RELEASE}-migrations") == set() and reachable.pop(CHAT_NAME) == set()
    assert reachable and all(found == {serve} for found in reachable.values())  # the GPU workers' proxies


@pytest.mark.parametrize(
    "extra",
    [
        {"networkPolicy": {"extraEgress": [{"to": [{"ipBlock": {"cidr": "10.9.0.0/24"}}]}]}},
        {"database": {"cloudnativepg": {"enabled": True}}, "networkPolicy": {"database": {"peers": []}}},
        {"networkPolicy": {"apiAllowedNamespaces": [], "database": {"peers": []}}},
        GATEWAY,
        {"serve": {"port": 8100}},
    ],
    ids=["extra-egress", "cloudnativepg", "closed", "gateway", "serve-port"],
)
def test_chat_policy_follows_the_values(chart, extra):
    values = merge(CHAT, extra)
    docs = render(chart, values)
    policy = named(docs, "NetworkPolicy", CHAT_NAME)["spec"]
    egress = {frozenset(ports(rule)): rule["to"] for rule in policy["egress"]}
    serve = values.get("serve", {}).get("port", 8000)
    assert set(egress) - {frozenset({53, 5353})} <= {frozenset({serve}), frozenset({443}), frozenset({5432})}
    assert "10.9.0.0/24" not in json.dumps(policy)  # extraEgress is the platform's, not the chat's
    if values.get("database", {}).get("cloudnativepg", {}).get("enabled"):
        assert egress[frozenset({5432})] == [{"podSelector": {"matchLabels": {"cnpg.io/cluster": f"{RELEASE}-pg"}}}]
    elif not values["networkPolicy"]["database"]["peers"]:
        assert frozenset({5432}) not in egress  # no Postgres named: none reached, not any address
    allowed = values["networkPolicy"]["apiAllowedNamespaces"]
    if allowed:
        (rule,) = policy["ingress"]
        names = [peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]]
        assert names == allowed
    else:
        assert "ingress" not in policy  # nothing comes in
    for kube_version in KUBE_VERSIONS:
        for doc in policies_of(docs):
            kubernetes_validate.validate(doc, kube_version, strict=True)


def test_no_policies_without_network_policy(chart):
    docs = render(chart, merge(CHAT, {"networkPolicy": {"enabled": False}}))
    assert [d for d in docs if d["kind"] == "NetworkPolicy"] == []
    assert named(docs, "Deployment", CHAT_NAME)


# --- exposure, realm, refusals -------------------------------------------------------------------


def test_service_and_ingress_on_the_chat_host(chart, docs):
    service = named(docs, "Service", CHAT_NAME)
    pod = dict(all_pods(docs))[CHAT_NAME]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    ingress = named(docs, "Ingress", CHAT_NAME)["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"hosts": ["chat.agency.gov"], "secretName": "chat-tls"}]
    (rule,) = ingress["rules"]
    assert rule["host"] == "chat.agency.gov"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"]["service"] == {"name": CHAT_NAME, "port": {"name": "http"}}
    # The API's Ingress is unchanged: its own host, /v1 and /admin/v1.
    api = named(docs, "Ingress", RELEASE)["spec"]
    assert [p["path"] for p in api["rules"][0]["http"]["paths"]] == ["/v1", "/admin/v1"]
    # Annotations: the API's, with the chat's own over them; a trailing slash of publicUrl is dropped.
    values = merge(
        CHAT,
        {
            "ingress": {"annotations": {"a": "api", "b": "api"}},
            "chat": {"publicUrl": "https://chat.agency.gov:8443/", "ingress": {"annotations": {"b": "chat"}}},
        },
    )
    docs = render(chart, values)
    chat_ingress = named(docs, "Ingress", CHAT_NAME)
    assert chat_ingress["metadata"]["annotations"] == {"a": "api", "b": "chat"}
    assert chat_ingress["spec"]["rules"][0]["host"] == "chat.agency.gov"
    assert env_of(open_webui(docs))["WEBUI_URL"]["value"] == "https://chat.agency.gov:8443"


def test_httproute_with_the_gateway(chart):
    docs = render(chart, merge(CHAT, GATEWAY))
    assert [d for d in docs if d["kind"] == "Ingress"] == []
    route = named(docs, "HTTPRoute", CHAT_NAME)["spec"]
    assert route["parentRefs"] == GATEWAY["gateway"]["parentRefs"]
    assert route["hostnames"] == ["chat.agency.gov"]
    (rule,) = route["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": CHAT_NAME, "port": 8080}]
    # Neither: no route, the Service alone (NOTES says so).
    plain = merge(CHAT, {"ingress": {"enabled": False}})
    assert not [d for d in render(chart, plain) if d["kind"] in {"Ingress", "HTTPRoute"}]
    notes = chart.render(copy.deepcopy(plain), name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert f"expose Service {CHAT_NAME} yourself" in notes[f"{RELEASE}/templates/NOTES.txt"]


def test_realm_client_matches_the_deployment(chart):
    """The realm import's `open-webui` client redirects exactly where the Deployment says it is."""
    values = merge(
        CHAT,
        {"keycloak": {"realmImport": {"enabled": True, "clientSecretsSecret": "realm-clients"}}},
    )
    docs = render(chart, values)
    env = env_of(open_webui(docs))
    spec = one(docs, "KeycloakRealmImport")["spec"]
    (client,) = [c for c in spec["realm"]["clients"] if c["clientId"] == env["OAUTH_CLIENT_ID"]["value"]]
    assert client["redirectUris"] == [env["OPENID_REDIRECT_URI"]["value"]]
    assert client["webOrigins"] == [env["WEBUI_URL"]["value"]] and client["rootUrl"] == env["WEBUI_URL"]["value"]
    assert client["secret"] == "${OPEN_WEBUI_CLIENT_SECRET}"
    assert spec["placeholders"]["OPEN_WEBUI_CLIENT_SECRET"]["secret"] == {
        "name": "realm-clients",
        "key": "open-webui-client-secret",
    }
    assert spec["placeholders"]["AGENCYLLM_DIRECTORY_CLIENT_SECRET"]["secret"]["key"] == "directory-client-secret"
    directory = [c for c in spec["realm"]["clients"] if c["clientId"] == VALUES["oidc"]["directory"]["clientId"]]
    assert len(directory) == 1
    # Without the chat the realm has no Open WebUI client and no placeholder for it.
    off = one(render(chart, merge(values, {"chat": {"enabled": False}})), "KeycloakRealmImport")["spec"]
    assert "open-webui" not in {c["clientId"] for c in off["realm"]["clients"]}
    assert "OPEN_WEBUI_CLIENT_SECRET" not in off["placeholders"] and "${OPEN_WEBUI" not in json.dumps(off)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"chat": {"publicUrl": ""}}, "chat.enabled needs chat.publicUrl"),
        ({"chat": {"existingSecret": ""}}, "chat.enabled needs chat.existingSecret"),
        ({"oidc": {"issuer": ""}}, "chat.enabled needs oidc.issuer"),
        ({"oidc": {"directory": {"existingSecret": ""}}}, "chat.enabled needs oidc.directory.existingSecret"),
    ],
)
def test_incomplete_values_are_refused(chart, change, message):
    assert message in refused(chart, merge(CHAT, change))


@pytest.mark.parametrize(
    "change, where",
    [
        ({"chat": {"publicUrl": "http://chat.agency.gov"}}, "/chat/publicUrl"),
        ({"chat": {"publicUrl": "https://llm.agency.gov/chat"}}, "/chat/publicUrl"),
        ({"chat": {"replicas": 2}}, "/chat/replicas"),
        ({"chat": {"image": {"tag": "latest"}}}, "/chat/image/tag"),
        ({"chat": {"image": {"registry": "https://ghcr.io"}}}, "/chat/image/registry"),
        ({"chat": {"containerSecurityContext": {"readOnlyRootFilesystem": False}}}, "readOnlyRootFilesystem"),
        ({"chat": {"podSecurityContext": {"runAsNonRoot": False}}}, "/chat/podSecurityContext/runAsNonRoot"),
        ({"chat": {"history": "yes"}}, "/chat/history"),
        ({"chat": {"persistence": {}}}, "additional properties 'persistence'"),
        ({"oidc": {"directory": {"secret": "x"}}}, "additional properties 'secret'"),
    ],
)
def test_schema_refuses_bad_chat_values(chart, change, where):
    assert where in refused(chart, merge(CHAT, change))


def test_chat_is_off_by_default(chart):
    docs = render(chart, {})
    assert not [d for d in docs if "chat" in d["metadata"]["name"]]
    assert all("open-webui" not in c["image"] for _, pod in all_pods(docs) for c in containers(pod["spec"]))


# --- Kubernetes' schemas, names, checkov ---------------------------------------------------------

VARIANTS = {
    "ingress": CHAT,
    "gateway-cnpg-history": merge(
        CHAT,
        {
            **GATEWAY,
            "database": {"cloudnativepg": {"enabled": True}},
            "chat": {"history": True, "image": {"digest": "sha256:" + "cd" * 32}, "service": {"port": 80}},
        },
    ),
    "scc-ids": merge(
        CHAT,
        {
            "chat": {
                "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
                "containerSecurityContext": {"runAsUser": None, "runAsGroup": None},
            }
        },
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_objects_validate_strictly(chart, variant):
    docs = render(chart, VARIANTS[variant])
    core = [d for d in docs if d["kind"] not in chart_tests.CUSTOM_KINDS]
    pods = [pod for name, pod in all_pods(docs) if name == CHAT_NAME]
    assert {d["kind"] for d in core} >= {"Deployment", "Service", "NetworkPolicy"} and len(pods) == 1
    for kube_version in KUBE_VERSIONS:
        for doc in core + pods:
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {kube_version}): "
                    f"{exc.message} at {list(exc.path)}"
                ) from None
    result = helm_python.lint(
        str(CHART), copy.deepcopy(VARIANTS[variant]), strict=True, namespace=NAMESPACE, kube_version=KUBE_VERSIONS[-1]
    )
    assert result["errors"] == [] and [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("release", ["a" * 53, "agency." + "llm." * 11 + "go"])
def test_longest_release_names_give_valid_chat_names(chart, release):
    docs = render(chart, CHAT, name=release)
    _check_names(docs, release)
    chat = [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "chat"]
    assert {d["kind"] for d in chat} == {"Deployment", "Service", "Ingress", "NetworkPolicy"}
    for doc in chat:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), (doc["kind"], name)


def test_checkov_on_the_chat_variants(chart, tmp_path):
    """The chat's objects as each variant renders them: checkov finds nothing beyond the findings
    the chart accepts (tests/test_helm_chart.py ACCEPTED), and did check the Deployment."""
    rendered = {variant: render(chart, values) for variant, values in VARIANTS.items()}
    report = chart_tests.checkov_report(rendered, tmp_path)
    assert chart_tests.unexplained_findings(report) == []
    # `--quiet` reports failed checks only: the Deployment's accepted ones (pull policy, tag not
    # digest, UID) show that checkov read it.
    flagged = {f["resource"] for f in report["results"]["failed_checks"]}
    assert f"Deployment.{NAMESPACE}.{CHAT_NAME}" in flagged, sorted(flagged)
    assert report["summary"]["passed"] > 100
