"""The report reads only the files it is given (the report rule's declared inputs, passed as
--inputs): nothing in it rebuilds a results path. tests/test_pipeline.py checks the other half
on a real run: the rule declares every file of --inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from reportkit import inputs_of, only_given, opened_files, sslpipe_build_report
from test_report import BASELINES, DATASET, METHODS, PROVENANCE, SEEDS, optional, results  # noqa: F401


def test_the_report_opens_only_the_files_it_is_given(optional: Path, tmp_path: Path) -> None:
    names = BASELINES + ["supervised"]
    given = inputs_of(optional, METHODS, SEEDS, names)
    out = tmp_path / "audited"
    with opened_files() as opened:
        sslpipe_build_report(given, DATASET, METHODS, SEEDS, names, out, PROVENANCE)
    read, declared = only_given(opened, given, tmp_path, out)
    assert read - declared == set()
    # It did read them: metrics, histories, summaries, policies, previews, diagnostics, benchmarks.
    for name in ("metrics.json", "history.csv", "summary.json", "policy.json", "preview.png", "prepare.tsv",
                 "dae_energy_vs_corruption.png", "predictions.npz", "embedding.png", "benchmark.json"):
        assert any(p.name == name for p in read), name


def test_inputs_may_come_as_json(optional: Path, tmp_path: Path) -> None:
    """As the rule passes them: seeds are JSON's string keys."""
    given = json.loads(json.dumps(inputs_of(optional, METHODS, SEEDS, BASELINES)))
    res = sslpipe_build_report(given, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "j")
    assert [r["name"] for r in res["rows"]] == ["simclr", "pixels", "dae", "random"]


def test_a_file_not_given_is_named(results: Path, tmp_path: Path) -> None:
    given = inputs_of(results, METHODS, SEEDS, BASELINES)
    del given["pretrain"]["dae"][1]
    with pytest.raises(ValueError, match="report inputs: nothing given for pretrain/dae/1"):
        sslpipe_build_report(given, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "n")
