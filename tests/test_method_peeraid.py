"""PeerAiD: one step equals the official training step (jaewonalive/PeerAiD main.py ``train_kd``) re-done by hand:
the attack against the student with the peer's eval-mode clean output as reference, the peer's own loss and
gradient, the student's loss and gradient (including the share of the peer's KL the code back-propagates)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.presets import PRESETS
from tests.conftest import tiny_net
from tests.test_presets import batch, hand_pgd

T = 5.0
STEPS = 3  # attack steps: the formula is the same at 10, and the CPU is small


def kl_mean(log_input, target_prob):
    """nn.KLDivLoss()(log_input, target): target * (log target - log_input), averaged over batch x classes."""
    return F.kl_div(log_input, target_prob, reduction="none").mean()


def setup(**kw):
    student, peer = tiny_net(seed=0), tiny_net(seed=1)
    recipe = PRESETS["peeraid"].fn(copy.deepcopy(student), mt.Teacher(copy.deepcopy(peer)), steps=STEPS,
                                   **kw).train()
    return recipe, student, peer


def official_step(student, peer, x, y, gamma2=0.1, detach_student_in_peer_kl=False):
    """The official step on copies of the nets: returns (loss_peer, loss_student, parts) with the graph of
    ``loss_peer + loss_student`` (the code's single backward)."""
    peer.eval()
    with torch.no_grad():
        peer_clean = peer(x)
    peer.train()
    x_adv = hand_pgd(student, x, lambda o: F.kl_div(F.log_softmax(o, 1), F.softmax(peer_clean, 1),
                                                    reduction="sum"), "normal", steps=STEPS)
    student.train()
    p_adv = peer(x_adv)
    s_adv = student(x_adv)
    s_nat = student(x)
    target = s_adv.detach() if detach_student_in_peer_kl else s_adv
    loss_peer = F.cross_entropy(p_adv, y) + gamma2 * kl_mean(F.log_softmax(p_adv, 1), F.softmax(target, 1))
    peer_kd = T * T * kl_mean(F.log_softmax(s_adv / T, 1), F.softmax(p_adv.detach() / T, 1))
    self_kd = T * T * kl_mean(F.log_softmax(s_adv / T, 1), F.softmax(s_nat / T, 1))
    pull = kl_mean(F.log_softmax(p_adv.detach(), 1), F.softmax(s_adv, 1))  # the peer's KL, as seen by the student
    return loss_peer, peer_kd + self_kd, (peer_kd, self_kd, pull)


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.fixture(scope="module")
def stepped():
    """One recipe step (backward done) and untouched copies of the nets it started from."""
    recipe, student, peer = setup()
    x, y = batch()
    torch.manual_seed(3)
    out = recipe(x, y)
    out.total.backward()
    return recipe, out, student, peer, x, y


def test_a_step_is_the_official_step_losses_and_both_networks_gradients(stepped):
    recipe, out, student, peer, x, y = stepped
    student, peer = copy.deepcopy(student), copy.deepcopy(peer)
    torch.manual_seed(3)
    loss_peer, loss_student, (peer_kd, self_kd, pull) = official_step(student, peer, x, y)
    (loss_peer + loss_student).backward()

    assert recipe.branch_names == ["peer_kd", "self_kd", "peer_pull"]
    assert out.weights.tolist() == pytest.approx([1.0, 1.0, 0.1])
    want = torch.stack([peer_kd, self_kd, pull]).detach()
    torch.testing.assert_close(out.losses, want, rtol=2e-4, atol=1e-7)
    # the logged total holds the peer's KL once on each side (its value twice); the gradients hold it once each
    assert out.total.item() == pytest.approx((loss_peer + loss_student + 0.1 * pull).item(), rel=1e-5)
    for got, want in ((grads(recipe.student), grads(student)), (grads(recipe.teachers[0]), grads(peer))):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    # the eval-mode reference left the peer's BN statistics alone; its train-mode forward on x' moved them once
    for (name, a), b in zip(recipe.teachers[0].model.named_buffers(), peer.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_the_peer_gets_exactly_the_gradient_of_its_own_loss_and_the_student_the_codes_pull(stepped):
    """The peer's gradient is that of gamma1 CE(P(x'), y) + gamma2 KL(S(x') || P(x')) with the student's output
    detached; without the pull branch the student's gradient would miss a term the code has."""
    recipe, _, student, peer, x, y = stepped
    student, peer = copy.deepcopy(student), copy.deepcopy(peer)
    peer_grads, student_grads = grads(recipe.teachers[0]), grads(recipe.student)

    own_student, own_peer = copy.deepcopy(student), copy.deepcopy(peer)
    torch.manual_seed(3)
    loss_peer, _, _ = official_step(own_student, own_peer, x, y, detach_student_in_peer_kl=True)
    loss_peer.backward()  # the peer's own loss alone
    for g, w in zip(peer_grads, grads(own_peer)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in own_student.parameters())

    torch.manual_seed(3)
    loss_peer, loss_student, _ = official_step(student, peer, x, y, detach_student_in_peer_kl=True)
    (loss_peer + loss_student).backward()  # the student's loss without the pull
    gap = max((g - w).abs().max().item() for g, w in zip(student_grads, grads(student)))
    assert gap > 1e-5  # the pull is a real part of the student's gradient (the first test matches it to 1e-7)


def test_official_settings():
    entry = PRESETS["peeraid"]
    assert entry.teachers == ("peer",) and entry.schedule == {"epochs": 300, "milestones": (214, 259, 284)}
    net = tiny_net(seed=1)
    recipe = entry.fn(tiny_net(seed=0), mt.Teacher(net))
    (peer,) = recipe.teachers
    assert peer.trainable and peer.model is net and all(p.requires_grad for p in net.parameters())
    assert peer.optimizer == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4}
    assert (peer.loss.gamma1, peer.loss.gamma2, peer.loss.temperature) == (1.0, 0.1, 1.0)
    pgd = recipe.branches[0].transform
    assert all(b.transform is pgd for b in recipe.branches)  # one attack a step
    assert (pgd.eps, pgd.alpha, pgd.steps, pgd.start, pgd.bn_mode) == (8 / 255, 2 / 255, 10, "normal", "eval")
    assert [b.loss.temperature for b in recipe.branches] == [5.0, 5.0, 1.0]
    hundred = entry.fn(tiny_net(100, seed=0), mt.Teacher(tiny_net(100, seed=1)), num_classes=100)
    assert hundred.teachers[0].loss.gamma2 == 1.0 and hundred.weighter.weights.tolist()[2] == 1.0
    with_ce = entry.fn(tiny_net(seed=0), mt.Teacher(tiny_net(seed=1)), lamb1=0.035, lamb2=35.0, lamb3=20.0)
    assert with_ce.branch_names[-1] == "adv_ce"
    assert with_ce.weighter.weights.tolist() == pytest.approx([35.0, 20.0, 0.1, 0.035])
