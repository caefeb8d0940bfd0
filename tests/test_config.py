"""Config schema: YAML in, typed config out, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedrag_ray.config import (
    ConfigError,
    ExperimentConfig,
    FederationConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


VALID = """\
name: tiny
seed: 7
data:
  format: qa_jsonl
  path: data/qa.jsonl
  corpus: data/corpus.jsonl
  max_train: 8
retriever:
  train: lora
  lora_r: 4
generator:
  quantization: 4bit
  lora: {r: 4, alpha: 8, target_modules: [q_proj, k_proj, v_proj]}
knowledge_store: {index: hnsw, n_shards: 3}
train:
  method: both
  both_mode: combined
  lr: 0.0005
  lsr: {tau: 0.05, k: 4}
federation:
  num_clients: 4
  clients_per_round: 2
  strategy: {name: fedprox, proximal_mu: 0.1}
  partition: {type: dirichlet, alpha: 0.1}
"""


def test_valid_yaml_loads_typed_values(tmp_path):
    cfg = load_config(_write(tmp_path, VALID))
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.name, cfg.seed) == ("tiny", 7)
    assert cfg.retriever.train == "lora" and cfg.retriever.lora_r == 4
    assert cfg.generator.quantization == "4bit"
    assert cfg.generator.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.knowledge_store.index == "hnsw" and cfg.knowledge_store.n_shards == 3
    assert cfg.train.method == "both" and cfg.train.lr == pytest.approx(5e-4)
    assert cfg.train.lsr.tau == pytest.approx(0.05) and cfg.train.lsr.k == 4
    # untouched sections keep their defaults
    assert cfg.train.lsr.beta == 1.0 and cfg.rag.top_k == 5
    assert cfg.train.lsr.target == "posterior"  # not REPLUG's uniform prior: see LsrConfig
    assert isinstance(cfg.federation, FederationConfig)
    assert cfg.federation.sampled == 2
    assert cfg.federation.strategy.name == "fedprox"
    assert cfg.federation.partition.type == "dirichlet"


def test_relative_data_paths_resolve_against_the_yaml_file(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    cfg = load_config(_write(sub, VALID))
    assert cfg.data.path == str((sub / "data" / "qa.jsonl").resolve())
    assert cfg.data.corpus == str((sub / "data" / "corpus.jsonl").resolve())
    # a data-directory reference is left as it is
    cfg2 = load_config(_write(tmp_path, "data: {path: 'data:squad/train.json.gz'}\n"))
    assert cfg2.data.path == "data:squad/train.json.gz"


def test_no_federation_section_means_centralized(tmp_path):
    cfg = load_config(_write(tmp_path, "name: c\n"))
    assert cfg.federation is None
    empty = load_config(_write(tmp_path, "", name="empty.yaml"))
    assert empty == ExperimentConfig()


def test_unknown_key_names_full_dotted_path(tmp_path):
    path = _write(tmp_path, "train:\n  lsr:\n    tauu: 0.2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "train.lsr.tauu" in msg
    assert "unknown field" in msg
    assert str(path) in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"retreiver: unknown field"):
        load_config(_write(tmp_path, "retreiver: {train: full}\n"))


def test_bad_enum_names_field_and_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, "train:\n  method: foo\n"))
    msg = str(exc.value)
    assert "train.method" in msg
    assert "'foo'" in msg
    for allowed in ("'ralt'", "'lsr'", "'both'"):
        assert allowed in msg


def test_nested_enum_and_range_errors_are_all_reported(tmp_path):
    text = "knowledge_store: {index: ivff}\ndata: {eval_fraction: 1.5}\n"
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text))
    msg = str(exc.value)
    assert "knowledge_store.index" in msg
    assert "'flat'" in msg and "'ivf'" in msg and "'hnsw'" in msg
    assert "data.eval_fraction" in msg


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="retriever.train is 'none'"):
        config_from_dict({"train": {"method": "lsr"}, "retriever": {"train": "none"}})
    with pytest.raises(ConfigError, match="clients_per_round"):
        config_from_dict({"federation": {"num_clients": 2, "clients_per_round": 3}})
    with pytest.raises(ConfigError, match=r"rag.*\{passage\}"):
        config_from_dict({"rag": {"prompt_template": "q: {question} a:"}})


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n", name="list.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_config(missing)


def test_apply_overrides_sets_nested_keys_without_mutating_input():
    raw = {"train": {"lr": 0.1, "lsr": {"tau": 0.1}}}
    out = apply_overrides(
        raw, {"train.lr": 0.5, "train.lsr.k": 3, "federation.strategy.name": "fedadam"}
    )
    assert out == {
        "train": {"lr": 0.5, "lsr": {"tau": 0.1, "k": 3}},
        "federation": {"strategy": {"name": "fedadam"}},
    }
    assert raw == {"train": {"lr": 0.1, "lsr": {"tau": 0.1}}}
    cfg = config_from_dict(out)
    assert cfg.train.lsr.k == 3 and cfg.federation.strategy.name == "fedadam"


def test_apply_overrides_refuses_to_descend_into_a_value():
    with pytest.raises(ConfigError, match="train.lr.x"):
        apply_overrides({"train": {"lr": 0.1}}, {"train.lr.x": 1})


def test_load_config_overrides_are_validated(tmp_path):
    path = _write(tmp_path, "train: {method: lsr}\n")
    cfg = load_config(path, overrides={"train.method": "both", "seed": 3})
    assert cfg.train.method == "both" and cfg.seed == 3
    with pytest.raises(ConfigError, match=r"train.method.*'bar'"):
        load_config(path, overrides={"train.method": "bar"})
    with pytest.raises(ConfigError, match="train.lsr.tauu"):
        load_config(path, overrides={"train.lsr.tauu": 1.0})


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, VALID))
    out = tmp_path / "dumped.yaml"
    dump_config(cfg, out)
    assert yaml.safe_load(out.read_text())["train"]["method"] == "both"
    assert load_config(out) == cfg


def test_assignment_is_validated():
    cfg = ExperimentConfig()
    with pytest.raises(ValueError):
        cfg.train.method = "nope"  # type: ignore[assignment]


def test_float16_weights_are_refused_without_a_grad_scaler():
    with pytest.raises(ConfigError, match="generator.*float16 needs a gradient scaler"):
        config_from_dict({"generator": {"dtype": "float16"}})
    assert config_from_dict({"generator": {"dtype": "bfloat16"}}).generator.dtype == "bfloat16"
