"""DDP on CPU with the gloo backend and 2 processes, as torchrun would start them."""

import json
import os
import shutil
import socket
import subprocess
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

import multiteach as mt
from multiteach.data import TensorLoader, synthetic
from multiteach.distributed import DistContext
from tests.conftest import SignalAtStep, tiny_net

pytestmark = pytest.mark.skipif(not tdist.is_available(), reason="torch.distributed not built")

GLOBAL_BATCH, STEPS = 32, 6


class RecordingANL(mt.ANL):
    """ANL that remembers every weight vector it produced (to compare ranks)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.history: list[list[float]] = []

    def update(self, losses):
        w = super().update(losses)
        self.history.append(w.tolist())
        return w


def no_bn_student() -> nn.Module:
    """Without BatchNorm, 2 ranks x 16 images compute exactly what 1 process x 32 images computes."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def make_recipe() -> mt.Recipe:
    adv, nat = mt.Teacher(tiny_net(seed=2)), mt.Teacher(tiny_net(seed=3))
    branches = [mt.Branch(mt.PGD(steps=2, start="none"), mt.KLDistill(), teacher=adv, name="adv"),
                mt.Branch(mt.Clean(), mt.KLDistill(), teacher=nat, name="nat")]
    return mt.Recipe(no_bn_student(), branches, RecordingANL(2, rw=0.5))


def train(rank: int, world: int, out: Path, fail_rank: int | None = None) -> None:
    dist = DistContext.from_env(backend="gloo", timeout_s=20) if world > 1 else DistContext()
    recipe = make_recipe()
    if fail_rank == rank:
        original = recipe.forward

        def dying(*a, **k):
            if len(recipe.weighter.history) == 3:
                os._exit(0)  # a node that disappears mid-run, without a word or an error code
            return original(*a, **k)

        recipe.forward = dying
    loader = TensorLoader(synthetic(GLOBAL_BATCH * STEPS, seed=0), GLOBAL_BATCH // world, shuffle=True,
                          augment=True, drop_last=True, seed=0, rank=rank, world=world)
    cfg = mt.TrainConfig(epochs=1, batch_size=GLOBAL_BATCH // world, lr=0.05, schedule="constant", milestones=[],
                         progress=False, eval_every=0, log_every=1)
    mt.Trainer(recipe, loader, cfg, dist=dist, run_dir=out / f"world{world}").fit()
    torch.save({"w": recipe.weighter.history, "student": recipe.student.state_dict()},
               out / f"world{world}_rank{rank}.pt")
    dist.close()


def _entry(rank: int, world: int, port: int, out: str, fail_rank: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(rank, world, Path(out), fail_rank)
    except Exception as e:  # keep the message for the parent
        Path(out, f"error_rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out: Path, fail_rank: int | None = None) -> None:
    mp.spawn(_entry, args=(2, free_port(), str(out), fail_rank), nprocs=2, join=True)


def test_two_ranks_agree_and_match_one_process_on_the_global_batch(tmp_path):
    train(0, 1, tmp_path)
    spawn(tmp_path)
    one = torch.load(tmp_path / "world1_rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "world2_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "world2_rank1.pt", weights_only=True)
    assert len(r0["w"]) == STEPS and r0["w"] == r1["w"]  # bit-identical ANL weights on both ranks
    assert r0["w"][-1] != r0["w"][0]  # and they did move
    torch.testing.assert_close(torch.tensor(r0["w"]), torch.tensor(one["w"]), rtol=1e-5, atol=1e-6)
    for k, v in one["student"].items():
        torch.testing.assert_close(r0["student"][k], r1["student"][k], rtol=0, atol=0)
        torch.testing.assert_close(r0["student"][k], v, rtol=1e-4, atol=1e-5)
    # the logs (rank 0 only) show the global batch's losses: the same trace as the single process
    def trace(world):
        lines = (tmp_path / f"world{world}" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["L"] for line in lines if '"step"' in line]

    torch.testing.assert_close(torch.tensor(trace(2)), torch.tensor(trace(1)), rtol=1e-4, atol=1e-6)
    assert not (tmp_path / "world2_rank1").exists()


def test_a_dead_rank_ends_the_job_with_a_clear_error(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="lost contact with the other ranks"):
        spawn(tmp_path, fail_rank=1)  # rank 0 must fail within the timeout (20 s), not hang
    err = (tmp_path / "error_rank0.txt").read_text()
    assert "LostRankError" in err and "lost contact with the other ranks" in err


def _stop_entry(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 alone gets SIGTERM in the last step of epoch 1 (of 3); each rank writes how its fit ended."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = DistContext.from_env(backend="gloo", timeout_s=10)
    recipe = make_recipe()
    if rank == 1:
        recipe.forward = SignalAtStep(recipe.forward, 2)
    loader = TensorLoader(synthetic(GLOBAL_BATCH * 2, seed=0), GLOBAL_BATCH // world, shuffle=True, drop_last=True,
                          seed=0, rank=rank, world=world)
    cfg = mt.TrainConfig(epochs=3, batch_size=GLOBAL_BATCH // world, lr=0.05, schedule="constant", milestones=[],
                         progress=False, eval_every=0, log_every=1)
    try:
        res = mt.Trainer(recipe, loader, cfg, dist=dist, run_dir=Path(out) / "run").fit()
        Path(out, f"rank{rank}.json").write_text(json.dumps([res.status, res.epoch]))
    finally:
        dist.close()


def test_a_signal_to_one_rank_at_an_epochs_end_stops_every_rank_there(tmp_path):
    """The ranks agree on stopping at an epoch's end too: the signalled rank must not stop while the others
    start the next epoch (a hang, then lost contact)."""
    mp.spawn(_stop_entry, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ends = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ends == [["interrupted (signal on another rank)", 1], ["interrupted (SIGTERM)", 1]]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1


def test_torchrun_launches_the_cli_and_resumes_under_ddp(tmp_path):
    """The README's launch line on the CPU: 2 gloo processes, rank 0 alone writes; a longer schedule
    resumes from the DDP run's checkpoint."""
    from tests.test_cli import ENV, small_config

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    cfg = small_config(tmp_path, "ddp", batch_size=16)

    def launch(*extra):
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "multiteach.cli", "train", str(cfg),
               "--synthetic", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)

    r = launch()
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["experiment"]["config"]["train"]["batch_size"] == 16
    r = launch("--set", "train.epochs=3", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["epoch"] == 3
