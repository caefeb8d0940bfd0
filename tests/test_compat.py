"""One test per private Flower / Ray / PEFT internal that fedrag_ray touches (the list is
``fedrag_ray.compat``'s docstring), the version gate, and the logged fallbacks."""

from __future__ import annotations

import ast
import inspect
import logging

import pytest

from fedrag_ray import compat


def test_the_version_gate_refuses_another_flwr_in_one_line(monkeypatch):
    monkeypatch.delenv(compat.SKIP_VERSION_CHECK_ENV, raising=False)
    compat.check_versions()  # what is installed here is what was tested
    wrong = {"flwr": "1.42.0", "ray": "2.55.1", "peft": "0.21.2"}
    with pytest.raises(compat.VersionMismatch) as err:
        compat.check_versions(wrong)
    message = str(err.value)
    assert "\n" not in message
    assert "flwr 1.42.0 (tested: 1.41.0)" in message and compat.SKIP_VERSION_CHECK_ENV in message
    with pytest.raises(compat.VersionMismatch, match="peft missing"):
        compat.check_versions({"flwr": "1.41.0", "ray": "2.55.1", "peft": None})
    assert compat._matches("0.21.2", "0.21") and not compat._matches("0.210.0", "0.21")
    monkeypatch.setenv(compat.SKIP_VERSION_CHECK_ENV, "1")
    compat.check_versions(wrong)  # opted out


def test_the_version_gate_stops_a_federated_run_before_ray(monkeypatch):
    from fedrag_ray.config import config_from_dict
    from fedrag_ray.federated import FederatedSession

    monkeypatch.delenv(compat.SKIP_VERSION_CHECK_ENV, raising=False)
    monkeypatch.setitem(compat.TESTED_VERSIONS, "flwr", "0.0.1")
    cfg = config_from_dict({"federation": {"num_clients": 2}})
    with pytest.raises(compat.VersionMismatch, match="flwr 1.41.0 \\(tested: 0.0.1\\)"):
        FederatedSession(cfg)


# --------------------------------------------------------------------------- Flower


def test_1_register_nodes_is_wrapped_for_one_simulation_and_restored():
    vce_api = compat.flower_engine()
    stock = vce_api._register_nodes
    assert list(inspect.signature(stock).parameters) == ["num_nodes", "state_factory"]
    seen = []

    def wrap(flower):
        seen.append(flower)
        return lambda *a, **k: {}

    with compat.flower_simulation_hooks(wrap, None, None):
        assert vce_api._register_nodes is not stock and seen == [stock]
    assert vce_api._register_nodes is stock


def test_2_the_poller_is_swapped_for_one_simulation_and_restored():
    from fedrag_ray.federated.ray_backend import _add_messages_to_queue

    vce_api = compat.flower_engine()
    stock = vce_api.add_messages_to_queue
    params = list(inspect.signature(stock).parameters)
    assert params == ["state", "queue", "nodes_mapping", "f_stop"]
    assert params == list(inspect.signature(_add_messages_to_queue).parameters)
    # the engine looks the poller up by name when it starts its thread
    assert "add_messages_to_queue," in inspect.getsource(vce_api.start_vce) or (
        "add_messages_to_queue" in inspect.getsource(vce_api)
    )
    with compat.flower_simulation_hooks(lambda f: f, None, _add_messages_to_queue):
        assert vce_api.add_messages_to_queue is _add_messages_to_queue
        assert compat.flower_poller() is stock
    assert vce_api.add_messages_to_queue is stock


def test_3_the_engine_builds_ray_backend_by_name_and_the_subclass_overrides_exist():
    from pathlib import Path

    from fedrag_ray.federated.ray_backend import FedRagRayBackend, fedrag_backend

    raybackend = compat.flower_ray_backend_module()
    stock = raybackend.RayBackend
    assert "RayBackend(backend_config)" in Path(compat.flower_engine().__file__).read_text()
    for name in ("_validate_client_resources", "build", "process_message", "terminate"):
        assert name in vars(stock), name
        assert name in vars(FedRagRayBackend), name
    with fedrag_backend():
        assert raybackend.RayBackend is FedRagRayBackend
    with fedrag_backend(stock=True):
        assert raybackend.RayBackend is stock
    assert raybackend.RayBackend is stock


def test_4_the_actor_pool_sets_every_attribute_flowers_init_sets():
    """FedRagActorPool skips BasicActorPool.__init__: it must set what that sets."""
    pool_cls, _ = compat.flower_actor_classes()
    tree = ast.parse(inspect.getsource(pool_cls.__init__).lstrip())
    flower_sets = {
        t.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    assert flower_sets == set(compat.ACTOR_POOL_ATTRIBUTES)
    from fedrag_ray.federated.ray_backend import FedRagActorPool

    pool = FedRagActorPool({"num_cpus": 1}, 2)
    assert all(hasattr(pool, a) for a in compat.ACTOR_POOL_ATTRIBUTES)
    for method in ("submit", "add_actors_to_pool", "fetch_result_and_return_actor_to_pool"):
        assert callable(getattr(pool_cls, method)), method


def test_5_the_client_actor_base_runs_an_app_per_message():
    _, actor_cls = compat.flower_actor_classes()
    params = list(inspect.signature(actor_cls.run).parameters)
    assert params[:5] == ["self", "client_app_fn", "message", "cid", "context"]


def _linkstate():
    """The state factory of a simulation, built as Flower's ``run_simulation`` builds it."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


def test_6_the_in_memory_linkstate_has_what_the_poller_reads(caplog):
    from flwr.app import Metadata

    state = _linkstate().state()
    store, lock, check = compat.linkstate_internals(state)
    assert isinstance(store, dict) and hasattr(lock, "acquire") and callable(check)
    assert list(inspect.signature(check).parameters)[:1] == ["message_ids"]
    stamp = inspect.getattr_static(Metadata, "delivered_at")
    assert isinstance(stamp, property) and stamp.fset is not None  # the poller stamps it
    compat._FALLBACKS_LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="fedrag_ray.compat"):
        assert compat.linkstate_internals(object()) is None
    assert "using Flower's poller instead" in caplog.text


def test_7_the_in_memory_grid_has_what_send_and_receive_reads(caplog):
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = InMemoryGrid(state_factory=_linkstate())
    replied, lock = compat.grid_internals(grid)
    assert isinstance(replied, dict) and hasattr(lock, "acquire")
    assert callable(grid.push_messages) and callable(grid.pull_messages)
    compat._FALLBACKS_LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="fedrag_ray.compat"):
        assert compat.grid_internals(object()) is None
    assert "using Grid.send_and_receive instead" in caplog.text


def test_8_make_message_keeps_the_metadata_with_new_content():
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    msg = Message(
        RecordDict({"a": ConfigRecord({"x": 1})}), dst_node_id=3, message_type=MessageType.TRAIN
    )
    rebuilt = compat.make_message(msg.metadata, RecordDict({"b": ConfigRecord({"y": 2})}))
    assert rebuilt.metadata is msg.metadata and list(rebuilt.content.keys()) == ["b"]


def test_9_flowers_logger_and_timestamp():
    compat.flower_log(logging.DEBUG, "compat test %s", "line")
    stamp = compat.flower_now()
    assert stamp.tzinfo is not None and "T" in stamp.isoformat()


# --------------------------------------------------------------------------- Ray


def test_10_rays_node_has_the_two_head_daemon_starters():
    node_class = compat.ray_node_class()
    assert node_class is not None
    for name in compat.RAY_HEAD_DAEMON_METHODS:
        assert callable(vars(node_class)[name]), name


def test_11_12_the_private_ray_settings_are_the_ones_ray_reads():
    """The system-config key is compiled into Ray's core; its name is in the library, and
    RAY_worker_niceness is the raylet's worker_niceness setting. tests/test_ray_head.py
    starts a head with both and checks their effect (no idle workers, actor niceness)."""
    import pathlib

    import ray

    from fedrag_ray.federated.ray_head import WORKER_NICENESS_ENV

    core = [p for p in pathlib.Path(ray.__file__).parent.glob("_raylet*.so")]
    assert core
    blob = core[0].read_bytes()
    (key,) = compat.RAY_NO_PRESTART
    assert key.encode() in blob
    assert WORKER_NICENESS_ENV == "RAY_worker_niceness" and b"worker_niceness" in blob


# --------------------------------------------------------------------------- PEFT


def test_13_peft_caches_bitsandbytes_availability_where_compat_clears_it():
    from fedrag_ray.peft_import import import_peft

    import_peft()
    import peft.helpers
    import peft.import_utils as utils

    assert callable(utils.is_bnb_available.cache_clear)
    assert callable(utils.is_bnb_4bit_available.cache_clear)
    assert hasattr(peft.helpers, "bnb")


def test_the_compat_docstring_lists_every_internal():
    doc = compat.__doc__ or ""
    for n in range(1, 14):
        assert f"\n{n}. " in doc or f"\n{n:>2}. " in doc, n
