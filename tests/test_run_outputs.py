"""What a run leaves for a person to read: evaluation outputs that come from one evaluation, and
progress that a batch job's log file can hold -- real ``python -m stdd.eval`` / ``stdd.train``
processes, run side by side, killed, with their output on a file and on a pseudo-terminal."""

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from test_cli_errors import CLASSES, assert_one_line_usage_error, run_cli, videos, weights  # noqa: F401 (fixtures)
from test_train_resume import REPO, _env, tiny_overrides

from stdd.files import is_orphan_temporary

# An evaluation that stops inside its first output write (per_class.csv) until the file `gate` exists,
# after writing its pid to `paused`: a second evaluation can then be started while it holds --out-dir.
PAUSED_EVALUATION = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from stdd import files
    from stdd.eval import main
    paused, gate = Path(sys.argv[1]), Path(sys.argv[2])
    plain_write = files._write_payload
    def write(payload, handle):
        if os.path.basename(handle.name).startswith(".per_class.csv."):
            paused.write_text(str(os.getpid()))
            while not gate.exists():
                time.sleep(0.01)
        plain_write(payload, handle)
    files._write_payload = write
    sys.exit(main(sys.argv[3:]))
""")


def _eval_args(videos, weights, out, classes_file):
    return ["--checkpoint", weights, "--annotations", videos.annotation_files["test"], "--root", videos.root,
            "--classes", classes_file, "--prompts", "templates", "--out-dir", out, "--quiet"]


def _start_paused_evaluation(args, paused, gate):
    return subprocess.Popen([sys.executable, "-c", PAUSED_EVALUATION, str(paused), str(gate), *map(str, args)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the evaluation ended before it paused: {process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.01)


def _png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # IHDR: width, then height


def _assert_one_evaluations_outputs(out: Path, classes: int) -> None:
    """results.json, per_class.csv and confusion.png all of the evaluation over ``classes`` classes."""
    report = json.loads((out / "results.json").read_text())
    assert [split["num_classes"] for split in report["splits"]] == [classes]
    rows = (out / "per_class.csv").read_text().splitlines()[1:]
    assert len(rows) == classes and sum(int(row.split(",")[1]) for row in rows) == report["videos"]
    # the figure grows with the class list (0.18 inch per class, 4 inches at least, 100 dpi)
    assert _png_width(out / "confusion.png") == int(round(100 * max(4.0, 0.18 * classes + 2.0)))


def _many_classes_file(tmp_path: Path) -> Path:
    """The test set's 3 classes first (its labels are positions), then 17 more: a larger figure."""
    path = tmp_path / "twenty_classes.txt"
    path.write_text("\n".join(CLASSES + [f"extra action {i}" for i in range(17)]) + "\n")
    return path


def test_a_second_evaluation_into_a_held_out_dir_is_refused_and_the_outputs_are_one_set(videos, weights,
                                                                                         tmp_path):
    out, paused, gate = tmp_path / "out", tmp_path / "paused", tmp_path / "gate"
    first = _start_paused_evaluation(_eval_args(videos, weights, out, videos.classes_file), paused, gate)
    try:
        _wait_for(paused, first)
        second = run_cli("stdd.eval", *_eval_args(videos, weights, out, _many_classes_file(tmp_path)))
    finally:
        gate.touch()
        _, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr[-3000:]
    assert_one_line_usage_error(second, f"--out-dir {out} is in use by another evaluation (pid {first.pid} on host ")
    assert not (out / "eval.lock").exists()  # released when the first one ended
    _assert_one_evaluations_outputs(out, classes=len(CLASSES))
    assert not [p for p in out.iterdir() if is_orphan_temporary(p.name)]


def test_the_lock_of_a_killed_evaluation_is_taken_over_and_its_leftovers_removed(videos, weights, tmp_path):
    out, paused, gate = tmp_path / "out", tmp_path / "paused", tmp_path / "gate"
    killed = _start_paused_evaluation(_eval_args(videos, weights, out, videos.classes_file), paused, gate)
    try:
        _wait_for(paused, killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    # the kill left the lock file (naming a process that is gone) and a half-done write
    assert json.loads((out / "eval.lock").read_text())["pid"] == killed.pid
    leftovers = [p for p in out.iterdir() if is_orphan_temporary(p.name)]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".per_class.csv.stdd-")

    again = run_cli("stdd.eval", *_eval_args(videos, weights, out, _many_classes_file(tmp_path)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"took over the lock of --out-dir {out} from an evaluation that is gone (pid {killed.pid} on host" \
        in again.stderr
    assert f"removed {leftovers[0]}, the temporary file of a write that was killed" in again.stderr
    assert not (out / "eval.lock").exists() and not [p for p in out.iterdir() if is_orphan_temporary(p.name)]
    _assert_one_evaluations_outputs(out, classes=len(CLASSES) + 17)


# ----------------------------------------------------------------------------- progress on a log file


PROGRESS_LINE = re.compile(r"^\[stdd\] train: step (\d+)/8 \(\d+%\), epoch \d+, loss \d+\.\d{4}, lr \S+, ")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _training_command(data_root: Path, run: Path) -> list[str]:
    # 2 epochs x 4 steps; a metrics record (and, off a terminal, a progress line) every 2 steps
    return [sys.executable, "-m", "stdd.train", "--config", "demo",
            *tiny_overrides(data_root, run, epochs=2), "run.log_every_steps=2"]


def test_training_progress_in_a_log_file_is_plain_lines_every_log_every_steps(data_root, tmp_path):
    log = tmp_path / "job.log"
    with open(log, "wb") as handle:  # a batch job's log: stdout and stderr into one file
        result = subprocess.run(_training_command(data_root, tmp_path / "run"), cwd=REPO, env=_env(),
                                stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_bytes().decode("utf-8")
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    steps = [int(match.group(1)) for match in map(PROGRESS_LINE.match, text.splitlines()) if match]
    assert steps == [2, 4, 6, 8], text[-3000:]


def test_training_progress_on_a_terminal_is_the_redrawing_bar(data_root, tmp_path):
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120, as a terminal
    process = subprocess.Popen(_training_command(data_root, tmp_path / "run"), cwd=REPO, env=_env(),
                               stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the process ended and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(main)
        process.wait(timeout=300)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    assert process.returncode == 0, text[-3000:]
    # tqdm's bar, redrawn in place (a terminal also turns every "\n" into "\r\n")
    assert re.search(r"\rtrain: +0%\|[^\r\n]*\| 0/8 \[", text) and re.search(r"\rtrain: 100%\|[^\r\n]*\| 8/8 \[", text), \
        text[-3000:]
    assert not [line for line in re.split(r"[\r\n]+", text) if PROGRESS_LINE.match(line)]
