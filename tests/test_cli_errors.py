"""Every command line reports bad input as ONE line naming the culprit, exit status 2, no traceback.

Real subprocesses of ``python -m stdd.<cli>``, real files (generated videos, YAML, weights).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from stdd import cli

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["moving left", "moving right", "growing"]


def run_cli(module, *args, env_extra=None, timeout=300, python_options=()):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(cli.DEBUG_ENV, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *python_options, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_usage_error(result, *culprits):
    """Exit 2, stderr ends in exactly one ``error: ...`` line naming every culprit, no traceback.

    (Lines before it may be warnings of the run, e.g. open_clip's about a random init.)"""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == cli.EXIT_USAGE, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for culprit in culprits:
        assert str(culprit) in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from stdd.data import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("videos"), videos_per_class={"test": 1},
                                      classes=CLASSES, num_frames=16, height=32, width=32, seed=5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    from stdd.engine.checkpoint import save_weights
    from stdd.engine.config import load_config
    from stdd.engine.task import build_model, student_state_dict

    cfg = load_config("demo", ["data.num_frames=4", "data.stride=3", "eval.n_temporal_views=1",
                               "run.tensorboard=false"])
    torch.manual_seed(0)
    model, _ = build_model(cfg, "cpu", with_teacher=False)
    return save_weights(tmp_path_factory.mktemp("weights") / "final.pt", student_state_dict(model), cfg)


def test_train_config_errors_are_one_line_and_overrides_go_anywhere(tmp_path):
    # an unknown key in a user YAML with base: names the file and the dotted key
    user = tmp_path / "user.yaml"
    user.write_text("base: demo\noptim: {lrr: 1.0}\n")
    assert_one_line_usage_error(run_cli("stdd.train", "--config", user), user, "optim.lrr")
    # overrides before and after an option: all parsed (the second one is the culprit here)
    assert_one_line_usage_error(
        run_cli("stdd.train", "--config", "demo", "run.seed=3", "--resume", "auto", "data.batch_size=2.7"),
        "data.batch_size")
    shown = run_cli("stdd.train", "--config", "demo", "run.seed=3", "--print-config", "run.max_steps=5")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "seed: 3" in shown.stdout and "max_steps: 5" in shown.stdout
    # argparse's own errors are one line too
    assert_one_line_usage_error(run_cli("stdd.train", "--config"), "--config")
    # STDD_DEBUG=1 shows the traceback, the status stays 2
    debug = run_cli("stdd.train", "--config", user, env_extra={cli.DEBUG_ENV: "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr and debug.stderr.rstrip().splitlines()[-1] \
        .startswith("error: ")


def test_demo_and_askg_errors_are_one_line(tmp_path):
    assert_one_line_usage_error(run_cli("stdd.demo", "--work-dir", tmp_path / "demo", "optim.nosuch=1"),
                                "optim.nosuch")
    assert_one_line_usage_error(run_cli("stdd.askg", "build", "--out", tmp_path / "askg"), "--classes")
    missing = tmp_path / "absent.json"
    assert_one_line_usage_error(run_cli("stdd.askg", "prompts", "--graph", missing, "--out", tmp_path / "p.json"),
                                missing)


def test_eval_errors_are_one_line_and_out_dir_is_checked_before_scoring(videos, weights, tmp_path):
    annotations = videos.annotation_files["test"]
    common = ["--annotations", annotations, "--root", videos.root, "--classes", videos.classes_file,
              "--quiet"]
    missing = tmp_path / "missing.pt"
    assert_one_line_usage_error(run_cli("stdd.eval", "--checkpoint", missing, *common, "--out-dir", tmp_path),
                                missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert_one_line_usage_error(run_cli("stdd.eval", "--checkpoint", corrupt, *common, "--out-dir", tmp_path),
                                corrupt)
    blocked = tmp_path / "a_file"
    blocked.write_text("in the way\n")
    assert_one_line_usage_error(
        run_cli("stdd.eval", "--checkpoint", weights, *common, "--out-dir", blocked / "results"), "--out-dir",
        blocked)


def test_eval_over_zero_decodable_videos_is_one_clear_error(weights, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (root / name).write_bytes(b"\x00" * 64)  # exists, but no video
    listing = tmp_path / "broken.txt"
    listing.write_text("a.mp4 0\nb.mp4 1\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "out"
    line = assert_one_line_usage_error(
        run_cli("stdd.eval", "--checkpoint", weights, "--annotations", listing, "--root", root, "--classes",
                classes, "--prompts", "templates", "--out-dir", out, "--quiet"),
        listing, "none of the 2 listed videos could be decoded")
    assert "a.mp4" in line and not (out / "results.json").exists()


def test_an_empty_annotation_list_names_its_file(weights, tmp_path):
    empty = tmp_path / "train.txt"
    empty.write_text("# nothing yet\n")
    assert_one_line_usage_error(
        run_cli("stdd.train", "--config", "demo", "data.dataset=list", f"data.root={tmp_path}",
                f"data.train_annotations={empty}", "data.class_names=[a,b]", "text.prompts=templates",
                f"run.output_dir={tmp_path / 'run'}"),
        empty, "lists no video")
    assert_one_line_usage_error(
        run_cli("stdd.eval", "--checkpoint", weights, "--annotations", empty, "--root", tmp_path, "--classes",
                "ucf101", "--out-dir", tmp_path / "out"),
        empty, "lists no video")


def test_predict_errors_are_one_line(videos, weights, tmp_path):
    clip = sorted((videos.root / "videos" / "test").rglob("*.mp4"))[0]
    assert_one_line_usage_error(run_cli("stdd.predict", clip, "--classes", "only one", "--checkpoint", weights),
                                "at least two")
    missing = tmp_path / "nothing.mp4"
    assert_one_line_usage_error(run_cli("stdd.predict", missing, "--classes", "a,b", "--checkpoint", weights),
                                missing)


def test_help_and_bad_arguments_do_not_import_what_the_command_does_not_need(tmp_path):
    """``--help`` and a bad argument answer before the slow imports: stdd.predict without open_clip (the
    model's side, seconds to import), stdd.askg without torch. Read off ``python -X importtime``."""

    def imported(result):
        return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}

    empty = tmp_path / "empty"
    empty.mkdir()
    runs = {
        "stdd.predict": [("--help",), (tmp_path / "missing.mp4", "--classes", "a,b"), (empty, "--classes", "a,b")],
        "stdd.askg": [("--help",), ("prompts", "--graph", tmp_path / "missing", "--out", tmp_path / "p.json")],
    }
    avoided = {"stdd.predict": "open_clip", "stdd.askg": "torch"}
    for module, argument_lists in runs.items():
        for arguments in argument_lists:
            result = run_cli(module, *arguments, python_options=("-X", "importtime"))
            assert result.returncode == (0 if arguments == ("--help",) else cli.EXIT_USAGE), result.stderr[-3000:]
            assert "stdd" in imported(result) and avoided[module] not in imported(result), (module, arguments)


def test_predict_takes_folders_and_overrides_anywhere(videos, weights, tmp_path):
    import json

    folder = tmp_path / "clips"
    folder.mkdir()
    clips = sorted((videos.root / "videos" / "test").rglob("*.mp4"))[:2]
    names = [f"clip{i}{clip.suffix}" for i, clip in enumerate(clips)]
    for name, clip in zip(names, clips):
        (folder / name).write_bytes(clip.read_bytes())
    (folder / "notes.txt").write_text("not a video\n")
    result = run_cli("stdd.predict", folder, "--classes", ",".join(CLASSES), "--checkpoint", weights, "--json",
                     "eval.n_temporal_views=1", "--top-k", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [Path(r["video"]).name for r in json.loads(result.stdout)] == names
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_usage_error(run_cli("stdd.predict", empty, "--classes", "a,b", "--checkpoint", weights),
                                empty, "holds no video file")


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable hub"])
def test_predict_without_weights_fails_at_once_naming_the_three_ways(videos, tmp_path, offline):
    import socket

    clip = sorted((videos.root / "videos" / "test").rglob("*.mp4"))[0]
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # an empty cache
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        with socket.socket() as probe:  # a loopback port nobody listens on: connections are refused
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    result = run_cli("stdd.predict", clip, "--classes", "a,b", "run.device=cpu", env_extra=env)
    assert_one_line_usage_error(result, "no usable weights", "--checkpoint", "model.pretrained=", "local cache")


def test_cli_main_statuses_in_process(capsys, monkeypatch):
    """The wrapper itself: usage errors 2 (one line), other exceptions 3 with the traceback, ^C 130."""
    from stdd.errors import UsageError

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def usage(argv):
        raise UsageError("--thing x:\n  expected y")

    def bug(argv):
        raise KeyError("unexpected")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.cli_main(usage, []) == 2
    assert capsys.readouterr().err == "error: --thing x:; expected y\n"
    assert cli.cli_main(bug, []) == cli.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err
    assert cli.cli_main(interrupted, []) == cli.EXIT_INTERRUPTED
    assert cli.cli_main(lambda argv: 1, []) == 1 and cli.cli_main(lambda argv: None, []) == 0
    assert cli.split_overrides(["a.mp4", "model.pretrained=null", "+x.y=1"]) == (
        ["a.mp4"], ["model.pretrained=null", "+x.y=1"])


# ----------------------------------------------------------------------------- the input's videos and folders


def _training_set(videos, root: Path, broken=()) -> Path:
    """The test set's videos copied under ``root``, the ``broken`` ones (by position) cut to 200 bytes
    (no container header survives); returns their list file."""
    lines = videos.annotation_files["test"].read_text().splitlines()
    for position, line in enumerate(lines):
        relative = line.split()[0]
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        payload = (videos.root / relative).read_bytes()
        (root / relative).write_bytes(payload[:200] if position in broken else payload)
    listing = root / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def _train_on(listing: Path, run: Path, *extra):
    return run_cli("stdd.train", "--config", "demo", "data.dataset=list", f"data.root={listing.parent}",
                   f"data.train_annotations={listing}", f"data.class_names=[{','.join(CLASSES)}]",
                   "text.prompts=templates", "data.num_frames=4", "data.stride=3", "data.batch_size=1",
                   "optim.epochs=1", "run.tensorboard=false", f"run.output_dir={run}", *extra)


def test_training_on_videos_that_all_fail_to_decode_is_bad_input(videos, tmp_path):
    listing = _training_set(videos, tmp_path / "data", broken=(0, 1, 2))  # decoded in the main process
    line = assert_one_line_usage_error(_train_on(listing, tmp_path / "run"), tmp_path / "data" / "videos",
                                       "did not decode either")
    assert "cannot open container" in line


def test_on_error_fail_meeting_a_bad_video_is_bad_input_naming_it(videos, tmp_path):
    listing = _training_set(videos, tmp_path / "data", broken=(1,))
    bad = tmp_path / "data" / listing.read_text().splitlines()[1].split()[0]
    # raised in a decoding worker process (the test above: in the main process), still one line
    result = _train_on(listing, tmp_path / "run", "data.on_error=fail", "data.num_workers=1")
    line = assert_one_line_usage_error(result, bad, "cannot open container", "on_error=fail stops")
    assert "DataLoader worker" not in line and line.count("on_error=fail stops") == 1


def _read_only_mount_runner(tmp_path: Path):
    """A command prefix that runs a command with ``tmp_path/ro`` a read-only filesystem (a new mount
    namespace: works for root, whom no permission bit stops), or None where that is not allowed."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(mount_point)]
    try:
        probe = subprocess.run(prefix + ["touch", str(mount_point / "probe")], capture_output=True, text=True,
                               timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "Read-only file system" not in probe.stderr:
        return None
    return prefix


def test_an_output_folder_that_cannot_be_written_is_bad_input(tmp_path):
    from test_train_resume import tiny_overrides

    # a folder under a regular file: no process, root included, can create it
    blocked = tmp_path / "a_file"
    blocked.write_text("in the way\n")
    run = blocked / "run"
    assert_one_line_usage_error(
        run_cli("stdd.train", "--config", "demo", *tiny_overrides(tmp_path / "data", run)), f"run.output_dir={run}",
        "cannot create the run directory or write in it")
    assert not (tmp_path / "data").exists()  # refused before anything was written

    prefix = _read_only_mount_runner(tmp_path)
    if prefix is None:
        pytest.skip("no read-only filesystem can be mounted here (unshare --user --mount is not allowed)")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(cli.DEBUG_ENV, None)

    def on_read_only(*overrides):
        return subprocess.run([*prefix, sys.executable, "-m", "stdd.train", "--config", "demo", *overrides],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    read_only = tmp_path / "ro"
    # the run directory on a read-only filesystem
    run = read_only / "run"
    assert_one_line_usage_error(on_read_only(*tiny_overrides(tmp_path / "data", run)), f"run.output_dir={run}",
                                "Read-only file system")
    # the synthetic videos' folder there (generated before training)
    data = read_only / "data"
    assert_one_line_usage_error(on_read_only(*tiny_overrides(data, tmp_path / "run")), data,
                                "Read-only file system")
