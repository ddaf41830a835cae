"""Reading torch files that stdd did not necessarily write: no code runs, corruption is caught.

Every weights or checkpoint file stdd reads (its own checkpoints and weights
files, and local CLIP weights given as ``model.pretrained``) goes through
:func:`load_torch_file`:

* the archive is verified first: a ``torch.save`` file is a zip archive whose
  members carry CRC-32 checksums, which ``torch.load`` does not check; every
  member is read and checked here, so one flipped byte anywhere in the data is
  an error naming the file and the member instead of a silently different
  tensor (a flip in the zip's own bookkeeping makes the archive unreadable);
* it is unpickled with ``torch.load(weights_only=True)`` passed explicitly:
  only tensors and plain containers can come out of it, and nothing in the
  file is executed (an explicit ``weights_only=True`` is not overridden by
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``); there is no retry without it;
* ``.safetensors`` files are read with ``safetensors`` (no pickle at all);
* the configuration objects other training code stores beside its weights
  (:data:`CONFIG_CLASSES_AS_MAPPINGS`: ViFi-CLIP's checkpoints hold a yacs
  ``CfgNode``) are read as plain ordered mappings: that code is not imported and
  nothing of it runs, and the file still loads under ``weights_only=True``.

Any failure is a :class:`UnreadableFileError` naming the file.
"""

from __future__ import annotations

import collections
import os
import zipfile
from pathlib import Path
from typing import Union

import torch

# Classes of configuration objects (dict subclasses) that training code pickles into its checkpoints, by
# the name the pickle gives them: unpickled as collections.OrderedDict (which weights_only allows), never
# as themselves. yacs' CfgNode: ViFi-CLIP saves its whole run config in every checkpoint.
CONFIG_CLASSES_AS_MAPPINGS = ("yacs.config.CfgNode",)


class UnreadableFileError(ValueError):
    """A weights or checkpoint file is corrupt, not what was expected, or refused; the message names it."""


def verify_archive(path: Union[str, os.PathLike], what: str = "file") -> None:
    """Check every member of the zip archive ``path`` against its CRC-32 (reads the whole file).

    Raises :class:`UnreadableFileError` ``"<what> <path>: ..."`` if it is not a
    zip archive or a member does not match its checksum.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError) as error:
        raise UnreadableFileError(f"{what} {path}: cannot be loaded: corrupt or not a torch.save archive "
                                  f"({type(error).__name__}: {error})") from error
    if bad_member is not None:
        raise UnreadableFileError(f"{what} {path}: cannot be loaded: corrupt: archive member {bad_member!r} does "
                                  "not match its CRC-32 checksum (the file was changed after it was written)")


def load_torch_file(path: Union[str, os.PathLike], what: str = "file", *, map_location="cpu",
                    require_archive: bool = True):
    """``torch.load(path, weights_only=True)`` after :func:`verify_archive`.

    ``what`` names the file in messages (``"checkpoint"``, ``"--checkpoint"``,
    ``"model.pretrained"``). ``require_archive=False`` also accepts torch's
    legacy (pre-1.6, not zipped) format, which carries no checksums; it is
    still unpickled with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError(f"{what} {path}: no such file")
    if require_archive or zipfile.is_zipfile(path):
        verify_archive(path, what)
    try:
        with torch.serialization.safe_globals([(collections.OrderedDict, name) for name in CONFIG_CLASSES_AS_MAPPINGS]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # unpickling refused, wrong format, a crafted file ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        hint = (" (a TorchScript archive: save its state_dict() with torch.save instead)"
                if "TorchScript" in str(error) else "")
        raise UnreadableFileError(f"{what} {path}: cannot be loaded as plain weights data, nothing in it was run "
                                  f"({type(error).__name__}: {first_line}){hint}") from error


def load_state_dict_file(path: Union[str, os.PathLike], what: str = "weights file") -> dict:
    """A ``{name: tensor}`` state dict from a ``.safetensors`` file or a ``torch.save`` file.

    A torch file may hold the state dict itself or ``{"state_dict": ...}``
    (training-script checkpoints); a ``module.`` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UnreadableFileError(f"{what} {path}: no such file")
        try:  # optional package: only .safetensors files need it
            from safetensors.torch import load_file
        except ImportError as error:
            raise UnreadableFileError(f"{what} {path}: reading .safetensors needs the safetensors package") from error
        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:
            raise UnreadableFileError(f"{what} {path}: cannot be loaded: not a readable safetensors file "
                                      f"({error})") from error
    else:
        state = load_torch_file(path, what, require_archive=False)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableFileError(f"{what} {path}: expected a state dict (parameter name -> tensor)")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return state
