"""Benchmark questions for `ola eval`: the two input formats and answer extraction.

Formats (both read into the same `Question` list):
- `cvbench`: CV-Bench as published (nyu-visionx/CV-Bench `test.parquet`): `idx`, `type`
  (2D/3D), `task` (Count, Relation, Depth, Distance), `source` (ADE20K, COCO, Omni3D),
  `question`, `prompt` (the question followed by "Select from the following choices."
  and the "(A) ..." lines), `choices` (list of option texts), `answer` ("(A)"), and
  `image` as the Hugging Face Image struct {bytes, path}. The `prompt` column is used
  as given, so the wording matches the card's.
- `mc`: a generic multiple-choice set, Parquet or JSONL: `id`, `image` (bytes, the Image
  struct, or a path relative to the data file), `question`, `options` (list of texts),
  `answer` (a letter, "(A)", or the option's exact text), optional `category` (reported
  like CV-Bench's `task`) and `source`. MMStar, RealWorldQA and similar sets map onto it
  with a column rename (docs/EVAL.md). The prompt is the question followed by "A. text"
  lines, LLaVA-1.5's multiple-choice layout.
Both append LLaVA-1.5's instruction "Answer with the option's letter from the given
choices directly." (`MC_SUFFIX`).

Images stay encoded (bytes) until a batch needs them: CV-Bench's 2,638 images are
~390 MB encoded, several GB decoded. Cost: a question holds its bytes in memory
(the Arrow column's buffers are referenced, not copied per row).

Answer extraction (`parse_answer`) takes, in this order: a parenthesised letter
"(B)"; a reply that is only a letter ("B", "b", "B."); a leading letter with a
delimiter ("B. left", "B) ...", "B: ..."); "answer/option/choice is B"; else the one
option whose text the reply contains (whole words, case-insensitive; a reply equal
to an option wins over containment). Letters outside the question's options are not
answers. Anything else is unparsed (None) and scored wrong; a reply naming two
options' texts is unparsed rather than guessed. Cost: a reply such as "A dog." to
options whose letters include A is read as "A" only if followed by a delimiter, so
"A dog" falls through to text matching.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from olavlm.schemas.errors import ConfigError, OlaError

BENCHES = ("cvbench", "mc")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


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


def _read_rows(path: Path) -> list[dict]:
    """Parquet or JSONL rows as dicts (image bytes referenced as Python bytes)."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
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


def _unique(questions: list[Question], path: Path) -> list[Question]:
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise EvalDataError(f"{path}: question id {q.id!r} occurs twice (ids key the predictions)")
        seen.add(q.id)
    return questions


def _need(row: dict, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if row.get(c) is None]
    if missing:
        raise EvalDataError(
            f"{where}: missing {missing} (has {sorted(k for k, v in row.items() if v is not None)})"
        )


def load_cvbench(path: str | Path) -> list[Question]:
    """CV-Bench Parquet (or its JSONL with image paths) -> questions, in file order."""
    path = Path(path)
    out = []
    for n, row in enumerate(_read_rows(path)):
        where = f"{path} row {n}"
        _need(row, ("idx", "choices", "answer", "task", "source", "image"), where)
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
                image=_image_bytes(row["image"], path.parent, where),
            )
        )
    return _unique(out, path)


def mc_prompt(question: str, options: tuple[str, ...]) -> str:
    """LLaVA-1.5's multiple-choice prompt: question, 'A. text' lines, the letter instruction."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{MC_SUFFIX}"


def load_mc(path: str | Path) -> list[Question]:
    """Generic multiple-choice Parquet / JSONL -> questions, in file order."""
    path = Path(path)
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
    return _unique(out, path)


def load_questions(bench: str, path: str | Path, *, limit: int = 0) -> list[Question]:
    """Questions of `bench` from `path`; `limit` > 0 keeps that many, round-robin over tasks in file order
    (so a small limit still covers every task; the same limit always picks the same questions)."""
    if bench not in BENCHES:
        raise ConfigError(f"unknown bench {bench!r}; known: {BENCHES}")
    questions = load_cvbench(path) if bench == "cvbench" else load_mc(path)
    if not questions:
        raise EvalDataError(f"{path}: no questions")
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
