"""`ola eval`: formats, answer extraction, scoring against hand counts, resume, comparison, the tiny student.

The CV-Bench fixture is built here in the published schema from the photos bundled with
scikit-image, with shapes drawn at known positions and sizes, so every answer is true of
its image by construction. Its answer letters are fixed by `FIXTURE`, which is what the
hand counts below are counted from.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from olavlm.trainer.eval.benchmark import (
    PREDICTIONS,
    EvalSettings,
    compare,
    format_comparison,
    format_table,
    read_predictions,
    score,
)
from olavlm.trainer.eval.questions import LETTERS, load_cvbench, load_mc, load_questions, parse_answer
from olavlm.trainer.student.build import load_student, save_student

# (task, source, index of the correct option). Correct letters per source:
#   ADE20K: A B C A B   -> 2 of 5 are A
#   COCO:   D A B B     -> 1 of 4 is A
#   Omni3D: A B A B B A -> 3 of 6 are A
FIXTURE = [
    ("Count", "ADE20K", 0),
    ("Count", "ADE20K", 1),
    ("Count", "ADE20K", 2),
    ("Relation", "ADE20K", 0),
    ("Relation", "ADE20K", 1),
    ("Count", "COCO", 3),
    ("Count", "COCO", 0),
    ("Relation", "COCO", 1),
    ("Relation", "COCO", 1),
    ("Depth", "Omni3D", 0),
    ("Depth", "Omni3D", 1),
    ("Depth", "Omni3D", 0),
    ("Distance", "Omni3D", 1),
    ("Distance", "Omni3D", 1),
    ("Distance", "Omni3D", 0),
]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZE = (96, 64)  # not square: padding and cropping give different pixels


def _photo(i: int) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
    return Image.fromarray(array).convert("RGB").resize(SIZE)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _square(draw, cx, cy, r, colour):
    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)


def _circle(draw, cx, cy, r, colour):
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)


def make_question(i: int, task: str, answer: int) -> dict:
    """One question in CV-Bench's row layout whose image makes option `answer` true."""
    image = _photo(i)
    draw = ImageDraw.Draw(image)
    pair = ["red square", "blue circle"]
    if task == "Count":
        counts = [3, 1, 2, 0]  # option texts; the true count is the one at index `answer`
        options, count = [str(c) for c in counts], counts[answer]
        for k in range(count):  # non-overlapping circles along the top row
            _circle(draw, 12 + 24 * k, 14, 8, (255, 0, 0))
        question = "How many red circles are in the image?"
    elif task == "Relation":
        options = ["left", "right"]
        red_x, blue_x = (20, 76) if answer == 0 else (76, 20)
        _square(draw, red_x, 24 + i, 8, (255, 0, 0))  # + i: no two questions share an image
        _circle(draw, blue_x, 24 + i, 8, (0, 0, 255))
        question = (
            "Considering the relative positions of the red square and the blue circle in the image, "
            "where is the red square located with respect to the blue circle?"
        )
    elif task == "Depth":  # nearer = drawn larger (same physical size by construction)
        options = pair
        red_r, blue_r = (14, 5) if answer == 0 else (5, 14)
        _square(draw, 24, 32, red_r, (255, 0, 0))
        _circle(draw, 72, 32, blue_r, (0, 0, 255))
        question = (
            "Which object is closer to the camera taking this photo, the red square or the blue circle?"
        )
    else:  # Distance: the option nearer to the green triangle is the answer
        options = pair
        draw.polygon([(48, 24), (40, 40), (56, 40)], fill=(0, 255, 0))
        near, far = (30, 32), (88, 56)
        red, blue = (near, far) if answer == 0 else (far, near)
        _square(draw, *red, 6, (255, 0, 0))
        _circle(draw, *blue, 6, (0, 0, 255))
        question = "Which object is closer to the green triangle, the red square or the blue circle?"
    lines = "\n".join(f"({LETTERS[k]}) {o}" for k, o in enumerate(options))
    kind = "3D" if task in ("Depth", "Distance") else "2D"
    filename = f"img/{kind}/{task.lower()}/{i}.png"  # the published folders: img/2D/count/...
    return {
        "idx": i,
        "type": kind,
        "task": task,
        "image": {"bytes": _png(image), "path": filename},
        "question": question,
        "choices": options,
        "answer": f"({LETTERS[answer]})",
        "prompt": f"{question} Select from the following choices.\n{lines}",
        "filename": filename,
        "source": None,
        "source_dataset": None,
        "source_filename": f"{i:012d}.jpg",
        "target_class": "red square" if task in ("Count", "Relation") else None,
        "target_size": 256 if task == "Count" else None,
        "bbox": [[4.0, 6.0, 20.0, 22.0]] if task == "Count" else None,
    }


def cvbench_rows(spec=FIXTURE) -> list[dict]:
    rows = []
    for i, (task, source, answer) in enumerate(spec):
        row = make_question(i, task, answer)
        row["source"], row["source_dataset"] = source, source
        rows.append(row)
    return rows


def write_cvbench(path, spec=FIXTURE) -> list[dict]:
    rows = cvbench_rows(spec)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on shared cores its spin-waits cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cvbench(tmp_path_factory):
    path = tmp_path_factory.mktemp("cvbench") / "test.parquet"
    write_cvbench(path)
    return path


def _key(prompt: str, image: bytes) -> tuple[str, str]:
    return prompt, hashlib.sha256(image).hexdigest()


class Oracle:
    """Knows every answer; replies in the formats real models use, in turn."""

    FORMATS = ("({L})", "{L}", "{L}.", "The answer is {L}.", "{T}")

    def __init__(self, path):
        self.truth = {_key(q.prompt, q.image): (q, k) for k, q in enumerate(load_cvbench(path))}
        self.asked: list[str] = []

    def generate(self, prompts, images):
        out = []
        for prompt, image in zip(prompts, images):
            q, k = self.truth[_key(prompt, image)]
            self.asked.append(q.id)
            letter = q.answer
            out.append(self.FORMATS[k % 5].format(L=letter, T=q.options[LETTERS.index(letter)]))
        return out

    def logprobs(self, prompts, images, continuations):
        out = []
        for prompt, image, conts in zip(prompts, images, continuations):
            q, _ = self.truth[_key(prompt, image)]
            self.asked.append(q.id)
            right = {q.answer, q.options[LETTERS.index(q.answer)]}
            out.append([0.0 if c in right else -3.0 for c in conts])
        return out


class ConstantA:
    """Always the first option."""

    def generate(self, prompts, images):
        return ["A" for _ in prompts]

    def logprobs(self, prompts, images, continuations):
        return [[0.0] + [-1.0] * (len(c) - 1) for c in continuations]


def _settings(path, mode="generate", **changes) -> EvalSettings:
    return EvalSettings(**{"model": "test", "bench": "cvbench", "data": str(path), "mode": mode, **changes})


# ---------------------------------------------------------------------------------------- answers

REPLIES = [
    # reply, options, expected letter
    ("(B)", ("3", "2", "1", "0"), "B"),
    ("B", ("left", "right"), "B"),
    ("b", ("left", "right"), "B"),
    ("B.", ("left", "right"), "B"),
    ("**C**", ("3", "2", "1", "0"), "C"),
    ("A. left", ("left", "right"), "A"),
    ("B) The blue circle", ("red square", "blue circle"), "B"),
    ("The answer is A.", ("left", "right"), "A"),
    ("The correct option is (D) 0", ("3", "2", "1", "0"), "D"),
    ("Answer: B", ("red square", "blue circle"), "B"),
    ("the answer is b", ("red square", "blue circle"), "B"),
    ("right", ("left", "right"), "B"),
    ("The red square is to the left of the blue circle.", ("left", "right"), "A"),
    ("There are 2 red circles in the image.", ("3", "2", "1", "0"), "B"),
    ("The blue circle is closer.", ("red square", "blue circle"), "B"),
    ("Red Square", ("red square", "blue circle"), "A"),
    # a letter form beside another option's text: the letter decides (models often restate an option)
    ("(B) cat", ("cat", "dog"), "B"),
    ("B. cat", ("cat", "dog"), "B"),
    ("B) the cat", ("cat", "dog"), "B"),
    ("B: cat", ("cat", "dog"), "B"),
    ("**B.** cat", ("cat", "dog"), "B"),
    ("The answer is B, not cat.", ("cat", "dog"), "B"),
    ("Option A: dog", ("cat", "dog"), "A"),
    ("C. 2", ("3", "2", "1", "0"), "C"),
    ("There are 2 red circles, so the answer is (A).", ("3", "2", "1", "0"), "A"),
    # unparsed: no option, two options, a letter that is not an option, an article
    ("I cannot tell from this image.", ("left", "right"), None),
    ("Either 2 or 3.", ("3", "2", "1", "0"), None),
    ("E", ("3", "2", "1", "0"), None),
    ("(E)", ("left", "right"), None),
    ("A dog sits on the table.", ("left", "right"), None),
    ("the answer is a cat", ("left", "right"), None),
    ("", ("left", "right"), None),
]


@pytest.mark.parametrize(("reply", "options", "expected"), REPLIES)
def test_parse_answer(reply, options, expected):
    assert parse_answer(reply, options) == expected


# ---------------------------------------------------------------------------------------- formats


def test_cvbench_reader_keeps_the_card_prompt_and_letters(cvbench):
    questions = load_cvbench(cvbench)
    assert [q.id for q in questions] == [str(i) for i in range(len(FIXTURE))]
    assert [q.answer for q in questions] == [LETTERS[a] for _, _, a in FIXTURE]
    q = questions[0]
    assert q.prompt.startswith(
        "How many red circles are in the image? Select from the following choices.\n(A) 3\n"
    )
    assert q.prompt.endswith("Answer with the option's letter from the given choices directly.")
    assert (q.task, q.source, q.type) == ("Count", "ADE20K", "2D")
    assert Image.open(io.BytesIO(q.image)).size == SIZE


def test_fixture_answers_are_true_of_the_images(cvbench):
    """The drawn shapes say what the answers say (count red pixels' blobs, compare positions)."""
    from scipy import ndimage

    for q in load_cvbench(cvbench):
        rgb = np.asarray(Image.open(io.BytesIO(q.image)).convert("RGB")).astype(int)
        red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
        blue = (rgb[..., 2] > 200) & (rgb[..., 0] < 60) & (rgb[..., 1] < 60)
        green = (rgb[..., 1] > 200) & (rgb[..., 0] < 60) & (rgb[..., 2] < 60)
        said = q.options[LETTERS.index(q.answer)]
        if q.task == "Count":
            labels, n = ndimage.label(red)
            blobs = np.bincount(labels.ravel())[1:]
            assert (blobs > 100).sum() == int(
                said
            )  # drawn circles are ~200 px; the photos' red specks are small
        elif q.task == "Relation":
            red_left = np.nonzero(red)[1].mean() < np.nonzero(blue)[1].mean()
            assert said == ("left" if red_left else "right")
        elif q.task == "Depth":
            assert said == ("red square" if red.sum() > blue.sum() else "blue circle")
        else:
            g = np.argwhere(green).mean(0)
            d_red, d_blue = (np.linalg.norm(np.argwhere(m).mean(0) - g) for m in (red, blue))
            assert said == ("red square" if d_red < d_blue else "blue circle")


def test_mc_format_jsonl_paths_and_parquet_bytes(tmp_path, cvbench):
    """MMStar/RealWorldQA-style rows: answers as a letter, '(B)' or the option text; categories as tasks."""
    source = load_cvbench(cvbench)[:4]
    (tmp_path / "images").mkdir()
    rows = []
    for k, q in enumerate(source):
        (tmp_path / "images" / f"{q.id}.png").write_bytes(q.image)
        answer = [q.answer, f"({q.answer})", q.options[LETTERS.index(q.answer)], q.answer.lower()][k]
        rows.append(
            {
                "id": f"mc-{q.id}",
                "image": f"images/{q.id}.png",
                "question": q.prompt.split(" Select")[0],
                "options": list(q.options),
                "answer": answer,
                "category": q.task,
            }
        )
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "set.parquet"
    pq.write_table(
        pa.Table.from_pylist([{**r, "image": (tmp_path / r["image"]).read_bytes()} for r in rows]), parquet
    )
    for path in (jsonl, parquet):
        questions = load_mc(path)
        assert [q.answer for q in questions] == [q.answer for q in source]
        assert [q.image for q in questions] == [q.image for q in source]
        assert questions[0].prompt == (
            "How many red circles are in the image?\nA. 3\nB. 1\nC. 2\nD. 0\n"
            "Answer with the option's letter from the given choices directly."
        )
        assert [q.task for q in questions] == ["Count", "Count", "Count", "Relation"]

    class Oracle:
        def generate(self, prompts, images):
            return [q.answer for q in questions]

    results = score(Oracle(), questions, tmp_path / "out", _settings(parquet, bench="mc"))
    assert results["accuracy"] == 1.0 and set(results["tasks"]) == {"Count", "Relation"}
    assert "cvbench" not in results


def test_bad_data_fails_loudly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {"id": "q1", "image": "missing.png", "question": "?", "options": ["x", "y"], "answer": "C"}
        )
        + "\n"
    )
    with pytest.raises(ValueError, match="q1: answer 'C'"):
        load_mc(bad)
    bad.write_text(
        json.dumps(
            {"id": "q1", "image": "missing.png", "question": "?", "options": ["x", "y"], "answer": "A"}
        )
        + "\n"
    )
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mc(bad)


def test_limit_is_round_robin_over_tasks(cvbench):
    picked = load_questions("cvbench", cvbench, limit=6)
    # Tasks in file order: Count (0,1,2,5,6), Relation (3,4,7,8), Depth (9..11), Distance (12..14).
    assert [q.id for q in picked] == ["0", "1", "3", "4", "9", "12"]


# ---------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_oracle_scores_100_percent(cvbench, tmp_path, mode):
    questions = load_cvbench(cvbench)
    results = score(Oracle(cvbench), questions, tmp_path, _settings(cvbench, mode), batch_size=4)
    assert (results["n"], results["correct"], results["unparsed"]) == (15, 15, [])
    assert results["cvbench"] == {
        "Count": 1.0,
        "Depth": 1.0,
        "Relation": 1.0,
        "Distance": 1.0,
        "2D": 1.0,
        "3D": 1.0,
        "Overall": 1.0,
    }
    lines = [json.loads(line) for line in (tmp_path / PREDICTIONS).read_text().splitlines()]
    assert [r["id"] for r in lines] == [q.id for q in questions] and all(r["correct"] for r in lines)
    if mode == "generate":  # every reply format was parsed
        assert {r["raw"] for r in lines} >= {"(A)", "B", "C.", "The answer is A.", "right"}
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == "group,name,n,correct,accuracy"


@pytest.mark.parametrize(
    ("mode", "continuation"), [("generate", "letter"), ("likelihood", "letter"), ("likelihood", "text")]
)
def test_constant_answer_scores_its_hand_counted_share(cvbench, tmp_path, mode, continuation):
    results = score(
        ConstantA(),
        load_cvbench(cvbench),
        tmp_path,
        _settings(cvbench, mode, continuation=continuation),
        batch_size=5,
    )
    # Hand counts from FIXTURE (answers that are A):
    assert results["sources"]["ADE20K"] == {"n": 5, "correct": 2, "accuracy": 2 / 5}
    assert results["sources"]["COCO"] == {"n": 4, "correct": 1, "accuracy": 1 / 4}
    assert results["sources"]["Omni3D"] == {"n": 6, "correct": 3, "accuracy": 3 / 6}
    cols = results["cvbench"]
    assert cols["Count"] == pytest.approx(2 / 5)  # Count answers A B C D A
    assert cols["Relation"] == pytest.approx(1 / 4)  # A B B B
    assert cols["Depth"] == pytest.approx(2 / 3)  # A B A
    assert cols["Distance"] == pytest.approx(1 / 3)  # B B A
    assert cols["2D"] == pytest.approx(
        (2 / 5 + 1 / 4) / 2
    )  # 0.325: the card's mean of sources, not 3/9 pooled
    assert cols["3D"] == pytest.approx(3 / 6)
    assert cols["Overall"] == pytest.approx((0.325 + 0.5) / 2)  # 0.4125, not the pooled 6/15
    assert results["accuracy"] == pytest.approx(6 / 15)
    table = format_table({"constant": results})
    assert table.splitlines()[0].split()[:8] == [
        "model",
        "Count",
        "Depth",
        "Relation",
        "Distance",
        "2D",
        "3D",
        "Overall",
    ]
    assert "41.2" in table or "41.3" in table


def test_unparsed_replies_are_wrong_and_listed(cvbench, tmp_path):
    class Mumble:
        def generate(self, prompts, images):
            return ["I am not sure." if k % 2 else "A" for k in range(len(prompts))]

    results = score(Mumble(), load_cvbench(cvbench)[:4], tmp_path, _settings(cvbench), batch_size=4)
    assert results["unparsed"] == ["1", "3"]
    assert (
        results["correct"] == 1
    )  # 0 and 2 replied A: 0 is A (right), 2 is C; 3 is A but its reply is unparsed
    preds = read_predictions(tmp_path / PREDICTIONS)
    assert preds["1"]["parsed"] is None and preds["1"]["correct"] is False


def test_rerun_after_kill_resumes_without_rescoring(cvbench, tmp_path):
    questions = load_cvbench(cvbench)
    full = score(Oracle(cvbench), questions, tmp_path / "full", _settings(cvbench), batch_size=4)

    # A kill mid-write: 6 complete lines and half of the 7th.
    path = tmp_path / "run" / PREDICTIONS
    path.parent.mkdir()
    lines = (tmp_path / "full" / PREDICTIONS).read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])
    (tmp_path / "run" / "run.json").write_text((tmp_path / "full" / "run.json").read_text())
    assert len(read_predictions(path)) == 6

    oracle = Oracle(cvbench)
    resumed = score(oracle, questions, tmp_path / "run", _settings(cvbench), batch_size=4)
    assert oracle.asked == [q.id for q in questions[6:]]  # the torn 7th line is rescored, nothing before it
    assert path.read_text() == (tmp_path / "full" / PREDICTIONS).read_text()
    assert {k: v for k, v in resumed.items() if k not in ("scored_now", "seconds")} == {
        k: v for k, v in full.items() if k not in ("scored_now", "seconds")
    }

    def never():
        raise AssertionError("a finished run must not load the model")

    again = score(never, questions, tmp_path / "run", _settings(cvbench), batch_size=4)
    assert again["scored_now"] == 0 and again["accuracy"] == 1.0

    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + "garbage\n" + "".join(lines[3:]))
    with pytest.raises(ValueError, match=r"predictions.jsonl:4: not a prediction line"):
        score(never, questions, tmp_path / "run", _settings(cvbench))


def test_rerun_with_other_settings_fails(cvbench, tmp_path):
    questions = load_cvbench(cvbench)[:2]
    score(ConstantA(), questions, tmp_path, _settings(cvbench, "generate"))
    with pytest.raises(ValueError, match="other settings.*mode"):
        score(ConstantA(), questions, tmp_path, _settings(cvbench, "likelihood"))


def test_compare_paired_bootstrap(cvbench, tmp_path):
    questions = load_cvbench(cvbench)
    score(Oracle(cvbench), questions, tmp_path / "oracle", _settings(cvbench))
    score(ConstantA(), questions, tmp_path / "const", _settings(cvbench))
    oracle, const = (read_predictions(tmp_path / d / PREDICTIONS) for d in ("oracle", "const"))

    c = compare(oracle, const, bench="cvbench", resamples=500, seed=1)  # the first minus the compared
    cols = c["columns"]
    assert cols["Count"]["diff"] == pytest.approx(1 - 2 / 5) and cols["Overall"]["diff"] == pytest.approx(
        1 - 0.4125
    )
    for v in cols.values():
        assert v["low"] <= v["diff"] <= v["high"]
    # Every Depth question the constant model gets right, the oracle gets right too: the diff never goes below 0.
    assert cols["Depth"]["low"] >= 0
    assert compare(oracle, const, bench="cvbench", resamples=500, seed=1) == c  # seeded
    assert compare(const, oracle, bench="cvbench", resamples=500)["columns"]["Overall"]["diff"] < 0
    same = compare(oracle, oracle, bench="cvbench", resamples=200)["columns"]
    assert all((v["diff"], v["low"], v["high"]) == (0.0, 0.0, 0.0) for v in same.values())
    text = format_comparison(c, "oracle", "const")
    assert text.startswith("diff = oracle - const") and "Overall" in text and "+58.8" in text
    # A partial benchmark (3D questions only): the columns it cannot fill are None, not NaN.
    only_3d = {i: r for i, r in oracle.items() if r["source"] == "Omni3D"}
    partial = compare(only_3d, {i: const[i] for i in only_3d}, bench="cvbench", resamples=100)["columns"]
    assert partial["Overall"] == dict.fromkeys(("a", "b", "diff", "low", "high"))
    assert partial["3D"]["diff"] == pytest.approx(1 - 3 / 6)
    assert "Overall" in format_comparison({"columns": partial, "resamples": 100, "n": 6}, "o", "c")


# ---------------------------------------------------------------------------------------- tiny student


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from olavlm.trainer.student.export import export_llava
    from tests._student import tiny_model

    root = tmp_path_factory.mktemp("student")
    model = tiny_model()
    with torch.no_grad():  # trained task tokens differ from their vocabulary rows
        model.task_embeddings.add_(torch.randn_like(model.task_embeddings))
    ckpt = save_student(model, root / "ckpt")
    return ckpt, export_llava(ckpt, root / "llava")


def _cli(*args):
    from olavlm.cli.app import app

    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout  # transformers' loading bars go to stderr


def test_tiny_student_end_to_end_both_modes_and_export(student, cvbench, tmp_path):
    ckpt, export = student
    runs = {}
    for name, folder, mode in [
        ("ckpt-lik", ckpt, "likelihood"),
        ("export-lik", export, "likelihood"),
        ("ckpt-gen", ckpt, "generate"),
        ("export-gen", export, "generate"),
    ]:
        output = _cli(
            folder,
            "--bench",
            "cvbench",
            "--data",
            cvbench,
            "--out",
            tmp_path / name,
            "--mode",
            mode,
            "--batch-size",
            "4",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        )
        assert "Count" in output and "Overall" in output
        runs[name] = read_predictions(tmp_path / name / PREDICTIONS)
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["n"] == len(FIXTURE) and set(results["cvbench"]) >= {"2D", "3D", "Overall"}
    # The export is the same model: same option scores, same choices, same greedy replies.
    for i, row in runs["ckpt-lik"].items():
        other = runs["export-lik"][i]
        np.testing.assert_allclose(row["raw"], other["raw"], atol=1e-3)
        assert row["parsed"] == other["parsed"]
    assert {i: r["raw"] for i, r in runs["ckpt-gen"].items()} == {
        i: r["raw"] for i, r in runs["export-gen"].items()
    }

    # --compare and --json: the same model twice -> zero difference; a rerun resumes (nothing scored now).
    output = _cli(
        ckpt,
        "--compare",
        export,
        "--bench",
        "cvbench",
        "--data",
        cvbench,
        "--out",
        tmp_path / "cmp",
        "--mode",
        "likelihood",
        "--json",
        "--resamples",
        "200",
        "--device",
        "cpu",
    )
    report = json.loads(output)
    assert set(report["results"]) == {"ckpt", "llava"}
    assert all(v["diff"] == 0 for v in report["comparison"]["columns"].values())
    again = json.loads(
        _cli(
            ckpt,
            "--bench",
            "cvbench",
            "--data",
            cvbench,
            "--out",
            tmp_path / "ckpt-lik",
            "--mode",
            "likelihood",
            "--json",
        )
    )
    assert again["results"]["ckpt"]["scored_now"] == 0


def test_tiny_student_scores_do_not_depend_on_batching(student, cvbench):
    """Right-padded likelihood rows are exact; the multi-token path agrees with the one-token path."""
    from olavlm.trainer.eval.adapter import LlavaEvalModel

    model = LlavaEvalModel(student[0], device="cpu", max_new_tokens=4)
    qs = load_cvbench(cvbench)[:5]
    prompts, images = [q.prompt for q in qs], [q.image for q in qs]
    conts = [list(q.letters) for q in qs]
    batched = model.logprobs(prompts, images, conts)
    single = [model.logprobs([p], [im], [c])[0] for p, im, c in zip(prompts, images, conts)]
    for b, s in zip(batched, single):  # ragged: 4 options for Count, 2 for Relation
        np.testing.assert_allclose(b, s, atol=1e-4)
    # Adding a multi-token option forces the one-row-per-option path; the letters' scores stay the same.
    mixed = model.logprobs(prompts, images, [c + ["blue circle"] for c in conts])
    for m, b in zip(mixed, batched):
        np.testing.assert_allclose(m[:-1], b, atol=1e-4)
    # Left-padded batched greedy decoding gives each row what it gives alone.
    assert model.generate(prompts, images) == [model.generate([p], [im])[0] for p, im in zip(prompts, images)]


def test_images_are_padded_or_cropped_as_the_model_was_trained(student, cvbench, tmp_path):
    """The mode comes from the model's saved image processor (export included); --image-aspect-ratio overrides."""
    from olavlm.trainer.data.images import with_aspect_ratio
    from olavlm.trainer.eval.adapter import LlavaEvalModel
    from olavlm.trainer.student.export import export_llava

    image = [load_cvbench(cvbench)[0].image]  # 96 x 64: padding and cropping differ
    cropped = LlavaEvalModel(student[0], device="cpu")
    assert cropped.image_aspect_ratio == "crop" and cropped.pixels(image).shape == (1, 3, 32, 32)
    model = load_student(student[0])
    model.image_processor = with_aspect_ratio(model.image_processor, "pad")
    padded_ckpt = save_student(model, tmp_path / "padded")
    for folder in (padded_ckpt, export_llava(padded_ckpt, tmp_path / "padded-llava")):
        padded = LlavaEvalModel(folder, device="cpu")
        assert padded.image_aspect_ratio == "pad"
        assert not torch.allclose(padded.pixels(image), cropped.pixels(image))
        # The top rows are the mean colour: normalised, about 0 (the mean is truncated to integers).
        assert padded.pixels(image)[0, :, 0].abs().max() < 0.02
    override = LlavaEvalModel(padded_ckpt, device="cpu", image_aspect_ratio="crop")
    torch.testing.assert_close(override.pixels(image), cropped.pixels(image))


def test_labels_name_subfolders():
    from olavlm.trainer.eval.benchmark import labels

    assert labels(["runs/pt", "runs/pt-baseline"]) == ["pt", "pt-baseline"]
    assert labels(["/a/ola/model", "b/base/model"]) == ["a_ola_model", "b_base_model"]
    with pytest.raises(ValueError, match="with itself"):
        labels(["runs/pt", "runs/pt"])


def test_cli_errors_are_one_line(cvbench, tmp_path):
    from olavlm.cli.app import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["eval", str(tmp_path / "nope"), "--bench", "cvbench", "--data", str(cvbench)]
    )
    assert (
        result.exit_code == 2 and "checkpoint folder" in result.output and "does not exist" in result.output
    )
    result = runner.invoke(app, ["eval", str(tmp_path), "--bench", "mmlu", "--data", str(cvbench)])
    assert result.exit_code == 2 and "unknown bench 'mmlu'" in result.output
