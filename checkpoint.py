"""Reading weight folders in the published layout, strictly and safely.

Every model here loads from the folder layout that diffusers and transformers publish:
`config.json` beside one weight file (`model.safetensors`, `diffusion_pytorch_model.safetensors`,
`pytorch_model.bin`, `diffusion_pytorch_model.bin`) or a sharded `*.index.json` naming several.

Two rules this file enforces, where the reference libraries are lenient:
- Nothing is unpickled except through `torch.load(weights_only=True)`, which refuses arbitrary
  objects; safetensors files hold no code at all.
- Loading is strict: every tensor in the file is used, every parameter of the model is filled, every
  shape matches, and an error names the file and the offending keys (diffusers and LAVIS load
  non-strictly in places, which is how missing weights go unnoticed).

Writing is atomic (a crash never leaves a half-written file or folder), and train.py's checkpoints
(`save_training`, `latest_training`, `load_training`) are folders written the same way.
"""

import dataclasses
import glob
import json
import os
import pickle
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# The names the reference libraries give their weight files, in the order we look for them.
WEIGHT_FILES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)
WEIGHTS_HELP = "see weights/README.md for where to get the published weights"


class CheckpointError(ValueError):
    """A weight folder or file that cannot be loaded; the message names the file and the problem."""


def read_json(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found; {WEIGHTS_HELP}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def write_part(folder, name, config, module, weights):
    """One model of the published folder layout: folder/name/config.json and folder/name/weights."""
    os.makedirs(os.path.join(folder, name))
    write_json(os.path.join(folder, name, "config.json"), config)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
              os.path.join(folder, name, weights))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def config_from_dict(cls, d):
    """Build the dataclass `cls` from a published config dict, keeping only the fields it declares.

    Our config fields carry the published names, so the rest of a config.json (`_class_name`,
    `_diffusers_version`, fields for features the published models do not use) is simply ignored.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def read_tensors(path):
    """One weight file -> {name: tensor}. safetensors, or a .bin read with weights_only=True."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found; {WEIGHTS_HELP}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused or unreadable as a weights-only torch file ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def find_weights(folder):
    """The weight file(s) of a published folder: a single file, or the shards of an index."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder; {WEIGHTS_HELP}")
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{index}: the index names no shards")
            return [os.path.join(folder, s) for s in shards]
    raise CheckpointError(f"{folder}: no weight file (looked for {', '.join(WEIGHT_FILES)} "
                          f"and their .index.json); {WEIGHTS_HELP}")


def read_folder(folder):
    """A published folder -> (config dict, state dict, a description of the files for errors)."""
    files = find_weights(folder)
    config = read_json(os.path.join(folder, "config.json"))
    sd = {}
    for path in files:
        sd.update(read_tensors(path))
    return config, sd, files[0] if len(files) == 1 else f"{folder} ({len(files)} shards)"


def _listed(keys, limit=8):
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(model, sd, source):
    """Copy `sd` into `model`, refusing any missing, unexpected or mis-shaped tensor.

    `model` may live on the meta device (built without allocating memory): the file's tensors are
    then assigned in place of the empty ones. Returns the model.
    """
    expected = model.state_dict()
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    shapes = [f"{k} {tuple(sd[k].shape)} in file, {tuple(v.shape)} in model"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes ({len(shapes)}): {'; '.join(shapes[:8])}")
    if problems:
        raise CheckpointError(f"{source}: does not match {type(model).__name__}: " + "; ".join(problems))
    on_meta = any(t.is_meta for t in expected.values())
    # Tensors take the model's dtype, so a half-precision file loads into an fp32 model as fp32.
    sd = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model


def plain_mode(path, folder=False):
    """Give a temporary file (0600) or folder (0700) the permissions open() or mkdir() would have
    given it under the user's umask, so what is renamed into place is not private by accident."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def write_atomically(path, write):
    """Call write(tmp) on a temporary file beside `path` (same extension), then rename it into place:
    a crash never leaves a half-written file under `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        write(tmp)
        plain_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """`text` into the file `path` (UTF-8), atomically: a reader sees the old file or the new one,
    never half of one (train.py's ranks write the tiny model's tokenizers side by side)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)


def write_folder_atomically(folder, write, merge=False):
    """Call write(tmp) to fill a fresh temporary folder, then put it in place of `folder`.

    A crash or a full disk during `write` leaves the previous `folder` untouched (the half-written
    temporary folder is removed). Without `merge` the whole folder is swapped (two renames; between
    them the previous version survives as `.NAME.old-*`). With `merge` each entry of the new folder
    replaces its namesake and everything else in `folder` stays (a model saved into a training run's
    folder keeps its checkpoints)."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    old = None
    try:
        write(tmp)
        plain_mode(tmp, folder=True)
        if not os.path.exists(folder):
            os.replace(tmp, folder)
            return
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        if not merge:
            os.replace(folder, os.path.join(old, name))
            os.replace(tmp, folder)
            return
        for entry in os.listdir(tmp):
            if os.path.lexists(os.path.join(folder, entry)):
                os.replace(os.path.join(folder, entry), os.path.join(old, entry))
            os.replace(os.path.join(tmp, entry), os.path.join(folder, entry))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Training checkpoints (train.py): trainable weights + EMA + optimizer + step + RNG, one folder each
# ---------------------------------------------------------------------------------------------------

def save_training(out, step, trainable, optimizer, schedule, ema, fingerprint, keep):
    """out/checkpoints/step-NNNNNNN, written atomically; only the newest `keep` are kept."""
    def write(tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.state_dict().items()},
                  os.path.join(tmp, "trainable.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "fingerprint": fingerprint, "torch_rng": torch.get_rng_state()},
                   os.path.join(tmp, "state.pt"))

    write_folder_atomically(os.path.join(out, "checkpoints", f"step-{step:07d}"), write)
    for old in sorted(glob.glob(os.path.join(out, "checkpoints", "step-*")))[:-keep]:
        # Hidden by one rename first, so an interruption leaves no half-deleted checkpoint in view.
        gone = os.path.join(os.path.dirname(old), f".{os.path.basename(old)}.old-pruned")
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)


def leftover_of(name):
    """What an unfinished atomic write was making, for the hidden name it left (None for any other
    name): write_folder_atomically's .NAME.tmp-XXXXXXXX and .NAME.old-XXXXXXXX (mkdtemp's 8
    characters), a checkpoint being pruned, .NAME.old-pruned, and write_atomically's .NAME.XXXXXXXX.EXT
    (mkstemp's, EXT being NAME's own extension)."""
    m = re.fullmatch(r"\.(.+)\.(?:(?:tmp-|old-)[a-z0-9_]{8}|old-pruned)", name)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}(\.[^.]+)", name)
    return m.group(1) if m and os.path.splitext(m.group(1))[1] == m.group(2) else None


def remove_leftovers(out):
    """Remove what an interrupted run left half-written beside the run folder `out` (its own temporary
    folders, .OUT.tmp-*), inside it, among its checkpoints and samples. -> the number removed."""
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    found = [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(".") and leftover_of(n) == name]
    for folder in (out, os.path.join(out, "checkpoints"), os.path.join(out, "samples")):
        if os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in os.listdir(folder) if leftover_of(n)]
    for path in found:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return len(found)


def latest_training(out):
    found = sorted(glob.glob(os.path.join(out, "checkpoints", "step-*")))
    return found[-1] if found else None


def load_training(path, trainable, optimizer, schedule, fingerprint):
    """Restore a checkpoint into the run's module, optimizer and schedule -> (step, EMA or None).
    The fingerprint (stage and configs) must be the run's: weights of another model never load."""
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(f"{path}: saved with a different model or stage ({state['fingerprint']['stage']}, "
                              f"configs differ); resume with the same --stage/--model/--weights or use a new --out")
    trainable.load_state_dict(read_tensors(os.path.join(path, "trainable.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    ema_path = os.path.join(path, "ema.safetensors")
    return state["step"], (load_file(ema_path) if os.path.isfile(ema_path) else None)
