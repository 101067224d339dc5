"""`ola eval`: score a model on multiple-choice questions, resumably, and aggregate as the benchmark does.

`score` asks an `EvalModel` (adapter.py) in generate mode (greedy reply, `parse_answer`) or
likelihood mode (the best-scoring option; option texts per byte, lm-eval's acc_norm). A model's OUT
holds predictions.jsonl (fsynced per batch), run.json (its settings; a rerun with others is refused)
and results.json / .csv: accuracy overall, per task and source, and CV-Bench's own columns (2D =
mean of ADE20K and COCO, 3D = Omni3D, overall = their mean). Design choice: a rerun cuts a torn
last line and scores only the ids not yet predicted. Cost: predictions.jsonl is re-read in full
on every start. `compare`: per-column difference of two result sets (the first minus the second),
paired stratified bootstrap. A column with no question (a partial benchmark) is None, never NaN.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from olavlm.schemas.errors import ConfigError
from olavlm.trainer.eval.adapter import EvalModel
from olavlm.trainer.eval.questions import (
    CVBENCH_2D_SOURCES,
    CVBENCH_3D_SOURCE,
    CVBENCH_TASKS,
    EvalDataError,
    Question,
    cvbench_columns,
    parse_answer,
)

MODES = ("generate", "likelihood")
CONTINUATIONS = ("letter", "text")
PREDICTIONS = "predictions.jsonl"
RUN = "run.json"
RESULTS = "results.json"
RESULTS_CSV = "results.csv"


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """What a set of predictions was made with; a resumed run must match it field by field."""

    model: str
    """Resolved model folder."""
    bench: str
    """'cvbench' or 'mc'."""
    data: str
    """The resolved data files (a folder's CV-Bench files), comma-separated."""
    mode: str = "generate"
    """'generate' (greedy reply, parsed) or 'likelihood' (best-scoring option)."""
    continuation: str = "letter"
    """Likelihood mode: score the option 'letter' or the option 'text'."""
    max_new_tokens: int = 32
    """Generation mode: most tokens per reply."""
    image_aspect_ratio: str = ""
    """'pad' or 'crop' overrides the model's own mode (its saved image processor's); '' = the model's own."""

    def identity(self) -> dict:
        """The fields that decide the predictions (the other mode's option is left out)."""
        out = asdict(self)
        out.pop("continuation" if self.mode == "generate" else "max_new_tokens")
        return out


# ------------------------------------------------------------------------------------- predictions


def read_predictions(path: Path) -> dict[str, dict]:
    """{id: prediction} of a predictions.jsonl; a torn last line is ignored (and cut by `_truncate_torn`)."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # torn write: the process died mid-line
            try:
                row = json.loads(line)
                out[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):  # not a torn write: someone edited the file
                raise EvalDataError(f"{path}:{n}: not a prediction line; fix or delete the file") from None
    return out


def _truncate_torn(path: Path) -> None:
    """Cut a partial last line so that the next append starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as f:
            f.truncate(keep)


def _check_settings(out: Path, settings: EvalSettings) -> None:
    path = out / RUN
    mine = settings.identity()
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ConfigError(
                f"{out} holds predictions made with other settings {diff} (saved, now): "
                "use another --out, or delete it to start over"
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mine, indent=2))
    os.replace(tmp, path)


def _choose(q: Question, scores: list[float], continuation: str) -> str:
    if continuation == "text":  # per byte: a summed log-probability favours short options
        scores = [s / max(1, len(o.encode())) for s, o in zip(scores, q.options)]
    return q.letters[int(np.argmax(scores))]


def score(
    model: EvalModel | Callable[[], EvalModel],
    questions: Sequence[Question],
    out: str | Path,
    settings: EvalSettings,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score the questions not yet in OUT/predictions.jsonl, then aggregate all of them; returns results.

    `model`: an `EvalModel`, or a function that builds one only if something is left to score.
    """
    if settings.mode not in MODES:
        raise ConfigError(f"mode {settings.mode!r}: one of {MODES}")
    if settings.continuation not in CONTINUATIONS:
        raise ConfigError(f"continuation {settings.continuation!r}: one of {CONTINUATIONS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    path = out / PREDICTIONS
    done = read_predictions(path)
    _truncate_torn(path)
    todo = [q for q in questions if q.id not in done]
    total, finished = len(questions), len(questions) - len(todo)
    if progress:
        progress(finished, total)
    start = time.perf_counter()
    if todo and not hasattr(model, "generate"):
        model = model()
    with path.open("a") as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            prompts, images = [q.prompt for q in batch], [q.image for q in batch]
            rows = []
            if settings.mode == "generate":
                for q, reply in zip(batch, model.generate(prompts, images)):
                    parsed = parse_answer(reply, q.options)
                    rows.append({"raw": reply, "parsed": parsed})
            else:
                conts = [
                    list(q.letters) if settings.continuation == "letter" else list(q.options) for q in batch
                ]
                for q, scores in zip(batch, model.logprobs(prompts, images, conts)):
                    rows.append(
                        {
                            "raw": [round(s, 6) for s in scores],
                            "parsed": _choose(q, scores, settings.continuation),
                        }
                    )
            for q, row in zip(batch, rows):
                line = {
                    "id": q.id,
                    "task": q.task,
                    "source": q.source,
                    "type": q.type,
                    "answer": q.answer,
                    **row,
                    "correct": row["parsed"] == q.answer,
                }
                done[q.id] = line
                f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a batch is either on disk or rescored: never half-counted
            finished += len(batch)
            if progress:
                progress(finished, total)
    elapsed = time.perf_counter() - start
    results = aggregate([done[q.id] for q in questions], bench=settings.bench)
    results.update(settings=asdict(settings), scored_now=len(todo), seconds=round(elapsed, 3))
    write_results(out, results)
    return results


# ------------------------------------------------------------------------------------- aggregation


def _acc(rows: list[dict]) -> dict:
    n, correct = len(rows), sum(bool(r["correct"]) for r in rows)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else float("nan")}


def aggregate(rows: list[dict], *, bench: str) -> dict:
    """Accuracy overall, per task and per source (+ CV-Bench's columns); unparsed ids listed."""
    by_task: dict[str, list[dict]] = {}
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
        by_source.setdefault(r["source"], []).append(r)
    results = {
        "bench": bench,
        **_acc(rows),
        "tasks": {t: _acc(v) for t, v in sorted(by_task.items())},
        "sources": {s: _acc(v) for s, v in sorted(by_source.items())},
        "unparsed": [r["id"] for r in rows if r["parsed"] is None],
    }
    if bench == "cvbench":
        results["cvbench"] = cvbench_columns(
            {t: v["accuracy"] for t, v in results["tasks"].items()},
            {s: v["accuracy"] for s, v in results["sources"].items()},
        )
        # The tasks and sources with no question: their columns (and 2D / 3D / Overall) are None.
        have = set(by_task) | set(by_source)
        results["partial"] = [
            n for n in (*CVBENCH_TASKS, *CVBENCH_2D_SOURCES, CVBENCH_3D_SOURCE) if n not in have
        ]
    return results


def columns(results: dict) -> dict[str, float]:
    """The columns of the printed table: CV-Bench's paper columns, else overall + per task."""
    if "cvbench" in results:
        return dict(results["cvbench"])
    cols = {"Overall": results["accuracy"]}
    if len(results["tasks"]) > 1 or "" not in results["tasks"]:
        cols.update({t or "(none)": v["accuracy"] for t, v in results["tasks"].items()})
    return cols


def write_results(out: Path, results: dict) -> None:
    """results.json and results.csv (group, name, n, correct, accuracy), each replaced atomically."""
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False))
    os.replace(tmp, out / RESULTS)
    tmp = out / (RESULTS_CSV + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "name", "n", "correct", "accuracy"])
        w.writerow(["all", "all", results["n"], results["correct"], f"{results['accuracy']:.6f}"])
        for group in ("tasks", "sources"):
            for name, v in results[group].items():
                w.writerow([group[:-1], name, v["n"], v["correct"], f"{v['accuracy']:.6f}"])
        for name, value in results.get("cvbench", {}).items():
            w.writerow(["cvbench", name, "", "", "" if value is None else f"{value:.6f}"])
    os.replace(tmp, out / RESULTS_CSV)


# ------------------------------------------------------------------------------------- comparison


def compare(
    a: dict[str, dict], b: dict[str, dict], *, bench: str, resamples: int = 2000, seed: int = 0
) -> dict:
    """Paired bootstrap of A - B (the first minus the compared one) over the question ids both scored
    ({id: predictions.jsonl row} each). Returns {column: {a, b, diff, low, high}}, low/high the 95%
    percentile interval of A - B; all None for a CV-Bench column the questions cannot fill."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise EvalDataError("the two result sets share no question ids")
    rows_a, rows_b = [a[i] for i in ids], [b[i] for i in ids]
    strata: dict[tuple[str, str], list[int]] = {}
    for k, r in enumerate(rows_a):
        strata.setdefault((r["task"], r["source"]), []).append(k)
    ca = np.array([bool(r["correct"]) for r in rows_a], dtype=np.float64)
    cb = np.array([bool(r["correct"]) for r in rows_b], dtype=np.float64)
    rng = np.random.default_rng(seed)
    # Per stratum and resample: correct counts of A and B on the same drawn questions. [S, R]
    keys = sorted(strata)
    sums_a, sums_b, sizes = [], [], []
    for key in keys:
        idx = np.asarray(strata[key])
        draw = idx[rng.integers(0, len(idx), size=(resamples, len(idx)))]  # [R, n]
        sums_a.append(ca[draw].sum(1))
        sums_b.append(cb[draw].sum(1))
        sizes.append(len(idx))
    sums_a, sums_b, sizes = np.stack(sums_a), np.stack(sums_b), np.asarray(sizes, dtype=np.float64)

    def cols(per_stratum_correct: np.ndarray) -> dict[str, np.ndarray]:
        """Columns from per-stratum correct counts (stratum sizes fixed), vectorised over resamples."""

        def acc(select) -> np.ndarray:
            chosen = [i for i, key in enumerate(keys) if select(key)]
            return per_stratum_correct[chosen].sum(0) / sizes[chosen].sum()

        tasks = {t: acc(lambda k, t=t: k[0] == t) for t in sorted({k[0] for k in keys})}
        out = {"Overall": acc(lambda k: True)}
        if bench == "cvbench":
            sources = {s: acc(lambda k, s=s: k[1] == s) for s in sorted({k[1] for k in keys})}
            out = cvbench_columns(tasks, sources)
        elif len(tasks) > 1 or "" not in tasks:
            out.update({t or "(none)": v for t, v in tasks.items()})
        return out

    point_a = cols(np.array([[ca[strata[k]].sum()] for k in keys]))
    point_b = cols(np.array([[cb[strata[k]].sum()] for k in keys]))
    boot = cols(sums_a - sums_b)  # differences of counts -> differences of accuracies (same denominators)
    result = {}
    for name, diffs in boot.items():
        if diffs is None:
            result[name] = dict.fromkeys(("a", "b", "diff", "low", "high"))
            continue
        low, high = np.percentile(diffs, [2.5, 97.5])
        a_, b_ = float(point_a[name][0]), float(point_b[name][0])
        result[name] = {"a": a_, "b": b_, "diff": a_ - b_, "low": float(low), "high": float(high)}
    return {"n": len(ids), "resamples": resamples, "seed": seed, "columns": result}


# ------------------------------------------------------------------------------------- tables


def format_table(named: dict[str, dict]) -> str:
    """{label: results} -> a fixed-width table, one row per model, columns as `columns` (percent)."""
    cols = list(dict.fromkeys(c for r in named.values() for c in columns(r)))
    width = max(10, *(len(n) for n in named))
    lines = [f"{'model':<{width}} " + " ".join(f"{c:>9}" for c in cols) + f" {'n':>6} {'unparsed':>8}"]
    for label, r in named.items():
        mine = columns(r)
        cells = " ".join(f"{_pct(mine.get(c)):>9}" for c in cols)
        lines.append(f"{label:<{width}} {cells} {r['n']:>6} {len(r['unparsed']):>8}")
    return "\n".join(lines)


def _pct(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{100 * value:{sign}.1f}"


def format_comparison(comparison: dict, label_a: str, label_b: str) -> str:
    """Per column: A, B, A - B and the bootstrap 95% interval of A - B (percentage points)."""
    cols = comparison["columns"]
    width = max(10, *(len(c) for c in cols))
    lines = [
        f"diff = {label_a} - {label_b} (percentage points; 95% CI: paired bootstrap, "
        f"{comparison['resamples']} resamples, n={comparison['n']})",
        f"{'column':<{width}} {label_a[:12]:>12} {label_b[:12]:>12} {'diff':>7}  95% CI",
    ]
    for name, v in cols.items():
        ci = "-" if v["low"] is None else f"[{_pct(v['low'], '+')}, {_pct(v['high'], '+')}]"
        lines.append(f"{name:<{width}} {_pct(v['a']):>12} {_pct(v['b']):>12} {_pct(v['diff'], '+'):>7}  {ci}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- checkpoints


def labels(checkpoints: Sequence[str]) -> list[str]:
    """Folder names as labels; the paths, made folder-safe, where two names collide (they name OUT's subfolders)."""
    names = [Path(c).name or str(c) for c in checkpoints]
    if len(set(names)) < len(names):
        names = [re.sub(r"[^\w.-]+", "_", str(c)).strip("_") for c in checkpoints]
    if len(set(names)) < len(names):
        raise ConfigError(f"compare two different checkpoints, not {checkpoints[0]} with itself")
    return names


def run_eval(
    checkpoints: Sequence[str],
    *,
    bench: str,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    mode: str = "generate",
    continuation: str = "letter",
    limit: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    image_aspect_ratio: str = "",
    device: str | None = None,
    resamples: int = 2000,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Evaluate one checkpoint (results in OUT) or two (OUT/<label> each, plus OUT/comparison.json).

    Checkpoints: olavlm model / checkpoint / run folders or exported LLaVA folders; `data`: files or
    folders (`questions.data_files`). Returns {"results": {label: results}, "comparison": {...}
    (two checkpoints: the first minus the second)}."""
    from olavlm.trainer.checkpoint import model_dir
    from olavlm.trainer.eval.adapter import LlavaEvalModel
    from olavlm.trainer.eval.questions import data_files, load_questions

    if not 1 <= len(checkpoints) <= 2:
        raise ConfigError(f"one checkpoint, or two to compare (got {len(checkpoints)})")
    for c in checkpoints:
        if not Path(c).is_dir():
            raise FileNotFoundError(f"checkpoint folder {c} does not exist")
    files = data_files(bench, data)
    questions = load_questions(bench, files, limit=limit)
    out = Path(out)
    names = labels(checkpoints)
    results, predictions = {}, {}
    for checkpoint, label in zip(checkpoints, names):
        folder = model_dir(checkpoint).resolve()
        target = out if len(checkpoints) == 1 else out / label
        settings = EvalSettings(
            model=str(folder),
            bench=bench,
            data=", ".join(str(f.resolve()) for f in files),
            mode=mode,
            continuation=continuation,
            max_new_tokens=max_new_tokens,
            image_aspect_ratio=image_aspect_ratio,
        )

        def build(folder=folder) -> EvalModel:
            return LlavaEvalModel(
                folder, device=device, image_aspect_ratio=image_aspect_ratio, max_new_tokens=max_new_tokens
            )

        report = (lambda done, total, label=label: progress(label, done, total)) if progress else None
        results[label] = score(build, questions, target, settings, batch_size=batch_size, progress=report)
        ids = {q.id for q in questions}
        predictions[label] = {i: r for i, r in read_predictions(target / PREDICTIONS).items() if i in ids}
    report = {"results": results}
    if len(checkpoints) == 2:
        a, b = names
        report["comparison"] = {
            "a": a,
            "b": b,
            "diff": f"{a} - {b}",
            **compare(predictions[a], predictions[b], bench=bench, resamples=resamples, seed=seed),
        }
        tmp = out / "comparison.json.tmp"
        tmp.write_text(json.dumps(report["comparison"], indent=2, allow_nan=False))
        os.replace(tmp, out / "comparison.json")
    return report
