import argparse
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from multiteach.evaluation import Report, TimedEvaluation
from multiteach.pipeline import run_command
from tests.conftest import SHARED

EXAMPLES = Path(__file__).parents[1] / "examples"


def load(name: str, folder: Path = EXAMPLES):
    """An example (or, with ``folder``, a benchmark) script as a module."""
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_benchmark(name: str):
    return load(name, Path(__file__).parents[1] / "benchmarks")


REFERENCE = Path(__file__).parents[1] / "benchmarks" / "reference.sh"
TABLE2_PRESETS = ["rslad", "rslad:steps=2"]  # a preset distilling from the cached adversarial teacher, and a lever


def run_reference(out: Path, run_dir: Path, data: Path, budget: int, *extra: str,
                  wall: str = "") -> subprocess.CompletedProcess:
    """benchmarks/reference.sh in tiny mode, as CI can run it (pydantic installed, data given). Its SIGTERM
    comes 10 minutes past the budget, not one: on a loaded machine a 1-s budget's minimal stages took 66 s."""
    env = {**os.environ, "PLAN": "tiny", "BUDGET": str(budget), "DATA_DIR": str(data), "RUN_DIR": str(run_dir),
           "GRACE": "600", "WALL": wall,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(REFERENCE), str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=900)


def test_reference_wrapper_then_three_teachers_reusing_the_cached_teachers(cifar_slice, tmp_path, monkeypatch):
    """benchmarks/reference.sh (tiny plan, ample budget) on a slice of CIFAR-10: teachers, student, the table
    with the teacher's rows and AutoAttack, at most 8 files out; the same command stopped by SIGTERM in its
    evaluation keeps the rows before it (exit 3); then the N = 3 example under the same budget, which must reuse
    the two cached teachers and train only the third; table2.py (no budget) trains its own teacher. The budget
    (ten hours, for minutes of work) leaves every row room on a loaded machine too, where AutoAttack's predicted
    cost, bound by single-image latency (6,900 sequential passes), runs to half an hour."""
    out, run_dir = tmp_path / "out", tmp_path / "ref"
    short = ["--nat-epochs", "2", "--adv-epochs", "1"]
    proc = run_reference(out, run_dir, cifar_slice, 36000, "--eval-n", "100", "--slow-n", "4", "--epochs", "2",
                         "--eval-tf32", *short)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Test set, n = 100 (fp32, TF32 allowed" in proc.stdout.split("stage times {")[-1]  # the table, last
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    assert {"eval.json", "reference.log", "metrics.jsonl", "losses.png", "weights.png", "accuracy.png"} <= set(files)
    result = json.loads((out / "eval.json").read_text())
    rows = {r["attack"]: r for r in result["rows"]}
    assert set(rows) == {"fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack", "pgd_sat_fp32"}
    assert result["tf32"] and rows["pgd_sat_fp32"]["settings"].endswith("(fp32)") and rows["pgd_sat_fp32"]["n"] == 100
    assert rows["autoattack"]["n"] == 4 and rows["pgd_sat"]["n"] == 100
    for r in rows.values():
        assert 0 <= r["robust"] <= r["clean"] <= 1  # on the same images, an attack never helps
    student_key, nat_key, teacher_key = result["models"]  # each labelled with the weights it was selected as
    assert re.fullmatch(r"mtard student \(cifar_resnet8, (raw|ema) weights, epoch \d+\)", student_key)
    assert re.fullmatch(r"nat teacher \(cifar_resnet8, (raw|ema) weights, epoch \d+\)", nat_key)
    assert re.fullmatch(r"adv teacher \(cifar_resnet8, SAT, (raw|ema) weights, epoch \d+\)", teacher_key)
    teacher = result["models"][teacher_key]
    assert {r["attack"] for r in teacher["rows"]} >= {"pgd_sat", "fgsm", "pgd_trades", "cw_inf"}
    theirs = {r["attack"]: r for r in teacher["rows"]}  # the MTARD vs SAT comparison, on the same images
    assert set(result["w_robust_gap"]) == {"fgsm", "pgd_sat", "pgd_trades", "cw_inf", "autoattack"}
    for attack, gap in result["w_robust_gap"].items():
        mine, other = rows[attack], theirs[attack]
        assert gap == pytest.approx(50 * (mine["clean"] + mine["robust"] - other["clean"] - other["robust"]), abs=0.01)
    assert "W-Robust, student - adversarial teacher (points): fgsm" in proc.stdout
    assert 0 < result["nat_teacher_clean"] <= 1
    assert set(result["budget"]["stages"]) == {"nat", "adv", "student"}
    if SHARED.is_dir():  # better than chance on the real slice (the natural teacher: the 2-epoch MTARD student
        assert result["nat_teacher_clean"] > 0.15  # of this tiny run can sit at chance)

    # the same command again (every stage finished: skipped), a SIGTERM in its third row: the rows before it
    # are kept in eval.json and the table, the command ends in one line with exit code 3
    example = load("mtard_cifar")
    row, calls = TimedEvaluation.row, []

    def row_then_sigterm(self, *args, **kwargs):
        calls.append((args[0].split()[0], args[2]))  # (model name, model, row name, attack)
        if args[2] == "autoattack":
            signal.raise_signal(signal.SIGTERM)
        return row(self, *args, **kwargs)

    monkeypatch.setattr(TimedEvaluation, "row", row_then_sigterm)
    [student] = (run_dir / "run").iterdir()  # the wrapper's: named by its configuration
    assert re.fullmatch(r"mtard-[0-9a-f]{8}", student.name)
    seconds = result["budget"]["stages"]["student"]["allotted_s"]  # what a lever's --student-seconds like:mtard reads
    assert example.allotted_student_seconds("mtard", run_dir / "run") == (seconds, student / "eval.json")
    argv = ["--plan", "tiny", "--budget", "36000", "--data-dir", str(cifar_slice), "--run-dir", str(run_dir / "run"),
            "--teacher-cache", str(run_dir / "teachers"), "--folder-by-config", "--quiet", "--eval-n", "100",
            "--epochs", "2", "--autoattack", "--slow-n", "4", *short]  # other evaluation flags: the same student
    with pytest.raises(SystemExit) as stop:
        run_command(lambda: example.main(argv))
    monkeypatch.undo()
    # the teacher's whole row before AutoAttack, whose last call a budget may cut (H200 run 6 lost the row so)
    attacks = ["fgsm", "pgd_sat", "pgd_trades", "cw_inf"]
    assert stop.value.code == 3 and calls == [*(("mtard", a) for a in attacks), ("adv", "pgd_sat"),
                                              *(("adv", a) for a in attacks if a != "pgd_sat"), ("mtard", "autoattack")]
    assert list((run_dir / "run").iterdir()) == [student]  # found finished, evaluated again: not retrained
    stopped = json.loads((student / "eval.json").read_text())
    assert [r["attack"] for r in stopped["rows"]] == attacks and stopped["stopped"]
    assert len(stopped["models"][teacher_key]["rows"]) == 4 and set(stopped["w_robust_gap"]) == set(attacks)
    assert stopped["skipped"] == ["the rest (stopped by a signal)"]
    # what like:mtard reads after this call: the seconds the student trained in, not those the budget had left now
    assert stopped["budget"]["stages"]["student"]["allotted_s"] == seconds

    cache = run_dir / "teachers"
    entries = sorted(cache.iterdir())
    assert [e.name.split("-")[0] for e in entries] == ["natural", "sat"]
    stamps = {e: (e / "done.json").stat().st_mtime_ns for e in entries}
    common = ["--tiny", "--data-dir", str(cifar_slice), "--teacher-cache", str(cache), "--quiet", *short]
    report3 = load("three_teachers").main([*common, "--budget", "36000", "--run-dir", str(tmp_path / "three"),
                                           "--epochs", "1", "--eval-n", "100"])
    assert {e: (e / "done.json").stat().st_mtime_ns for e in entries} == stamps  # reused, not retrained
    assert len(list(cache.iterdir())) == 3  # + the L2 teacher
    rows3 = {r["attack"]: r for r in report3["rows"]}
    assert "pgd_l2" in rows3 and rows3["pgd_l2"]["settings"].startswith("L2 eps 0.5")
    metrics = [json.loads(line) for line in (tmp_path / "three" / "mtard3" / "metrics.jsonl").read_text().split("\n")
               if line]
    last = [m for m in metrics if m["type"] == "step"][-1]
    assert len(last["w"]) == 3 and abs(sum(last["w"]) - 1) < 1e-5

    # benchmarks/table2.py on any subset of presets: without a budget, its own adversarial teacher (a budgeted
    # stage is named by its share of the budget), the budgeted ones left as they were
    table2 = load_benchmark("table2")
    results = table2.main([*common, "--run-dir", str(tmp_path / "t2"), "--epochs", "1", "--eval-n", "50",
                           "--teacher-row", "--presets", *TABLE2_PRESETS])
    teacher_row = results.pop("adv teacher (SAT)")  # first; its eval.json in the run folder, not the shared cache
    assert json.loads((tmp_path / "t2" / "adv_teacher" / "eval.json").read_text())["rows"] == teacher_row["rows"]
    assert not any(tmp_path.glob("**/teachers/*/eval.json"))
    assert list(results) == TABLE2_PRESETS
    assert all(r["n"] == 50 and {x["attack"] for x in r["rows"]} >= {"fgsm", "pgd_sat"} for r in results.values())
    table2_json = json.loads((tmp_path / "t2" / "table2.json").read_text())
    assert table2_json["results"].keys() == {"adv teacher (SAT)", *TABLE2_PRESETS}
    assert {f"{spec}_s" for spec in TABLE2_PRESETS} <= table2_json["timings"].keys()  # each student its own time
    assert sorted(p.name for p in (tmp_path / "t2").iterdir()) == ["adv_teacher", "rslad", "rslad-steps=2",
                                                                   "table2.json"]
    lever = json.loads((tmp_path / "t2" / "rslad-steps=2" / "run.json").read_text())["experiment"]["config"]
    assert lever["options"]["steps"] == 2
    assert {e: (e / "done.json").stat().st_mtime_ns for e in entries} == stamps
    assert len(list(cache.iterdir())) == 4  # + table2's unbudgeted SAT teacher


def test_reference_wrapper_out_of_time_still_ends_with_an_evaluated_student(cifar_slice, tmp_path):
    """A budget far too small: every stage trains its minimum (one epoch), the student's PGD_SAT row runs
    regardless, the rows that do not fit are listed as skipped, and the run exits 0 with its table. WALL reaches
    the example as its hard deadline (here after the budget's end: the budget binds). A lever's --option names
    the student in the table and eval.json (an MTARD student with fixed weights is not ANL's)."""
    out = tmp_path / "out"
    lever = 'weighter={name="fixed", weights=[0.75, 0.25]}'
    proc = run_reference(out, tmp_path / "ref", cifar_slice, 1, "--eval-n", "32", "--option", lever, wall="900")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert [r["attack"] for r in result["rows"]] == ["pgd_sat"]
    assert result["options"] == [lever] and next(iter(result["models"])).startswith(f"mtard student [{lever}] (")
    # printed as written, not taken for rich markup (which dropped "[...]" silently)
    table = load("mtard_cifar").reference_rich_table(
        {"mtard student [beta=2] (x)": Report(n=1, meta={"clean": 0.5})}, {}, ["mtard student [beta=2] (x)/fgsm"])
    console = Console(width=300, file=io.StringIO())
    console.print(table)
    assert console.file.getvalue().count("mtard student [beta=2] (x)") == 2
    assert result["skipped"] and all(s["spent_s"] > 0 for s in result["budget"]["stages"].values())
    assert result["budget"]["deadline_in_s"] == 900 - 5 - 2  # WALL less its kill's 5 s and the tiny exit margin
    assert "Test set, n = 32" in proc.stdout


def test_the_paper_plan_trains_every_stage_with_its_official_settings(cifar_slice, tmp_path):
    """--plan paper: ResNet-56 natural and TRADES WRN-34-10 teachers and the ResNet-18 MTARD student, each with
    its preset's official schedule and MTARD's published settings (checked on the configs; training takes hours)."""
    example = load("mtard_cifar")
    run = example.Pipeline(example.parser().parse_args(
        ["--plan", "paper", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path / "runs")]))
    nat, adv = run.teacher_config("nat"), run.teacher_config("adv")
    assert (nat.preset, nat.student.model, adv.preset, adv.student.model) == (
        "natural", "cifar_resnet56", "trades", "cifar_wrn34_10")
    assert (nat.train.epochs, nat.train.milestones, nat.train.select) == (200, [100, 150], "clean")
    assert (adv.train.epochs, adv.train.milestones, adv.train.weight_decay) == (76, [75], 2e-4)
    for name in ("a.pt", "n.pt"):  # teachers' checkpoints must exist (their contents are read at training)
        (tmp_path / name).write_bytes(b"")
    student = run.student_config("mtard", {"adv": ("cifar_wrn34_10", str(tmp_path / "a.pt")),
                                           "nat": ("cifar_resnet56", str(tmp_path / "n.pt"))})
    t = student.train
    assert (student.student.model, t.epochs, t.milestones, t.batch_size, t.lr, t.weight_decay, t.momentum) == (
        "cifar_resnet18", 300, [215, 260, 285], 128, 0.1, 2e-4, 0.9)
    assert t.ema_decay is None and t.time_budget_s is None and t.schedule == "piecewise"
    recipe = example.get_preset("mtard").fn("cifar_resnet8", "cifar_resnet8", "cifar_resnet8", **student.options)
    pgd = recipe.branches[0].transform
    assert (pgd.steps, pgd.start, pgd.alpha) == (10, "normal", 2 / 255) and recipe.branches[0].loss.reduction == "mean"
    nfgsm = example.Pipeline(example.parser().parse_args(  # another teacher preset: its own settings, all of them
        ["--plan", "paper", "--adv-preset", "nfgsm", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path)]))
    t = nfgsm.teacher_config("adv").train
    assert (t.epochs, t.schedule, t.cycle_momentum, t.lr, t.weight_decay) == (30, "cyclic", 0.8, 0.2, 5e-4)


def test_the_adversarial_teacher_can_come_from_another_preset(cifar_slice, tmp_path):
    """--adv-preset nfgsm: the plan's teacher options go where that preset takes them (no PGD steps for N-FGSM,
    nor their step size: N-FGSM's ``alpha`` is its one step, eps by default)."""
    example = load("mtard_cifar")
    run = example.Pipeline(example.parser().parse_args(
        ["--plan", "speedrun", "--adv-preset", "nfgsm", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path)]))
    adv = run.teacher_config("adv")
    assert adv.preset == "nfgsm" and adv.options == {"bn_mode": "eval"} and adv.student.model == "cifar_resnet18"
    assert run.teacher_config("nat").preset == "natural"
    args = ["--plan", "speedrun", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path)]
    smooth = example.Pipeline(example.parser().parse_args(
        [*args, "--adv-option", "label_smoothing=0.1", "--adv-option", "steps=7"])).teacher_config("adv")
    # steps given without a step size: the preset's own (PGD-7 of 2/255), not the plan's step for five steps
    assert smooth.preset == "sat" and smooth.options == {"steps": 7, "bn_mode": "eval", "label_smoothing": 0.1}
    run2 = example.Pipeline(example.parser().parse_args([*args, "--adv-option", "alpha=0.01568627450980392"]))
    assert run2.teacher_config("adv").options == {"steps": 5, "alpha": 4 / 255, "bn_mode": "eval"}  # H200 run 2's
    trades = example.Pipeline(example.parser().parse_args([*args, "--adv-preset", "trades"])).teacher_config("adv")
    assert trades.options == {"steps": 5, "alpha": 2 / 255}  # the plan's PGD-5 where the preset runs a PGD
    with pytest.raises(ValueError, match="not an option of preset 'sat'"):
        example.Pipeline(example.parser().parse_args([*args, "--adv-option", "k=3"])).teacher_config("adv")



def test_a_natural_teacher_that_comes_with_its_own_recipe_trains_with_it(cifar_slice, tmp_path):
    """--nat-arch cifar_airbench94: airbench94's settings (Nesterov 0.85, one-cycle, label smoothing 0.2, its LR
    per example) over the plan's, the plan's EMA and validation kept; on a small split a smaller batch, its LR
    scaled with it. ResNet-18's natural teacher keeps the plan's batch 512 / lr 0.4. --nat-option goes over the
    network's recipe; a bad one is refused."""
    example = load("mtard_cifar")
    run = example.Pipeline(example.parser().parse_args(
        ["--plan", "speedrun", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path)]))
    nat = run.teacher_config("nat", "cifar_airbench94")
    batch = min(1024, len(run.splits.train) // 10)
    assert nat.preset == "natural" and nat.student.model == "cifar_airbench94"
    assert nat.options == {"label_smoothing": 0.2}
    t = nat.train
    assert (t.batch_size, t.momentum, t.nesterov, t.schedule, t.warmup_epochs) == (batch, 0.85, True, "onecycle", 0)
    assert t.lr == pytest.approx(1.5 * batch / 1024) and t.weight_decay == pytest.approx(0.0153 / 11.5)
    assert t.ema_decay == 0.999 and t.epochs == 60
    assert run.teacher_config("nat") == nat  # the speedrun's natural teacher (H200 run 6)
    plain = run.teacher_config("nat", "cifar_resnet18").train
    assert (plain.batch_size, plain.lr, plain.momentum, plain.schedule) == (512, 0.4, 0.9, "cosine")
    args = ["--plan", "speedrun", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path)]
    sharp = example.Pipeline(example.parser().parse_args([*args, "--nat-option", "label_smoothing=0"]))
    assert sharp.teacher_config("nat", "cifar_airbench94").options == {"label_smoothing": 0}  # over the recipe's
    with pytest.raises(ValueError, match="not an option of preset 'natural'"):
        example.Pipeline(example.parser().parse_args([*args, "--nat-option", "steps=3"])).teacher_config("nat")
    (tmp_path / "n.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="--nat-option sets how the nat teacher trains, and --nat-teacher"):
        example.main([*args, "--nat-option", "label_smoothing=0", "--nat-teacher", str(tmp_path / "n.pt")])

def student_teachers(folder: Path) -> dict[str, tuple[str, str]]:
    return {"adv": ("cifar_resnet18", str(folder / "a.pt")), "nat": ("cifar_resnet18", str(folder / "n.pt"))}


def test_every_lever_is_a_command_line_option_and_bad_values_end_before_any_training(cifar_slice, tmp_path, capsys):
    """--option (the student's preset: the KL reduction, ANL's beta, ...) and --share (the budget's split) reach
    the stage they set, over the plan's; a bad name or value ends the command in one line with exit code 2
    before any stage trains (not when the student's stage starts, minutes into a run)."""
    example = load("mtard_cifar")
    args = ["--plan", "speedrun", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path / "runs")]
    run = example.Pipeline(example.parser().parse_args(
        [*args, "--budget", "540", "--share", "adv=0.45", "--share", "student=0.45"]))
    assert run.budget.shares == {"nat": 0.085, "adv": 0.45, "student": 0.45}
    airbench = run.planned_teacher("nat", model="cifar_airbench")  # --nat-arch: its own cache entry, not the plan's
    assert airbench[0] == "cifar_airbench" and airbench[1] != run.planned_teacher("nat")[1]
    for name in ("a.pt", "n.pt"):
        (tmp_path / name).write_bytes(b"")
    given = example.given_options("--option", ["reduction=mean", "beta=2"], "mtard")
    student = run.student_config("mtard", student_teachers(tmp_path), given)
    assert student.options == {"steps": 5, "alpha": 4 / 255, "start": "uniform", "reduction": "mean", "beta": 2}
    assert student.run_dir == str(tmp_path / "runs" / "mtard")
    assert run.options("student", "mtard", {"steps": 10}) == {"steps": 10, "reduction": "batchmean", "start": "uniform"}
    assert run.options("student", "mtard", {"steps": 10, "alpha": 0.01}) == {
        "steps": 10, "alpha": 0.01, "reduction": "batchmean", "start": "uniform"}
    assert example.student_folder("mtard", ["reduction=mean", "weighter={name='dwa'}"]) == \
        "mtard-reduction=mean-weighter=_name=_dwa__"  # a student with other options: its own folder
    recipe = example.get_preset("mtard").fn("cifar_resnet8", "cifar_resnet8", "cifar_resnet8", **student.options)
    assert recipe.branches[0].loss.reduction == "mean" and recipe.weighter.beta == 2
    # levers as the command line writes them: fixed weights and a one-step attack (measured on the CPU plan,
    # RESULTS.md), and run 1's training attack (2/255 steps from x + 0.001 N, also measured there)
    def lever(*pairs: str):
        options = {**run.options("student", "mtard"), **example.given_options("--option", list(pairs), "mtard")}
        return example.get_preset("mtard").fn("cifar_resnet8", "cifar_resnet8", "cifar_resnet8", **options)

    recipe = lever('weighter={name="fixed", weights=[0.75, 0.25]}', "steps=1", "alpha=0.04")
    assert recipe.weighter.weights.tolist() == [0.75, 0.25]
    pgd = recipe.branches[0].transform
    assert (pgd.steps, pgd.alpha, pgd.start) == (1, 0.04, "uniform")
    pgd = lever("alpha=0.00784313725490196", "start=normal").branches[0].transform
    assert (pgd.steps, pgd.alpha, pgd.start) == (5, 2 / 255, "normal")
    ablation = run.student_config("baseline_mt", student_teachers(tmp_path), allot=False)  # next GPU call, 2nd
    assert ablation.options == {"steps": 5, "alpha": 4 / 255, "reduction": "batchmean", "start": "uniform"}
    balanced = run.student_config("bmtard", student_teachers(tmp_path), allot=False)  # B-MTARD: only T differs
    adv_only = {"adv": student_teachers(tmp_path)["adv"]}
    alone = run.student_config("baseline", adv_only, allot=False)  # the adversarial teacher alone
    assert balanced.options == alone.options == ablation.options
    recipe = example.get_preset("bmtard").fn("cifar_resnet8", "cifar_resnet8", "cifar_resnet8", **balanced.options)
    assert recipe.branches[0].loss.reduction == "batchmean" and recipe.branches[0].transform.start == "uniform"
    timed = example.Pipeline(example.parser().parse_args([*args, "--budget", "540", "--student-seconds", "150"]))
    for allot in (False, True):  # under the time left (219.5 s is the student's nominal share), the cap names it
        t = timed.student_config("mtard", student_teachers(tmp_path), allot=allot).train
        assert t.stage_budget_s == 150 and t.time_budget_s == (150 if allot else None)
    assert timed.budget.allotted["student"] == 150  # the seconds it is given, which like:RUN reads
    assert timed.teacher_config("adv", allot=False).train.stage_budget_s == round(timed.budget.nominal("adv"), 1)
    ample = example.Pipeline(example.parser().parse_args([*args, "--budget", "540", "--student-seconds", "300"]))
    t = ample.student_config("mtard", student_teachers(tmp_path)).train  # above the share: still its own name
    # (its share of the time before the 35 s a table without AutoAttack needs, not before the 160-s reserve)
    assert t.stage_budget_s == 300 and t.time_budget_s == pytest.approx((540 - 8 - 35) * 0.59, abs=1)
    assert ample.budget.allotted["student"] == t.time_budget_s
    walled = example.Pipeline(example.parser().parse_args(  # a call with 300 s left of a 540-s budget
        [*args, "--budget", "540", "--wall", "300", "--started-at", str(time.time()), "--student-seconds", "250",
         "--autoattack"]))
    t = walled.student_config("mtard", student_teachers(tmp_path)).train  # its share of the time to its wall
    assert t.stage_budget_s == 250 and t.time_budget_s == pytest.approx((300 - 8 - 160) * 0.59, abs=1)
    lean = example.Pipeline(example.parser().parse_args(  # no AutoAttack row: the student keeps back 35 s, not 160
        [*args, "--budget", "540", "--wall", "300", "--started-at", str(time.time()), "--no-autoattack"]))
    for role in ("nat", "adv"):  # the teachers keep back the whole reserve: one teacher per name
        assert lean.teacher_config(role).train.time_budget_s == pytest.approx(lean.budget.allotted[role])
        lean.budget.finish(role)
    assert lean.budget.allotted["adv"] == pytest.approx((300 - 8 - 160) * 0.325 / 0.915, abs=1)
    t = lean.student_config("mtard", student_teachers(tmp_path)).train
    # the teachers took no time here: the student gets all of it up to the wall, less the 35 s
    assert t.time_budget_s == pytest.approx(300 - 8 - 35, abs=1)
    assert t.stage_budget_s == round(walled.budget.nominal("student"), 1)
    assert walled.budget.nominal("adv") == timed.budget.nominal("adv")  # the teachers' names: the budget's
    assert walled.budget.summary()["deadline_in_s"] == 300 - 8
    alone = example.Pipeline(example.parser().parse_args([*args, "--student-seconds", "30"]))
    # AutoAttack's images: all of them without a budget (the protocol), the plan's first 1,000 under one
    assert alone.slow_n(10000) == 10000 and timed.slow_n(10000) == 1000 and timed.slow_n(500) == 500
    assert example.Pipeline(example.parser().parse_args([*args, "--slow-n", "250"])).slow_n(10000) == 250
    t = alone.student_config("mtard", student_teachers(tmp_path)).train
    assert t.stage_budget_s == 30 and t.time_budget_s == 30
    assert alone.teacher_config("adv").train.time_budget_s is None  # the teachers are not capped
    assert example.parser().parse_args([*args, "--autoattack", "--no-autoattack"]).autoattack is False
    assert example.parser().parse_args([*args, "--autoattack"]).autoattack is True

    bad = {"--option reduction=maen": "reduction", "--option bogus=1": "not an option of preset 'mtard'",
           "--adv-option steps=0": "steps must be >= 1", "--share adv=1": "give --budget",
           "--budget 60 --share adv=0": "positive weight", "--budget 60 --share teacher=1": "one of nat, adv, student",
           "--budget 60 --share adv=inf": "positive weight", "--wall 200": "--wall shapes a time budget",
           "--budget 60 --wall 0": "--wall: give the seconds", "--budget 60 --wall nan": "--wall: give the seconds",
           "--budget 540 --wall 300": "--wall 300 is shorter than --budget 540, and the nat and adv teachers are not "
                                      "cached",
           "--preset rslad --option beta=1": "not an option of preset 'rslad'",
           "--student-seconds 0": "--student-seconds: give seconds (> 0) or like:RUN",
           "--student-seconds like:mtard": "--student-seconds like:mtard: no evaluated run found",
           "--adv-arch cifar_resnet9": "--adv-arch: unknown model 'cifar_resnet9' (did you mean cifar_resnet8",
           "--student cifar_airbnch": "--student: unknown model", "--nat-arch resnet_18": "--nat-arch: unknown"}
    for flags, why in bad.items():
        with pytest.raises(SystemExit) as stop:
            run_command(lambda f=flags: example.main([*args, "--quiet", *f.split()]))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and why in err and "Traceback" not in err, (flags, err)
    assert not (tmp_path / "teachers").exists() and not (tmp_path / "runs").exists()  # nothing trained


def test_reference_wrapper_stops_the_example_before_wall_whatever_the_budget(cifar_slice, tmp_path):
    """WALL, a device call's limit, stops the example (SIGTERM) 5 s before it, under a budget of ten hours: a
    lever's call keeps the reference's budget (its cached teachers' names) and still ends, with what it finished,
    before the caller's kill. Here WALL leaves no time at all: timeout's exit 124, the wrapper's last line."""
    proc = run_reference(tmp_path / "out", tmp_path / "ref", cifar_slice, 36000, "--eval-n", "100", wall="6")
    assert proc.returncode == 124, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference run: exit 124" in proc.stdout
    assert not any((tmp_path / "ref").rglob("done.json"))  # stopped before any stage finished


def test_student_seconds_like_a_run_reads_the_seconds_its_student_was_allotted(tmp_path):
    """--student-seconds like:RUN times a lever's student like a finished reference's (the next GPU session's
    second call, on a machine that stays warm for seconds only): the newest run of the preset without options,
    or the folder given; a run without a budget, or none, is refused with what to do instead."""
    example = load("mtard_cifar")
    runs = tmp_path / "run"

    def finished(name: str, allotted: float | None, age: int) -> Path:
        folder = runs / name
        folder.mkdir(parents=True)
        budget = {"stages": {"student": {"allotted_s": allotted, "spent_s": 1.0}}} if allotted else {}
        (folder / "eval.json").write_text(json.dumps({"budget": budget}))
        os.utime(folder / "eval.json", (time.time() - age, time.time() - age))
        return folder

    older, newer = finished("mtard-0123abcd", 201.3, 60), finished("mtard-89abcdef", 213.4, 30)
    finished("mtard-beta=2-fedcba98", 99.0, 0)  # a lever of the preset: newest, but not the preset's own run
    finished("baseline-76543210", 55.0, 0)
    assert example.allotted_student_seconds("mtard", runs) == (213.4, newer / "eval.json")
    assert example.allotted_student_seconds(str(older), runs) == (201.3, older / "eval.json")
    assert example.allotted_student_seconds(str(older / "eval.json"), runs)[0] == 201.3
    assert example.student_seconds("like:mtard") == "like:mtard" and example.student_seconds("150") == 150.0
    for bad in ("0", "-1", "nan", "inf", "like:", "ten"):
        with pytest.raises(argparse.ArgumentTypeError, match="give seconds"):
            example.student_seconds(bad)
    unbudgeted = finished("natural-0f0f0f0f", None, 0)
    with pytest.raises(ValueError, match="records no budgeted student stage"):
        example.allotted_student_seconds(str(unbudgeted), runs)
    with pytest.raises(ValueError, match="no evaluated run found"):
        example.allotted_student_seconds("rslad", runs)


def test_table2_trains_a_lever_per_preset_spec_and_refuses_a_bad_one_before_any_training(cifar_slice, tmp_path,
                                                                                          capsys):
    table2 = load_benchmark("table2")
    assert table2.parse_spec("mtard:beta=2,steps=7") == ("mtard", ({"beta": 2, "steps": 7}, "mtard-beta=2-steps=7"))
    assert table2.parse_spec("baseline_mt") == ("baseline_mt", ({}, "baseline_mt"))
    args = ["--tiny", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path / "t2"), "--quiet", "--presets"]
    bad = {"mtard:bogus=1": "--presets mtard:bogus=1: bogus: not an option of preset 'mtard'",
           "mtard:beta": "write KEY=VALUE", "nosuch": "unknown preset 'nosuch'", "mtard:": "given twice"}
    for spec, why in bad.items():
        with pytest.raises(SystemExit) as stop:
            run_command(lambda s=spec: table2.main([*args, "mtard", s]))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and why in err and "Traceback" not in err, (spec, err)
    for twice in (["mtard", "mtard"], ["mtard:beta=2,steps=7", "mtard:steps=7,beta=2"]):
        with pytest.raises(SystemExit) as stop:
            table2.main([*args, *twice])
        assert stop.value.code == 2 and "given twice" in capsys.readouterr().err
    assert not (tmp_path / "teachers").exists() and not (tmp_path / "t2").exists()  # nothing trained


def test_a_budget_names_its_stages_and_the_students_folder_is_checked_before_any_training(cifar_slice, tmp_path,
                                                                                           capsys):
    """Under --budget a teacher's cache entry is named by its share of the budget: a smoke run's (75 s) is not
    the reference's (540 s) nor an unbudgeted run's, another split is another teacher, and a second command of
    the same budget (another setup time) finds the first's. A student folder holding a run of another
    configuration is refused in one line before any teacher trains."""
    example = load("mtard_cifar")
    base = ["--plan", "speedrun", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path / "runs")]

    def entry(*flags: str) -> Path:
        run = example.Pipeline(example.parser().parse_args([*base, *flags]))
        model, checkpoint = run.planned_teacher("adv")
        assert run.budget is None or not run.budget.allotted  # planning starts no stage's clock
        return Path(checkpoint).parent

    ref = entry("--budget", "540")
    assert ref.parent == tmp_path / "teachers" and ref.name.startswith("sat-cifar_resnet18-seed0-")
    assert entry("--budget", "540", "--started-at", str(time.time() - 30)) == ref
    assert len({ref, entry("--budget", "75"), entry("--budget", "540", "--share", "adv=0.45"), entry()}) == 4

    run = example.Pipeline(example.parser().parse_args([*base, "--budget", "540"]))
    teachers = {r: run.planned_teacher(r) for r in ("adv", "nat")}
    planned = run.planned_student("mtard", teachers)
    for _, checkpoint in teachers.values():  # once the teachers are trained: the config the student stage builds
        Path(checkpoint).parent.mkdir(parents=True)
        Path(checkpoint).write_bytes(b"")
    assert run.student_config("mtard", teachers).digest() == planned.digest()
    # only this allots (before a table without AutoAttack, 35 s, not the 160-s reserve)
    assert run.budget.allotted == {"student": pytest.approx((540 - 8 - 35) * 0.59, abs=1)}
    shutil.rmtree(tmp_path / "teachers")

    student = tmp_path / "runs" / "mtard"  # a finished student of another configuration
    student.mkdir(parents=True)
    (student / "done.json").write_text(json.dumps({"digest": "0" * 16}))
    with pytest.raises(SystemExit) as stop:
        run_command(lambda: example.main([*base, "--plan", "tiny", "--budget", "60", "--quiet"]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "holds a finished run of another configuration" in err, err
    assert not (tmp_path / "teachers").exists()  # refused before any teacher trained


def test_attack_strength_benchmark_measures_each_training_attack(cifar_slice):
    """benchmarks/attack_strength.py end to end on a slice: a row per attack; 2/255 steps from a uniform start
    leave pixels short of the boundary that 4/255 steps reach (what made the speedrun take Madry's step)."""
    bench = load_benchmark("attack_strength")
    results = bench.main(["--data-dir", str(cifar_slice), "--train-n", "256", "--epochs", "1", "--test-n", "64",
                          "--seeds", "1", "--device", "cpu"])
    assert list(results) == list(bench.ATTACKS)
    assert all(0 <= r["robust"] <= 1 and 0 <= r["at_eps"] <= 1 for r in results.values())
    short, madry = (results[k]["at_eps"] for k in ("PGD-5, 2/255, uniform start",
                                                        "PGD-5, 4/255, uniform start (2.5 eps / 5)"))
    assert madry - short > 0.2  # measured: 0.53 vs 0.85 here, 0.56 vs 0.89 on a trained ResNet-8



def test_bf16_teacher_benchmark_measures_what_bf16_moves(cifar_slice, tmp_path):
    """benchmarks/bf16_teacher.py on a fresh cifar_airbench94 fitted to the slice: its fp32 column is the model's
    clean accuracy, and both bf16 columns differ from fp32 a little (a copy left in fp32 would read 0)."""
    import torch

    import multiteach as mt
    from multiteach.build import eval_tensors, init_from_data, load_splits
    from multiteach.config import DataConfig
    from multiteach.evaluation import correct_mask
    from multiteach.models import Airbench94

    torch.manual_seed(0)
    splits = load_splits(DataConfig(data_dir=str(cifar_slice), val_size=0))
    model = Airbench94()
    assert init_from_data(model, splits)
    mt.atomic_save({"model": model.state_dict()}, tmp_path / "ab.pt")
    results = load_benchmark("bf16_teacher").main(
        ["--data-dir", str(cifar_slice), "--n", "100", f"cifar_airbench94={tmp_path / 'ab.pt'}"])
    r = results["cifar_airbench94"]
    x, y = eval_tensors(splits, 100)
    assert r["clean_fp32"] == pytest.approx(correct_mask(model.eval(), x.to("cpu"), y, None, 100).float().mean().item())
    assert 0 < r["kl_autocast"] < 1e-2 and 0 < r["kl_copy"] < 1e-2 and r["agree_copy"] > 0.8

def test_the_student_teacher_gap_pairs_rows_run_on_the_same_images():
    """w_robust_gap: student minus teacher W-Robust in points, only for attacks both ran on the same images (a
    teacher's AutoAttack cut to fewer images for time is not compared with the student's)."""
    from multiteach.evaluation import Report, Row

    example = load("mtard_cifar")
    student = Report(n=100, rows=[Row("pgd_sat", "", 0.86, 0.42, 0.64, 1.0, 100),
                                  Row("autoattack", "", 0.86, 0.36, 0.61, 1.0, 100)])
    teacher = Report(n=100, rows=[Row("pgd_sat", "", 0.80, 0.45, 0.625, 1.0, 100),
                                  Row("autoattack", "", 0.82, 0.40, 0.61, 1.0, 50)])
    assert example.w_robust_gap(student, teacher) == {"pgd_sat": 1.5}
