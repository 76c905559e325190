"""The README's measured tables (and bench/README.md's memory tables) are what bench/readme_tables.py renders
from the result files under bench/results/: a number edited by hand in a document, or a result file that changed without the README being
regenerated, fails here. Every result file has the form's keys (host, CPU profile, date, command, figures)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import readme_tables, results_file

ROOT = Path(__file__).resolve().parent.parent

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", readme_tables.DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_are_the_result_files_rendered(doc):
    text = doc.read_text()
    assert readme_tables.render(text) == text, f"{doc.name}'s tables differ from bench/results/: run " \
                                               "python -m bench.readme_tables"


def test_every_table_is_placed_in_a_document():
    assert readme_tables.unplaced([doc.read_text() for doc in readme_tables.DOCUMENTS]) == set()


def test_a_number_edited_by_hand_is_caught():
    table = readme_tables.MARKER.search(README[README.index("<!-- table:jobs -->"):]).group("body")
    row = next(line for line in table.splitlines() if line.startswith("| pretraining"))
    edited = README.replace(row, row.replace("1.17×", "1.27×"))
    assert edited != README
    assert readme_tables.render(edited) == README  # the file's figure comes back, so --check tells them apart


def test_a_changed_result_file_is_caught(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(results_file.RESULTS, results)
    f = results / "sharded_memory.json"
    record = json.loads(f.read_text())
    record["figures"]["mib_per_rank"][1]["tracked_peak"] += 10
    f.write_text(json.dumps(record))
    assert readme_tables.render(README, results) != README


@pytest.mark.parametrize("path", sorted(results_file.RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_result_file_names_host_profile_date_and_command(path):
    record = results_file.load(path.stem)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", record["date"]), record["date"]
    assert isinstance(record["figures"], dict) and record["figures"]


def test_every_table_of_measured_results_is_rendered():
    """Inside "Measured results", every table row sits between table markers."""
    section = README.split("\n## Measured results\n", 1)[1].split("\n## ", 1)[0]
    outside = re.sub(r"<!-- table:[a-z_]+ -->.*?<!-- /table -->", "", section, flags=re.S)
    assert [line for line in outside.splitlines() if line.startswith("|")] == []


def test_a_marker_without_a_table_is_refused():
    with pytest.raises(KeyError):
        readme_tables.render(README + "\n<!-- table:nothing -->\n<!-- /table -->\n")


def test_a_script_writes_a_result_file_of_the_form(tmp_path):
    path = results_file.write("probe", "python bench/x.py --flag", {"tok_s": 1.5}, out_dir=tmp_path)
    record = results_file.load(path.stem, tmp_path)
    assert record["command"] == "python bench/x.py --flag" and record["figures"] == {"tok_s": 1.5}
    assert "CPUs" in record["host"] and "ATen capability" in record["cpu_profile"] and "precision" in record["cpu_profile"]
    assert results_file.split_host_line("Xeon, 2 CPUs, ATen capability AVX512, precision auto -> bf16") == (
        "Xeon, 2 CPUs", "ATen capability AVX512, precision auto -> bf16")
