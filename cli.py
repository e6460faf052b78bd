"""What the four scripts share at the command line: one-line errors, checked numeric flags, output folders.

A user's mistake (a missing file, a bad flag, a CSV without its path column, a corrupt checkpoint) ends with
one line naming the file, key or argument and a non-zero exit, never a traceback. Set `DINO_DEBUG=1` to get
the traceback instead (for developers). `main_guard(main)` is what each script's `__main__` calls.

An output folder holds one job (DEVELOPERS.md): `claim_output` records the settings a script was started with
in `OUT/settings.json`. Rerunning with the same settings continues where it stopped; other settings are
refused with one line naming `--overwrite`, which empties the folder and starts clean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import hub

# The errors a user's input can cause. ValueError covers hub.CheckpointError and data's ImageReadError;
# OSError covers missing files, permissions and a full disk (ENOSPC).
USER_ERRORS = (ValueError, OSError, KeyError, ImportError)


def main_guard(main, argv=None):
    """Run `main(argv)`; a user error becomes `prog: error: message` on stderr and exit status 1."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if os.environ.get("DINO_DEBUG"):
            raise
        if isinstance(e, OSError) and e.strerror:
            msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        else:
            msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e) or type(e).__name__
        fail(msg.splitlines()[0])


def fail(message: str):
    """Stop with one line (the traceback, if any, only under DINO_DEBUG=1)."""
    if os.environ.get("DINO_DEBUG"):
        traceback.print_stack()
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}")  # printed to stderr, exit status 1


# ---------------------------------------------------------------------------------------------- flag types


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`prog: error: argument --x: ...`), not the usage block too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows '(default: ...)' after every flag that has a default (None and switches have none to
    show: their help sentence says what happens without them)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def number(kind, lo, hi=None, lo_open=False, hi_open=False):
    """An argparse type: `kind(text)` within [lo, hi] (an open end with lo_open / hi_open; no hi: unbounded)."""
    bound = ((f"> {lo}" if lo_open else f">= {lo}") if hi is None
             else f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        above = v > lo if lo_open else v >= lo
        below = hi is None or (v < hi if hi_open else v <= hi)
        if not (above and below):  # NaN is neither
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def comma_list(item):
    """An argparse type: comma-separated values, each parsed by `item` (a type such as positive_int; an empty
    value is refused by it)."""
    def parse(text: str) -> list:
        try:
            return [item(t.strip()) for t in text.split(",")]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    parse.__name__ = "list"
    return parse


positive_int = number(int, 1)
nonneg_int = number(int, 0)
positive_float = number(float, 0.0, lo_open=True)
nonneg_float = number(float, 0.0)
probability = number(float, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- outputs


def claim_output(out, settings: dict, *, overwrite: bool, flag_hint: str = "") -> Path:
    """Make `out` this job's folder. Same settings as recorded: continue. Other settings (or files from
    something else): refuse in one line, unless `overwrite`, which empties the folder first."""
    out = Path(out)
    record = out / "settings.json"
    settings = json.loads(json.dumps(settings, default=str))  # what JSON keeps, so equal compares equal
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        old = json.loads(record.read_text()) if record.is_file() else None
        if old != settings and not overwrite:
            differ = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
            what = f"other settings ({', '.join(differ)})" if old is not None else "files of another job"
            fail(f"--out {out} holds outputs made with {what}; pass --overwrite to start clean, or choose "
                 f"another --out{flag_hint}")
        if old != settings:
            empty_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    hub.write_json_atomic(settings, record)
    return out


def empty_folder(folder: Path):
    for p in Path(folder).iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


# ---------------------------------------------------------------------------------------------- data flags

# CheXpert's uncertain label -1 (Irvin et al., 2019): U-Zeros, U-Ones, or U-Ignore (nan: masked out of the
# loss and out of AUC).
UNCERTAIN = {"zeros": 0.0, "ones": 1.0, "ignore": float("nan")}


def add_data_flags(p: argparse.ArgumentParser, labels: bool = True):
    """--path-column and --image-root (how a CSV names its images) and, where labels are read, --uncertain."""
    p.add_argument("--path-column", default=None, metavar="NAME",
                   help="CSV column holding the image paths (default: 'path', else 'Path', else 'image')")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder that relative CSV paths start from (default: the CSV's own folder; for "
                        "CheXpert's train.csv, the folder that holds CheXpert-v1.0/)")
    if labels:
        p.add_argument("--uncertain", choices=sorted(UNCERTAIN), default="zeros",
                       help="what an uncertain label (-1) becomes: zeros (U-Zeros), ones (U-Ones) or ignore "
                            "(masked out of the loss and the AUC) (default: %(default)s)")
