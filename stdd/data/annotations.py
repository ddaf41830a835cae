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

`load_annotations(path, format=..., ...)` picks a parser by name from `ANNOTATION_READERS` (the one
list of formats: `ANNOTATION_FORMATS`), and `resolve_videos(records, on_missing="fail"|"skip")` checks
that the files exist (counted and reported either way). The official splits of UCF101 and HMDB51
(`OFFICIAL_SPLIT_FORMATS`) take `split` (1, 2 or 3) and `subset` ("train" or "test").

A line "# ..." ("#" then a blank) is a comment; "#" starting a word is data (`is_comment`).

A file that lists the same video with the same label more than once is read as it is (a user may
weight videos on purpose), but each reader logs one warning naming the file and how many lines
repeat an earlier one: a repeated line makes that video count more in training and in the accuracy.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import UsageError

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


def _content_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, stripped text) for non-empty, non-comment lines (`is_comment`)."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8-sig") as handle:  # -sig: tolerate a UTF-8 byte order mark
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if text and not is_comment(text):
                yield line_number, text


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
    from stdd.resources import CLASS_COUNTS, class_names

    if spec is None:
        raise ValueError(f"{where}: no class list given")
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        names = [str(name) for name in spec]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{where}: duplicated class names {duplicates[:5]}")
    elif str(spec).lower() in CLASS_COUNTS:
        names = class_names(str(spec).lower())
    else:
        path = Path(os.path.expanduser(str(spec)))
        if not path.is_file():
            raise ValueError(f"{where} {spec!r}: neither a shipped list ({', '.join(CLASS_COUNTS)}) nor a file")
        names = read_class_names(path)
    if not names:
        raise ValueError(f"{where}: the class list is empty")
    return names


def read_video_list(
    path: str | os.PathLike, root: str | os.PathLike | None = None, *, num_classes: int | None = None
) -> list[VideoRecord]:
    """mmaction2-style list: "relative/path label" per line; paths joined to `root` (default: the list's directory)."""
    path = Path(path)
    root_path = Path(root) if root is not None else path.parent
    records = []
    for line_number, text in _content_lines(path):
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise AnnotationError(path, line_number, f"expected '<relative/path> <integer label>', got {text!r}")
        label = int(parts[1])
        _check_label(path, line_number, label, num_classes)
        records.append(VideoRecord(_join(root_path, parts[0]), label))
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


def _load_list(path, root, class_names, **options):
    _no_options("list", options)
    records = read_video_list(path, root, num_classes=len(class_names) if class_names is not None else None)
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
    """Read annotations of `format` (one of `ANNOTATION_FORMATS`: "list" | "csv" | "ucf101" | "hmdb51" | "kinetics").

    path: the list/csv file; for "ucf101" the train/testlist file (options: class_index_file, defaults to
    classInd.txt next to it; split and subset, which an officially named list must match); for "hmdb51"
    the split directory (options split and subset, both required); for "kinetics" the csv (options:
    path_template). root: the video root. class_names: a list or a class-name file.
    Returns (records, class names or None when the format carries none and none were given).
    """
    if format not in ANNOTATION_READERS:
        raise ValueError(f"format: expected one of {', '.join(ANNOTATION_FORMATS)}, got {format!r}")
    if isinstance(class_names, (str, os.PathLike)):
        class_names = read_class_names(class_names)
    return ANNOTATION_READERS[format](path, root, class_names, **options)
