"""The results folder: atomic tables and arrays, config.json, resume keys, the settings guard and the lock.

One process writes a folder at a time: :func:`lock` takes an OS lock (``flock``) on a file inside it, which the
OS releases when the process ends however it ends, so a killed run leaves no stale lock.
"""

import csv
import errno
import fcntl
import json
import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGES = ("jax", "jaxlib", "tensorcircuit-ng", "optax", "numpy", "scipy", "scikit-learn", "pandas", "ray")
LOCK_NAME = ".lock"
SPECTRA = "hessian_spectra.npz"


class ResultsError(Exception):
    """A results folder that cannot be used as asked: the message is one line for the user."""


class Table:
    """A results CSV (``file``, ``columns``, ``key_columns`` of a part) to which finished units are appended
    atomically (write a copy, then rename): an interrupted write leaves the table as it was."""

    def __init__(self, folder, part):
        self.columns, self.key_columns = part.columns, part.key_columns
        self.path = Path(folder) / part.file

    def unit_key(self, row):
        return tuple(str(row[c]) for c in self.key_columns)

    def done(self):
        if not self.path.exists():
            return set()
        with open(self.path, newline="") as f:
            return {self.unit_key(row) for row in csv.DictReader(f)}

    def append(self, rows):
        tmp = self.path.with_suffix(".csv.tmp")
        try:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            with open(tmp, "a", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                if f.tell() == 0:
                    writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def save_arrays(path, new):
    """Add arrays to an npz file atomically (write a copy, then rename)."""
    old = dict(np.load(path)) if path.exists() else {}
    tmp = path.with_suffix(".tmp.npz")
    try:
        np.savez(tmp, **old, **new)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    """Write a text file atomically (a copy, then rename), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def environment(device):
    """Python and package versions, and the ``device`` description, as config.json records them."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "packages": versions, "device": device}


def check_settings(out, settings, *, overwrite):
    """Refuse (``ResultsError``) a folder whose config.json holds other settings, unless ``overwrite``. Reads only."""
    config_path = Path(out) / "config.json"
    old = json.loads(config_path.read_text()).get("settings") if config_path.exists() else settings
    if old != settings and not overwrite:
        differ = sorted(k for k in {*(old or {}), *settings} if (old or {}).get(k) != settings.get(k))
        raise ResultsError(f"{out} holds results made with other settings ({', '.join(differ)} differ); use another "
                           "--out, or --overwrite")


def open_results(out, settings, *, files, device, overwrite):
    """The folder's config.json for ``settings``, created if new. Earlier results made with other settings are
    refused, or with ``overwrite`` deleted (``files``: the tables of every part). Call under :func:`lock`."""
    out = Path(out)
    check_settings(out, settings, overwrite=overwrite)
    config_path = out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()).get("settings") != settings:
        for name in (*files, SPECTRA):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "figures", ignore_errors=True)
        config_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(config_path.read_text()) if config_path.exists() else {"settings": settings, "wall_s": {}}
    config.update(environment(device))
    write_json(config_path, config)
    return config


def lock(out):
    """Take the folder's lock, creating the folder; returns the open lock file (the lock lasts while it is open,
    or until the process ends). Another process's lock is a ``ResultsError`` naming its pid and command."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ResultsError(f"{out} is being written by {holder}; wait for it to end, or use another --out") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} ({' '.join(sys.argv)})\n")
    handle.flush()
    return handle


def is_disk_full(err):
    """Whether an exception, or one it was raised from, is 'no space left on device' (ENOSPC or EDQUOT)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def space_needed(out, margin=2**20):
    """Bytes a folder needs free to go on: its largest file (an atomic append copies it) and ``margin`` for the
    figures being drawn."""
    sizes = [p.stat().st_size for p in Path(out).rglob("*") if p.is_file()]
    return max(sizes, default=0) + margin


def units_saved(out, parts):
    """Finished units in the folder, over the tables of ``parts``."""
    return sum(len(Table(out, part).done()) for part in parts)
