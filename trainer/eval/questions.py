"""Benchmark questions for `ola eval`: the two input formats and answer extraction.

`cvbench` reads CV-Bench as published (a folder's test_2d/test_3d .parquet, or .jsonl with images
under img/; its `prompt` column as given, to match the card's wording); `mc` a generic multiple-
choice Parquet or JSONL (`id`, `image`, `question`, `options`, `answer`, optional `category`,
`source`; docs/EVAL.md), prompted in LLaVA-1.5's "A. text" layout. Both end with `MC_SUFFIX`;
images stay encoded until a batch needs them. `parse_answer` takes "(B)", a bare letter, a leading
letter with a delimiter, "answer is B", else the one option whose text the reply contains; anything
else, or two options, is unparsed and scored wrong. Design choice: a leading letter needs a
delimiter. Cost: "A dog" is matched as text, not read as "A".
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from olavlm.schemas.errors import ConfigError, OlaError

BENCHES = ("cvbench", "mc")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase
CVBENCH_LAYOUTS = ("test*.parquet", "test*.jsonl")
"""CV-Bench's published files, in the order a folder is searched: the card's default config (Parquet,
images embedded), then the JSONL files whose `filename` column names an image under img/."""
CVBENCH_TASKS = ("Count", "Depth", "Relation", "Distance")
"""The paper's CV-Bench columns, in its order (Table 1)."""
CVBENCH_2D_SOURCES = ("ADE20K", "COCO")
CVBENCH_3D_SOURCE = "Omni3D"


class EvalDataError(OlaError, ValueError):
    """A benchmark file the user must fix (bad row, missing image, duplicate id); the message names file and id."""


@dataclass(frozen=True, kw_only=True)
class Question:
    """One multiple-choice question, in either input format."""

    id: str
    """Unique within the data file (CV-Bench: `idx`); the key of predictions.jsonl."""
    prompt: str
    """The full user text: question, options, instruction (no image placeholder)."""
    options: tuple[str, ...]
    """Option texts in letter order (A, B, ...)."""
    answer: str
    """The correct letter."""
    task: str
    """CV-Bench task (Count, Relation, Depth, Distance) or the mc set's category ('' = none)."""
    source: str = ""
    """CV-Bench source (ADE20K, COCO, Omni3D) or the mc set's source column."""
    type: str = ""
    """CV-Bench's 2D / 3D."""
    image: bytes = b""
    """The encoded image."""

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(LETTERS[: len(self.options)])


# ---------------------------------------------------------------------------------------- reading


def data_files(bench: str, data: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files one or more `--data` values name, in order: a file as given, a CV-Bench folder -> its
    published files (the first of `CVBENCH_LAYOUTS` it holds); each file once."""
    files: list[Path] = []
    for path in [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]:
        if path.is_dir() and bench == "cvbench":
            found = next((sorted(path.glob(p)) for p in CVBENCH_LAYOUTS if any(path.glob(p))), [])
            if not found:
                raise EvalDataError(
                    f"{path}: no CV-Bench files in this folder (expected {' or '.join(CVBENCH_LAYOUTS)}, "
                    "e.g. test_2d.parquet and test_3d.parquet)"
                )
            files.extend(found)
        elif path.is_dir():
            raise EvalDataError(f"{path} is a folder: give the data file (.parquet or .jsonl)")
        elif not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        else:
            files.append(path)
    if not files:
        raise ConfigError("no data file given (--data)")
    return list({f.resolve(): f for f in files}.values())


def _read_rows(path: Path) -> list[dict]:
    """Parquet or JSONL rows as dicts (image bytes referenced as Python bytes)."""
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise EvalDataError(f"{path}:{n}: not JSON ({exc})") from None
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise EvalDataError(f"{path}: expected a .parquet or .jsonl file")


def _image_bytes(value, base: Path, where: str) -> bytes:
    """bytes | {'bytes', 'path'} (Hugging Face Image) | path relative to the data file -> encoded bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} does not exist")
        return path.read_bytes()
    raise EvalDataError(f"{where}: no image (expected bytes, an Image struct or a path)")


def _letter(answer, options: tuple[str, ...], where: str) -> str:
    """'A' | '(A)' | 'A.' | an option's exact text | an int index -> the letter; fails loudly otherwise."""
    if isinstance(answer, int) and 0 <= answer < len(options):
        return LETTERS[answer]
    text = str(answer).strip()
    m = re.fullmatch(r"\(?([A-Za-z])[).]?", text)
    if m and m.group(1).upper() in LETTERS[: len(options)]:
        return m.group(1).upper()
    if text in options:
        return LETTERS[options.index(text)]
    raise EvalDataError(
        f"{where}: answer {answer!r} is neither a letter of {len(options)} options nor an option's text"
    )


def _unique(questions: list[Question], files: list[Path]) -> list[Question]:
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            where = ", ".join(map(str, files))
            raise EvalDataError(f"{where}: question id {q.id!r} occurs twice (ids key the predictions)")
        seen.add(q.id)
    return questions


def _need(row: dict, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if row.get(c) is None]
    if missing:
        raise EvalDataError(
            f"{where}: missing {missing} (has {sorted(k for k, v in row.items() if v is not None)})"
        )


def _cvbench_image(row: dict, base: Path, where: str) -> bytes:
    """The Parquet layout embeds the image; the JSONL layout names it in `filename`, under img/."""
    if row.get("image") is not None:
        return _image_bytes(row["image"], base, where)
    _need(row, ("filename",), where)
    for path in (base / row["filename"], base / "img" / row["filename"]):
        if path.is_file():
            return path.read_bytes()
    raise FileNotFoundError(f"{where}: image file {base / row['filename']} does not exist")


def load_cvbench(data: str | Path | Sequence[str | Path]) -> list[Question]:
    """CV-Bench files or folders (`data_files`) -> questions, in file order."""
    files = data_files("cvbench", data)
    return _unique([q for path in files for q in _cvbench_file(path)], files)


def _cvbench_file(path: Path) -> list[Question]:
    out = []
    for n, row in enumerate(_read_rows(path)):
        where = f"{path} row {n}"
        _need(row, ("idx", "choices", "answer", "task", "source"), where)
        where = f"{path} idx {row['idx']}"
        options = tuple(str(c) for c in row["choices"])
        if "prompt" in row and row["prompt"]:
            text = str(row["prompt"])
        else:  # the card's prompt layout, rebuilt from question + choices
            _need(row, ("question",), where)
            lines = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
            text = f"{row['question']} Select from the following choices.\n{lines}"
        out.append(
            Question(
                id=str(row["idx"]),
                prompt=f"{text}\n{MC_SUFFIX}",
                options=options,
                answer=_letter(row["answer"], options, where),
                task=str(row["task"]),
                source=str(row["source"]),
                type=str(row.get("type") or ""),
                image=_cvbench_image(row, path.parent, where),
            )
        )
    return out


def cvbench_columns(task_acc: dict, source_acc: dict) -> dict:
    """The paper's CV-Bench columns and the card's 2D = (ADE20K + COCO) / 2, 3D = Omni3D, Overall = (2D + 3D) / 2
    from per-task and per-source accuracies (floats, or arrays of bootstrap resamples); None where a task or
    source has no question (a partial benchmark)."""
    cols = {t: task_acc.get(t) for t in CVBENCH_TASKS}
    ade, coco = (source_acc.get(s) for s in CVBENCH_2D_SOURCES)
    cols["2D"] = None if ade is None or coco is None else (ade + coco) / 2
    cols["3D"] = source_acc.get(CVBENCH_3D_SOURCE)
    cols["Overall"] = None if cols["2D"] is None or cols["3D"] is None else (cols["2D"] + cols["3D"]) / 2
    return cols


def mc_prompt(question: str, options: tuple[str, ...]) -> str:
    """LLaVA-1.5's multiple-choice prompt: question, 'A. text' lines, the letter instruction."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{MC_SUFFIX}"


def load_mc(data: str | Path | Sequence[str | Path]) -> list[Question]:
    """Generic multiple-choice Parquet / JSONL files -> questions, in file order."""
    files = data_files("mc", data)
    return _unique([q for path in files for q in _mc_file(path)], files)


def _mc_file(path: Path) -> list[Question]:
    out = []
    for n, row in enumerate(_read_rows(path)):
        where = f"{path} row {n}"
        _need(row, ("id", "question", "options", "answer", "image"), where)
        where = f"{path} id {row['id']}"
        options = tuple(str(o) for o in row["options"])
        if not 2 <= len(options) <= len(LETTERS):
            raise EvalDataError(f"{where}: {len(options)} options (need 2..{len(LETTERS)})")
        out.append(
            Question(
                id=str(row["id"]),
                prompt=mc_prompt(str(row["question"]), options),
                options=options,
                answer=_letter(row["answer"], options, where),
                task=str(row.get("category") or ""),
                source=str(row.get("source") or ""),
                image=_image_bytes(row["image"], path.parent, where),
            )
        )
    return out


def load_questions(bench: str, data: str | Path | Sequence[str | Path], *, limit: int = 0) -> list[Question]:
    """Questions of `bench` from `data` (files or folders, `data_files`); `limit` > 0 keeps that many,
    round-robin over tasks in file order (so a small limit still covers every task; the same limit
    always picks the same questions)."""
    if bench not in BENCHES:
        raise ConfigError(f"unknown bench {bench!r}; known: {BENCHES}")
    questions = load_cvbench(data) if bench == "cvbench" else load_mc(data)
    if not questions:
        raise EvalDataError(f"{', '.join(map(str, data_files(bench, data)))}: no questions")
    if limit <= 0 or limit >= len(questions):
        return questions
    by_task: dict[str, list[Question]] = {}
    for q in questions:
        by_task.setdefault(q.task, []).append(q)
    picked: list[Question] = []
    depth = 0
    while len(picked) < limit:
        for group in by_task.values():
            if depth < len(group) and len(picked) < limit:
                picked.append(group[depth])
        depth += 1
    order = {q.id: i for i, q in enumerate(questions)}
    return sorted(picked, key=lambda q: order[q.id])


# ---------------------------------------------------------------------------------------- answers

_PAREN = re.compile(r"\(([A-Z])\)")
_ONLY = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_LEADING = re.compile(r"\(?([A-Z])(?:[.:)]|\s*-\s)")
_SAID = re.compile(r"\b(?:answer|option|choice)\s*(?:is|would be|should be|:)?\s*:?\s*\(?([A-Z])\b\)?", re.I)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".").strip()).lower()


def parse_answer(reply: str, options: tuple[str, ...]) -> str | None:
    """The letter a free-text `reply` chooses among `options`, or None (see the module docstring)."""
    letters = LETTERS[: len(options)]
    text = reply.replace("*", "").strip()  # markdown bold ("**B**") is common in chat models' replies
    found = {m.group(1) for m in _PAREN.finditer(text) if m.group(1) in letters}
    if len(found) == 1:
        return found.pop()
    m = _ONLY.fullmatch(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = _LEADING.match(text)
    if m and m.group(1) in letters:
        return m.group(1)
    m = _SAID.search(text)
    # A lower-case letter only where it ends the reply: "the answer is a cat" names no option.
    if m and m.group(1).upper() in letters and (m.group(1).isupper() or not text[m.end() :].strip(" .)")):
        return m.group(1).upper()
    reply_norm = _norm(text)
    exact = [i for i, o in enumerate(options) if _norm(o) == reply_norm]
    if len(exact) == 1:
        return letters[exact[0]]
    contained = [
        i
        for i, o in enumerate(options)
        if _norm(o) and re.search(r"(?<!\w)" + re.escape(_norm(o)) + r"(?!\w)", reply_norm)
    ]
    if len(contained) == 1:
        return letters[contained[0]]
    return None
