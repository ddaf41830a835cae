"""Annotation formats -> a list of `VideoRecord(path, label)`.

Supported (each parser names the file and line of a malformed entry and says what was expected):

- `read_video_list`: mmaction2-style "relative/path label" lines (path may contain spaces; the label
  is the last whitespace-separated token, an integer).
- `read_csv_list`: "path,label" rows, optional header row; label an integer or a class name (needs
  `class_names`).
- `read_class_names`: one class name per line (label = line number - 1), or "<id> <name>" lines as in
  UCF101's classInd.txt (ids 1-based and consecutive); `resolve_class_names` takes a shipped list
  name, such a file or a list of names (the one class-list reader every command uses).
- `read_ucf101_split`: UCF101 official classInd.txt + trainlist0{1,2,3}.txt ("Class/v_....avi 1-based
  label") / testlist0{1,2,3}.txt ("Class/v_....avi", label from the class directory).
- `read_hmdb51_split`: HMDB51 official split files "<class>_test_split{1,2,3}.txt" with lines
  "<video>.avi <id>", id 1 = train, 2 = test, 0 = unused; videos under <root>/<class>/<video>.avi;
  labels are the class names sorted (or given `class_names`). The subset (train or test) is always
  given: there is no default that could make training read the test videos.
- `read_kinetics_csv`: Kinetics csv "label,youtube_id,time_start,time_end,split[,is_cc]"; file names
  from `path_template` (default "{youtube_id}_{time_start:06d}_{time_end:06d}.mp4", optionally with
  "{split}/{label}/" directories).
- `read_ssv2_json`: Something-Something v2's official annotation files (``something-something-v2-
  train.json`` / ``-validation.json`` / ``-test.json``): a JSON list of {"id", "template", ...};
  videos ``<root>/<id>.webm``; the label is the template without its brackets ("Putting [something]
  onto [something]" -> "Putting something onto something"), looked up in the 174-class list (the
  shipped ``ssv2`` list by default, or the official ``something-something-v2-labels.json``).
- `read_split_folder` / `resolve_split`: a published split (base-to-novel or few-shot): a folder whose
  ``split.json`` names its class lists, its training lists (one per seed or shot count) and its
  validation lists, all "list" files (the shipped ones: `stdd.resources.split_dir`).

Every line-based file may be gzip-compressed (a name ending in ".gz"); a line "# ..." ("#" then a blank) is
a comment, while "#" starting a word is data (`is_comment`). A "list" file read with
``class_directories=True`` also finds a video that is not at ``<root>/<listed path>`` at
``<root>/<listed folder>/<class>/<file name>`` (UCF101 and HMDB51 keep each class in its own folder;
the published split lists name the files alone).

`load_annotations(path, format=..., ...)` picks a parser by name from `ANNOTATION_READERS` (the one
list of formats: `ANNOTATION_FORMATS`), and `resolve_videos(records, on_missing="fail"|"skip")` checks
that the files exist (counted and reported either way). The official splits of UCF101 and HMDB51
(`OFFICIAL_SPLIT_FORMATS`) take `split` (1, 2 or 3) and `subset` ("train" or "test").

A file that lists the same video with the same label more than once is read as it is (a user may
weight videos on purpose), but each reader logs one warning naming the file and how many lines
repeat an earlier one: a repeated line makes that video count more in training and in the accuracy.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import UsageError
from ..resources import CLASS_COUNTS
from ..resources import class_names as shipped_class_names

logger = logging.getLogger(__name__)

ON_MISSING_POLICIES = ("skip", "fail")  # listed videos that do not exist: dropped (counted) | an error
OFFICIAL_SPLITS = (1, 2, 3)  # the three official train/test splits of UCF101 and HMDB51
SPLIT_SUBSETS = ("train", "test")  # the halves of an official split
_SPLIT_NUMBER = f"[{''.join(map(str, OFFICIAL_SPLITS))}]"  # a split's number in an official file name


class AnnotationError(UsageError, ValueError):
    """A malformed annotation entry; the message starts with "file:line:"."""

    def __init__(self, file: str | os.PathLike, line_number: int | None, message: str):
        location = f"{file}:{line_number}" if line_number is not None else f"{file}"
        super().__init__(f"{location}: {message}")
        self.file = str(file)
        self.line_number = line_number


@dataclass(frozen=True)
class VideoRecord:
    """One video of a dataset: absolute (or root-joined) path and integer label (-1 = unlabelled)."""

    path: Path
    label: int


def is_comment(text: str) -> bool:
    """Whether a stripped line is a comment: "#" followed by a blank or nothing ("# train split"). A "#" that
    starts a word is data: HMDB51 has videos named "#437_How_To_Ride_A_Bike_ride_bike_f_cm_np1_ba_med_1.avi"."""
    return text.startswith("#") and (len(text) == 1 or text[1].isspace())


def _open_text(path: Path):
    """``path`` opened for reading text; a name ending in ".gz" is decompressed (-sig: a UTF-8 byte order
    mark is tolerated)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _content_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, stripped text) for non-empty, non-comment lines (`is_comment`)."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with _open_text(path) as handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                text = line.strip()
                if text and not is_comment(text):
                    yield line_number, text
        except (OSError, EOFError, UnicodeDecodeError) as error:  # a damaged .gz, bytes that are not text
            raise AnnotationError(path, None, f"cannot be read as text ({error})") from error


def _join(root: Path | None, relative: str) -> Path:
    relative_path = Path(relative)
    return relative_path if root is None or relative_path.is_absolute() else root / relative_path


def _check_label(file: Path, line_number: int, label: int, num_classes: int | None) -> None:
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"in [0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        raise AnnotationError(file, line_number, f"label {label} out of range, expected {bound}")


def warn_duplicate_lines(records: Sequence[VideoRecord], source: str | os.PathLike) -> int:
    """Log one warning when ``records`` (read from ``source``) repeat a (video, label) entry; returns how
    many entries repeat an earlier one. They are kept: a repeated video counts that many times."""
    counts: dict[VideoRecord, int] = {}
    for record in records:
        counts[record] = counts.get(record, 0) + 1
    repeated = {record: count for record, count in counts.items() if count > 1}
    extra = sum(count - 1 for count in repeated.values())
    if extra:
        first, times = next(iter(repeated.items()))
        logger.warning(
            "%s: %d duplicate line%s (the same video and label again; %d video%s listed more than once, e.g. %s "
            "x%d); kept, so those videos count more in training and in the accuracy",
            source, extra, "" if extra == 1 else "s", len(repeated), "" if len(repeated) == 1 else "s",
            first.path, times,
        )
    return extra


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names by label. Lines "name" (label = order) or "<id> <name>" (ids 1..K or 0..K-1, in order)."""
    path = Path(path)
    entries = list(_content_lines(path))
    if not entries:
        raise AnnotationError(path, None, "expected at least one class name, the file is empty")
    numbered = [re.fullmatch(r"(\d+)\s+(\S.*)", text) for _, text in entries]
    if all(match is not None for match in numbered):
        first_id = int(numbered[0].group(1))
        if first_id not in (0, 1):
            raise AnnotationError(path, entries[0][0], f"expected class ids to start at 0 or 1, got {first_id}")
        names = []
        for position, ((line_number, _), match) in enumerate(zip(entries, numbered)):
            if int(match.group(1)) != first_id + position:
                raise AnnotationError(
                    path, line_number, f"expected class id {first_id + position} (consecutive ids), got {match.group(1)}"
                )
            names.append(match.group(2).strip())
    else:
        names = [text for _, text in entries]
    seen: dict[str, int] = {}
    for (line_number, _), name in zip(entries, names):
        if name in seen:
            raise AnnotationError(path, line_number, f"duplicate class name {name!r} (first at line {seen[name]})")
        seen[name] = line_number
    return names


def resolve_class_names(spec, *, where: str = "classes") -> list[str]:
    """The class list ``spec`` names: a shipped list (``ucf101``, ``hmdb51``, ``k400``, ``k600``,
    ``k600_new``; see `stdd.resources`), a class-name file (read by `read_class_names`: one name per
    line, or "<id> <name>" lines as in UCF101's classInd.txt), or a sequence of names.

    ``ValueError`` (an `AnnotationError` for a malformed file) names ``where`` and the problem.
    """
    if spec is None:
        raise ValueError(f"{where}: no class list given")
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        names = [str(name) for name in spec]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{where}: duplicated class names {duplicates[:5]}")
    elif str(spec).lower() in CLASS_COUNTS:
        names = shipped_class_names(str(spec).lower())
    else:
        path = Path(os.path.expanduser(str(spec)))
        if not path.is_file():
            raise ValueError(f"{where} {spec!r}: neither a shipped list ({', '.join(CLASS_COUNTS)}) nor a file")
        names = read_class_names(path)
    if not names:
        raise ValueError(f"{where}: the class list is empty")
    return names


def class_directory_names(class_name: str) -> tuple[str, ...]:
    """The folder names a class's videos may sit in: the name as written, and with "_" for its spaces
    (Kinetics copies spell "air drumming" either way)."""
    joined = "_".join(class_name.split())
    return (class_name,) if joined == class_name else (class_name, joined)


def _in_class_directory(path: Path, class_name: str) -> Path:
    """``path`` if it exists, else ``<its folder>/<class folder>/<its name>`` where that exists; else ``path``
    (reported as missing by `resolve_videos`)."""
    if path.is_file():
        return path
    for directory in class_directory_names(class_name):
        candidate = path.parent / directory / path.name
        if candidate.is_file():
            return candidate
    return path


def read_video_list(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    class_directories: Sequence[str] | None = None,
) -> list[VideoRecord]:
    """mmaction2-style list: "relative/path label" per line; paths joined to `root` (default: the list's directory).

    ``class_directories``: the class names the labels index; a video that is not at ``<root>/<relative
    path>`` is then also looked for in its class's folder (`_in_class_directory`). The list may be gzipped.
    """
    path = Path(path)
    root_path = Path(root) if root is not None else path.parent
    if class_directories is not None:
        num_classes = len(class_directories) if num_classes is None else num_classes
    records = []
    for line_number, text in _content_lines(path):
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise AnnotationError(path, line_number, f"expected '<relative/path> <integer label>', got {text!r}")
        label = int(parts[1])
        _check_label(path, line_number, label, num_classes)
        video = _join(root_path, parts[0])
        if class_directories is not None:
            video = _in_class_directory(video, class_directories[label])
        records.append(VideoRecord(video, label))
    warn_duplicate_lines(records, path)
    return records


def read_csv_list(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> list[VideoRecord]:
    """csv "path,label" rows (a first row "path,label" or similar non-numeric header is skipped).

    A label is an integer, or a class name looked up in `class_names`.
    """
    path = Path(path)
    root_path = Path(root) if root is not None else path.parent
    label_of = {name: index for index, name in enumerate(class_names)} if class_names is not None else None
    records = []
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for row_number, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row) or is_comment(row[0].strip()):
                continue
            if len(row) != 2:
                raise AnnotationError(path, row_number, f"expected 2 columns 'path,label', got {len(row)}: {row!r}")
            video, label_text = row[0].strip(), row[1].strip()
            if row_number == 1 and video.lower() in ("path", "video", "filename", "file") and not label_text.isdigit():
                continue  # header
            if re.fullmatch(r"-?\d+", label_text):
                label = int(label_text)
            elif label_of is not None and label_text in label_of:
                label = label_of[label_text]
            elif label_of is None:
                raise AnnotationError(
                    path, row_number, f"expected an integer label (or pass class_names for names), got {label_text!r}"
                )
            else:
                raise AnnotationError(path, row_number, f"unknown class name {label_text!r}")
            if not video:
                raise AnnotationError(path, row_number, "expected a video path in column 1, got an empty cell")
            _check_label(path, row_number, label, len(class_names) if class_names is not None else None)
            records.append(VideoRecord(_join(root_path, video), label))
    warn_duplicate_lines(records, path)
    return records


def check_split_arguments(split: int, subset: str) -> None:
    """``split`` one of `OFFICIAL_SPLITS`, ``subset`` one of `SPLIT_SUBSETS`; ``ValueError`` naming the bad one."""
    if isinstance(split, bool) or split not in OFFICIAL_SPLITS:
        raise ValueError(f"split: expected one of {', '.join(map(str, OFFICIAL_SPLITS))}, got {split!r}")
    if subset not in SPLIT_SUBSETS:
        raise ValueError(f"subset: expected one of {', '.join(SPLIT_SUBSETS)}, got {subset!r}")


_UCF101_LIST_NAME = re.compile(rf"(?P<subset>{'|'.join(SPLIT_SUBSETS)})list0(?P<split>{_SPLIT_NUMBER})\.txt")


def ucf101_list_mismatch(split_file: str | os.PathLike, split: int, subset: str) -> str | None:
    """Why a UCF101 list named as the official ones (``trainlist0N.txt`` / ``testlist0N.txt``) is not
    the list of ``subset`` in ``split``, or ``None`` when it is (or is named otherwise: taken as given).
    Training on a test list, or on the train list of one split while validating on the test list of
    another, would put test videos into training."""
    check_split_arguments(split, subset)
    match = _UCF101_LIST_NAME.fullmatch(Path(split_file).name)
    if match is None:
        return None
    if match.group("subset") != subset:
        return f"a UCF101 {match.group('subset')} list, where the {subset} list ({subset}list0{split}.txt) is read"
    if int(match.group("split")) != split:
        return (f"a list of UCF101 split {match.group('split')}, where split {split} is read (its lists: "
                f"trainlist0{split}.txt, testlist0{split}.txt)")
    return None


def read_ucf101_split(
    split_file: str | os.PathLike,
    class_index_file: str | os.PathLike,
    video_root: str | os.PathLike,
    *,
    split: int | None = None,
    subset: str | None = None,
) -> tuple[list[VideoRecord], list[str]]:
    """UCF101 official split: trainlist0N.txt ("Class/v_X.avi <1-based label>") or testlist0N.txt ("Class/v_X.avi").

    Returns (records with 0-based labels, class names from classInd.txt). The class directory must agree
    with the label when both are given. With ``split`` and ``subset`` (both or neither), an officially
    named list must be that one (`ucf101_list_mismatch`).
    """
    split_file = Path(split_file)
    if (split is None) != (subset is None):
        raise ValueError("read_ucf101_split: give both split and subset, or neither")
    mismatch = None if split is None else ucf101_list_mismatch(split_file, split, subset)
    if mismatch is not None:
        raise ValueError(f"{split_file}: {mismatch}")
    class_names = read_class_names(class_index_file)
    label_of = {name: index for index, name in enumerate(class_names)}
    records = []
    for line_number, text in _content_lines(split_file):
        parts = text.split()
        if len(parts) not in (1, 2) or "/" not in parts[0]:
            raise AnnotationError(
                split_file, line_number, f"expected '<Class>/<video>.avi' optionally followed by a 1-based label, got {text!r}"
            )
        class_directory = parts[0].split("/")[0]
        if class_directory not in label_of:
            raise AnnotationError(split_file, line_number, f"class directory {class_directory!r} is not in {class_index_file}")
        label = label_of[class_directory]
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise AnnotationError(split_file, line_number, f"expected a 1-based integer label, got {parts[1]!r}")
            if int(parts[1]) - 1 != label:
                raise AnnotationError(
                    split_file, line_number, f"label {parts[1]} (1-based) disagrees with class directory {class_directory!r} (label {label + 1})"
                )
        records.append(VideoRecord(Path(video_root) / parts[0], label))
    warn_duplicate_lines(records, split_file)
    return records, class_names


_HMDB_SPLIT_NAME = re.compile(rf"(?P<name>.+)_test_split(?P<split>{_SPLIT_NUMBER})\.txt")
_HMDB_SUBSET_ID = {"train": "1", "test": "2"}  # the ids of the split files' second column (0: unused)


def read_hmdb51_split(
    split_dir: str | os.PathLike,
    video_root: str | os.PathLike,
    *,
    split: int,
    subset: str,
    class_names: Sequence[str] | None = None,
) -> tuple[list[VideoRecord], list[str]]:
    """HMDB51 official splits: every "<class>_test_split<split>.txt" in `split_dir`.

    Lines "<video>.avi <id>": id 1 = train, 2 = test, 0 = not used. Returns (records of `subset`,
    class names); labels index the sorted class names unless `class_names` is given. ``split``
    (1, 2 or 3) and ``subset`` ("train" or "test") have no defaults: which videos a run reads is
    always said by its caller.
    """
    check_split_arguments(split, subset)
    wanted_id = _HMDB_SUBSET_ID[subset]
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split_dir: HMDB51 split directory not found: {split_dir}")
    split_files = {}
    for file in split_dir.iterdir():
        match = _HMDB_SPLIT_NAME.fullmatch(file.name)
        if match and int(match.group("split")) == split:
            split_files[match.group("name")] = file
    if not split_files:
        raise FileNotFoundError(f"split_dir: no '<class>_test_split{split}.txt' files in {split_dir}")
    names = list(class_names) if class_names is not None else sorted(split_files)
    missing = sorted(set(split_files) - set(names))
    if missing:
        raise ValueError(f"class_names: split files in {split_dir} name classes not in class_names: {missing}")
    records = []
    for label, name in enumerate(names):
        if name not in split_files:
            raise FileNotFoundError(f"split_dir: no split file {name}_test_split{split}.txt in {split_dir}")
        chosen = []
        for line_number, text in _content_lines(split_files[name]):
            parts = text.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(
                    split_files[name], line_number, f"expected '<video>.avi <0|1|2>' (1 train, 2 test, 0 unused), got {text!r}"
                )
            if parts[1] == wanted_id:
                chosen.append(VideoRecord(Path(video_root) / name / parts[0], label))
        warn_duplicate_lines(chosen, split_files[name])
        records.extend(chosen)
    return records, names


KINETICS_DEFAULT_TEMPLATE = "{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"


def read_kinetics_csv(
    csv_file: str | os.PathLike,
    video_root: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    path_template: str = KINETICS_DEFAULT_TEMPLATE,
) -> tuple[list[VideoRecord], list[str]]:
    """Kinetics csv (header "label,youtube_id,time_start,time_end,split[,is_cc]").

    Video paths: video_root / path_template.format(label=..., youtube_id=..., time_start=int,
    time_end=int, split=...). Labels index `class_names` (default: the csv's labels sorted). A csv
    without a label column (a test set) gives label -1.
    """
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {csv_file}")
    with open(csv_file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise AnnotationError(csv_file, 1, "expected a header 'label,youtube_id,time_start,time_end,split', the file is empty")
        columns = {name.strip(): position for position, name in enumerate(header)}
        required = ("youtube_id", "time_start", "time_end")
        if any(name not in columns for name in required):
            raise AnnotationError(
                csv_file, 1, f"expected a header with columns label,youtube_id,time_start,time_end,split, got {header!r}"
            )
        rows = [(row_number, row) for row_number, row in enumerate(reader, start=2) if any(cell.strip() for cell in row)]
    has_label = "label" in columns
    if class_names is None:
        class_names = sorted({row[columns["label"]].strip() for _, row in rows if len(row) == len(header)}) if has_label else []
    label_of = {name: index for index, name in enumerate(class_names)}
    records = []
    for row_number, row in rows:
        if len(row) != len(header):
            raise AnnotationError(csv_file, row_number, f"expected {len(header)} columns as in the header, got {len(row)}: {row!r}")
        values = {name: row[position].strip() for name, position in columns.items()}
        try:
            values["time_start"] = int(float(values["time_start"]))
            values["time_end"] = int(float(values["time_end"]))
        except ValueError:
            raise AnnotationError(
                csv_file, row_number, f"expected integer time_start/time_end, got {values['time_start']!r}/{values['time_end']!r}"
            ) from None
        label = -1
        if has_label:
            if values["label"] not in label_of:
                raise AnnotationError(csv_file, row_number, f"label {values['label']!r} is not in class_names")
            label = label_of[values["label"]]
        values.setdefault("label", "")
        values.setdefault("split", "")
        try:
            relative = path_template.format(**values)
        except (KeyError, ValueError) as error:
            raise ValueError(f"path_template: cannot format {path_template!r} with {sorted(values)}: {error}") from None
        records.append(VideoRecord(Path(video_root) / relative, label))
    warn_duplicate_lines(records, csv_file)
    return records, list(class_names)


SSV2_VIDEO_SUFFIX = ".webm"  # Something-Something v2 ships every video as <id>.webm


def ssv2_class_name(template: str) -> str:
    """The class of a Something-Something v2 template: its brackets removed ("Putting [something] onto
    [something]" -> "Putting something onto something"), as the official label file spells classes."""
    return " ".join(template.replace("[", "").replace("]", "").split())


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(path, None, f"expected a JSON file ({error})") from error


def read_ssv2_labels(path: str | os.PathLike) -> list[str]:
    """Class names by label from the official ``something-something-v2-labels.json`` ({"name": "index"})."""
    path = Path(path)
    data = _read_json(path, "Something-Something v2 label file")
    if not isinstance(data, dict) or not data:
        raise AnnotationError(path, None, 'expected a JSON object {"<class name>": "<index>", ...}')
    by_index: dict[int, str] = {}
    for name, index in data.items():
        if not str(index).isdigit() or int(index) in by_index:
            raise AnnotationError(path, None, f"class {name!r}: expected a distinct integer index, got {index!r}")
        by_index[int(index)] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise AnnotationError(path, None, f"expected the indices 0..{len(by_index) - 1}, each once")
    return [by_index[i] for i in range(len(by_index))]


def read_ssv2_json(
    path: str | os.PathLike,
    video_root: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    labels_file: str | os.PathLike | None = None,
    suffix: str = SSV2_VIDEO_SUFFIX,
) -> tuple[list[VideoRecord], list[str]]:
    """Something-Something v2 annotations: a JSON list of {"id": "78687", "template": "Holding [something]
    next to [something]", ...} (train / validation; entries without "template", as in the test file,
    get label -1). Videos ``video_root/<id><suffix>``. Labels index ``class_names``, else the names of
    ``labels_file`` (the official labels JSON), else the shipped ``ssv2`` list (the same 174 names in
    the same order). Returns (records, class names)."""
    path = Path(path)
    if class_names is None:
        class_names = read_ssv2_labels(labels_file) if labels_file is not None else resolve_class_names("ssv2")
    label_of = {name: index for index, name in enumerate(class_names)}
    entries = _read_json(path, "annotation file")
    if not isinstance(entries, list):
        raise AnnotationError(path, None, 'expected a JSON list of {"id": ..., "template": ...} entries')
    records = []
    for position, entry in enumerate(entries, start=1):
        video_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(video_id, (str, int)) or not str(video_id).strip() or "/" in str(video_id):
            raise AnnotationError(path, None, f"entry {position}: expected an object with a video \"id\", got {entry!r:.120}")
        label = -1
        template = entry.get("template")
        if template is not None:
            name = ssv2_class_name(str(template))
            if name not in label_of:
                raise AnnotationError(path, None, f"entry {position} (id {video_id}): template {template!r} names no "
                                                  f"class of the {len(class_names)}-class list ({name!r})")
            label = label_of[name]
        records.append(VideoRecord(Path(video_root) / f"{str(video_id).strip()}{suffix}", label))
    warn_duplicate_lines(records, path)
    return records, list(class_names)


# ----------------------------------------------------------------------------- published split folders

SPLIT_FILE = "split.json"  # the description of a split folder


@dataclass(frozen=True)
class SplitFolder:
    """A published split: its class lists, its training lists and its validation lists (``split.json``).

    ``classes``: part -> class names in label order ("base" and "novel" for base-to-novel, "all" for
    few-shot); ``train``: the training lists by key (``train_key``: "seed" or "shots"), labelled with the
    classes of ``train_part``; ``val``: part -> the validation list labelled with that part's classes.
    ``dataset``: the dataset's name (display names, shipped ASKG prompts), None for others; ``prompts``:
    a prompts JSON of the split (``text.prompts: dataset``), if any.
    """

    folder: Path
    protocol: str
    dataset: str | None
    classes: dict[str, list[str]]
    train_key: str
    train_part: str
    train: dict[int, Path]
    val: dict[str, Path]
    prompts: Path | None = None
    files: dict = field(default_factory=dict)  # file name -> {"source", "sha256", "lines"} (shipped splits)

    def describe(self) -> str:
        return f"the {self.protocol} split {self.dataset or self.folder}"

    def train_list(self, key) -> Path:
        """The training list of ``key`` (a seed or a shot count); ``ValueError`` naming the keys there are."""
        if isinstance(key, bool) or not isinstance(key, int) or key not in self.train:
            have = ", ".join(map(str, sorted(self.train)))
            given = "null" if key is None else repr(key)
            raise ValueError(f"{self.train_key}={given}: {self.describe()} has no training list for it; its lists "
                             f"have {self.train_key} {have}")
        return self.train[key]

    def records(self, list_file: Path, part: str, root) -> list[VideoRecord]:
        """The videos of one of this split's lists (labels index the classes of ``part``) under ``root``; a
        video not where the list puts it is also looked for in its class's folder."""
        return read_video_list(list_file, root, class_directories=self.classes[part])


def read_split_folder(folder: str | os.PathLike) -> SplitFolder:
    """The split described by ``<folder>/split.json``::

        {"protocol": "base2novel" | "fewshot", "dataset": "<name>" | null,
         "classes": {"<part>": "<class file in the folder, or a shipped class list name>", ...},
         "train": {"key": "seed" | "shots", "part": "<part>", "lists": {"<key>": "<list file>", ...}},
         "val": {"<part>": "<list file>", ...}, "prompts": "<prompts JSON>" (optional)}

    Every list is a "list" file ("<relative path> <label>" lines, gzipped or not) whose labels index the
    classes of its part. A malformed description is an `AnnotationError` naming the file and the key.
    """
    from stdd.resources import SPLIT_PROTOCOLS

    folder = Path(folder)
    path = folder / SPLIT_FILE
    data = _read_json(path, "split description")

    def need(mapping, key, kind, where):
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if not isinstance(value, kind) or not value:
            raise AnnotationError(path, None, f"{where}{key}: expected a non-empty {kind.__name__}")
        return value

    def existing(name, where):
        file = folder / str(name)
        if not file.is_file():
            raise AnnotationError(path, None, f"{where}: names {name!r}, which is not a file in {folder}")
        return file

    protocol = need(data, "protocol", str, "")
    if protocol not in SPLIT_PROTOCOLS:
        raise AnnotationError(path, None, f"protocol: expected one of {', '.join(SPLIT_PROTOCOLS)}, got {protocol!r}")
    classes = {}
    for part, spec in need(data, "classes", dict, "").items():
        source = folder / str(spec)
        classes[part] = read_class_names(source) if source.is_file() else resolve_class_names(
            str(spec), where=f"{path}: classes.{part}")
    train = need(data, "train", dict, "")
    train_part = need(train, "part", str, "train.")
    if train_part not in classes:
        raise AnnotationError(path, None, f"train.part: {train_part!r} is not one of its class lists "
                                          f"({', '.join(classes)})")
    lists = {}
    for key, name in need(train, "lists", dict, "train.").items():
        if not str(key).isdigit():
            raise AnnotationError(path, None, f"train.lists: expected integer keys, got {key!r}")
        lists[int(key)] = existing(name, f"train.lists.{key}")
    val = {}
    for part, name in need(data, "val", dict, "").items():
        if part not in classes:
            raise AnnotationError(path, None, f"val.{part}: not one of its class lists ({', '.join(classes)})")
        val[part] = existing(name, f"val.{part}")
    prompts = existing(data["prompts"], "prompts") if data.get("prompts") else None
    dataset = data.get("dataset")
    return SplitFolder(folder=folder, protocol=protocol, dataset=str(dataset) if dataset else None, classes=classes,
                       train_key=need(train, "key", str, "train."), train_part=train_part, train=lists, val=val,
                       prompts=prompts, files=dict(data.get("files") or {}))


def write_split_folder(
    folder: str | os.PathLike,
    *,
    protocol: str,
    classes: dict[str, Sequence[str]],
    train_key: str,
    train_part: str,
    train: dict[int, Sequence[tuple[str, int]]],
    val: dict[str, Sequence[tuple[str, int]]],
    dataset: str | None = None,
    prompts: dict[str, Sequence[str]] | None = None,
) -> SplitFolder:
    """Write a split folder of one's own (the format `read_split_folder` reads) and read it back.

    ``classes``: part -> class names in label order; ``train``: key -> ("<relative path>", label) entries
    labelled with the classes of ``train_part``; ``val``: part -> entries labelled with that part's classes;
    ``prompts``: {class: [sentences]} for ``text.prompts: dataset``. Files: ``<part>_classes.txt``,
    ``train_<key>.txt``, ``<part>_val.txt``, ``prompts.json``, ``split.json`` (each written atomically).
    """
    from ..files import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def listing(name: str, entries) -> str:
        atomic_write(folder / name, "".join(f"{path} {int(label)}\n" for path, label in entries))
        return name

    description = {"protocol": protocol, "dataset": dataset, "classes": {}, "val": {},
                   "train": {"key": train_key, "part": train_part, "lists": {}}}
    for part, names in classes.items():
        description["classes"][part] = f"{part}_classes.txt"
        atomic_write(folder / f"{part}_classes.txt", "".join(f"{name}\n" for name in names))
    for key, entries in train.items():
        description["train"]["lists"][str(int(key))] = listing(f"train_{int(key)}.txt", entries)
    for part, entries in val.items():
        description["val"][part] = listing(f"{part}_val.txt", entries)
    if prompts is not None:
        description["prompts"] = "prompts.json"
        atomic_write(folder / "prompts.json", json.dumps({name: list(s) for name, s in prompts.items()}, indent=1) + "\n")
    atomic_write(folder / SPLIT_FILE, json.dumps(description, indent=1) + "\n")
    return read_split_folder(folder)


def resolve_split(spec, protocol: str, *, where: str = "split") -> SplitFolder:
    """The ``protocol`` split ``spec`` names: a shipped one by its dataset (``hmdb51``; see
    `stdd.resources.published_datasets`) or a folder holding a ``split.json`` of that protocol.
    ``ValueError`` naming ``where`` and what exists."""
    from stdd.resources import SPLIT_PROTOCOLS, published_datasets, split_dir

    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"{where}: protocol {protocol!r}: expected one of {', '.join(SPLIT_PROTOCOLS)}")
    shipped = published_datasets(protocol)
    text = str(spec) if spec is not None else ""
    if text.lower() in shipped:
        folder = split_dir(protocol, text.lower())
    else:
        folder = Path(os.path.expanduser(text))
        if not text or not (folder / SPLIT_FILE).is_file():
            raise ValueError(f"{where} {spec!r}: no published {protocol} split for it; expected one of "
                             f"{', '.join(shipped)} or a folder holding a {SPLIT_FILE}")
    split = read_split_folder(folder)
    if split.protocol != protocol:
        raise ValueError(f"{where} {spec!r}: {folder / SPLIT_FILE} describes a {split.protocol} split, not {protocol}")
    return split


@dataclass
class MissingVideoReport:
    total: int
    missing: list[Path]

    @property
    def found(self) -> int:
        return self.total - len(self.missing)

    def summary(self, source: str = "annotations") -> str:
        text = f"{source}: {self.found}/{self.total} videos found, {len(self.missing)} missing"
        if self.missing:
            text += " (first: " + ", ".join(str(path) for path in self.missing[:5]) + ")"
        return text


def relabel_by_name(
    records: Sequence[VideoRecord], file_names: Sequence[str], class_names: Sequence[str], *, source
) -> list[VideoRecord]:
    """``records`` labelled by position in ``file_names`` (a file's own class order, e.g. classInd.txt),
    relabelled by position in ``class_names`` (the list the text side uses): the same class by name,
    whatever the two orders. A class of the file missing from ``class_names`` is an `AnnotationError`."""
    position = {name: index for index, name in enumerate(class_names)}
    missing = [name for name in file_names if name not in position]
    if missing:
        raise AnnotationError(source, None, f"{len(missing)} of its classes are not in the given class list "
                                            f"({len(class_names)} names), e.g. {missing[:5]}")
    return [VideoRecord(record.path, position[file_names[record.label]]) for record in records]


def resolve_videos(
    records: Sequence[VideoRecord], *, on_missing: str = "fail", source: str = "annotations"
) -> tuple[list[VideoRecord], MissingVideoReport]:
    """Check every video exists. on_missing="fail": raise FileNotFoundError naming the count and the
    first missing paths; "skip": drop them with one warning. Returns (kept records, report)."""
    if on_missing not in ON_MISSING_POLICIES:
        raise ValueError(f"on_missing: expected one of {', '.join(ON_MISSING_POLICIES)}, got {on_missing!r}")
    kept, missing = [], []
    for record in records:
        (kept if record.path.is_file() else missing).append(record)
    report = MissingVideoReport(total=len(records), missing=[record.path for record in missing])
    if missing:
        if on_missing == "fail":
            raise FileNotFoundError(report.summary(source) + "; pass on_missing='skip' to drop them")
        logger.warning("%s; skipping them", report.summary(source))
    return kept, report


def _load_list(path, root, class_names, *, class_directories: bool = False, **options):
    _no_options("list", options)
    if class_directories and class_names is None:
        raise ValueError(f"list annotations {path}: class_directories needs the class names")
    records = read_video_list(path, root, num_classes=len(class_names) if class_names is not None else None,
                              class_directories=list(class_names) if class_directories else None)
    return records, list(class_names) if class_names is not None else None


def _load_csv(path, root, class_names, **options):
    _no_options("csv", options)
    return read_csv_list(path, root, class_names=class_names), list(class_names) if class_names is not None else None


def _load_ucf101(path, root, class_names, *, class_index_file=None, split=None, subset=None, **options):
    _no_options("ucf101", options)
    if class_index_file is None:
        class_index_file = Path(path).parent / "classInd.txt"
    records, index_names = read_ucf101_split(path, class_index_file, root if root is not None else Path(path).parent,
                                             split=split, subset=subset)
    if class_names is None:
        return records, index_names
    return relabel_by_name(records, index_names, class_names, source=class_index_file), list(class_names)


def _load_hmdb51(path, root, class_names, **options):
    if root is None:
        raise ValueError("root: HMDB51 needs the video root (<root>/<class>/<video>.avi)")
    missing = [name for name in ("split", "subset") if name not in options]
    if missing:
        raise ValueError(f"hmdb51 annotations {path}: give {' and '.join(missing)} (split 1, 2 or 3; subset "
                         "'train' or 'test')")
    return read_hmdb51_split(path, root, class_names=class_names, **options)


def _load_kinetics(path, root, class_names, **options):
    if root is None:
        raise ValueError("root: Kinetics needs the video root")
    return read_kinetics_csv(path, root, class_names=class_names, **options)


def _load_ssv2(path, root, class_names, **options):
    if root is None:
        raise ValueError("root: Something-Something v2 needs the video folder (<root>/<id>.webm)")
    return read_ssv2_json(path, root, class_names=class_names, **options)


def _no_options(format: str, options: dict) -> None:
    if options:
        raise TypeError(f"load_annotations(format={format!r}): unexpected options {sorted(options)}")


# The one list of annotation formats: name -> reader (path, root, class names, **options) -> (records, names).
ANNOTATION_READERS: dict[str, Callable] = {
    "list": _load_list,
    "csv": _load_csv,
    "ucf101": _load_ucf101,
    "hmdb51": _load_hmdb51,
    "kinetics": _load_kinetics,
    "ssv2": _load_ssv2,
}
ANNOTATION_FORMATS = tuple(ANNOTATION_READERS)
OFFICIAL_SPLIT_FORMATS = ("ucf101", "hmdb51")  # formats that take split= and subset= (`check_split_arguments`)


def load_annotations(
    path: str | os.PathLike,
    *,
    format: str = "list",
    root: str | os.PathLike | None = None,
    class_names: Sequence[str] | str | os.PathLike | None = None,
    **options,
) -> tuple[list[VideoRecord], list[str] | None]:
    """Read annotations of `format` (one of `ANNOTATION_FORMATS`: "list" | "csv" | "ucf101" | "hmdb51" |
    "kinetics" | "ssv2").

    path: the list/csv file (for "list" options: class_directories, see `read_video_list`); for "ucf101"
    the train/testlist file (options: class_index_file, defaults to classInd.txt next to it; split and
    subset, which an officially named list must match); for "hmdb51" the split directory (options split
    and subset, both required); for "kinetics" the csv (options: path_template); for "ssv2" the official
    JSON (options: labels_file, suffix; class names default to the shipped ``ssv2`` list). root: the video
    root. class_names: a list or a class-name file.
    Returns (records, class names or None when the format carries none and none were given).
    """
    if format not in ANNOTATION_READERS:
        raise ValueError(f"format: expected one of {', '.join(ANNOTATION_FORMATS)}, got {format!r}")
    if isinstance(class_names, (str, os.PathLike)):
        class_names = read_class_names(class_names)
    return ANNOTATION_READERS[format](path, root, class_names, **options)
