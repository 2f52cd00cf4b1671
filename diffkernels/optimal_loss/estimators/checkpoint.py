"""Checkpoints of :func:`~.curve.estimate_curve`: one JSON file, rewritten atomically after every
noise level, that a later call with the same settings and data resumes from.

The file holds the format tag, the settings (including the data checksum) and the finished levels.
It is written to a temporary file in the same directory, fsynced and renamed over the old one, so a
crash never leaves a corrupt file; JSON keeps floats exactly, so a resumed curve equals an
uninterrupted one. Different settings, different data or a malformed file are a ValueError.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["CHECKPOINT_FORMAT", "atomic_write_json", "check_levels", "load_checkpoint"]

CHECKPOINT_FORMAT = "diffkernels.optimal_loss.curve/2"


def atomic_write_json(path, obj) -> None:
    """Write JSON so that ``path`` always holds either the old or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_levels(levels, settings: dict) -> dict:
    """The saved levels as {index: level dict}; ValueError (without the path) if anything is malformed."""
    if not isinstance(levels, dict):
        raise ValueError(f"'levels' is a {type(levels).__name__}, not an object")
    keys = ("sigma", "j_ab", "se_ab") + (("j_var", "se_var") if settings["estimator"] == "full" else ())
    sigmas = settings["sigmas"]
    out = {}
    for name, level in levels.items():
        if not (isinstance(name, str) and name.isdigit() and int(name) < len(sigmas)):
            raise ValueError(f"level {name!r} is not an index into the {len(sigmas)} noise levels")
        if not isinstance(level, dict):
            raise ValueError(f"level {name} is a {type(level).__name__}, not an object")
        for key in keys:
            if not _is_number(level.get(key)):
                raise ValueError(f"level {name} has no number {key!r}")
        if level["sigma"] != sigmas[int(name)]:
            raise ValueError(f"level {name} is for sigma {level['sigma']!r}, not {sigmas[int(name)]!r}")
        out[int(name)] = {key: float(level[key]) for key in keys}
    return out


def load_checkpoint(path: Path, settings: dict) -> dict:
    """Finished levels {index: level dict} from ``path`` if it exists; ValueError naming the file if it
    is not a checkpoint of this format, is malformed, or was written with other settings or data."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is not readable JSON ({exc}); delete it to start over") from exc
    fmt = saved.get("format") if isinstance(saved, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith(CHECKPOINT_FORMAT.rsplit("/", 1)[0] + "/")):
        raise ValueError(f"{path} is not a diffkernels optimal-loss checkpoint")
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {fmt!r}, this version reads {CHECKPOINT_FORMAT!r}; "
                         "delete it to start over")
    old = saved.get("settings")
    if not isinstance(old, dict):
        raise ValueError(f"checkpoint {path} is malformed: 'settings' is missing or not an object; "
                         "delete it to start over")
    old = {"common_random_numbers": False, **old}  # files written before the option have independent draws
    if old.get("data") != settings["data"] and all(old.get(k) == v for k, v in settings.items() if k != "data"):
        raise ValueError(f"checkpoint {path} was written for other data (the checksum of the values differs: "
                         f"{old.get('data')!r} != {settings['data']!r}); delete it or use another checkpoint path")
    diff = [f"{k}: {old.get(k)!r} != {v!r}" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise ValueError(f"checkpoint {path} was written with other settings ({'; '.join(diff)}); "
                         "delete it or use another checkpoint path")
    try:
        return check_levels(saved.get("levels", {}), settings)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} is malformed: {exc}; delete it to start over") from None
