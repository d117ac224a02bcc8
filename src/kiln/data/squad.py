"""The ``squad`` task: extractive question answering from SQuAD v1.1-format JSON files.

A file is ``{"data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [{"id": ...,
"question": ..., "answers": [{"text": ..., "answer_start": N}, ...]}]}]}]}``; ``answer_start``
is the character offset of ``text`` in ``context``. ``task.path`` is one file, split by article
(md5 of ``squad:{title}``, :func:`~kiln.data.corpus.split_of`; an article's optional ``split``
field wins), or ``train=a.json,validation=b.json[,test=c.json]``: each file is that split,
and without a test file the validation file is scored as test too (SQuAD's dev set is the one
its papers report). Each question is one :class:`~kiln.data.tasks.Example` (``input`` the
question, ``context`` the paragraph, ``answers`` the gold (text, offset) pairs, ``target``
the first answer).
"""

from __future__ import annotations

import json
import pathlib

from kiln.data import corpus, qa, tasks
from kiln.errors import KilnError

KIND = qa.KIND
METRICS = ("f1", "em")


def parse_path(spec: str) -> dict[str, pathlib.Path]:
    """``task.path``: one file (key ``""``) or ``split=file`` items by split name."""
    if not spec.strip():
        raise KilnError(
            "Task squad needs task.path: a SQuAD v1.1 JSON file, or"
            " 'train=train.json,validation=dev.json'."
        )
    if "=" not in spec:
        return {"": pathlib.Path(spec).expanduser()}
    files: dict[str, pathlib.Path] = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        split, _, name = (part.strip() for part in item.partition("="))
        split = corpus._SPLIT_ALIASES.get(split, "")
        if not split or not name or split in files:
            raise KilnError(
                f"task.path={spec!r}: bad entry {item!r}. Use one file, or comma-separated"
                " SPLIT=FILE with SPLIT train, validation or test (each once)."
            )
        files[split] = pathlib.Path(name).expanduser()
    if "train" not in files or "validation" not in files:
        raise KilnError(
            f"task.path={spec!r} needs train= and validation= files (test= is optional)."
        )
    return files


def load_squad(spec: str) -> tasks.Task:
    """The ``squad`` task of ``task.path`` (module docstring), cached per file version."""
    files = parse_path(spec)
    for path in files.values():
        if not path.is_file():
            raise KilnError(
                f"SQuAD file {path} not found (task.path={spec!r}): no file at"
                f" {path.resolve()}. Fix task.path (relative paths start from the working"
                " directory)."
            )
    key = ("squad", *(part for p in files.values() for part in tasks._file_key(p)), spec)
    return tasks._cached(key, lambda: _build(files))


def _build(files: dict[str, pathlib.Path]) -> tasks.Task:
    rows: list[tuple[str, tasks.Example]] = []
    for split, path in files.items():
        rows += _read(path, split)
    if "" not in files and "test" not in files:
        rows += [("test", e) for s, e in rows if s == "validation"]
    task = tasks._task("squad", KIND, rows, METRICS)
    for split, examples in task.splits.items():
        if not examples:
            raise KilnError(
                f"{', '.join(map(str, files.values()))}: no {split} questions ({len(rows)} in"
                " all). A single file is split by article title (about 80/10/10: it needs a"
                " few dozen articles), or give articles a 'split' field, or name one file per"
                " split in task.path."
            )
    return task


def _read(path: pathlib.Path, split: str) -> list[tuple[str, tasks.Example]]:
    """(split, example) per question of one file; `split` "" = by article."""
    try:
        data = json.loads(corpus._read_text(path))
        articles = data["data"]
        if not isinstance(articles, list):
            raise TypeError("'data' is not a list")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise KilnError(
            f"{path} is not a SQuAD v1.1 JSON file ({type(e).__name__}: {e}): it needs"
            ' {"data": [{"title": ..., "paragraphs": [...]}]}.'
        ) from None
    out = []
    for number, article in enumerate(articles):
        where = f"{path}, article {number}"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise KilnError(f"{where}: needs a 'paragraphs' list. Fix or remove the article.")
        title = str(article.get("title", number))
        chosen = split or _article_split(where, article, title)
        for paragraph in article["paragraphs"]:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not isinstance(paragraph.get("qas"), list):
                raise KilnError(
                    f"{where} ({title!r}): a paragraph needs a string 'context' and a 'qas'"
                    " list. Fix or remove it."
                )
            out += [(chosen, _example(path, context, qa)) for qa in paragraph["qas"]]
    return out


def _article_split(where: str, article: dict, title: str) -> str:
    if "split" not in article:
        return corpus.split_of(f"squad:{title}")
    split = (
        corpus._SPLIT_ALIASES.get(article["split"]) if isinstance(article["split"], str) else None
    )
    if split is None:
        raise KilnError(
            f"{where}: unknown split {article['split']!r}; use train, validation or test, or"
            " drop the field to split by md5 of the title."
        )
    return split


def _example(path: pathlib.Path, context: str, qa: object) -> tasks.Example:
    """One question; checks its fields and that every answer lies at its offset."""
    qid = qa.get("id") if isinstance(qa, dict) else None
    if isinstance(qid, bool) or not isinstance(qid, str | int):
        raise KilnError(
            f"{path}: a question has no 'id' (a string): {str(qa)[:80]!r}. Give every"
            " question a unique id."
        )
    where = f"{path}, question {qid!r}"
    question, answers = qa.get("question"), qa.get("answers")
    if not isinstance(question, str) or not question.strip():
        raise KilnError(f"{where}: 'question' is missing or empty. Add the question text.")
    if not isinstance(answers, list) or not answers:
        raise KilnError(
            f"{where}: 'answers' is missing or empty; a SQuAD v1.1 question needs at least one"
            ' {"text": ..., "answer_start": N}. (Unanswerable questions, SQuAD 2.0, are not'
            " supported: remove it.)"
        )
    gold = []
    for answer in answers:
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text.strip() or not isinstance(start, int):
            raise KilnError(
                f"{where}: an answer needs a non-empty 'text' and an integer 'answer_start',"
                f" found {answer!r}. Fix the answer."
            )
        if start < 0 or start + len(text) > len(context):
            raise KilnError(
                f"{where}: answer {text!r} at answer_start={start} lies outside its context"
                f" ({len(context)} characters). Fix answer_start (a character offset)."
            )
        if context[start : start + len(text)] != text:
            found = context[start : start + len(text)]
            at = context.find(text)
            hint = f" (the text occurs at {at})" if at >= 0 else " (it does not occur there)"
            raise KilnError(
                f"{where}: answer {text!r} does not match the context at answer_start={start},"
                f" which reads {found!r}{hint}. Fix answer_start or the text."
            )
        gold.append((text, start))
    return tasks.Example(str(qid), question, gold[0][0], context=context, answers=tuple(gold))
