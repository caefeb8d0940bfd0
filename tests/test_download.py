"""``fedrag-ray data download`` against local file URLs (no network): checksums verified
before anything is written, the configs' layout produced, failures leave nothing."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys

import pytest

from fedrag_ray.data import DataError, load_pubmedqa, load_squad
from fedrag_ray.download import DATASETS, Dataset, Source, download


def _squad_doc() -> bytes:
    art = {
        "title": "T",
        "paragraphs": [
            {
                "context": "T is red.",
                "qas": [{"id": "q", "question": "Colour?", "answers": [{"text": "red"}]}],
            }
        ],
    }
    return json.dumps({"version": "1.1", "data": [art]}).encode()


def _with_source(name: str, **sources: Source) -> dict[str, Dataset]:
    ds = DATASETS[name]
    return {name: Dataset(ds.name, sources, ds.build, ds.licence, ds.citation, ds.outputs)}


def test_squad_download_verifies_and_installs_gzipped(tmp_path):
    src = tmp_path / "mirror" / "train-v1.1.json"
    src.parent.mkdir()
    src.write_bytes(_squad_doc())
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    reg = _with_source("squad", train=Source(src.as_uri(), sha256=sha))
    out = tmp_path / "data"
    written = download("squad", out, datasets=reg)
    assert written == [out / "squad" / "squad-train-v1.1.json.gz"]
    assert gzip.decompress(written[0].read_bytes()) == src.read_bytes()
    examples, passages = load_squad(written[0])
    assert examples[0].answers == ["red"] and len(passages) == 1
    assert not list(out.glob(".download-*")), "temp download folder left behind"


def test_wrong_checksum_writes_nothing(tmp_path):
    src = tmp_path / "train-v1.1.json"
    src.write_bytes(_squad_doc())
    reg = _with_source("squad", train=Source(src.as_uri(), sha256="0" * 64))
    out = tmp_path / "data"
    with pytest.raises(DataError, match="SHA-256 .* does not match"):
        download("squad", out, datasets=reg)
    assert not (out / "squad").exists()
    assert not list(out.iterdir())


def test_pubmedqa_leaves_the_official_test_items_out(tmp_path):
    items = {
        str(i): {
            "QUESTION": f"q{i}?",
            "CONTEXTS": ["c"],
            "LONG_ANSWER": "a",
            "final_decision": "yes",
        }
        for i in range(4)
    }
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ori_pqal.json").write_text(json.dumps(items))
    (mirror / "test_ground_truth.json").write_text(json.dumps({"1": "yes", "3": "yes"}))
    md5 = hashlib.md5((mirror / "ori_pqal.json").read_bytes()).hexdigest()  # noqa: S324
    reg = _with_source(
        "pubmedqa",
        pqal=Source((mirror / "ori_pqal.json").as_uri(), md5=md5),
        test_ground_truth=Source((mirror / "test_ground_truth.json").as_uri()),
    )
    [path] = download("pubmedqa", tmp_path / "data", datasets=reg)
    examples, _ = load_pubmedqa(path)
    assert sorted(e.id for e in examples) == ["0", "2"]


def test_cli_rejects_a_mirror_with_other_bytes_and_unknown_names(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train-v1.1.json").write_bytes(_squad_doc())  # not the official file
    cmd = [
        sys.executable,
        "-m",
        "fedrag_ray.cli",
        "data",
        "download",
        "squad",
        "--dir",
        str(tmp_path / "data"),
        "--mirror",
        mirror.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    err = " ".join(proc.stderr.split())  # rich wraps long lines off a terminal
    assert proc.returncode == 2
    assert "does not match the expected" in err and "Traceback" not in err
    assert not (tmp_path / "data" / "squad").exists()
    cmd[5] = "imagenet"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown dataset 'imagenet'" in " ".join(proc.stderr.split())


def test_if_missing_is_a_no_op_when_the_files_are_there(tmp_path):
    target = tmp_path / "squad" / "squad-train-v1.1.json.gz"
    target.parent.mkdir()
    target.write_bytes(gzip.compress(_squad_doc()))
    cmd = [
        sys.executable,
        "-m",
        "fedrag_ray.cli",
        "data",
        "download",
        "squad",
        "--dir",
        str(tmp_path),
        "--if-missing",
        "--mirror",
        "file:///nonexistent",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already in" in proc.stderr
