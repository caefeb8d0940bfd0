"""Validate every clusters/*.yaml the way `ray up` does, without contacting any cloud.

`ray up` (ray.autoscaler._private.commands.create_or_update_cluster) loads the YAML with
yaml.safe_load, looks the provider type up in _NODE_PROVIDERS, then _bootstrap_config runs
    prepare_config(config)                                   # defaults.yaml merge, local prep
    provider_cls.fillout_available_node_types_resources(...) # AWS: EC2 API call
    validate_config(config)                                  # ray-schema.json + node-type rules
    provider_cls.bootstrap_config(config)                    # cloud: IAM/VPC/keys via the API
`ray_up_validate` below mirrors that path. The two provider-class steps run for the
`local` provider (both offline there) and are skipped for aws/gcp: they need the cloud
SDKs and credentials, and every node type here declares its resources explicitly, so the
autodetection step would not change what validate_config checks.
"""

from __future__ import annotations

import copy
import inspect
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private import commands
from ray.autoscaler._private.providers import _NODE_PROVIDERS, _get_node_provider_cls
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
CONFIG_FILES = sorted(CLUSTERS.glob("*.yaml"))
EXPECTED = {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem-local.yaml"}
# Providers whose node-provider class can run offline (no SDK import, no API call).
OFFLINE_PROVIDERS = {"local"}
INSTALL_RE = re.compile(r'pip install .*-e "\$HOME/fedrag_ray\[(?P<extras>[a-z,]+)\]"')


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def ray_up_validate(raw: dict[str, Any]) -> dict[str, Any]:
    """The config-checking part of `ray up`, in the same order, without cloud calls."""
    config = copy.deepcopy(raw)
    provider_type = config["provider"]["type"]
    if not _NODE_PROVIDERS.get(provider_type):
        raise ValueError(f"unknown provider type {provider_type!r}")
    config = prepare_config(config)
    provider_cls = None
    if provider_type in OFFLINE_PROVIDERS:
        provider_cls = _get_node_provider_cls(config["provider"])
        config = provider_cls.fillout_available_node_types_resources(config)
    validate_config(config)
    if provider_cls is not None:
        config = provider_cls.bootstrap_config(config)
    return config


def node_types(raw: dict[str, Any]) -> dict[str, Any]:
    return raw.get("available_node_types") or {}


def all_commands(raw: dict[str, Any]) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [cmd for key in keys for cmd in raw.get(key) or []]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_expected_files_present():
    assert EXPECTED <= {p.name for p in CONFIG_FILES}


def test_mirror_matches_ray_up():
    """Guard the mirror: `ray up` still validates via prepare_config -> validate_config."""
    src = inspect.getsource(commands._bootstrap_config)
    order = [
        src.index("prepare_config(config)"),
        src.index("fillout_available_node_types_resources(config)"),
        src.index("validate_config(config)"),
        src.index("bootstrap_config(config)", src.index("validate_config(config)")),
    ]
    assert order == sorted(order)
    assert "_bootstrap_config(config" in inspect.getsource(commands.create_or_update_cluster)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=ids(CONFIG_FILES))
def test_ray_up_validation_passes(path):
    raw = load(path)
    resolved = ray_up_validate(raw)
    assert resolved["cluster_name"] == raw["cluster_name"]
    assert resolved["head_node_type"] in resolved["available_node_types"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=ids(CONFIG_FILES))
def test_node_type_resources_are_whole_numbers(path):
    for name, spec in node_types(load(path)).items():
        assert "resources" in spec, f"{path.name}: {name} has no resources"
        for key, value in spec["resources"].items():
            assert isinstance(value, int) and not isinstance(value, bool), (
                f"{path.name}: {name}.resources.{key} = {value!r} is not a whole number"
            )
            assert value >= 0


def test_local_provider_has_no_node_types():
    local = [p for p in CONFIG_FILES if load(p)["provider"]["type"] == "local"]
    assert local, "expected an on-prem (local provider) config"
    for path in local:
        raw = load(path)
        assert "available_node_types" not in raw, path.name
        assert "head_node_type" not in raw, path.name
        assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"], path.name


@pytest.mark.parametrize("path", CONFIG_FILES, ids=ids(CONFIG_FILES))
def test_setup_installs_fedrag_ray_from_synced_checkout(path):
    raw = load(path)
    assert raw["file_mounts"].get("~/fedrag_ray") == "."
    setup = raw["setup_commands"]
    installs = [m for m in map(INSTALL_RE.search, setup) if m]
    assert len(installs) == 1, f"{path.name}: setup_commands must install fedrag_ray once"
    extras = set(installs[0]["extras"].split(","))
    install_at = next(i for i, cmd in enumerate(setup) if INSTALL_RE.search(cmd))
    torch_pins = [i for i, cmd in enumerate(setup) if "torch==" in cmd]
    is_gpu = any(spec["resources"].get("GPU") for spec in node_types(raw).values())
    if is_gpu:
        # GPU images keep their CUDA torch; the CPU pin must not appear there.
        assert extras == {"gpu", "tracking"}
        assert torch_pins == []
    else:
        assert extras == {"tracking"}
        assert len(torch_pins) == 1 and torch_pins[0] < install_at
        assert "torch==2.13.0" in setup[torch_pins[0]]
        assert "download.pytorch.org/whl/cpu" in setup[torch_pins[0]]


def test_extras_and_ray_pin_match_project():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["optional-dependencies"])
    for path in CONFIG_FILES:
        for cmd in load(path)["setup_commands"]:
            m = INSTALL_RE.search(cmd)
            if m:
                assert set(m["extras"].split(",")) <= declared, path.name
                # The cluster must run the Ray the laptop (and flwr 1.41.0) uses.
                assert f'"ray[default]=={ray.__version__}"' in cmd, path.name
    assert f"ray[train,tune]=={ray.__version__}" in project["dependencies"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", CONFIG_FILES, ids=ids(CONFIG_FILES))
def test_commands_are_valid_bash(path):
    for cmd in all_commands(load(path)):
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"{path.name}: {cmd!r}: {res.stderr}"


# --- negative tests: the same validation path must reject broken copies -------------

CLOUD_FILES = [p for p in CONFIG_FILES if load(p)["provider"]["type"] != "local"]


@pytest.mark.parametrize("path", CLOUD_FILES, ids=ids(CLOUD_FILES))
def test_fractional_node_resource_rejected(path):
    raw = load(path)
    worker = next(n for n in node_types(raw) if n != raw["head_node_type"])
    raw["available_node_types"][worker]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="0.5"):
        ray_up_validate(raw)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=ids(CONFIG_FILES))
def test_unknown_top_level_key_rejected(path):
    raw = load(path)
    raw["setup_comands"] = ["echo typo"]
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        ray_up_validate(raw)


def test_local_provider_with_node_types_rejected():
    raw = load(CLUSTERS / "onprem-local.yaml")
    raw["available_node_types"] = {"cpu": {"resources": {"CPU": 8}, "node_config": {}}}
    raw["head_node_type"] = "cpu"
    with pytest.raises(click.ClickException):
        ray_up_validate(raw)
