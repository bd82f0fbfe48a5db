"""What the command lines share: help that shows every default, flags checked as they are read (a
one-line error and exit status 2, before any work), an output place checked before the work,
--threads and --device. torch is imported only where a device or threads are set, so that bad
input is answered in a moment."""

import argparse
import math
import os
import tempfile


class ShowDefaults(argparse.HelpFormatter):
    """--help with each flag's default, unless its help already speaks of one or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower()
                or action.default is None or action.default is False or action.default in ([], "", argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with every default in --help, and an error as one line, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", ShowDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def whole(low):
    """An argparse type: a whole number of at least `low`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: give {low} or more")
        return value
    parse.__name__ = "whole number"
    return parse


def real(low=None, high=None, above=None, below=None):
    """An argparse type: a finite number within the bounds (low <= x <= high, above < x < below)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        bounds = [(low, lambda v: v >= low, f"{low} or more"), (high, lambda v: v <= high, f"at most {high}"),
                  (above, lambda v: v > above, f"more than {above}"), (below, lambda v: v < below, f"less than {below}")]
        wanted = [say for bound, ok, say in bounds if bound is not None]
        if not math.isfinite(value) or not all(ok(value) for bound, ok, _ in bounds if bound is not None):
            raise argparse.ArgumentTypeError(f"{value}: give a number {' and '.join(wanted) or 'that is finite'}")
        return value
    parse.__name__ = "number"
    return parse


def add_threads(parser):
    parser.add_argument("--threads", type=whole(1), default=None,
                        help="CPU threads torch computes with (default: one per core, the fastest on an idle machine; "
                             "where other jobs use the cores, give the cores left free, often 1)")


def use_threads(threads):
    """--threads: torch's intra-op threads (and the oneDNN and MKL kernels under it)."""
    if threads:
        import torch
        torch.set_num_threads(threads)


def pick_device(name):
    """--device: auto picks CUDA, then Apple's MPS, then the CPU; a device torch cannot see here is a
    ValueError that says so."""
    import torch
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if have[d])
    if not have.get(name, False):
        raise ValueError(f"--device {name}: this torch sees no {name.upper()} device here "
                         f"(torch {torch.__version__}); use --device cpu, or auto")
    return name


def check_writable(path, flag="--out", folder=False):
    """`path` (a file, or with `folder` a folder) can be made: its place is a folder this process can
    write in, tried by making a file there; checked before the work, so no work is lost to a bad
    place. Raises ValueError with one line."""
    path = os.path.abspath(path)
    if folder and os.path.isfile(path):
        raise ValueError(f"{flag} {path}: is a file; give a folder")
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    place = path if folder else os.path.dirname(path)
    while not os.path.isdir(place):  # the nearest folder that exists: what is missing will be made there
        if os.path.exists(place):
            raise ValueError(f"{flag} {path}: {place} is a file, not a folder")
        place = os.path.dirname(place)
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {place} ({e.strerror}); choose another place") from None
