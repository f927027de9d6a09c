"""The memory the job files give prepare's Ray head and driver follows from the measured peak, recorded in
deploy/sizing/ by bench/bench_scale.py (issue 10): at least 1.5 × what the 13.15 M-input run needed."""

from __future__ import annotations

import json
import re

import yaml
from conftest import REPO

RESULTS = sorted((REPO / "deploy" / "sizing").glob("bench_scale-*.json"))[-1]
HEADROOM = 1.5
UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def full_size() -> dict:
    sizes = json.loads(RESULTS.read_text())["plan"]["sizes"]
    return max(sizes, key=lambda size: size["rows"])


def quantity(text: str) -> int:
    """A Kubernetes (``8Gi``) or compose (``3g``) memory quantity in bytes."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", str(text)).groups()
    unit = {"g": "Gi", "m": "Mi", "k": "Ki"}.get(unit, unit)
    return int(float(number) * UNITS[unit])


def test_the_recorded_run_is_the_full_size_and_meets_the_budgets():
    size = full_size()
    assert size["rows"] == 13_150_000
    assert size["dry_run"]["peak_rss_bytes"] <= 2e9
    assert size["real_run"]["driver_peak_rss_bytes"] <= 2e9
    phases = size["real_run"]["phases"]
    assert phases["listing"]["cpu_seconds"] + phases["planning"]["cpu_seconds"] <= 60


def test_the_ray_head_pod_holds_the_driver_and_ray_with_headroom():
    real = full_size()["real_run"]
    needed = HEADROOM * (real["driver_peak_rss_bytes"] + real["ray_processes_peak_rss_bytes"])
    job = yaml.safe_load((REPO / "deploy" / "k8s" / "prepare-rayjob.yaml").read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert quantity(head["requests"]["memory"]) >= needed
    assert quantity(head["limits"]["memory"]) >= quantity(head["requests"]["memory"])


def test_the_compose_driver_and_head_have_headroom():
    real = full_size()["real_run"]
    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    assert quantity(services["prepare"]["mem_limit"].split(":-")[-1].rstrip("}")) >= (
        HEADROOM * real["driver_peak_rss_bytes"])
    assert quantity(services["head"]["mem_limit"].split(":-")[-1].rstrip("}")) >= (
        HEADROOM * real["ray_processes_peak_rss_bytes"])
