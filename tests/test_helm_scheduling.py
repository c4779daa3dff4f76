"""The Helm chart's scheduling, drain and lifecycle values, rendered by the real Helm engine and
validated as tests/test_helm_chart.py does (Kubernetes' schemas strict on the oldest and newest
supported release, KubeRay's RayService CRD with unknown fields refused): PodDisruptionBudgets that
let a node drain proceed, per-group priority and runtime classes, spread, affinity, node selectors
and tolerations, ephemeral-storage requests that match the /tmp volumes, no deprecated KubeRay
fields, GCS fault tolerance, and the evaluation database kept on `helm uninstall`.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_helm_chart import (
    ACCEPTED,
    CASES,
    CHART,
    CUSTOM_KINDS,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    all_pods,
    checkov,
    documents,
    one,
    ray_pods,
    rayservice_schema,  # noqa: F401 (fixture)
)

DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


@pytest.fixture(scope="module")
def chart():
    loaded = helm_python.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart, values: dict, name: str = RELEASE) -> list[dict]:
    return documents(chart.render(copy.deepcopy(values), name=name, namespace=NAMESPACE, is_install=True))


def quantity(text: str | int) -> int:
    """Bytes of a quantity the chart writes: `50Gi`, `53248Mi` or a plain byte count."""
    text = str(text)
    if text[-2:] in UNITS:
        return int(text[:-2]) * UNITS[text[-2:]]
    return int(text)


def budgets(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}


def validate_core(docs: list[dict]) -> None:
    """PodDisruptionBudgets, Jobs and every pod the release runs, against Kubernetes' own schemas."""
    targets = [d for d in docs if d["kind"] in {"PodDisruptionBudget", "Job"}] + [p for _, p in all_pods(docs)]
    for kube_version in KUBE_VERSIONS:
        for doc in targets:
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {kube_version})"
                raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from None


def validate_crd(schema: dict, docs: list[dict]) -> None:
    errors = jsonschema.Draft7Validator(schema).iter_errors(one(docs, "RayService"))
    assert [f"{list(e.path)}: {e.message}" for e in errors] == []


def worker_groups(**extra: Any) -> list[dict]:
    """The default worker group plus a second one, each updated with `extra`."""
    first = copy.deepcopy(DEFAULTS["ray"]["workerGroups"][0])
    second = {**copy.deepcopy(first), "name": "l4", "replicas": 2, "minReplicas": 2, "maxReplicas": 3}
    return [{**first, **extra}, {**second, **extra}]


# --- PodDisruptionBudgets --------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c != "evaluation-one-gpu"])
def test_default_budgets_let_a_drain_proceed(chart, case):
    """Every budget allows at least one eviction, and each selects exactly its group's pods."""
    docs = render(chart, CASES[case])
    found = budgets(docs)
    rayservice = one(docs, "RayService")
    groups = ["head"] + [g["groupName"] for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert set(found) == {f"{RELEASE}-{g}" for g in groups}
    pods = dict(ray_pods(rayservice))
    for group in groups:
        spec = found[f"{RELEASE}-{group}"]["spec"]
        assert spec == {"maxUnavailable": 1, "selector": spec["selector"]}, group
        selector = spec["selector"]["matchLabels"]
        for name, pod in pods.items():
            selected = selector.items() <= pod["metadata"]["labels"].items()
            assert selected == (name == group), (group, name)
    validate_core(docs)


def test_evaluation_example_has_no_budgets(chart):
    assert budgets(render(chart, CASES["evaluation-one-gpu"])) == {}
    assert budgets(render(chart, {"podDisruptionBudget": {"enabled": False}})) == {}


def test_budgets_per_group(chart):
    groups = worker_groups()
    groups[1]["podDisruptionBudget"] = {"minAvailable": "50%"}
    docs = render(
        chart,
        {
            # minAvailable replaces the default maxUnavailable (which Helm merges in) of the head.
            "podDisruptionBudget": {"head": {"minAvailable": 1}, "workers": {"maxUnavailable": "25%"}},
            "ray": {"workerGroups": groups},
        },
    )
    found = {name: {k: v for k, v in d["spec"].items() if k != "selector"} for name, d in budgets(docs).items()}
    assert found == {
        f"{RELEASE}-head": {"minAvailable": 1},
        f"{RELEASE}-gpu": {"maxUnavailable": "25%"},
        f"{RELEASE}-l4": {"minAvailable": "50%"},
    }
    validate_core(docs)
    head = budgets(render(chart, {"podDisruptionBudget": {"head": {"maxUnavailable": 0}}}))[f"{RELEASE}-head"]
    assert head["spec"]["maxUnavailable"] == 0  # drains of the head's node wait for an operator


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"podDisruptionBudget": {"head": {"maxUnavailable": None}}}, "/podDisruptionBudget/head"),
        ({"podDisruptionBudget": {"workers": {"maxUnavailable": -1}}}, "/podDisruptionBudget/workers"),
        ({"podDisruptionBudget": {"workers": {"maxUnavailable": "150%"}}}, "/podDisruptionBudget/workers"),
        ({"podDisruptionBudget": {"workers": {"maxUnavailable": "one"}}}, "/podDisruptionBudget/workers"),
        ({"podDisruptionBudget": {"head": {"maxUnavailble": 1}}}, "/podDisruptionBudget/head"),
        (
            {"ray": {"workerGroups": worker_groups(podDisruptionBudget={})}},
            "/ray/workerGroups/0/podDisruptionBudget",
        ),
        (
            {"ray": {"workerGroups": worker_groups(podDisruptionBudget={"minAvailable": 1.5})}},
            "/ray/workerGroups/0/podDisruptionBudget",
        ),
    ],
)
def test_schema_refuses_bad_budgets(chart, bad, where):
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, bad)
    assert where in str(caught.value)


# --- scheduling ------------------------------------------------------------------------------------

SPREAD_ZONES = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
SPREAD_HOSTS = {
    "maxSkew": 1,
    "topologyKey": "kubernetes.io/hostname",
    "whenUnsatisfiable": "DoNotSchedule",
    "labelSelector": {"matchLabels": {"team": "llm"}},
}
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["llm"]}]}]
        }
    }
}
TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}


def scheduling_values(autoscaling: bool, strategy: str = "NewCluster") -> dict:
    groups = worker_groups(
        priorityClassName="llm-engines",
        runtimeClassName="nvidia",
        topologySpreadConstraints=[SPREAD_ZONES],
        affinity=AFFINITY,
    )
    groups[1]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-L4"}
    return {
        "upgrade": {"strategy": strategy},
        "ray": {
            "autoscaling": {"enabled": autoscaling},
            "head": {
                "priorityClassName": "llm-control",
                "topologySpreadConstraints": [SPREAD_ZONES, SPREAD_HOSTS],
                "nodeSelector": {"pool": "llm-control"},
                "tolerations": [TOLERATION],
                "affinity": AFFINITY,
            },
            "workerGroups": groups,
        },
        "migrations": {
            "priorityClassName": "llm-control",
            "nodeSelector": {"pool": "llm-control"},
            "tolerations": [TOLERATION],
            "affinity": AFFINITY,
        },
        "networkPolicy": {"apiServerCidrs": ["10.0.0.1/32"]},
    }


@pytest.mark.parametrize("strategy", ["NewCluster", "Recreate"])
@pytest.mark.parametrize("autoscaling", [False, True], ids=["autoscaling-off", "autoscaling-on"])
def test_scheduling_values_reach_every_pod(chart, rayservice_schema, autoscaling, strategy):  # noqa: F811
    docs = render(chart, scheduling_values(autoscaling, strategy))
    validate_crd(rayservice_schema, docs)
    validate_core(docs)
    pods = dict(all_pods(docs))
    head, gpu, l4, job = pods["head"]["spec"], pods["gpu"]["spec"], pods["l4"]["spec"], pods[f"{RELEASE}-migrations"]
    job = job["spec"]

    assert head["priorityClassName"] == "llm-control" and "runtimeClassName" not in head
    assert head["nodeSelector"] == {"pool": "llm-control"} and head["tolerations"] == [TOLERATION]
    assert head["affinity"] == AFFINITY
    # A constraint without a labelSelector spreads the group's own pods; one with it is kept as is.
    zones, hosts = head["topologySpreadConstraints"]
    assert zones["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-head"
    assert zones["labelSelector"]["matchLabels"].items() <= pods["head"]["metadata"]["labels"].items()
    assert hosts == SPREAD_HOSTS

    for name, spec in (("gpu", gpu), ("l4", l4)):
        assert spec["priorityClassName"] == "llm-engines" and spec["runtimeClassName"] == "nvidia", name
        assert spec["affinity"] == AFFINITY, name
        (spread,) = spec["topologySpreadConstraints"]
        selector = spread["labelSelector"]["matchLabels"]
        assert selector["agencyllm.io/worker-group"] == name
        assert selector.items() <= pods[name]["metadata"]["labels"].items()
        assert {k: v for k, v in spread.items() if k != "labelSelector"} == SPREAD_ZONES
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert l4["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}

    assert job["priorityClassName"] == "llm-control" and job["nodeSelector"] == {"pool": "llm-control"}
    assert job["tolerations"] == [TOLERATION] and job["affinity"] == AFFINITY


def test_defaults_set_no_scheduling_fields(chart):
    """Empty values render nothing: no class the cluster may lack, no empty lists or maps."""
    for _, pod in all_pods(render(chart, {})):
        spec = pod["spec"]
        for field in ("priorityClassName", "runtimeClassName", "topologySpreadConstraints", "affinity"):
            assert field not in spec, (pod["metadata"]["name"], field)


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"ray": {"head": {"runtimeClassName": "Nvidia_GPU"}}}, "/ray/head/runtimeClassName"),
        ({"ray": {"head": {"priorityClassName": "High"}}}, "/ray/head/priorityClassName"),
        ({"ray": {"workerGroups": worker_groups(runtimeClassName="nvidia ")}}, "/ray/workerGroups/0/runtimeClassName"),
        (
            {"ray": {"head": {"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}]}}},
            "/ray/head/topologySpreadConstraints/0",
        ),
        (
            {"ray": {"head": {"topologySpreadConstraints": [{**SPREAD_ZONES, "whenUnsatisfiable": "Sometimes"}]}}},
            "/ray/head/topologySpreadConstraints/0/whenUnsatisfiable",
        ),
        (
            {"ray": {"head": {"topologySpreadConstraints": [{**SPREAD_ZONES, "maxskew": 2}]}}},
            "/ray/head/topologySpreadConstraints/0",
        ),
        ({"migrations": {"nodeSelector": {"pool": 1}}}, "/migrations/nodeSelector/pool"),
        ({"migrations": {"runtimeClassName": "nvidia"}}, "additional properties 'runtimeClassName'"),
    ],
)
def test_schema_refuses_bad_scheduling(chart, bad, where):
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, bad)
    assert where in str(caught.value)


# --- ephemeral storage -----------------------------------------------------------------------------


def check_ephemeral_storage(docs: list[dict], overhead: str = "2Gi") -> int:
    """Each Ray container requests its pod's /tmp size and may use it plus the overhead. Returns
    the number of Ray pods checked."""
    checked = 0
    for name, pod in ray_pods(one(docs, "RayService")):
        spec = pod["spec"]
        tmp = next(v for v in spec["volumes"] if v["name"] == "tmp")["emptyDir"]
        assert "medium" not in tmp, name  # on the node's disk: counted as ephemeral storage
        ray = spec["containers"][0]
        requested = quantity(ray["resources"]["requests"]["ephemeral-storage"])
        limit = quantity(ray["resources"]["limits"]["ephemeral-storage"])
        assert requested == quantity(tmp["sizeLimit"]), name
        assert limit == requested + quantity(overhead), name
        # The pod's ephemeral-storage limit (the sum over its containers) covers the whole /tmp.
        total = sum(quantity(c["resources"].get("limits", {}).get("ephemeral-storage", 0)) for c in spec["containers"])
        assert total >= quantity(tmp["sizeLimit"]), name
        checked += 1
    return checked


@pytest.mark.parametrize("case", CASES)
def test_ephemeral_storage_matches_tmp(chart, case):
    docs = render(chart, CASES[case])
    assert check_ephemeral_storage(docs) >= 2
    validate_core(docs)


def test_ephemeral_storage_with_autoscaling_and_odd_sizes(chart, rayservice_schema):  # noqa: F811
    groups = worker_groups(tmpSizeLimit="1536Mi")
    groups[1]["tmpSizeLimit"] = "3Ti"
    values = {
        "ray": {
            "autoscaling": {"enabled": True},
            "ephemeralStorageOverhead": "512Ki",
            "head": {"tmpSizeLimit": "10Gi"},
            "workerGroups": groups,
        },
        "networkPolicy": {"apiServerCidrs": ["10.0.0.1/32"]},
    }
    docs = render(chart, values)
    assert check_ephemeral_storage(docs, overhead="512Ki") == 3
    head = dict(ray_pods(one(docs, "RayService")))["head"]["spec"]["containers"][0]
    assert head["resources"]["limits"]["ephemeral-storage"] == str(10 * 2**30 + 512 * 2**10)
    validate_crd(rayservice_schema, docs)
    validate_core(docs)
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, {"ray": {"ephemeralStorageOverhead": "2G"}})
    assert "/ray/ephemeralStorageOverhead" in str(caught.value)


# --- deprecated fields -----------------------------------------------------------------------------


def test_deprecated_kuberay_thresholds_are_gone(chart):
    """KubeRay ignores `deploymentUnhealthySecondThreshold` and `serviceUnhealthySecondThreshold`:
    the chart neither renders nor documents them, and the schema refuses the old value."""
    rendered = [json.dumps(render(chart, values)) for values in CASES.values()]
    sources = [p.read_text() for p in CHART.rglob("*") if p.is_file()]
    sources.append((CHART.parents[2] / "docs" / "install-kubernetes.md").read_text())
    for text in rendered + sources:
        assert "UnhealthySecondThreshold" not in text
    with pytest.raises(helm_python.HelmError) as caught:
        render(chart, {"serve": {"deploymentUnhealthySecondThreshold": 900}})
    assert "additional properties 'deploymentUnhealthySecondThreshold'" in str(caught.value)


# --- GCS fault tolerance ---------------------------------------------------------------------------


def test_gcs_fault_tolerance(chart, rayservice_schema):  # noqa: F811
    assert "gcsFaultToleranceOptions" not in one(render(chart, {}), "RayService")["spec"]["rayClusterConfig"]
    values = {
        "ray": {
            "gcsFaultTolerance": {
                "enabled": True,
                "redisAddress": "redis.llm-redis.svc:6379",
                "redisPasswordSecret": "ray-redis",
            }
        }
    }
    docs = render(chart, values)
    validate_crd(rayservice_schema, docs)
    options = one(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {
        "redisAddress": "redis.llm-redis.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "ray-redis", "key": "password"}}},
    }
    values["ray"]["gcsFaultTolerance"]["redisPasswordSecret"] = ""
    options = one(render(chart, values), "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "redis.llm-redis.svc:6379"}
    for bad in ({"enabled": True}, {"enabled": True, "redisAddress": "redis"}, {"redisAdress": "r:6379"}):
        with pytest.raises(helm_python.HelmError) as caught:
            render(chart, {"ray": {"gcsFaultTolerance": bad}})
        assert "/ray/gcsFaultTolerance" in str(caught.value)


# --- the evaluation database -----------------------------------------------------------------------


def test_cloudnativepg_kept_on_uninstall_and_drainable(chart):
    cluster = one(render(chart, CASES["evaluation-one-gpu"]), "Cluster")
    assert cluster["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert cluster["spec"]["instances"] == 1 and cluster["spec"]["enablePDB"] is False

    def cnpg(**settings: Any) -> dict:
        return one(render(chart, {"database": {"cloudnativepg": {"enabled": True, **settings}}}), "Cluster")

    assert cnpg(instances=3)["spec"]["enablePDB"] is True
    assert cnpg(instances=3, enablePDB=False)["spec"]["enablePDB"] is False
    assert cnpg(instances=1, enablePDB=True)["spec"]["enablePDB"] is True
    assert "annotations" not in cnpg(keepOnUninstall=False)["metadata"]
    with pytest.raises(helm_python.HelmError) as caught:
        cnpg(enablePDB="yes")
    assert "/database/cloudnativepg/enablePDB" in str(caught.value)


def test_budgets_and_scheduling_documented():
    """The platform team's checklist names each value this part of the chart adds."""
    guide = (CHART.parents[2] / "docs" / "install-kubernetes.md").read_text()
    checklist = guide.split("## Platform team checklist", 1)[1].split("\n## ", 1)[0]
    for value in (
        "podDisruptionBudget.head",
        "podDisruptionBudget.workers",
        "ray.gcsFaultTolerance",
        "priorityClassName",
        "runtimeClassName",
        "topologySpreadConstraints",
        "tmpSizeLimit",
        "ray.ephemeralStorageOverhead",
        "database.cloudnativepg.keepOnUninstall",
        "database.cloudnativepg.enablePDB",
    ):
        assert value in checklist, value


def test_checkov_on_scheduling_and_lifecycle_values(chart, tmp_path):
    """Every value of this part switched on (autoscaling, GCS fault tolerance, the evaluation
    database, custom budgets): checkov finds nothing beyond the findings the chart accepts."""
    import os
    import subprocess

    values = scheduling_values(autoscaling=True)
    values["ray"]["gcsFaultTolerance"] = {"enabled": True, "redisAddress": "redis:6379", "redisPasswordSecret": "r"}
    values["database"] = {"cloudnativepg": {"enabled": True, "instances": 3}}
    values["podDisruptionBudget"] = {"head": {"maxUnavailable": 0}, "workers": {"minAvailable": "50%"}}
    docs = render(chart, values)
    core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    pods = [pod for name, pod in all_pods(docs) if not name.endswith("-migrations")]
    (tmp_path / "scheduling.yaml").write_text(yaml.safe_dump_all(core + pods))
    done = subprocess.run(
        [str(checkov()), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 100
    unexplained = []
    for failed in report["results"]["failed_checks"]:
        kind, _, name = failed["resource"].partition(".")
        accepted = ACCEPTED.get(failed["check_id"])
        if accepted is None or not accepted[1](kind, name.partition(".")[2]):
            unexplained.append(f"{failed['check_id']} {failed['check_name']}: {failed['resource']}")
    assert unexplained == []
