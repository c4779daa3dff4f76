"""The chart as a platform team receives it: `helm test`, the generated README, the image list for
mirroring, the OpenShift and production examples, and the optional operator resources
(Keycloak's `KeycloakRealmImport`, External Secrets' `ExternalSecret`). Rendered by the real Helm
engine and validated offline like the rest of the chart (tests/test_helm_chart.py); the operators'
CRDs are not here, so their resources are checked for the fields the operators require.
"""

from __future__ import annotations

import copy
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import test_helm_chart as chart_tests  # the chart's cases and helpers (tests/ is on sys.path)
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = chart_tests.CHART
RELEASE, NAMESPACE = chart_tests.RELEASE, chart_tests.NAMESPACE
REALM = ROOT / "infra" / "keycloak" / "agencyllm-realm.json"
KEY_FILE = "/etc/agencyllm/bootstrap/key"

# The optional operator resources switched on, beside everything the FULL case has, and the staff
# chat (Open WebUI) with its Secret and the realm's directory client.
OPERATORS = {
    **chart_tests.FULL,
    "oidc": {**chart_tests.FULL["oidc"], "directory": {"existingSecret": "agencyllm-directory"}},
    "chat": {"enabled": True, "publicUrl": "https://chat.agency.gov/", "existingSecret": "agencyllm-chat"},
    "console": {"publicUrl": "https://llm.agency.gov/", "existingSecret": "agencyllm-console"},
    "metrics": {"tokenSecret": "agencyllm-metrics"},
    "keycloak": {"realmImport": {"enabled": True, "keycloakCRName": "sso", "clientSecretsSecret": "realm-clients"}},
    "externalSecrets": {
        "enabled": True,
        "secretStoreRef": {"name": "vault", "kind": "ClusterSecretStore"},
        "database": {"key": "llm/database", "property": "url"},
        "bootstrapAdmin": {"key": "llm/admin"},
        "consoleSessionSecret": {"key": "llm/console", "property": "session"},
        "consoleClientSecret": {"key": "llm/console", "property": "client"},
        "metricsToken": {"key": "llm/metrics"},
        "oidcDirectoryClientSecret": {"key": "llm/directory", "property": "secret"},
        "chatFrontendKey": {"key": "llm/chat", "property": "frontend-key"},
        "chatClientSecret": {"key": "llm/chat", "property": "client-secret"},
        "chatSecretKey": {"key": "llm/chat", "property": "secret-key"},
        "chatDatabaseUrl": {"key": "llm/chat", "property": "database-url"},
    },
    "database": {"existingSecret": "agencyllm-database"},
}
OPERATOR_KINDS = {"KeycloakRealmImport", "ExternalSecret"}


@pytest.fixture(scope="module")
def chart():
    loaded = helm_python.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart, values: dict) -> list[dict]:
    return chart_tests.documents(chart_tests.render(chart, values))


def helm_test_pods(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Pod" and d["metadata"]["annotations"].get("helm.sh/hook") == "test"]


# --- helm test -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(chart_tests.CASES))
def test_helm_test_pod_is_a_restricted_hook_that_validates(chart, case):
    values = chart_tests.CASES[case]
    docs = render(chart, values)
    (pod,) = helm_test_pods(docs)
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True and not sc.get("privileged")
    assert (
        {"cpu", "memory"}
        <= set(container["resources"]["limits"])
        <= set(container["resources"]["requests"])
        | {
            "cpu",
            "memory",
        }
    )
    # The chart's own image: its Python runs the check, no curl needed.
    rayservice = chart_tests.one(docs, "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"] and container["command"][:2] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == pod["metadata"]["name"][:-5])
    assert env["AGENCYLLM_URL"] == (
        f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    )
    models = values.get("models") or yaml.safe_load((CHART / "values.yaml").read_text())["models"]
    assert json.loads(env["AGENCYLLM_EXPECTED_MODELS"]) == [m["id"] for m in models]
    # The bootstrap key, from the Secret the migrations Job registers, as a file (never in env).
    secret = values.get("bootstrapAdmin", {}).get("existingSecret")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if secret:
        assert mounts[str(Path(KEY_FILE).parent)] == "bootstrap-admin"
        assert volumes["bootstrap-admin"]["secret"]["secretName"] == secret
        assert volumes["bootstrap-admin"]["secret"]["items"][0]["path"] == Path(KEY_FILE).name
    else:
        assert "bootstrap-admin" not in volumes
    for kube_version in chart_tests.KUBE_VERSIONS:
        kubernetes_validate.validate(pod, kube_version, strict=True)


def _policy(docs: list[dict], suffix: str) -> dict:
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == f"{RELEASE}{suffix}"]
    return policy


def test_helm_test_pod_reaches_the_serve_port_and_nothing_else(chart):
    docs = render(chart, chart_tests.CASES["production"])
    (pod,) = helm_test_pods(docs)
    labels = pod["metadata"]["labels"]
    release_policies = [
        d for d in docs if d["kind"] == "NetworkPolicy" and "helm.sh/hook" not in d["metadata"].get("annotations", {})
    ]
    # The release's own policies (internal traffic, database, Keycloak egress) do not select it.
    for policy in release_policies:
        assert not policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), policy["metadata"]["name"]
    own = _policy(docs, "-test")
    assert own["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert own["metadata"]["annotations"]["helm.sh/hook-weight"] < pod["metadata"]["annotations"]["helm.sh/hook-weight"]
    assert own["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(own["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in own["spec"]
    dns, api = own["spec"]["egress"]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert {p["port"] for p in dns["ports"]} == {53, 5353}
    assert api["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert api["to"][0]["podSelector"]["matchLabels"]["agencyllm.io/ray"] == "true"
    # The Ray pods accept the test pod on the Serve port only, while the test runs.
    ray_side = _policy(docs, "-test-api")
    assert ray_side["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert ray_side["spec"]["podSelector"]["matchLabels"]["agencyllm.io/ray"] == "true"
    (rule,) = ray_side["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert rule["from"] == [{"podSelector": {"matchLabels": own["spec"]["podSelector"]["matchLabels"]}}]
    for policy in (own, ray_side):
        for kube_version in chart_tests.KUBE_VERSIONS:
            kubernetes_validate.validate(policy, kube_version, strict=True)
    # Without NetworkPolicies, none for the test either.
    plain = render(chart, {"networkPolicy": {"enabled": False}})
    assert [d for d in plain if d["kind"] == "NetworkPolicy"] == [] and len(helm_test_pods(plain)) == 1


class _Platform(http.server.BaseHTTPRequestHandler):
    """Stands in for the platform behind the Service: /readyz and /v1/models with a key."""

    ready = True
    models = ["llama-3.1-8b-instruct"]
    key = "sk-agency-test"

    def do_GET(self) -> None:
        if self.path == "/readyz":
            status, body = (200, {"status": "ready"}) if self.ready else (503, {"status": "not_ready"})
        elif self.path == "/v1/models":
            if self.headers.get("Authorization") != f"Bearer {self.key}":
                status, body = 401, {"error": {"message": "missing or invalid key"}}
            else:
                status, body = 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        else:
            status, body = 404, {}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def platform():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Platform)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_test_pod(chart, values: dict, platform, tmp_path: Path, key: str | None) -> subprocess.CompletedProcess:
    """The test pod's own script and environment, run here against the stand-in platform."""
    (pod,) = helm_test_pods(render(chart, values))
    (container,) = pod["spec"]["containers"]
    script = container["command"][2]
    assert script.count(KEY_FILE) == 1
    key_file = tmp_path / "key"
    key_file.unlink(missing_ok=True)
    if key is not None:
        key_file.write_text(key + "\n")
    env = {e["name"]: e["value"] for e in container["env"]}
    env["AGENCYLLM_URL"] = f"http://127.0.0.1:{platform.server_address[1]}"
    return subprocess.run(
        [sys.executable, "-c", script.replace(KEY_FILE, str(key_file))],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_helm_test_script_checks_readiness_models_and_auth(chart, platform, tmp_path, monkeypatch):
    with_key = {"bootstrapAdmin": {"existingSecret": "agencyllm-bootstrap-admin"}}
    done = _run_test_pod(chart, with_key, platform, tmp_path, _Platform.key)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
    assert "models: llama-3.1-8b-instruct" in done.stdout
    # A model the values list but the platform does not serve fails the test.
    monkeypatch.setattr(_Platform, "models", ["other"])
    done = _run_test_pod(chart, with_key, platform, tmp_path, _Platform.key)
    assert done.returncode != 0 and "models not served: llama-3.1-8b-instruct" in done.stderr
    # A wrong key fails it.
    monkeypatch.setattr(_Platform, "models", ["llama-3.1-8b-instruct"])
    done = _run_test_pod(chart, with_key, platform, tmp_path, "sk-agency-wrong")
    assert done.returncode != 0 and "GET /v1/models 401" in done.stdout
    # Without a bootstrap key the test checks that the API refuses anonymous callers.
    done = _run_test_pod(chart, {}, platform, tmp_path, None)
    assert done.returncode == 0 and "GET /v1/models without a key 401" in done.stdout, done.stdout + done.stderr
    # Not ready: fails at once, naming /readyz.
    monkeypatch.setattr(_Platform, "ready", False)
    done = _run_test_pod(chart, with_key, platform, tmp_path, _Platform.key)
    assert done.returncode != 0 and "GET /readyz 503" in done.stdout and "not ready" in done.stderr


# --- README ------------------------------------------------------------------------------------------


def _gen_schemas():
    """scripts/gen_schemas.py, the README's generator, as a module."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_schemas
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return gen_schemas


def _leaf_paths(schema: dict, path: str = "") -> list[str]:
    if schema.get("type") == "object" and schema.get("properties"):
        return [p for name, sub in schema["properties"].items() for p in _leaf_paths(sub, f"{path}.{name}".lstrip("."))]
    return [path]


def test_readme_parameter_table_is_generated_and_complete():
    gen_schemas = _gen_schemas()
    readme = (CHART / "README.md").read_text()
    assert gen_schemas.helm_readme(readme) == readme, "run `python scripts/gen_schemas.py`"
    table = readme.partition(gen_schemas.README_START)[2].partition(gen_schemas.README_END)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.strip().splitlines()[2:]}
    # Every value appears: a row of its own, or inside a row of an object documented as a whole.
    schema = json.loads((CHART / "values.schema.json").read_text())
    for leaf in _leaf_paths(schema):
        assert any(leaf == key or leaf.startswith(key + ".") for key in rows), leaf
    for key, line in rows.items():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4 and cells[1] and cells[3], f"{key}: type and description are required"
    # Every top-level key of values.yaml has its default shown.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert rows["models"].split(" | ")[2].strip("` ") == json.dumps(values["models"], ensure_ascii=False)
    # Stale tables are caught: a new value without its row fails the check.
    grown = json.loads(json.dumps(schema))
    grown["properties"]["nameOverride"]["description"] = "changed"
    assert gen_schemas.parameter_rows(
        grown, values, gen_schemas.values_comments((CHART / "values.yaml").read_text())
    ) != [line for line in table.strip().splitlines()[2:]]


def test_readme_states_the_prerequisites_chart_yaml_declares():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    low, high = (v.lstrip(">=<").split(".") for v in meta["kubeVersion"].split())
    assert f"| Kubernetes | {low[0]}.{low[1]} – {high[0]}.{int(high[1]) - 1} |" in readme
    kuberay = meta["annotations"]["agencyllm.io/requires"].split(">=")[1].split()[0]
    assert f"| KubeRay operator | ≥ {kuberay} |" in readme
    assert "../../../docs/install-kubernetes.md" in readme and (CHART / "../../../docs/install-kubernetes.md").exists()
    assert "artifacthub.io/images" in readme


# --- images for mirroring ----------------------------------------------------------------------------


def _annotated_images() -> dict[str, str]:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return {i["name"]: i["image"] for i in yaml.safe_load(meta["annotations"]["artifacthub.io/images"])}


def _repository(image: str) -> str:
    """registry/repository:tag or @digest -> repository."""
    name = image.split("@")[0]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def _all_images(docs: list[dict]) -> set[str]:
    """Every image reference the rendered release would pull."""
    images = set()
    for doc in docs:
        if doc["kind"] == "Cluster":
            images.add(doc["spec"]["imageName"])
        if doc["kind"] == "RayService" and "autoscalerOptions" in doc["spec"]["rayClusterConfig"]:
            images.add(doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["image"])
    pods = [pod for _, pod in chart_tests.all_pods(docs)] + helm_test_pods(docs)
    return images | {c["image"] for pod in pods for c in chart_tests.containers(pod["spec"])}


def test_chart_yaml_lists_every_image_the_chart_can_run(chart):
    listed = _annotated_images()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    everything = {**OPERATORS, "database": {"cloudnativepg": {"enabled": True}}}
    cases = {**chart_tests.CASES, "operators": OPERATORS, "everything": everything}
    seen: set[str] = set()
    for case, case_values in cases.items():
        for image in _all_images(render(chart, case_values)):
            assert _repository(image) in {_repository(i) for i in listed.values()}, (case, image)
            seen.add(_repository(image))
    assert seen == {_repository(i) for i in listed.values()}, "an image is listed that nothing runs"
    # With default values, CloudNativePG and the chat on, the chart runs exactly the listed references.
    every_part = {**OPERATORS, "global": {}, "image": {}, "database": {"cloudnativepg": {"enabled": True}}}
    assert _all_images(render(chart, every_part)) == set(listed.values())
    assert listed["agencyllm"].endswith(f":{values['image']['tag']}")
    assert listed["postgresql"].endswith(f":{values['database']['cloudnativepg']['image']['tag']}")
    assert listed["open-webui"].endswith(f":{values['chat']['image']['tag']}")


# --- examples ----------------------------------------------------------------------------------------


def test_every_example_is_a_validated_case():
    """tests/test_helm_chart.py runs lint, kubernetes-validate, the KubeRay CRD, checkov and the
    platform's rules on each of its CASES: every example file must be one of them."""
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        assert chart_tests.CASES.get(example.stem) == yaml.safe_load(example.read_text()), example.name


def _security_contexts(docs: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for name, pod in chart_tests.all_pods(docs) + [(p["metadata"]["name"], p) for p in helm_test_pods(docs)]:
        found.append((name, pod["spec"]["securityContext"]))
        found.extend((f"{name}/{c['name']}", c["securityContext"]) for c in chart_tests.containers(pod["spec"]))
    for doc in docs:
        options = (
            doc.get("spec", {}).get("rayClusterConfig", {}).get("autoscalerOptions")
            if doc["kind"] == "RayService"
            else None
        )
        if options:
            found.append(("autoscaler", options["securityContext"]))
    return found


def test_openshift_example_leaves_ids_to_the_scc(chart):
    docs = render(chart, chart_tests.CASES["openshift"])
    contexts = _security_contexts(docs)
    assert len(contexts) >= 8
    for where, context in contexts:
        assert not {"runAsUser", "runAsGroup", "fsGroup", "supplementalGroups"} & set(context), where
        assert context["runAsNonRoot"] is True and context["seccompProfile"]["type"] == "RuntimeDefault", where
    # Plain Kubernetes keeps the image's user (1000:100).
    for where, context in _security_contexts(render(chart, {})):
        assert context.get("runAsUser") == 1000, where
    # OpenShift's DNS pods answer on 5353: the example allows it to them alone.
    egress = _policy(docs, "-egress")["spec"]["egress"]
    dns_5353 = [r for r in egress if {p["port"] for p in r.get("ports", [])} == {5353}]
    assert dns_5353 and all(
        peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "openshift-dns"}
        for r in dns_5353
        for peer in r["to"]
    )


def test_production_example_pins_images_by_digest(chart):
    values = chart_tests.CASES["production"]
    digest = values["image"]["digest"]
    assert digest.startswith("sha256:") and len(digest) == 71
    text = (ROOT / "examples" / "production.yaml").read_text()
    assert "PLACEHOLDER" in text, "say that the example's digest is not a real image"
    images = _all_images(render(chart, values))
    assert images and all(i.endswith("@" + digest) for i in images if "agencyllm/agencyllm" in i)


# --- optional operators: Keycloak realm import, External Secrets -------------------------------------


def test_realm_copy_in_the_chart_is_the_realm():
    """Helm reads files inside the chart only: the chart's copy must be the realm file itself."""
    assert (CHART / "files" / "agencyllm-realm.json").read_bytes() == REALM.read_bytes()


# Realm placeholders the operator fills from keycloak.realmImport.clientSecretsSecret: key in that Secret.
REALM_SECRETS = {
    "AGENCYLLM_GATEWAY_CLIENT_SECRET": "gateway-client-secret",
    "AGENCYLLM_SERVICE_CLIENT_SECRET": "service-client-secret",
    "AGENCYLLM_DIRECTORY_CLIENT_SECRET": "directory-client-secret",
    "OPEN_WEBUI_CLIENT_SECRET": "open-webui-client-secret",
}


def _realm_import(docs: list[dict]) -> dict:
    (realm_import,) = [d for d in docs if d["kind"] == "KeycloakRealmImport"]
    return realm_import


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "no-chat"])
def test_keycloak_realm_import(chart, chat):
    values = copy.deepcopy(OPERATORS)
    if not chat:
        values["chat"] = {"enabled": False}
    realm_import = _realm_import(render(chart, values))
    assert realm_import["apiVersion"] == "k8s.keycloak.org/v2alpha1"
    assert realm_import["metadata"]["name"] == f"{RELEASE}-realm" and realm_import["metadata"]["namespace"] == NAMESPACE
    spec = realm_import["spec"]
    assert spec["keycloakCRName"] == "sso"
    realm_text = REALM.read_text()
    assert all("${" + p + "}" in realm_text for p in REALM_SECRETS)
    # The public URLs are filled by the chart (trailing slash dropped); the secrets by the operator.
    expected = json.loads(
        realm_text.replace("${AGENCYLLM_PUBLIC_URL}", "https://llm.agency.gov").replace(
            "${OPEN_WEBUI_URL}", "https://chat.agency.gov"
        )
    )
    if not chat:
        # Without the chat, the realm has no Open WebUI client (its redirect would point nowhere).
        expected["clients"] = [c for c in expected["clients"] if c["clientId"] != "open-webui"]
    assert spec["realm"] == expected
    assert {c["clientId"] for c in spec["realm"]["clients"]} >= {"agencyllm-gateway", "agencyllm-directory"}
    wanted = {p: key for p, key in REALM_SECRETS.items() if chat or not p.startswith("OPEN_WEBUI")}
    assert {p: v["secret"]["key"] for p, v in spec["placeholders"].items()} == wanted
    assert {v["secret"]["name"] for v in spec["placeholders"].values()} == {"realm-clients"}
    # No placeholder is left but those the operator fills.
    text = json.dumps(spec["realm"])
    for placeholder in wanted:
        text = text.replace("${" + placeholder + "}", "")
    assert "${AGENCYLLM_" not in text and "${OPEN_WEBUI" not in text
    if chat:
        (client,) = [c for c in spec["realm"]["clients"] if c["clientId"] == "open-webui"]
        assert client["redirectUris"] == ["https://chat.agency.gov/oauth/oidc/callback"]
        assert client["secret"] == "${OPEN_WEBUI_CLIENT_SECRET}"
    # Another namespace (where the Keycloak resource lives) is honoured.
    other = copy.deepcopy(OPERATORS)
    other["keycloak"]["realmImport"]["namespace"] = "keycloak"
    (moved,) = [d for d in render(chart, other) if d["kind"] == "KeycloakRealmImport"]
    assert moved["metadata"]["namespace"] == "keycloak"
    assert [d for d in render(chart, {}) if d["kind"] in OPERATOR_KINDS] == []


def _pod_secret_refs(docs: list[dict]) -> set[tuple[str, str]]:
    """(Secret, key) pairs the release's pods read: env secretKeyRefs and secret volumes."""
    refs = set()
    for _, pod in chart_tests.all_pods(docs):
        for container in chart_tests.containers(pod["spec"]):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        for volume in pod["spec"].get("volumes", []):
            if "secret" in volume:
                refs |= {(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]}
    return refs


def test_external_secrets_fill_the_secrets_the_pods_read(chart):
    docs = render(chart, OPERATORS)
    external = [d for d in docs if d["kind"] == "ExternalSecret"]
    filled = set()
    for doc in external:
        assert doc["apiVersion"] == "external-secrets.io/v1"
        spec = doc["spec"]
        assert spec["secretStoreRef"] == {"name": "vault", "kind": "ClusterSecretStore"}
        assert spec["target"]["name"] == doc["metadata"]["name"] and spec["refreshInterval"] == "1h"
        for item in spec["data"]:
            assert item["remoteRef"]["key"].startswith("llm/") and item["secretKey"]
            filled.add((spec["target"]["name"], item["secretKey"]))
    assert filled == {
        ("agencyllm-database", "url"),
        ("admin-key", "key"),
        ("agencyllm-console", "session-secret"),
        ("agencyllm-console", "client-secret"),
        ("agencyllm-metrics", "token"),
        ("agencyllm-directory", "client-secret"),
        ("agencyllm-chat", "frontend-key"),
        ("agencyllm-chat", "client-secret"),
        ("agencyllm-chat", "secret-key"),
        ("agencyllm-chat", "database-url"),
    }
    assert filled == _pod_secret_refs(docs)
    # Without the chat, nothing is made for its Secret (the pods would not read it).
    no_chat = copy.deepcopy(OPERATORS)
    no_chat["chat"]["enabled"] = False
    names = {d["metadata"]["name"] for d in render(chart, no_chat) if d["kind"] == "ExternalSecret"}
    assert "agencyllm-chat" not in names and "agencyllm-directory" in names
    console = next(d for d in external if d["metadata"]["name"] == "agencyllm-console")
    assert {i["remoteRef"]["property"] for i in console["spec"]["data"]} == {"session", "client"}
    # With CloudNativePG the database Secret is the operator's: no ExternalSecret for it.
    with_pg = copy.deepcopy(OPERATORS)
    with_pg["database"] = {"cloudnativepg": {"enabled": True}}
    names = {d["metadata"]["name"] for d in render(chart, with_pg) if d["kind"] == "ExternalSecret"}
    assert "agencyllm-database" not in names and "admin-key" in names


@pytest.mark.parametrize(
    "values, message",
    [
        ({"keycloak": {"realmImport": {"enabled": True, "clientSecretsSecret": "c"}}}, "needs console.publicUrl"),
        (
            {"keycloak": {"realmImport": {"enabled": True}}, "console": {"publicUrl": "https://llm.agency.gov"}},
            "needs keycloak.realmImport.clientSecretsSecret",
        ),
        ({"externalSecrets": {"enabled": True}}, "needs externalSecrets.secretStoreRef.name"),
        (
            {"externalSecrets": {"enabled": True, "secretStoreRef": {"name": "v"}, "bootstrapAdmin": {"key": "k"}}},
            "set bootstrapAdmin.existingSecret",
        ),
    ],
)
def test_operator_options_refuse_incomplete_values(chart, values, message):
    with pytest.raises(helm_python.HelmError) as caught:
        chart_tests.render(chart, values)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"externalSecrets": {"secretStoreRef": {"kind": "Vault"}}}, "/externalSecrets/secretStoreRef/kind"),
        ({"externalSecrets": {"refreshInterval": "hourly"}}, "/externalSecrets/refreshInterval"),
        ({"externalSecrets": {"database": {"path": "x"}}}, "additional properties 'path'"),
        (
            {"keycloak": {"realmImport": {"clientSecretsSecret": "Bad_Name"}}},
            "/keycloak/realmImport/clientSecretsSecret",
        ),
    ],
)
def test_schema_refuses_bad_operator_values(chart, bad, where):
    with pytest.raises(helm_python.HelmError) as caught:
        chart_tests.render(chart, bad)
    assert where in str(caught.value)


@pytest.mark.parametrize("kube_version", chart_tests.KUBE_VERSIONS)
def test_operator_options_lint_and_core_objects_validate(chart, kube_version):
    result = helm_python.lint(
        str(CHART), copy.deepcopy(OPERATORS), strict=True, namespace=NAMESPACE, kube_version=kube_version
    )
    assert result["errors"] == [] and [m for m in result["messages"] if m["severity"] > 1] == []
    docs = render(chart, OPERATORS)
    assert {d["kind"] for d in docs} >= OPERATOR_KINDS
    for doc in docs:
        if doc["kind"] not in chart_tests.CUSTOM_KINDS | OPERATOR_KINDS:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        # Every object carries the fields any API server requires.
        assert doc["apiVersion"] and doc["metadata"]["name"] and doc["metadata"]["namespace"], doc["kind"]


def test_readme_reads_comments_the_way_values_yaml_writes_them():
    gen_schemas = _gen_schemas()
    text = """# A section about a.
a:
  # -- Documented as a whole,
  # over two lines.
  whole: {x: 1}
  # A plain comment.
  plain: 2

  undocumented: 3
list:
  - name: item
    # not a path: inside a list
    inner: 1
after: true
"""
    assert gen_schemas.values_comments(text) == {
        "a": ("A section about a.", False),
        "a.whole": ("Documented as a whole, over two lines.", True),
        "a.plain": ("A plain comment.", False),
        "a.undocumented": ("", False),
        "list": ("", False),
        "after": ("", False),
    }
    schema = {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "whole": {"type": "object", "properties": {"x": {"type": "integer"}}},
                    "plain": {"type": "integer", "description": "From the schema."},
                    "undocumented": {"type": ["integer", "null"]},
                },
            },
            "list": {"type": "array"},
            "after": {"const": True},
        },
    }
    values = yaml.safe_load(text)
    assert gen_schemas.parameter_rows(schema, values, gen_schemas.values_comments(text)) == [
        '| `a.whole` | object | `{"x": 1}` | Documented as a whole, over two lines. |',
        "| `a.plain` | integer | `2` | From the schema. |",
        "| `a.undocumented` | integer \\| null | `3` |  |",
        '| `list` | array | `[{"name": "item", "inner": 1}]` |  |',
        "| `after` | true | `true` |  |",
    ]
