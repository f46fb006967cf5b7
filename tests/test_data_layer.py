"""Datasets by name (imagefolder, npz, svhn), the two loaders behind one interface (resident and streaming: the
same batches for the same seed, mid-epoch resume, DDP sharding) and the CLI on an ImageFolder."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from multiteach.checkpoint import CheckpointError
from multiteach.config import DataConfig
from multiteach.data import Files, TensorLoader, resized_crop_flip, scan_image_folder, synthetic
from multiteach.loaders import StreamingLoader, choose_loader, make_loader

# multiteach.build (presets, timm) is imported inside the tests that need it: the DDP test's spawned processes
# import this module, and should not pay for it.


def write_image_folder(root: Path, classes: int = 3, train: int = 10, val: int = 4, size: int = 40,
                       seed: int = 0) -> Path:
    """``root/train/class_k/*.png`` and ``root/val/class_k/*.png``: class k is a brightness band plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h = size + (i % 3) * 4  # images of several sizes: the loader resizes them
                img = (rng.integers(0, 60, (h, size, 3)) + 70 * c).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagefolder") / "data")


def batches(loader, epochs: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(epochs):
        out += [(x.clone(), y.clone()) for x, y in loader]
        loader.end_epoch()
    return out


def assert_same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the CLI on an ImageFolder
def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``multiteach ARGS`` in this process (it shares the imports, so it starts at once): code, stdout, stderr."""
    from multiteach.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trained_on_folder(tmp_path, folder, capsys) -> Path:
    code, _, err = cli(capsys, "config", "natural", "-o", str(tmp_path / "c.toml"))
    assert code == 0, err
    code, _, err = cli(capsys, "train", str(tmp_path / "c.toml"), "--set", "data.dataset=imagefolder",
                       "--set", f"data.data_dir={folder}", "--set", "data.image_size=32", "--set", "train.epochs=1",
                       "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=8",
                       "--set", "student.model=cifar_resnet8", "--set", "data.val_size=6", "--set", "data.workers=1",
                       "--set", "train.eval_pgd_steps=1", "--set", "train.progress=false",
                       "--set", f"run_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert "train split: streamed by 1 worker " in " ".join(err.split())  # image files on the CPU: streamed
    return tmp_path / "run"


def test_imagefolder_trains_and_evaluates_through_the_cli(tmp_path, folder, trained_on_folder, capsys):
    ckpt = torch.load(trained_on_folder / "last.pt", weights_only=True)
    assert ckpt["experiment"]["config"]["data"]["image_size"] == 32 and ckpt["loader"]["kind"] == "stream"
    out = tmp_path / "e.json"
    code, stdout, err = cli(capsys, "eval", str(trained_on_folder / "best.pt"), "--dataset", "imagefolder",
                            "--data-dir", str(folder), "--attacks", "fgsm", "--workers", "0", "--out", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert "fgsm" in stdout and report["meta"]["image_size"] == 32  # the size recorded in the checkpoint
    assert report["n"] == 12  # DIR/val: 3 classes x 4 images
    code, _, err = cli(capsys, "eval", str(trained_on_folder / "best.pt"), "--dataset", "imagefolder",
                       "--data-dir", str(tmp_path))
    assert code == 2 and "train' not found" in err and "DIR/train/<class>/<image>" in " ".join(err.split())
    assert err.startswith("error: ") and "Traceback" not in err


# ----------------------------------------------------------------------------- datasets by name
@pytest.mark.parametrize("case, message", [
    ("no data_dir", "dataset 'imagefolder' needs data.data_dir"),
    ("no train", "train' not found (in"),
    ("no val", "val' not found (in"),
    ("loose images", "has no class folders (3 images lie directly in it): expected DIR/train/<class>/<image>"),
    ("empty class", "class_1' holds no images"),
    ("unknown val class", "has class folder(s) zebra that"),
])
def test_layout_errors_name_the_folder_and_the_layout(tmp_path, case, message):
    from PIL import Image

    from multiteach.build import load_splits

    root = tmp_path / "d"
    for split in ("train", "val"):
        for c in ("class_0", "class_1"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / c / "a.png")
    if case == "no train":
        os.rename(root / "train", root / "training")
    elif case == "no val":
        os.rename(root / "val", root / "valid")
    elif case == "loose images":
        for c in ("class_0", "class_1"):
            (root / "train" / c / "a.png").rename(root / "train" / f"{c}.png")
            (root / "train" / c).rmdir()
        Image.new("RGB", (8, 8)).save(root / "train" / "x.jpg")
    elif case == "empty class":
        (root / "train" / "class_1" / "a.png").unlink()
    elif case == "unknown val class":
        (root / "val" / "zebra").mkdir()
    cfg = DataConfig(dataset="imagefolder", data_dir=None if case == "no data_dir" else str(root), val_size=0)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_splits(cfg)
    assert "\n" not in str(e.value)
    if case != "no data_dir":
        assert str(root) in str(e.value)


def test_imagefolder_splits_classes_and_sizes(folder):
    from multiteach.build import eval_tensors, load_splits

    train, val = scan_image_folder(folder)
    assert isinstance(train, Files) and train.classes == ("class_0", "class_1", "class_2")
    assert len(train) == 30 and len(val) == 12 and np.bincount(train.y).tolist() == [10, 10, 10]
    assert not np.all(np.diff(val.y) >= 0)  # a fixed shuffle, so the first n test images span the classes
    s = load_splits(DataConfig(dataset="imagefolder", data_dir=str(folder), val_size=6, image_size=24))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (24, 6, 12, 3)
    assert s.image_size == 24 and s.augment == "crop_flip"
    images, y = eval_tensors(s, n=5, workers=0)
    assert images.x.dtype == np.uint8 and images.shape == (5, 3, 24, 24)  # held as decoded: no float copy
    x = images.to("cpu")
    assert x.shape == (5, 3, 24, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(images[1:3].to("cpu"), x[1:3]) and len(images[2:]) == 3
    assert torch.equal(y, torch.from_numpy(val.y[:5]))
    big = load_splits(DataConfig(dataset="imagefolder", data_dir=str(folder), val_size=0))
    assert big.image_size == 224 and big.augment == "resized_crop"  # ImageNet-style defaults


def test_npz_of_any_size_and_class_count(tmp_path):
    from multiteach.build import load_splits

    a, b = synthetic(60, num_classes=5, size=16, seed=0), synthetic(20, num_classes=5, size=16, seed=1)
    b.y[0] = 4  # the class count comes from the labels of both files
    for name, s in (("train", a), ("test", b)):
        np.savez(tmp_path / f"{name}.npz", x=s.x, y=s.y)
    s = load_splits(DataConfig(dataset="npz", data_dir=str(tmp_path), val_size=10))
    assert s.num_classes == 5 and s.train.x.shape[1:] == (16, 16, 3) and s.image_size == 16
    assert len(s.train) == 50 and len(s.val) == 10
    loader = make_loader(s.train, 10, train=True, augment=s.augment, image_size=s.image_size)
    assert isinstance(loader, TensorLoader) and next(iter(loader))[0].shape == (10, 3, 16, 16)
    up = load_splits(DataConfig(dataset="npz", data_dir=str(tmp_path), val_size=10, image_size=24))
    assert up.train.x.shape[1:] == (24, 24, 3) and up.test.x.shape[1:] == (24, 24, 3)
    with pytest.raises(ValueError, match="dataset 'npz' needs data.data_dir"):
        load_splits(DataConfig(dataset="npz"))
    (tmp_path / "test.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no test.npz: write them there \(x uint8 N,H,W,3"):
        load_splits(DataConfig(dataset="npz", data_dir=str(tmp_path)))


def test_svhn_reads_torchvisions_mat_files_and_names_missing_ones(tmp_path):
    from multiteach.build import load_splits

    scipy_io = pytest.importorskip("scipy.io")
    with pytest.raises(FileNotFoundError, match="svhn not found under .* train_32x32.mat or test_32x32.mat.*download"):
        load_splits(DataConfig(dataset="svhn", root=str(tmp_path)))
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 12)):
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # SVHN's labels: 1..10, 10 meaning the digit 0
        x = rng.integers(0, 255, (32, 32, 3, n)).astype(np.uint8)
        x[0, 0, 0, :] = y[:, 0] % 10  # a mark to check images keep their labels
        scipy_io.savemat(tmp_path / f"{name}_32x32.mat", {"X": x, "y": y})
    s = load_splits(DataConfig(dataset="svhn", root=str(tmp_path), val_size=10))
    assert s.num_classes == 10 and len(s.train) == 30 and len(s.test) == 12 and s.train.x.shape[1:] == (32, 32, 3)
    assert s.train.y.max() <= 9 and (s.train.y == 0).any()
    assert np.array_equal(s.train.x[:, 0, 0, 0], s.train.y)


# ----------------------------------------------------------------------------- the two loaders
def test_streaming_and_resident_loaders_give_the_same_batches(folder):
    data = synthetic(70, size=16, seed=0)
    resident = TensorLoader(data, 16, shuffle=True, drop_last=True, seed=7)
    stream = StreamingLoader(data, 16, shuffle=True, drop_last=True, seed=7, workers=0)
    assert len(resident) == len(stream) == 4
    assert_same(batches(resident, 2), batches(stream, 2))  # two epochs: the order's generator carries on
    first = batches(TensorLoader(data, 70, shuffle=True, seed=7))[0][1]  # the documented order
    assert torch.equal(first, torch.from_numpy(data.y)[torch.randperm(70, generator=torch.Generator().manual_seed(7))])
    files, _ = scan_image_folder(folder)  # image files: decoded once for the device, or read by workers
    kw = dict(train=True, augment="none", image_size=32, seed=3, workers=1)
    resident, stream = make_loader(files, 8, kind="resident", **kw), make_loader(files, 8, kind="stream", **kw)
    assert isinstance(resident, TensorLoader) and isinstance(stream, StreamingLoader)
    assert_same(batches(resident), batches(stream))
    stream.close()


def test_streaming_loader_resumes_mid_epoch_like_an_uninterrupted_epoch():
    data = synthetic(96, size=16, seed=0)
    whole = StreamingLoader(data, 12, shuffle=True, augment="crop_flip", drop_last=True, seed=5, workers=2)
    batches(whole)  # epoch 1
    expected = batches(whole)  # epoch 2, uninterrupted
    whole.close()
    cut = StreamingLoader(data, 12, shuffle=True, augment="crop_flip", drop_last=True, seed=5, workers=2)
    batches(cut)
    it = iter(cut)
    head = [next(it) for _ in range(3)]
    state = cut.state_dict()
    assert state["pos"] == 3 and cut.position == 3
    cut.close()
    resumed = StreamingLoader(data, 12, shuffle=True, augment="crop_flip", drop_last=True, seed=99, workers=1)
    resumed.load_state_dict(state)
    assert resumed.position == 3
    assert_same(head + batches(resumed), expected)  # augmentation included: it is seeded per image and epoch
    resumed.close()
    # a resident loader's state carries over: the same order from the same position
    resident = TensorLoader(data, 12, shuffle=True, augment=True, drop_last=True, seed=5)
    it = iter(resident)
    next(it)
    s = StreamingLoader(data, 12, shuffle=True, drop_last=True, workers=0)
    s.load_state_dict(resident.state_dict())
    assert [y.tolist() for _, y in s] == [y.tolist() for _, y in it]


def test_both_loaders_refuse_a_state_they_cannot_continue():
    data = synthetic(64, size=8, seed=0)
    a = StreamingLoader(data, 8, shuffle=True, drop_last=True, workers=0)
    it = iter(a)
    next(it)
    state = a.state_dict()
    for loader in (TensorLoader(synthetic(48, size=8), 8, shuffle=True, drop_last=True),
                   StreamingLoader(synthetic(48, size=8), 8, shuffle=True, drop_last=True, workers=0)):
        with pytest.raises(CheckpointError, match="middle of an epoch over 64 training images; this run has 48"):
            loader.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "global_batch"}  # a state written before it was recorded
    for loader in (TensorLoader(data, 32, shuffle=True, drop_last=True),
                   StreamingLoader(data, 32, shuffle=True, drop_last=True, workers=0)):
        with pytest.raises(CheckpointError, match="after batch 3 of an epoch that now has 2 batches"):
            loader.load_state_dict({**older, "pos": 3})
    # another number of processes (or batch size) mid-epoch would skip or repeat images: refused
    for loader in (TensorLoader(data, 8, shuffle=True, drop_last=True, rank=0, world=2),
                   StreamingLoader(data, 4, shuffle=True, drop_last=True, workers=0)):
        with pytest.raises(CheckpointError, match=f"global batches of 8 images .*this run's are {loader.global_batch}"):
            loader.load_state_dict(state)
    same = TensorLoader(data, 4, shuffle=True, drop_last=True, rank=1, world=2)  # 2 x 4 = 8: the same batches
    same.load_state_dict(state)


def test_the_loader_is_chosen_by_size_and_free_memory(monkeypatch):
    arrays = synthetic(100, size=8)  # 19,200 bytes
    files = Files("/nowhere", np.array([b"a.png"] * 100), np.zeros(100, dtype=np.int64))
    cpu = torch.device("cpu")
    assert choose_loader(arrays, "auto", cpu)[0] == "resident"
    assert choose_loader(files, "auto", cpu, 32)[0] == "stream"
    assert choose_loader(arrays, "stream", cpu)[0] == "stream" and choose_loader(files, "resident", cpu, 32)[0] == \
        "resident"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100_000, 10**9))
    cuda = torch.device("cuda")
    assert choose_loader(arrays, "auto", cuda) == ("resident", "100 images, 18.8 KiB as uint8, within 25% of 97.7 KiB "
                                                              "free")
    assert choose_loader(files, "auto", cuda, 32)[0] == "stream"  # 300 KiB of images > a quarter of 98 KiB


def test_a_file_that_cannot_be_decoded_is_named(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, train=2, val=1, size=8)
    (root / "train" / "class_1" / "000.png").write_bytes(b"not a png")
    files, _ = scan_image_folder(root)
    with pytest.raises(ValueError, match=r"cannot read .*class_1/000.png"):
        batches(StreamingLoader(files, 4, image_size=8, workers=0))


def test_resized_crop_flip_keeps_the_size_and_covers_the_image_at_full_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 10, generator=g)
    out = resized_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    whole = resized_crop_flip(x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(10 / 12, 10 / 12))
    assert all(torch.allclose(o, i, atol=1e-5) or torch.allclose(o, i.flip(2), atol=1e-5) for o, i in zip(whole, x))


# ----------------------------------------------------------------------------- DDP sharding, 2 gloo processes
def _shard_entry(rank: int, world: int, port: int, root: str, out: str) -> None:
    from multiteach.distributed import DistContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist = DistContext.from_env(backend="gloo", timeout_s=30)
        files, _ = scan_image_folder(root)
        loader = StreamingLoader(files, 6 // world, shuffle=True, augment="crop_flip", drop_last=False, seed=1,
                                 rank=dist.rank, world=dist.world, image_size=16, workers=1)
        got = batches(loader)
        loader.close()
        torch.save(got, Path(out) / f"rank{rank}.pt")
        dist.barrier()
        dist.close()
    except Exception as e:  # keep the message for the parent
        Path(out, f"error_rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise


def test_streaming_ranks_see_exactly_the_batches_one_process_sees(tmp_path, folder):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    mp.spawn(_shard_entry, args=(2, free_port, str(folder), str(tmp_path)), nprocs=2, join=True)
    files, _ = scan_image_folder(folder)  # 30 images, global batch 6: 5 batches of 3 + 3
    one = StreamingLoader(files, 6, shuffle=True, augment="crop_flip", seed=1, image_size=16, workers=1)
    single = batches(one)
    one.close()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert len(single) == len(r0) == len(r1) == 5
    union = [(torch.cat([x0, x1]), torch.cat([y0, y1])) for (x0, y0), (x1, y1) in zip(r0, r1)]
    assert_same(union, single)  # the same images, in the same order, with the same augmentation
