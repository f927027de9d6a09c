"""Every Kubernetes manifest of the repository validates offline, strictly, on every version docs/cluster.md names.

Built-in kinds go through ``kubernetes_validate.validate(..., strict=True)``, the check behind
``kubernetes-validate --strict -k VERSION FILE``: that version's OpenAPI schema with unknown fields
refused. A custom resource (KubeRay's ``RayJob``) is checked against its schema in ``deploy/schemas/``
(``KIND-GROUP-VERSION.json``, named as kubernetes-validate names its own), whose pod templates point
into the same version's Kubernetes definitions. A resource that has neither fails: nothing is skipped.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from functools import cache
from importlib.resources import files

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO
from kubernetes_validate.utils import all_versions
from referencing import Registry, Resource

CUSTOM_SCHEMAS = REPO / "deploy" / "schemas"
DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"


def supported_versions() -> list[str]:
    """The range docs/cluster.md gives users ("Kubernetes versions: 1.A to 1.B"), every minor in it."""
    found = re.search(r"Kubernetes versions: 1\.(\d+) to 1\.(\d+)", (REPO / "docs" / "cluster.md").read_text())
    assert found, "docs/cluster.md must name the supported range as 'Kubernetes versions: 1.A to 1.B'"
    return [f"1.{minor}" for minor in range(int(found[1]), int(found[2]) + 1)]


def kubernetes_resources() -> list[tuple[str, dict]]:
    """(file, resource) for every YAML document with apiVersion and kind, in any file git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    resources = []
    for name in sorted(set(listed)):
        if not (REPO / name).exists():  # deleted in the work tree, not yet in the index
            continue
        for document in yaml.safe_load_all((REPO / name).read_text()):
            if isinstance(document, dict) and {"apiVersion", "kind"} <= document.keys():
                resources.append((name, document))
    return resources


def schema_name(resource: dict) -> str:
    """kubernetes-validate's file name for a kind: ray.io/v1 RayJob -> rayjob-ray-v1.json."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", resource["apiVersion"])
    return f"{resource['kind'].lower()}-{group_version}.json"


@cache
def definitions(version: str) -> dict:
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    return json.loads((folder / "_definitions.json").read_text())


def validate(resource: dict, version: str) -> None:
    """Raise jsonschema.ValidationError (or kubernetes-validate's) when ``resource`` is not valid on ``version``."""
    custom = CUSTOM_SCHEMAS / schema_name(resource)
    if not custom.exists():
        kubernetes_validate.validate(resource, version, strict=True)
        return
    schema = json.loads(custom.read_text())
    registry = Registry().with_resource(DEFINITIONS_URI, Resource.from_contents(definitions(version)))
    errors = sorted(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(resource),
                    key=lambda error: list(map(str, error.absolute_path)))
    if errors:
        raise errors[0]


RESOURCES = kubernetes_resources()
VERSIONS = supported_versions()


def test_the_supported_versions_are_the_ones_kubernetes_validate_ships() -> None:
    # kubernetes-validate quietly uses the nearest older schema for a version it lacks: demand each one.
    shipped = set(all_versions())
    assert VERSIONS and all(f"{version}.0" in shipped for version in VERSIONS), (VERSIONS, sorted(shipped))


def test_every_manifest_under_deploy_k8s_is_found() -> None:
    manifests = {f"deploy/k8s/{path.name}" for path in (REPO / "deploy" / "k8s").glob("*.yaml")}
    assert manifests and manifests <= {name for name, _ in RESOURCES}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "resource"), RESOURCES,
                         ids=[f"{name}:{res['kind']}/{res['metadata']['name']}" for name, res in RESOURCES])
def test_manifest_validates_strictly(name: str, resource: dict, version: str) -> None:
    try:
        validate(resource, version)
    except jsonschema.ValidationError as error:
        where = ".".join(map(str, error.absolute_path))
        pytest.fail(f"{name}: {resource['kind']} is not valid on Kubernetes {version}: {where}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{name}: no schema for {resource['apiVersion']} {resource['kind']}: kubernetes-validate has "
                    f"none, so add deploy/schemas/{schema_name(resource)}")


def test_the_custom_schemas_are_valid_json_schemas() -> None:
    schemas = sorted(CUSTOM_SCHEMAS.glob("*.json"))
    assert [path.name for path in schemas] == ["rayjob-ray-v1.json"]
    for path in schemas:
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


# ------------------------------------------------------------------ the checks can fail

def _rayjob() -> dict:
    return copy.deepcopy(next(res for _, res in RESOURCES if res["kind"] == "RayJob"))


def _head_container(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _unquoted_num_cpus(rayjob: dict) -> None:
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings


def _misspelt_spec_field(rayjob: dict) -> None:
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")


def _misspelt_container_field(rayjob: dict) -> None:
    _head_container(rayjob)["resource"] = _head_container(rayjob).pop("resources")


def _bad_quantity_type(rayjob: dict) -> None:
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"] = "6379"


def _field_newer_than_kuberay_1_2(rayjob: dict) -> None:
    rayjob["spec"]["managedBy"] = "ray.io/kuberay-operator"


@pytest.mark.parametrize("break_it", [_unquoted_num_cpus, _misspelt_spec_field, _misspelt_container_field,
                                      _bad_quantity_type, _field_newer_than_kuberay_1_2],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_broken_rayjob_is_refused(break_it) -> None:
    rayjob = _rayjob()
    validate(rayjob, VERSIONS[0])  # the real one passes
    break_it(rayjob)
    with pytest.raises(jsonschema.ValidationError):
        validate(rayjob, VERSIONS[0])


def test_a_kind_without_any_schema_is_refused_not_skipped() -> None:
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(unknown, VERSIONS[-1])


def test_pod_failure_policy_conditions_name_their_status_before_1_35() -> None:
    """The defect that started this: `onPodConditions` without `status` is refused by 1.29-1.34's schema."""
    job = copy.deepcopy(next(res for name, res in RESOURCES if name == "deploy/k8s/train-members.yaml"))
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        for condition in rule.get("onPodConditions", []):
            condition.pop("status", None)
    with pytest.raises(jsonschema.ValidationError, match="'status' is a required property"):
        validate(job, "1.34")
    validate(job, "1.35")
