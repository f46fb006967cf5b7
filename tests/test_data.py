"""The data path: batched crop + flip, the device loader's sharding and resume, the splits, and the
no-host-sync weighter the fast path relies on."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.data import Arrays, TensorLoader, crop_flip, load_cifar, split_validation, synthetic


def test_crop_flip_is_a_padded_window_of_each_image_maybe_mirrored():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g) + 1.0  # > 0, so zero padding is recognisable
    out = crop_flip(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (2, 2, 2, 2))
    seen_shift, seen_flip = set(), set()
    for i in range(len(x)):
        matches = [(r, c, f) for r in range(5) for c in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(2) if f else w)(padded[i, :, r:r + 8, c:c + 8]))]
        assert matches, f"image {i} is not a window of its padded self"
        r, c, f = matches[0]
        seen_shift.add((r, c))
        seen_flip.add(f)
    assert seen_flip == {False, True} and len(seen_shift) > 10  # both flips, many offsets
    flipped_only = crop_flip(x, 0, torch.Generator().manual_seed(1))  # pad 0: the image or its mirror
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(2)) for o, i in zip(flipped_only, x))


def test_ranks_see_exactly_the_images_one_process_sees():
    data = synthetic(96, seed=0)
    one = TensorLoader(data, 32, shuffle=True, augment=True, seed=3)
    ranks = [TensorLoader(data, 16, shuffle=True, augment=True, seed=3, rank=r, world=2) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        torch.testing.assert_close(torch.cat([x0, x1]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([y0, y1]), y)


def test_loader_resumes_mid_epoch_with_the_same_batches():
    data = synthetic(128, seed=0)
    a = TensorLoader(data, 16, shuffle=True, augment=True, seed=5)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    rest = [x for x, _ in it]
    b = TensorLoader(data, 16, shuffle=True, augment=True, seed=99)
    b.load_state_dict(state)
    again = [x for x, _ in b]
    assert len(rest) == len(again) == 5
    for u, v in zip(rest, again):
        assert torch.equal(u, v)


def test_validation_split_is_stratified_and_disjoint():
    train = synthetic(1000, seed=0)
    rest, val = split_validation(train, 100, seed=0)
    assert len(rest) + len(val) == 1000 and not set(map(bytes, val.x)) - set(map(bytes, train.x))
    counts = np.bincount(train.y, minlength=10)
    assert np.all(np.abs(np.bincount(val.y, minlength=10) - 100 * counts / 1000) < 1)  # in proportion
    with pytest.raises(ValueError, match="leaves no training images"):
        split_validation(train, 1000)


def _labelled(counts):
    y = np.repeat(np.arange(len(counts)), counts)
    return Arrays(np.zeros((len(y), 2, 2, 3), np.uint8), y)


def test_validation_shares_follow_the_class_sizes_and_no_class_leaves_training():
    """SVHN's unequal classes: validation in their proportions (not 100 each); a tiny class keeps a training
    image, its share going to the others; a balanced set splits equally, the extra images to the first classes."""
    svhn = [4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659]
    _, val = split_validation(_labelled(svhn), 1000)
    assert np.bincount(val.y).tolist() == [68, 189, 144, 116, 102, 94, 78, 76, 69, 64]
    rest, val = split_validation(_labelled([500, 3]), 100)
    assert np.bincount(rest.y).tolist() == [401, 2] and len(val) == 100
    rest, val = split_validation(_labelled([50, 50, 1]), 6)
    assert np.bincount(rest.y, minlength=3).tolist() == [47, 47, 1] and len(val) == 6
    _, val = split_validation(_labelled([20] * 10), 13)
    assert np.bincount(val.y).tolist() == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="would leave a class without training images"):
        split_validation(_labelled([50, 1]), 50)


def test_numpy_files_and_missing_directory(tmp_path):
    sorted_by_class = Arrays(np.repeat(np.arange(10), 20)[:, None, None, None].repeat(32, 1).repeat(32, 2)
                             .repeat(3, 3).astype(np.uint8), np.repeat(np.arange(10), 20))
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=sorted_by_class.x, y=sorted_by_class.y)
    train, _ = load_cifar(data_dir=tmp_path)
    assert not np.all(np.diff(train.y) >= 0)  # class-sorted files get a fixed shuffle
    blocks = np.concatenate([np.full(20, c) for c in (3, 1, 2, 0, 9, 8, 7, 6, 5, 4)])  # grouped, not ascending
    np.savez(tmp_path / "test.npz", x=sorted_by_class.x, y=blocks)
    _, test = load_cifar(data_dir=tmp_path)
    assert len(set(test.y[:20].tolist())) > 3  # a first-n subset is not one class
    assert np.all(train.x[:, 0, 0, 0] == train.y)  # images stay with their labels
    with pytest.raises(FileNotFoundError, match="x uint8 N,32,32,3.*--download"):
        load_cifar(data_dir=tmp_path / "nowhere")


def test_anl_never_reads_a_tensor_on_the_host(monkeypatch):
    """The fast path's promise: ANL's update and combine stay on the device (no .item(), no bool())."""
    from multiteach.weighting import StepContext

    anl = mt.ANL(3)
    losses = torch.tensor([[1.0, 1.5], [2.0, 2.5], [3.0, 3.5]], requires_grad=True)  # (branches, samples)
    y = torch.zeros(2, dtype=torch.long)

    def forbidden(*a, **k):
        raise AssertionError("host read of a tensor inside the weighter")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for scale in (1.0, 0.5, 0.25):
        total, w = anl.combine(losses * scale, StepContext((losses * scale).detach(), y))
    monkeypatch.undo()
    assert w.sum().item() == pytest.approx(1.0) and torch.isfinite(total).item()
