"""`ola eval` on CV-Bench as nyu-visionx/CV-Bench publishes it: both layouts from a folder, repeated --data,
the card's overall recomputed from predictions.jsonl, a partial benchmark, and the comparison's sign.

The model is a stand-in (tests/test_eval.py's oracle or constant answer) behind the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from olavlm.trainer.eval.benchmark import PREDICTIONS, read_predictions
from olavlm.trainer.eval.questions import load_cvbench, load_questions
from tests.test_eval import FIXTURE, ConstantA, Oracle, _cli, cvbench_rows, write_cvbench


@pytest.fixture(scope="module")
def cvbench(tmp_path_factory):
    path = tmp_path_factory.mktemp("cvbench") / "test.parquet"
    write_cvbench(path)
    return path


def write_published_cvbench(folder, layout: str):
    """CV-Bench as nyu-visionx/CV-Bench publishes it: test_2d / test_3d as Parquet (images embedded), or as
    JSONL without the image column, the images as files under img/ named by `filename`."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("2D", "3D"):
        rows = [r for r in cvbench_rows() if r["type"] == kind]
        if layout == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), folder / f"test_{kind.lower()}.parquet")
            continue
        for r in rows:
            (folder / r["filename"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / r["filename"]).write_bytes(r.pop("image")["bytes"])
        (folder / f"test_{kind.lower()}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {layout: write_published_cvbench(root / layout, layout) for layout in ("parquet", "jsonl")}


@pytest.mark.parametrize("layout", ["parquet", "jsonl"])
def test_a_cvbench_folder_reads_either_published_layout(published, cvbench, layout, tmp_path):
    folder = published[layout]
    assert (
        ("image" in pq.read_schema(folder / "test_2d.parquet").names)
        if layout == "parquet"
        else ("image" not in json.loads((folder / "test_2d.jsonl").read_text().splitlines()[0]))
    )
    expected = load_cvbench(cvbench)
    for data in (folder, [folder / f"test_2d.{layout}", folder / f"test_3d.{layout}"]):
        questions = load_questions("cvbench", data)  # 2D file first: the order is the fixture's
        assert [(q.id, q.answer, q.task, q.source, q.type) for q in questions] == [
            (q.id, q.answer, q.task, q.source, q.type) for q in expected
        ]
        assert [q.image for q in questions] == [q.image for q in expected]
    with pytest.raises(ValueError, match="no CV-Bench files"):
        load_questions("cvbench", tmp_path)


class FakeEvalModel:
    """Stands in for LlavaEvalModel in `ola eval`: the oracle for a folder named 'oracle', else always A."""

    def __init__(self, folder, **_):
        self.model = Oracle(self.data) if Path(folder).name == "oracle" else ConstantA()

    def generate(self, prompts, images):
        return self.model.generate(prompts, images)


def _strict_json(path) -> dict:
    """JSON as the standard defines it: a bare NaN or Infinity fails."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _card_overall(predictions) -> float:
    """((ADE20K + COCO) / 2 + Omni3D) / 2 from predictions.jsonl, as CV-Bench's card computes it."""
    acc = {
        s: np.mean([r["correct"] for r in predictions.values() if r["source"] == s])
        for s in ("ADE20K", "COCO", "Omni3D")
    }
    return ((acc["ADE20K"] + acc["COCO"]) / 2 + acc["Omni3D"]) / 2


def test_eval_reads_published_cvbench_repeated_data_and_reports_partial(published, tmp_path, monkeypatch):
    from olavlm.trainer.eval import adapter

    monkeypatch.setattr(adapter, "LlavaEvalModel", FakeEvalModel)
    monkeypatch.setattr(FakeEvalModel, "data", published["parquet"], raising=False)
    (tmp_path / "constant").mkdir()
    for layout, folder in published.items():
        out = tmp_path / layout
        _cli(tmp_path / "constant", "--bench", "cvbench", "--data", folder, "--out", out)
        results = _strict_json(out / "results.json")
        assert results["n"] == len(FIXTURE) and results["partial"] == []
        assert results["cvbench"]["Overall"] == pytest.approx(
            _card_overall(read_predictions(out / PREDICTIONS))
        )
        assert results["cvbench"]["Overall"] == pytest.approx(0.4125)
    # Both files as two --data options: both are read, and they are the folder's files (a rerun: nothing new).
    files = [
        f for name in ("test_2d", "test_3d") for f in ("--data", published["parquet"] / f"{name}.parquet")
    ]
    report = json.loads(
        _cli(tmp_path / "constant", "--bench", "cvbench", *files, "--out", tmp_path / "parquet", "--json")
    )
    assert report["results"]["constant"]["n"] == len(FIXTURE)
    assert report["results"]["constant"]["scored_now"] == 0
    # 3D only: the 2D columns, 2D and Overall are left out (null), named as missing; never NaN.
    output = _cli(
        tmp_path / "constant",
        "--bench",
        "cvbench",
        "--data",
        published["parquet"] / "test_3d.parquet",
        "--out",
        tmp_path / "3d",
    )
    results = _strict_json(tmp_path / "3d" / "results.json")
    assert results["partial"] == ["Count", "Relation", "ADE20K", "COCO"]
    cols = results["cvbench"]
    assert cols["3D"] == pytest.approx(3 / 6) and cols["2D"] is None and cols["Overall"] is None
    assert "partial CV-Bench" in output and "nan" not in output.lower()


def test_eval_compare_prints_the_first_minus_the_compared(published, tmp_path, monkeypatch):
    from olavlm.trainer.eval import adapter

    monkeypatch.setattr(adapter, "LlavaEvalModel", FakeEvalModel)
    monkeypatch.setattr(FakeEvalModel, "data", published["parquet"], raising=False)
    for name in ("oracle", "constant"):
        (tmp_path / name).mkdir()
    args = ("--bench", "cvbench", "--data", published["parquet"], "--resamples", "200")
    output = _cli(tmp_path / "oracle", "--compare", tmp_path / "constant", *args, "--out", tmp_path / "cmp")
    assert "diff = oracle - constant" in output and "+58.8" in output
    saved = _strict_json(tmp_path / "cmp" / "comparison.json")
    assert saved["diff"] == "oracle - constant"
    assert saved["columns"]["Overall"]["diff"] == pytest.approx(1 - 0.4125)
