"""Bad weight folders and files give one clear error that names the file and the problem."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from checkpoint import CheckpointError, find_weights, load_strict, read_folder, read_tensors


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)


def write_folder(folder, sd, name="model.safetensors"):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"hidden_size": 4}, f)
    path = os.path.join(folder, name)
    if name.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def test_round_trip_safetensors_bin_and_shards(tmp_path):
    ref = Tiny()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    for name in ("model.safetensors", "diffusion_pytorch_model.bin"):
        write_folder(tmp_path / name, sd, name)
        _, loaded, _ = read_folder(str(tmp_path / name))
        with torch.device("meta"):
            model = Tiny()
        load_strict(model, loaded, name)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # A sharded folder: two files and the index that names them.
    shard = tmp_path / "sharded"
    shard.mkdir()
    save_file({"proj.weight": sd["proj.weight"], "proj.bias": sd["proj.bias"]}, str(shard / "a.safetensors"))
    save_file({"norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}, str(shard / "b.safetensors"))
    index = {"weight_map": {"proj.weight": "a.safetensors", "proj.bias": "a.safetensors",
                            "norm.weight": "b.safetensors", "norm.bias": "b.safetensors"}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    (shard / "config.json").write_text("{}")
    _, loaded, _ = read_folder(str(shard))
    assert loaded.keys() == sd.keys()


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        read_folder(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no weight file.*weights/README.md"):
        find_weights(str(tmp_path))
    write_folder(tmp_path / "noconfig", Tiny().state_dict())
    os.remove(tmp_path / "noconfig" / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        read_folder(str(tmp_path / "noconfig"))


def test_wrong_shape_unexpected_and_missing_keys_are_named(tmp_path):
    sd = dict(Tiny().state_dict())
    sd["proj.weight"] = torch.zeros(5, 3)
    sd["extra.weight"] = torch.zeros(1)
    del sd["norm.bias"]
    path = write_folder(tmp_path, sd)
    _, loaded, source = read_folder(str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        load_strict(Tiny(), loaded, source)
    msg = str(e.value)
    assert path in msg and "\n" not in msg
    assert "missing keys (1): norm.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "proj.weight (5, 3) in file, (4, 3) in model" in msg


def test_corrupt_safetensors(tmp_path):
    path = write_folder(tmp_path, Tiny().state_dict())
    with open(path, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        read_folder(str(tmp_path))
    assert path in str(e.value)


class Exploit:
    """An object whose unpickling would run a command: the classic pickle attack."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_in_bin_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = write_folder(tmp_path / "w", {"proj.weight": Exploit(str(marker))}, "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused or unreadable") as e:
        read_folder(str(tmp_path / "w"))
    assert path in str(e.value)
    assert not marker.exists(), "the pickled command ran"


def test_bin_that_is_not_a_dict_of_tensors(tmp_path):
    path = str(tmp_path / "pytorch_model.bin")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        read_tensors(path)


def test_half_precision_file_loads_into_fp32_model(tmp_path):
    ref = Tiny()
    write_folder(tmp_path, {k: v.half() for k, v in ref.state_dict().items()})
    _, sd, source = read_folder(str(tmp_path))
    with torch.device("meta"):
        model = Tiny()
    load_strict(model, sd, source)
    assert model.proj.weight.dtype == torch.float32
    assert torch.allclose(model.proj.weight, ref.proj.weight, atol=1e-3)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from checkpoint import write_atomically, write_folder_atomically
    umask = os.umask(0o022)
    try:
        write_atomically(str(tmp_path / "out.png"), lambda tmp: open(tmp, "w").write("x"))
        write_folder_atomically(str(tmp_path / "model"), lambda tmp: open(os.path.join(tmp, "w.txt"), "w").write("x"))
        plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
        plain_file.write_text("x")
        plain_dir.mkdir()
    finally:
        os.umask(umask)
    mode = lambda p: os.stat(p).st_mode & 0o777
    assert mode(tmp_path / "out.png") == mode(plain_file) == 0o644  # not mkstemp's private 0600
    assert mode(tmp_path / "model") == mode(plain_dir) == 0o755  # not mkdtemp's 0700
