"""Interfaces v2 on the CPU: transforms' base contract and adapters, trainable teachers, feature branches,
attacks through a teacher, wrapping of plain modules, one registry style, the fast path's logic with fakes,
optimizers and schedules from the config."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import multiteach as mt
from multiteach.config import DataConfig, TrainConfig
from multiteach.data import Arrays, TensorLoader, synthetic
from multiteach.engine.optim import lr_factor, optimizer_class, student_optimizer
from multiteach.fast import FoldedEval, GraphedTransform, plan
from multiteach.features import feature_shapes
from multiteach.losses import CrossEntropy, FeatureHint, KLDistill
from multiteach.recipe import Branch, Recipe
from multiteach.registry import ATTACKS, DATASETS, PRESETS
from multiteach.transforms import CallableTransform, TorchattacksTransform
from tests.conftest import tiny_net


def batch(n=8, seed=0):
    a = synthetic(n, seed=seed)
    return torch.from_numpy(a.x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(a.y)


def modes(model):
    return [m.training for m in model.modules()]


# ----------------------------------------------------------------------------- transforms
def test_the_base_call_restores_every_submodules_mode_and_detaches():
    class Rude(mt.InputTransform):
        bn_mode = "eval"

        def perturb(self, model, x, y, reference):
            model.train()  # a transform that leaves the model in another mode
            return x.clone().requires_grad_(True) * 1.0

    net = tiny_net()
    net.train()
    net.layer1.eval()  # a mixed state, as a frozen sub-network inside a trainable one
    before = modes(net)
    x, y = batch()
    out = Rude()(net, x, y)
    assert modes(net) == before and not out.requires_grad


def test_attacks_leave_no_gradient_on_any_weight():
    net = tiny_net()
    x, y = batch()
    for attack in (mt.PGD(steps=2), mt.FGSM(), mt.PGD(steps=2, objective="kl")):
        attack(net, x, y)
        assert all(p.grad is None for p in net.parameters())


def test_a_plain_callable_and_a_torchattacks_attack_are_transforms():
    torchattacks = pytest.importorskip("torchattacks")
    net = tiny_net(seed=0).eval()
    x, y = batch()
    ours = mt.PGD(eps=8 / 255, alpha=2 / 255, steps=3, start="none")(net, x, y)
    theirs = TorchattacksTransform(torchattacks.PGD, eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)
    assert torch.allclose(theirs(net, x, y), ours, atol=1e-6)
    built = torchattacks.PGD(tiny_net(seed=1), eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)
    assert torch.allclose(mt.transforms.as_transform(built)(net, x, y), ours, atol=1e-6)  # pointed at `net`

    def shift(model, x, y):
        return (x + 0.01).clamp(0, 1)

    t = mt.transforms.as_transform(shift)
    assert isinstance(t, CallableTransform) and torch.equal(t(net, x, y), (x + 0.01).clamp(0, 1))
    recipe = Recipe(tiny_net(), [Branch(shift, CrossEntropy())])  # a branch takes the callable as it is
    assert isinstance(recipe.branches[0].transform, CallableTransform)
    recipe(x, y).total.backward()


def test_an_attack_through_the_teacher_ascends_kl_to_its_perturbed_output():
    """AdaAD's inner attack: the reference is the teacher's output on x' at every step; gradients reach x'
    only (the teacher's weights get none)."""
    student, teacher = tiny_net(seed=0).eval(), mt.Teacher(tiny_net(seed=1))
    x, y = batch(16)
    pgd = mt.PGD(eps=8 / 255, alpha=2 / 255, steps=1, start="none", objective="kl", through=teacher)
    x_adv = pgd(student, x, y)
    z = x.clone().requires_grad_(True)  # one step by hand: the gradient runs through both networks
    F.kl_div(F.log_softmax(student(z), 1), F.softmax(teacher(z), 1), reduction="sum").backward()
    assert torch.equal(x_adv, (x + 2 / 255 * z.grad.sign()).clamp(0, 1))
    fixed = mt.PGD(eps=8 / 255, alpha=2 / 255, steps=1, start="none", objective="kl")(student, x, y,
                                                                                    teacher(x).detach())
    assert not torch.equal(x_adv, fixed)  # a fixed clean reference is another attack
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="objective='kl'"):
        mt.PGD(objective="ce", through=teacher)


# ----------------------------------------------------------------------------- teachers
def test_any_module_given_as_a_teacher_is_wrapped_frozen():
    raw = tiny_net(seed=1)
    recipe = mt.presets.baseline(tiny_net(seed=0), copy.deepcopy(raw))
    ref = Recipe(tiny_net(seed=0), [Branch(mt.Clean(), KLDistill(), teacher=raw)])
    (teacher,) = ref.teachers
    assert isinstance(teacher, mt.Teacher) and teacher.model is raw and not teacher.trainable
    assert all(not p.requires_grad for p in raw.parameters())
    student_params, extra = ref.trainable_parameters()
    assert extra == [] and len(student_params) == len(list(ref.student.parameters()))
    ref.train()
    assert not raw.training
    assert isinstance(recipe.teachers[0], mt.Teacher)


def peer_loss(teacher_logits, student_logits, y):
    """PeerAiD-like: the peer's CE on its input plus a pull towards the student (per sample)."""
    return F.cross_entropy(teacher_logits, y, reduction="none") + 0.1 * F.kl_div(
        F.log_softmax(teacher_logits, 1), F.softmax(student_logits, 1), reduction="none").sum(1)


def test_a_trainable_teacher_learns_from_its_own_loss_only():
    torch.manual_seed(0)
    peer = mt.Teacher(tiny_net(seed=1), trainable=True, loss=peer_loss, optimizer={"name": "sgd", "lr": 0.05})
    pgd = mt.PGD(steps=2)
    recipe = Recipe(tiny_net(seed=0), [Branch(pgd, KLDistill(), teacher=peer, name="peer")]).train()
    assert peer.training and all(p.requires_grad for p in peer.parameters())
    x, y = batch(16)
    student0, peer0 = copy.deepcopy(recipe.student), copy.deepcopy(peer)  # the state before the step
    torch.manual_seed(1)
    out = recipe(x, y)
    out.total.backward()
    got = [p.grad.clone() for p in peer.parameters()]
    # the peer's gradient is that of its own loss on the same x' (the student's KL reads a detached target)
    torch.manual_seed(1)
    x_adv = pgd(student0, x, y)
    s = student0(x_adv).detach()
    peer_loss(peer0(x_adv), s, y).mean().backward()
    for g, p in zip(got, peer0.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs its own loss"):
        mt.Teacher(tiny_net(), trainable=True)


def test_a_trainable_teacher_is_stepped_checkpointed_and_resumed(tmp_path):
    def build():
        torch.manual_seed(0)
        peer = mt.Teacher(tiny_net(seed=1), trainable=True, loss=peer_loss, optimizer={"name": "sgd", "lr": 0.05})
        return Recipe(tiny_net(seed=0), [Branch(mt.PGD(steps=1), KLDistill(), teacher=peer, name="peer")])

    def loader():
        return TensorLoader(synthetic(128, seed=0), 32, shuffle=True, drop_last=True, seed=0)

    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, milestones=[], eval_every=0, progress=False, log_every=1)
    recipe = build()
    before = copy.deepcopy(recipe.teachers[0].state_dict())
    ref = mt.Trainer(recipe, loader(), cfg, run_dir=tmp_path / "ref")
    ref.fit()
    after = recipe.teachers[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the peer moved
    assert len(ref.teacher_optimizers) == 1
    one = mt.Trainer(build(), loader(), cfg.model_copy(update={"epochs": 1}), run_dir=tmp_path / "cut")
    one.fit()
    resumed = mt.Trainer(build(), loader(), cfg, run_dir=tmp_path / "cut")
    resumed.fit()
    for k, v in after.items():
        assert torch.equal(v, resumed.recipe.teachers[0].state_dict()[k]), k
    for a, b in zip(ref.recipe.student.parameters(), resumed.recipe.student.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- features
def test_a_feature_branch_trains_its_projector_with_the_student():
    torch.manual_seed(0)
    student, teacher = tiny_net(seed=0), mt.Teacher(tiny_net(seed=1))
    s_shape = feature_shapes(student, ["layer1"])["layer1"]
    t_shape = feature_shapes(teacher.model, ["layer2"])["layer2"]
    assert s_shape == (8, 32, 32) and t_shape == (16, 16, 16)
    hint = FeatureHint(8, 16, projector=nn.Conv2d(8, 16, 1, stride=2, bias=False))
    branches = [Branch(mt.Clean(), CrossEntropy(), name="ce"),
                Branch(mt.Clean(), hint, teacher=teacher, student_layer="layer1", teacher_layer="layer2", name="hint")]
    recipe = Recipe(student, branches).train()
    x, y = batch(8)
    out = recipe(x, y)
    with torch.no_grad():  # the hint branch's loss, by hand
        fs = F.relu(student.bn1(student.conv1(x)))
        fs = student.layer1(fs)
        ft = teacher.model.layer2(teacher.model.layer1(F.relu(teacher.model.bn1(teacher.model.conv1(x)))))
        want = ((hint.projector(fs) - ft) ** 2).mean()
    assert out.losses[1].item() == pytest.approx(want.item(), rel=1e-5)
    out.total.backward()
    assert hint.projector.weight.grad.abs().sum() > 0
    _, extra = recipe.trainable_parameters()
    assert [id(p) for p in extra] == [id(hint.projector.weight)]  # trained by the student's optimizer
    assert "losses" in recipe.component_state()  # and saved in the checkpoint with the student
    with pytest.raises(ValueError, match="has no layer 'layer9'"):
        Recipe(tiny_net(), [Branch(mt.Clean(), hint, teacher=mt.Teacher(tiny_net()), student_layer="layer9",
                                   teacher_layer="layer2")])(x, y)


# ----------------------------------------------------------------------------- per-sample contract
def test_losses_are_per_sample_and_a_scalar_loss_still_works():
    x, y = batch(8)
    recipe = Recipe(tiny_net(), [Branch(mt.Clean(), CrossEntropy()),
                                 Branch(mt.Clean(), lambda s, q, y: F.cross_entropy(s, y))])
    out = recipe(x, y)
    assert out.losses[0].item() == pytest.approx(out.losses[1].item(), rel=1e-6)
    bad = Recipe(tiny_net(), [Branch(mt.Clean(), lambda s, q, y: s)])
    with pytest.raises(ValueError, match=r"one value per sample, shape \(8,\)"):
        bad(x, y)


# ----------------------------------------------------------------------------- registries
def test_every_multi_teacher_preset_accepts_any_weighter_with_its_options():
    student, teachers = tiny_net(seed=0), [mt.Teacher(tiny_net(seed=k)) for k in (1, 2, 3)]
    for name, entry in PRESETS.items():
        if "weighter" not in entry.options():
            continue
        recipe = entry.fn(student, *teachers[: len(entry.teachers)], weighter={"name": "dwa", "temperature": 3.0})
        dwa = [m for m in recipe.weighter.modules() if isinstance(m, mt.DWA)]  # itself, or the teachers' group
        assert len(dwa) == 1 and dwa[0].temperature == 3.0, name
    own = {"ebkd", "ca_mkd", "aekd"}  # their weighter is the method itself (avg_kd takes any)
    multi = [n for n, e in PRESETS.items() if len(e.teachers) >= 2 and n not in own]
    assert multi and all("weighter" in PRESETS[n].options() for n in multi)


def test_a_weighter_option_beside_another_weighter_is_refused():
    t = [mt.Teacher(tiny_net()) for _ in range(2)]
    with pytest.raises(ValueError, match="rw, beta|beta, rw"):
        mt.presets.mtard(tiny_net(), *t, weighter="dwa", rw=0.9, beta=5.0)
    with pytest.raises(ValueError, match="weighter 'dwa' has no option 'rw'"):
        mt.presets.mtard(tiny_net(), *t, weighter={"name": "dwa", "rw": 0.9})
    assert mt.presets.mtard(tiny_net(), *t, weighter={"name": "anl", "rw": 0.5}).weighter.rw == 0.5
    built = mt.ANL(2, rw=0.5)  # a weighter given built ignores the preset's options: refused, not dropped
    with pytest.raises(ValueError, match=r"rw would be ignored: the weighter is given built \(ANL\)"):
        mt.presets.mtard(tiny_net(), *t, weighter=built, rw=0.05)
    assert mt.presets.mtard(tiny_net(), *t, weighter=built).weighter is built


def test_attacks_and_datasets_by_name():
    pgd = ATTACKS.build({"name": "pgd", "steps": 3, "eps": 4 / 255})
    assert isinstance(pgd, mt.PGD) and pgd.steps == 3
    assert set(ATTACKS) >= {"clean", "pgd", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack"}
    with pytest.raises(ValueError, match="attack 'pgd' has no option 'stepz'"):
        ATTACKS.build({"name": "pgd", "stepz": 3})
    with pytest.raises(ValueError, match="unknown attack 'pgx': choose one of"):
        ATTACKS.build("pgx")
    assert {"cifar10", "cifar100"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'cifar11': choose one of cifar10, cifar100"):
        DataConfig(dataset="cifar11")


def test_a_registered_dataset_is_read_by_the_config(tmp_path):
    from multiteach.build import load_splits
    from multiteach.datasets import Dataset

    @DATASETS.register("toy7", "seven toy classes")
    def toy7(data_dir=None, root="data", download=False) -> Dataset:
        a, b = synthetic(200, num_classes=7, seed=0), synthetic(50, num_classes=7, seed=1)
        return Dataset(a, b, num_classes=7)

    try:
        splits = load_splits(DataConfig(dataset="toy7", val_size=14))
        assert splits.num_classes == 7 and len(splits.val) == 14 and len(splits.train) == 186
        assert isinstance(splits.test, Arrays)
    finally:
        DATASETS._entries.pop("toy7")


# ----------------------------------------------------------------------------- acceleration, with fakes
class FakeCapture:
    """Stands in for CapturedCall on the CPU: counts recordings and replays, calls the function eagerly."""

    made = 0
    replays = 0

    def __init__(self, fn):
        FakeCapture.made += 1
        self.fn = fn

    def __call__(self, *args):
        FakeCapture.replays += 1
        return self.fn(*args)


def assert_step_agrees(recipe, eager, x, y):
    """One bf16 step of the accelerated recipe against the eager one, from the same random starts."""
    with torch.autocast("cpu", torch.bfloat16):
        torch.manual_seed(1)
        fast_out = recipe(x, y)
        torch.manual_seed(1)
        eager_out = eager(x, y)
    torch.testing.assert_close(fast_out.losses.float(), eager_out.losses.float(), rtol=0.05, atol=1e-3)


def _accelerated_mtard(seed=0):
    torch.manual_seed(seed)
    recipe = mt.presets.mtard(tiny_net(seed=0), mt.Teacher(tiny_net(seed=1)), mt.Teacher(tiny_net(seed=2)), steps=2,
                              start="uniform", reduction="batchmean")
    eager = copy.deepcopy(recipe)
    assert mt.fast.accelerate(recipe, "bf16") == []  # on the CPU nothing changes without a capture ...
    assert type(recipe.branches[0].transform) is mt.PGD
    mt.fast.accelerate(recipe, "bf16", capture=FakeCapture)  # ... with one, what CUDA gets
    return recipe, eager


def test_the_accelerated_recipe_trains_checkpoints_and_resumes(tmp_path):
    """The CUDA fast path's whole wiring on the CPU, a fake standing in for the graph: the attack replays on the
    BN-folded view refreshed from the live student, teachers run their bf16 folded copies and stay frozen, the
    step agrees with the eager recipe's, and a run stopped after epoch 1 resumes to the same weights."""
    from multiteach.fast import FastTeacher

    recipe, eager = _accelerated_mtard()
    g = recipe.branches[0].transform
    assert isinstance(g, GraphedTransform) and isinstance(g.view, FoldedEval) and g.bound is recipe.student
    assert all(isinstance(t, FastTeacher) for t in recipe.teachers)
    assert recipe.branches[0].teacher is recipe.teachers[0] and recipe.branches[1].teacher is recipe.teachers[1]
    x, y = batch(16)
    assert_step_agrees(recipe, eager, x, y)

    def run(epochs, run_dir):
        r, _ = _accelerated_mtard()
        frozen = [copy.deepcopy(t.model.state_dict()) for t in r.teachers]
        loader = TensorLoader(synthetic(128), 32, shuffle=True, augment=True, drop_last=True, seed=0)
        cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, milestones=[], progress=False, eval_every=1,
                          eval_pgd_steps=1, precision="bf16", ema_decay=0.9, log_every=1)
        res = mt.Trainer(r, loader, cfg, val_loader=TensorLoader(synthetic(32, seed=5), 32), run_dir=run_dir).fit()
        for t, before in zip(r.teachers, frozen):
            for k, v in t.model.state_dict().items():
                assert torch.equal(v, before[k]), k
        return r, res

    FakeCapture.replays = 0
    whole, res = run(2, tmp_path / "whole")
    assert FakeCapture.replays >= 2 * 4 * 3  # 4 steps an epoch, the attack and both teachers replayed
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    view = whole.branches[0].transform.view
    whole.branches[0].transform(whole.student, x, y)  # a replay folds the live weights first
    for conv, bn, folded in view.pairs:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(folded.weight, conv.weight * scale.view(-1, 1, 1, 1))
    run(1, tmp_path / "cut")
    resumed, res2 = run(2, tmp_path / "cut")
    assert res2.epoch == 2
    for k, v in whole.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=0, atol=0, msg=k)



def test_a_whitening_stem_teacher_takes_the_fast_path():
    """cifar_airbench94 as MTARD's natural teacher through the CUDA fast path's wiring on the CPU: its bf16
    BN-folded copy (the fitted stem's buffers converted with it) replays in the step, and the step's losses
    agree with the eager recipe's as for any teacher."""
    from multiteach.fast import FastTeacher
    from multiteach.models import Airbench94

    torch.manual_seed(0)
    nat = Airbench94()
    nat.init_from_data(torch.rand(64, 3, 32, 32))
    recipe = mt.presets.mtard(tiny_net(seed=0), mt.Teacher(tiny_net(seed=1)), mt.Teacher(nat), steps=2,
                              start="uniform", reduction="batchmean")
    eager = copy.deepcopy(recipe)
    mt.fast.accelerate(recipe, "bf16", capture=FakeCapture)
    assert isinstance(recipe.teachers[1], FastTeacher)
    assert_step_agrees(recipe, eager, *batch(16))

def test_an_attack_on_a_frozen_teacher_replays_its_graph_after_the_swap():
    """PGD(model=teacher): after the swap the recipe hands the transform the FastTeacher, which must be the
    model it replays for (not the original, which would run it eagerly every step)."""
    teacher = mt.Teacher(tiny_net(seed=1))
    pgd = mt.PGD(steps=2, model=teacher)
    recipe = Recipe(tiny_net(seed=0), [Branch(pgd, KLDistill(), teacher=teacher)])
    mt.fast.accelerate(recipe, "bf16", capture=FakeCapture)
    g = recipe.branches[0].transform
    assert isinstance(g, GraphedTransform) and g.bound is recipe.teachers[0] and g.model is recipe.teachers[0]
    FakeCapture.replays = 0
    x, y = batch()
    with torch.autocast("cpu", torch.bfloat16):
        recipe(x, y)
    assert FakeCapture.replays == 2  # the attack's graph and the teacher's


def test_what_a_graph_would_freeze_is_not_graph_safe():
    """A PGD that leaves the model's mode as found would replay the recorded mode; one whose ``observe`` has
    side effects would run them once, at recording: neither is recorded unless it says it is safe."""
    class Observing(mt.PGD):
        def observe(self, logits, y):
            pass

    class DeclaredSafe(Observing):
        graph_safe = True

    assert mt.PGD().graph_safe and not mt.PGD(bn_mode="keep").graph_safe
    assert not Observing().graph_safe and DeclaredSafe().graph_safe
    recipe = Recipe(tiny_net(), [Branch(mt.PGD(bn_mode="keep"), CrossEntropy(), name="a"),
                                 Branch(Observing(), CrossEntropy(), name="b")])
    _, transforms, eager = plan(recipe)
    assert transforms == [] and len(eager) == 2 and all("not graph-safe" in e for e in eager)


def test_a_graphed_transform_records_again_when_its_settings_change():
    FakeCapture.made = 0
    student = tiny_net(seed=0).eval()
    pgd = mt.PGD(steps=2, start="none")
    lines = []
    g = GraphedTransform(pgd, student, student, capture=FakeCapture, log=lines.append)
    x, y = batch()
    assert torch.equal(g(student, x, y), pgd(student, x, y))
    assert g.recorded == 1 and FakeCapture.made == 1
    g.eps = 2 / 255  # set on the wrapper: it is the wrapped transform's setting
    assert pgd.eps == 2 / 255
    g(student, x, y)
    assert g.recorded == 2 and "settings changed" in lines[-1] and "eps" in lines[-1]
    g(student, x, y)
    assert g.recorded == 2  # unchanged settings replay
    other = tiny_net(seed=1).eval()
    assert torch.equal(g(other, x, y), pgd(other, x, y))  # another model: eager
    with pytest.raises(ValueError, match="not graph-safe"):
        GraphedTransform(CallableTransform(lambda m, x, y: x), student, student)


def test_the_fast_path_plan_names_what_stays_eager():
    peer = mt.Teacher(tiny_net(seed=3), trainable=True, loss=peer_loss)
    frozen = mt.Teacher(tiny_net(seed=1))
    hint_teacher = mt.Teacher(tiny_net(seed=2))
    shift = CallableTransform(lambda m, x, y: x)
    recipe = Recipe(tiny_net(seed=0), [
        Branch(mt.PGD(steps=1), KLDistill(), teacher=frozen, name="adv"),
        Branch(shift, KLDistill(), teacher=peer, name="peer"),
        Branch(mt.Clean(), FeatureHint(16, 16), teacher=hint_teacher, student_layer="layer2",
               teacher_layer="layer2", name="hint"),
    ])
    teachers, transforms, eager = plan(recipe)
    assert teachers == [frozen] and [type(t) for t in transforms] == [mt.PGD]
    assert any("trainable" in e for e in eager) and any("features" in e for e in eager)
    assert any("not graph-safe" in e for e in eager)


def test_the_eval_view_has_no_dropout_even_when_built_in_train_mode():
    class DropNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

        def forward(self, x):
            x = F.relu(self.bn(self.conv(x)))
            x = F.dropout(x, 0.5, self.training)  # functional dropout: fx would bake `training` at trace time
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    net = DropNet()
    net.bn.running_mean.normal_()
    net.bn.running_var.uniform_(0.5, 2)
    net.train()  # the student is in train mode when the trainer builds its attack view
    view = FoldedEval(net)
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        a, b = view(x), view(x)
        net.eval()
        want = net(x)
    assert torch.equal(a, b) and torch.allclose(a, want, atol=1e-5)


# ----------------------------------------------------------------------------- optimizers and schedules
def test_optimizers_by_name_with_options():
    params = [nn.Parameter(torch.zeros(2))]
    cfg = TrainConfig(optimizer="AdamW", optimizer_options={"betas": [0.9, 0.95]}, lr=1e-3, weight_decay=0.05)
    opt = student_optimizer(cfg, params, [], torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    sgd = student_optimizer(TrainConfig(nesterov=True), params, [], torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    with pytest.raises(ValueError, match="unknown optimizer 'adamz': use a torch.optim class"):
        optimizer_class("adamz")
    with pytest.raises(ValueError, match="optimizer AdamW has no option 'momentun'"):
        student_optimizer(cfg.model_copy(update={"optimizer_options": {"momentun": 0.9}}), params, [],
                          torch.device("cpu"))



def test_a_networks_lr_multipliers_and_data_init_reach_the_trainer(tmp_path):
    """cifar_airbench94 through build_trainer: its whitening stem is fitted to the first training images before
    the EMA copy is made (the EMA would otherwise average towards an unfitted stem), its BN biases train at 64x
    the LR with the weight decay / 64 at every step of the schedule (set_lr keeps each group's multiplier), and
    what it froze (the stem's filters, the BN scales) does not move."""
    from multiteach import build
    from multiteach.data import Images
    from multiteach.models.airbench import WhiteningConv

    cfg = mt.ExperimentConfig(
        preset="natural", student={"model": "cifar_airbench94"}, data={"train_size": 96, "val_size": 0},
        train={"epochs": 2, "batch_size": 32, "lr": 0.05, "weight_decay": 1e-3, "schedule": "cosine",
               "milestones": [], "ema_decay": 0.9, "device": "cpu", "progress": False, "eval_every": 0},
        run_dir=str(tmp_path / "run"))
    splits = build.load_splits(cfg.data, synthetic_data=True)
    trainer = build.build_trainer(cfg, splits=splits)
    student = trainer.recipe.student
    want = WhiteningConv()
    want.fit(Images(splits.train.x))  # its 96 images: fewer than the 5,000 drawn
    stem = student.stem[0]
    assert torch.allclose(stem.weight, want.weight) and torch.allclose(stem.offset, want.offset)
    assert torch.equal(trainer.ema.module.stem[0].weight, stem.weight)
    biases = {id(p) for n, p in student.named_parameters() if n in student.param_lr_scales()}
    fast = [g for g in trainer.optimizer.param_groups if g["lr_scale"] == 64.0]
    plain = [g for g in trainer.optimizer.param_groups if g["lr_scale"] == 1.0]
    assert len(fast) == len(plain) == 1 and {id(p) for p in fast[0]["params"]} == biases
    assert fast[0]["weight_decay"] == pytest.approx(1e-3 / 64) and plain[0]["weight_decay"] == pytest.approx(1e-3)
    frozen = stem.weight.clone()
    assert trainer.fit().status == "finished"
    assert fast[0]["lr"] == pytest.approx(64 * plain[0]["lr"]) and 0 < plain[0]["lr"] < 0.05  # the last step's
    assert torch.equal(stem.weight, frozen) and not torch.equal(stem.bias, want.bias)
    assert all(torch.all(m.weight == 1) for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    given = student.state_dict()
    given["stem.0.weight"] = 2 * given["stem.0.weight"]  # a stem fitted elsewhere: kept, not refitted here
    mt.atomic_save({"model": given}, tmp_path / "given.pt")
    cfg2 = cfg.model_copy(update={"student": mt.ModelConfig(model="cifar_airbench94",
                                                            checkpoint=str(tmp_path / "given.pt")),
                                  "run_dir": str(tmp_path / "run2")})
    again = build.build_trainer(cfg2, splits=splits).recipe.student
    assert torch.equal(again.stem[0].weight, given["stem.0.weight"])

def test_schedules():
    cos = TrainConfig(epochs=10, schedule="cosine")
    assert [lr_factor(cos, e) for e in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-9)
    one = TrainConfig(epochs=10, schedule="onecycle")
    assert lr_factor(one, 0) == pytest.approx(1 / 25)
    assert lr_factor(one, 3) == pytest.approx(1.0)  # the peak at 30%
    assert lr_factor(one, 10) == pytest.approx(1 / 25e4)
    steps = TrainConfig(epochs=10, schedule="piecewise", milestones=[3, 6], gamma=0.1, warmup_epochs=1)
    assert [lr_factor(steps, e) for e in (0.5, 2, 4, 7)] == pytest.approx([0.5, 1.0, 0.1, 0.01])


def test_a_fast_teacher_keeps_the_gradient_of_an_attack_through_it():
    """Under autocast a FastTeacher replays a no-grad graph; an input that needs its gradient (AdaAD's attack
    through the teacher) must run the folded copy instead, or the teacher's part of the gradient is lost."""
    from multiteach.fast import FastTeacher

    teacher = mt.Teacher(tiny_net(seed=1))
    fast = FastTeacher(teacher, None, graphs=False)
    calls = []
    object.__setattr__(fast, "_replay", lambda x: calls.append(x) or fast.fast(x).detach())
    x = torch.rand(4, 3, 32, 32)
    with torch.autocast("cpu", torch.bfloat16):
        fast(x)
        assert len(calls) == 1  # a plain forward replays
        z = x.clone().requires_grad_(True)
        fast(z).float().sum().backward()
    assert len(calls) == 1 and z.grad is not None and z.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(fast(x), teacher(x))  # fp32 (no autocast): the exact model
