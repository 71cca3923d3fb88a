"""Our torch-free reader of PyTorch `.bin` checkpoints against torch.load(weights_only=True), and its refusals."""

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from flax_lora.models.torch_pickle import TorchCheckpointError, UnsafeCheckpointError, load_torch_file


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor's values as the numpy array we should produce (numpy has no bfloat16/float8 of its own)."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if tensor.dtype == torch.float8_e4m3fn:
        return tensor.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return tensor.numpy()


def _assert_same_as_torch(path) -> dict[str, np.ndarray]:
    ours = load_torch_file(path)
    theirs = torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = _numpy(tensor)
        assert isinstance(ours[key], np.ndarray), key
        assert ours[key].shape == expected.shape, key
        assert ours[key].dtype == expected.dtype, key
        assert np.ascontiguousarray(ours[key]).tobytes() == expected.tobytes(), key  # bit-exact, NaN included
    return ours


def test_dtypes_and_shapes(tmp_path):
    torch.manual_seed(0)
    state = {
        "float32": torch.randn(3, 5),
        "float16": torch.randn(7).half(),
        "bfloat16": torch.randn(2, 3).bfloat16(),
        "float64": torch.randn(4).double(),
        "int64": torch.arange(-5, 7),
        "int32": torch.arange(6, dtype=torch.int32),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "uint16": torch.tensor([0, 60000], dtype=torch.uint16),  # saved through _rebuild_tensor_v3
        "float8": torch.randn(5).to(torch.float8_e4m3fn),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "conv": torch.randn(2, 3, 4, 5),
        "empty": torch.zeros(0, 4),
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
    }
    torch.save(state, tmp_path / "model.bin")
    _assert_same_as_torch(tmp_path / "model.bin")


def test_views_and_shared_storage(tmp_path):
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32)
    tied = torch.randn(3, 4)
    state = collections.OrderedDict(
        transposed=torch.randn(3, 4).t(),
        permuted=torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1),
        strided=torch.randn(4, 6)[:, ::2],
        head=base[2:5],
        tail=base[10:].view(2, 7),
        whole=base.view(4, 6),
        tied_a=tied,
        tied_b=tied,
    )
    torch.save(state, tmp_path / "views.bin")
    with zipfile.ZipFile(tmp_path / "views.bin") as archive:
        storages = [name for name in archive.namelist() if "/data/" in name]
    assert len(storages) == 5  # base and tied each saved once
    ours = _assert_same_as_torch(tmp_path / "views.bin")
    # Tensors that shared a storage come back as independent arrays.
    assert not np.shares_memory(ours["whole"], ours["head"])
    assert not np.shares_memory(ours["tied_a"], ours["tied_b"])
    ours["tied_a"][0, 0] += 1
    assert ours["tied_a"][0, 0] != ours["tied_b"][0, 0]


def test_module_state_dicts(tmp_path):
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    torch.save(linear.state_dict(), tmp_path / "linear.bin")
    _assert_same_as_torch(tmp_path / "linear.bin")

    sequential = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    sequential(torch.randn(2, 3, 3, 3))  # updates the BatchNorm buffers, num_batches_tracked included
    torch.save(sequential.state_dict(), tmp_path / "pytorch_model.bin")
    ours = _assert_same_as_torch(tmp_path / "pytorch_model.bin")
    assert ours["1.num_batches_tracked"].dtype == np.int64 and ours["1.num_batches_tracked"].shape == ()


def test_parameters_and_other_root_names(tmp_path):
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save({"weight": torch.nn.Parameter(torch.randn(2, 2))}, buffer)
    # Rename the archive's root folder: other writers do not name it after the file.
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(tmp_path / "renamed.bin", "w") as target:
        for info in source.infolist():
            target.writestr("some_root/" + info.filename.split("/", 1)[1], source.read(info))
    _assert_same_as_torch(tmp_path / "renamed.bin")


def test_big_endian_archive(tmp_path):
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 2), "h": torch.randn(4).half(), "b": torch.randn(2).bfloat16(), "i": torch.arange(3)}
    torch.save(state, tmp_path / "little.bin")
    # Rewrite as a big-endian machine would have saved it; torch.load byteswaps such files, and so must we.
    itemsizes = [tensor.element_size() for tensor in state.values()]  # storage keys count from 0 in save order
    with zipfile.ZipFile(tmp_path / "little.bin") as source, zipfile.ZipFile(tmp_path / "big.bin", "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                itemsize = itemsizes[int(info.filename.rsplit("/", 1)[1])]
                data = np.frombuffer(data, f"u{itemsize}").byteswap().tobytes()
            target.writestr(info.filename.replace("little/", "big/"), data)
    ours = _assert_same_as_torch(tmp_path / "big.bin")
    np.testing.assert_array_equal(ours["w"], state["w"].numpy())


class _Reduces:
    """An object whose unpickling calls `fn(*args)`: what a malicious checkpoint hides."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_malicious_checkpoint_is_refused_before_it_runs(tmp_path):
    pwned = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.ones(2), "bias": _Reduces(os.system, f"touch {pwned}")}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.bin.*'posix\.system'"):
        load_torch_file(path)
    assert not pwned.exists()
    with pytest.raises(pickle.UnpicklingError):  # torch's safe mode agrees
        torch.load(path, weights_only=True)
    assert not pwned.exists()


def _write_archive(path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", b"little")


@pytest.mark.parametrize(
    "name, make_pickle",
    [
        # Protocol 4 spells globals as STACK_GLOBAL; they still go through find_class.
        ("posix.system", lambda pwned: pickle.dumps(_Reduces(os.system, f"touch {pwned}"), protocol=4)),
        ("builtins.eval", lambda pwned: pickle.dumps(_Reduces(eval, f"open({str(pwned)!r}, 'w')"), protocol=3)),
        # Hidden inside an otherwise harmless state dict.
        ("builtins.getattr", lambda pwned: pickle.dumps(collections.OrderedDict(a=getattr), protocol=3)),
        ("torch.serialization.load", lambda pwned: b"\x80\x02ctorch.serialization\nload\n."),
        ("EXT1", lambda pwned: b"\x80\x02\x82\x01."),  # copyreg extension codes
    ],
)
def test_hand_written_malicious_pickles_are_refused(tmp_path, name, make_pickle):
    pwned = tmp_path / "pwned"
    _write_archive(tmp_path / "evil.bin", make_pickle(pwned))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.bin.*" + name.replace(".", r"\.")):
        load_torch_file(tmp_path / "evil.bin")
    assert not pwned.exists()


def test_legacy_format_is_refused_with_advice(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(TorchCheckpointError, match=r"old\.bin.*legacy \(pre-1\.6\) format.*safetensors"):
        load_torch_file(path)


def test_truncated_and_foreign_files(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchCheckpointError, match=r"cut\.bin.*truncated"):
        load_torch_file(tmp_path / "cut.bin")
    (tmp_path / "notes.bin").write_text("not a checkpoint")
    with pytest.raises(TorchCheckpointError, match=r"notes\.bin.*expected a zip archive written by torch\.save"):
        load_torch_file(tmp_path / "notes.bin")
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.bin")


def test_storage_entry_shorter_than_the_pickle_says(tmp_path):
    torch.save({"w": torch.ones(10)}, tmp_path / "ok.bin")
    with zipfile.ZipFile(tmp_path / "ok.bin") as source, zipfile.ZipFile(tmp_path / "short.bin", "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info.filename.replace("ok/", "short/"), data[:8] if "/data/" in info.filename else data)
    with pytest.raises(TorchCheckpointError, match=r"short\.bin: tensor 'w'.*holds 8 bytes, expected 40"):
        load_torch_file(tmp_path / "short.bin")


def test_nested_or_non_tensor_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "nested.bin")
    with pytest.raises(TorchCheckpointError, match=r"nested\.bin.*key 'state_dict' holding a dict"):
        load_torch_file(tmp_path / "nested.bin")
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(TorchCheckpointError, match=r"list\.bin.*flat state dict.*found a list"):
        load_torch_file(tmp_path / "list.bin")


def test_errors_are_value_errors():
    assert issubclass(UnsafeCheckpointError, ValueError) and issubclass(TorchCheckpointError, ValueError)


def test_reading_never_imports_torch(tmp_path):
    torch.save({"w": torch.randn(2, 3).bfloat16()}, tmp_path / "model.bin")
    script = (
        "import sys\n"
        "from flax_lora.models.torch_pickle import load_torch_file\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        f"assert load_torch_file({str(tmp_path / 'model.bin')!r})['w'].shape == (2, 3)\n"
        "assert 'torch' not in sys.modules, 'load'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root)
