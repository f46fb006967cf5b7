"""Evaluation: cross-checks against torchattacks and AutoAttack, and the sanity checks against gradient masking."""

import pytest
import torch
import torch.nn.functional as F

from multiteach.data import TensorLoader, synthetic
from multiteach.evaluation import AutoAttack, Transfer, correct_mask, eps_sweep, evaluate, standard_attacks
from multiteach.transforms import FGSM, PGD
from tests.conftest import tiny_net

N = 128


@pytest.fixture(scope="module")
def model_and_data():
    """A small BN network trained for a few hundred steps on toy images: accurate, not robust."""
    torch.manual_seed(0)
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = TensorLoader(synthetic(1024, seed=0), 64, shuffle=True, drop_last=True)
    for _ in range(6):
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test = synthetic(N, seed=1)
    x = torch.from_numpy(test.x).permute(0, 3, 1, 2).contiguous().float() / 255
    y = torch.from_numpy(test.y)
    assert correct_mask(net, x, y).float().mean() > 0.8  # a model worth attacking
    return net, x, y


def acc(net, x, y, attack=None):
    return correct_mask(net, x, y, attack, batch_size=64).float().mean().item()


def test_pgd_equals_torchattacks_pgd(model_and_data):
    torchattacks = pytest.importorskip("torchattacks")
    net, x, y = model_and_data
    eps, alpha, steps = 4 / 255, 1 / 255, 20
    ours = PGD(eps, alpha, steps, start="none")(net, x, y)
    ref = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    # the same deterministic iteration; sign() may flip on a few pixels where the gradient is ~0
    assert (ours - ref).abs().gt(1e-6).float().mean() < 0.01
    assert abs(acc(net, ours, y) - acc(net, ref, y)) <= 1 / N
    # with random starts the two draw different noise: the accuracy agrees within a few images
    rand_ours = acc(net, x, y, PGD(eps, alpha, steps, start="uniform"))
    rand_ref = acc(net, torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y), y)
    assert abs(rand_ours - rand_ref) <= 4 / N


def test_fgsm_equals_torchattacks_fgsm(model_and_data):
    torchattacks = pytest.importorskip("torchattacks")
    net, x, y = model_and_data
    ours = FGSM(4 / 255)(net, x, y)
    ref = torchattacks.FGSM(net, eps=4 / 255)(x, y)
    assert (ours - ref).abs().gt(1e-6).float().mean() < 0.01
    assert abs(acc(net, ours, y) - acc(net, ref, y)) <= 1 / N


def test_no_gradient_masking(model_and_data):
    """Robust accuracy falls as eps grows, is ~0 at a large eps, and eps = 0 gives clean accuracy."""
    net, x, y = model_and_data
    sweep = eps_sweep(net, x, y, [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 32 / 255], steps=10)
    values = list(sweep.values())
    assert values[0] == pytest.approx(acc(net, x, y))
    assert all(b <= a + 2 / N for a, b in zip(values, values[1:]))
    assert values[-1] <= 0.02 and values[0] - values[-1] > 0.5


def test_pgd_is_stronger_than_fgsm_and_autoattack_than_pgd(model_and_data):
    pytest.importorskip("pyautoattack")
    net, x, y = model_and_data
    eps = 8 / 255
    fgsm, pgd = acc(net, x, y, FGSM(eps)), acc(net, x, y, PGD(eps, eps / 4, 20, start="uniform"))
    # the standard version (APGD-CE, APGD-T, FAB-T, Square) on 8 images: its CPU time grows with each one
    aa = acc(net, x[:8], y[:8], AutoAttack(eps))
    pgd8 = acc(net, x[:8], y[:8], PGD(eps, eps / 4, 20, start="uniform"))
    assert pgd <= fgsm
    assert aa <= pgd8
    assert 0 < pgd < acc(net, x, y)  # the setting is informative: some images resist, some fall


def test_report_rows_w_robust_and_worst_case(model_and_data):
    net, x, y = model_and_data
    attacks = {k: v for k, v in standard_attacks(2 / 255).items()}
    # inputs in channels_last memory (as eval tensors permuted from NHWC are) must work for every attack
    report = evaluate(net, x.contiguous(memory_format=torch.channels_last), y, attacks, batch_size=50,
                      subsets={"cw_inf": 64})
    rows = {r.attack: r for r in report.rows}
    assert set(rows) == set(attacks) and rows["cw_inf"].n == 64 and rows["fgsm"].n == N
    for r in report.rows:
        assert 0 <= r.robust <= r.clean
    assert report.worst.n == 64 and report.worst.robust <= min(r.robust for r in report.rows) + 1e-9
    d = report.to_dict()
    assert d["n"] == N and d["worst"]["attack"] == "worst case"


def test_transfer_attack_is_crafted_on_the_surrogate(model_and_data):
    net, x, y = model_and_data
    surrogate = tiny_net(seed=5).eval()
    calls = []
    surrogate.register_forward_hook(lambda *a: calls.append(1))
    transfer = Transfer(PGD(8 / 255, 2 / 255, 5, start="none"), surrogate)
    white = acc(net, x, y, PGD(8 / 255, 2 / 255, 5, start="none"))
    black = acc(net, x, y, transfer)
    assert calls and black >= white  # an untrained surrogate's examples transfer worse than white-box ones


def test_images_held_as_uint8_evaluate_exactly_as_their_float_tensor(model_and_data):
    """Test splits stay uint8 in memory (Images) and become floats a batch at a time: every row agrees with
    the float tensor's, including rows on a first-k subset."""
    from multiteach.data import Images, synthetic

    net = model_and_data[0]
    test = synthetic(N, seed=1)
    images, y = Images(test.x), torch.from_numpy(test.y)
    x = torch.from_numpy(test.x).permute(0, 3, 1, 2).contiguous().float() / 255
    assert torch.equal(images.to("cpu"), x) and images.shape == x.shape
    attacks = {"pgd": PGD(8 / 255, 2 / 255, 3, start="none"), "fgsm": FGSM(8 / 255)}
    a = evaluate(net, images, y, attacks, batch_size=50, subsets={"fgsm": 70})
    b = evaluate(net, x, y, attacks, batch_size=50, subsets={"fgsm": 70})
    assert a.to_dict()["rows"] == [dict(r, seconds=ra["seconds"]) for r, ra in zip(b.to_dict()["rows"],
                                                                                 a.to_dict()["rows"])]
    with pytest.raises(TypeError, match="sliced"):
        images[3]
