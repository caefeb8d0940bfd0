"""The generated pages match their sources: no figure or default is typed by hand.

``docs/configuration.md`` is rendered from the pydantic schema, ``docs/benchmarks.md`` and
the README's results table from ``benchmarks/results/*.json``; these tests fail as soon as
either source changes without rerunning the generators (or a page is edited by hand).
Fast: no models, no Ray.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from benchmarks import report
from fedrag_ray import config_docs

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "quality_squad.json"
REGENERATE = "run `python -m fedrag_ray.config_docs` and `python -m benchmarks.report`"


def test_every_config_field_has_a_description() -> None:
    assert config_docs.missing_descriptions() == []


def test_configuration_page_is_generated_from_the_schema() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config_docs.render(), REGENERATE
    # the defaults come from the schema itself, e.g. the Dirichlet alpha and round count
    from fedrag_ray.config import FederationConfig, PartitionConfig

    assert f"| `federation.partition.alpha` | float | `{PartitionConfig().alpha}` |" in page
    assert f"| `federation.rounds` | int | `{FederationConfig().rounds}` |" in page


def test_a_field_without_description_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrag_ray.config import RaltConfig

    monkeypatch.setattr(RaltConfig.model_fields["k"], "description", None)
    assert config_docs.missing_descriptions() == ["train.ralt.k"]


def test_benchmarks_page_is_generated_from_the_results() -> None:
    assert (ROOT / "docs" / "benchmarks.md").read_text() == report.render_docs(), REGENERATE


def test_readme_results_table_is_generated_from_the_results() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme == report.update_readme(readme), REGENERATE


def test_every_result_file_has_a_section_with_its_provenance() -> None:
    page = report.render_docs()
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        section = page.split(f"`benchmarks/results/{path.name}`", 1)[1].split("\n## ", 1)[0]
        assert f"- command: `{doc['command']}`" in section, path.name
        assert "- date: " in section and "host: " in section, path.name


def test_a_hand_edited_figure_changes_the_generated_pages(tmp_path: Path) -> None:
    """What the checks above catch: one number changed in a result JSON."""
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    path = results / "eval_speed.json"
    doc = json.loads(path.read_text())
    doc["runs"]["new"]["seconds"] = 12.345
    path.write_text(json.dumps(doc))
    page = report.render_docs(results)
    assert page != report.render_docs()
    assert "| new | 12.3 |" in page


def test_squad_renderer_and_headline(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(FIXTURE, results / "quality_squad.json")
    section = report.render_docs(results)
    assert "## Quality: federated RALT on SQuAD v1.1" in section
    assert "| federated RALT, 8 clients | 3 | 0.260 [0.233, 0.287] (seed sd 0.011) |" in (section)
    assert (
        "| RALT vs zero-shot RAG | exact_match | +0.250 [+0.220, +0.280] | ✔ | >= +0.25 | ✔ |"
        in (section)
    )
    assert "| zero-shot RAG | 0 |" in section  # seeds as a list (older schema)
    assert "| central_ralt_s0 | 812 | 2.1e+11 | 3.2 |" in section
    assert "Not run (yet): fed_both_s0." in section
    table = report.headline(results)
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) - 1 == 3  # header + one row per comparison
    assert (
        "| RALT vs zero-shot RAG | exact_match +0.250 [+0.220, +0.280] | ✔ | >= +0.25 | ✔ |"
        in table
    )
    assert (
        "| federated vs centralized RALT | f1 -0.012 [-0.031, +0.007] | ✘ | >= +0.00 | ✘ |" in table
    )
    # host and date once, in the caption
    assert table.count("Test CPU, 2 cores") == 1 and table.count("2026-12-05") == 1


def test_carried_figures_are_named_with_the_publish_they_came_from(tmp_path: Path) -> None:
    """Figures a publish could not recompute are not passed off as measured with it."""
    results = tmp_path / "results"
    results.mkdir()
    doc = json.loads(FIXTURE.read_text())
    doc["carried"] = {
        "rows": ["central_ralt_s0"],
        "comparisons": ["ralt_vs_zero_shot"],
        "from": [{"commit": "abc1234", "date": "2026-11-30T10:00:00+00:00", "machine": {}}],
    }
    (results / "quality_squad.json").write_text(json.dumps(doc))
    section = report.render_docs(results)
    assert "not recomputed here" in section and "comparisons ralt_vs_zero_shot." in section
    table = report.headline(results)
    assert "New figures measured on Test CPU" in table
    assert "carried figures as published 2026-11-30 on CPU model not recorded" in table
    assert "(commit abc1234)" in section and "abc1234" not in table  # no hashes in the README


def test_headline_keeps_at_most_max_headline_rows_figures(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    doc = json.loads(FIXTURE.read_text())
    doc["comparisons"] = doc["comparisons"] * report.MAX_HEADLINE_ROWS  # more than fit
    (results / "quality_squad.json").write_text(json.dumps(doc))
    rows = [ln for ln in report.headline(results).splitlines() if ln.startswith("| ")]
    assert len(rows) - 1 == report.MAX_HEADLINE_ROWS  # minus the header


def test_readme_is_short_and_links_existing_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links its docs pages"
    for link in links:
        assert (ROOT / link).exists(), link
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", readme)
    assert not hashes, f"commit hashes in the README: {hashes}"


def test_design_page_maps_every_module() -> None:
    """docs/design.md's module map names every module of the package."""
    page = (ROOT / "docs" / "design.md").read_text()
    package = ROOT / "fedrag_ray"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if path.name == "__init__.py" and path.parent != package:
            continue  # subpackage markers
        if f"`{rel}`" not in page:
            missing.append(rel)
    assert not missing, f"modules missing from docs/design.md's module map: {missing}"


def test_headline_falls_back_to_pubmedqa_until_squad_has_comparisons(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "benchmarks" / "results" / "quality_pubmedqa.json", results)
    doc = json.loads(FIXTURE.read_text())
    doc["comparisons"] = []
    (results / "quality_squad.json").write_text(json.dumps(doc))
    table = report.headline(results)
    assert table.startswith("| figure | measured | target | met |") and "PubMedQA" in table


def test_readme_headline_never_cuts_a_comparison_with_a_target():
    """One comparison too many, the last with a target: the untargeted one makes room."""
    comps = [{"name": f"c{i}", "target": ">= +0.05"} for i in range(report.MAX_HEADLINE_ROWS - 1)]
    comps += [{"name": "f1", "target": None}, {"name": "fed_vs_central", "target": ">= -0.03"}]
    kept = [c["name"] for c in report._headline_comparisons(comps)]
    assert len(kept) == report.MAX_HEADLINE_ROWS
    assert "fed_vs_central" in kept and "f1" not in kept
    assert kept == [c["name"] for c in comps if c["name"] != "f1"]  # order kept
