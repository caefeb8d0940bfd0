"""``fedrag-ray data download``: fetch the public datasets the bundled configs read, from
their official addresses, verify each file's checksum, and write them into the data
directory (``fedrag_ray.data.data_dir``) in the layout the configs expect.

No dataset ships inside this package. Every file is checked before anything is written:
a wrong checksum (a changed or truncated download) is an error and leaves nothing
behind; outputs are written atomically (a temp file, then a rename).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedrag_ray.data import DataError, data_dir

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One official file: where it lives and what its bytes must hash to."""

    url: str
    sha256: str | None = None
    md5: str | None = None  # when the publisher states only an MD5


@dataclass(frozen=True)
class Dataset:
    name: str
    sources: dict[str, Source]
    # builds the files the configs read from the verified downloads (paths by key)
    build: Callable[[dict[str, Path], Path], list[Path]]
    licence: str
    citation: str
    outputs: tuple[str, ...] = field(default=())


def _build_squad(files: dict[str, Path], out_dir: Path) -> list[Path]:
    """The official train-v1.1.json, gzip-compressed (what ``configs/squad.yaml`` reads)."""
    target = out_dir / "squad" / "squad-train-v1.1.json.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with files["train"].open("rb") as src, gzip.open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    tmp.replace(target)
    return [target]


def _build_pubmedqa(files: dict[str, Path], out_dir: Path) -> list[Path]:
    """PQA-L without its official test split: the 500 train/validation items."""
    items = json.loads(files["pqal"].read_text())
    test_ids = set(json.loads(files["test_ground_truth"].read_text()))
    keep = {k: v for k, v in items.items() if k not in test_ids}
    target = out_dir / "pubmedqa" / "pqal_trainval.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(keep))
    tmp.replace(target)
    return [target]


_PUBMEDQA_COMMIT = "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997"
_PUBMEDQA_RAW = f"https://raw.githubusercontent.com/pubmedqa/pubmedqa/{_PUBMEDQA_COMMIT}/data"

DATASETS: dict[str, Dataset] = {
    "squad": Dataset(
        name="squad",
        sources={
            "train": Source(
                "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",
                sha256="3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
            )
        },
        build=_build_squad,
        licence="CC BY-SA 4.0",
        citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension "
        "of Text, EMNLP 2016",
        outputs=("squad/squad-train-v1.1.json.gz",),
    ),
    "pubmedqa": Dataset(
        name="pubmedqa",
        sources={
            "pqal": Source(
                f"{_PUBMEDQA_RAW}/ori_pqal.json", md5="05b2b70949907e260d2aa82bc5d20c6f"
            ),
            # the official test ids, used only to leave those items out
            "test_ground_truth": Source(f"{_PUBMEDQA_RAW}/test_ground_truth.json"),
        },
        build=_build_pubmedqa,
        licence="MIT",
        citation="Jin et al., PubMedQA: A Dataset for Biomedical Research Question "
        "Answering, EMNLP 2019",
        outputs=("pubmedqa/pqal_trainval.json",),
    ),
}


def _fetch(url: str, dest: Path) -> tuple[str, str]:
    """Stream ``url`` into ``dest``; (sha256, md5) of the bytes."""
    sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 (md5: a publisher's checksum)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, dest.open("wb") as f:  # noqa: S310
            while chunk := resp.read(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
                f.write(chunk)
    except OSError as err:  # URLError, timeouts, refused connections
        raise DataError(f"download of {url} failed: {err}") from None
    return sha.hexdigest(), md5.hexdigest()


def _verify(url: str, source: Source, sha: str, md5: str) -> None:
    if source.sha256 and sha != source.sha256:
        raise DataError(
            f"{url}: SHA-256 {sha} does not match the expected {source.sha256} "
            "(a changed or truncated file); nothing was written"
        )
    if source.md5 and md5 != source.md5:
        raise DataError(
            f"{url}: MD5 {md5} does not match the expected {source.md5}; nothing was written"
        )


def download(
    name: str,
    out_dir: Path | None = None,
    mirror: str | None = None,
    datasets: dict[str, Dataset] | None = None,
) -> list[Path]:
    """Fetch, verify and install dataset ``name``; the paths written.

    ``mirror``: a base URL (``file:///…`` works) that replaces each file's directory, for
    machines that reach the files elsewhere; checksums are checked all the same."""
    registry = datasets or DATASETS
    if name not in registry:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(registry))}")
    ds = registry[name]
    out_dir = Path(out_dir) if out_dir else data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise DataError(f"data directory {out_dir} is not writable (set FEDRAG_RAY_DATA)")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".download-") as tmp:
        files = {}
        for key, source in ds.sources.items():
            url = source.url
            if mirror:
                url = mirror.rstrip("/") + "/" + url.rsplit("/", 1)[1]
            dest = Path(tmp) / url.rsplit("/", 1)[1]
            sha, md5 = _fetch(url, dest)
            _verify(url, source, sha, md5)
            files[key] = dest
        return ds.build(files, out_dir)
