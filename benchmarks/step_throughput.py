"""Training-step throughput of the official MTARD recipe: a faithful plain step vs multiteach's trainer step.

    python benchmarks/step_throughput.py                         # batch 128 and 512, both natural teachers
    python benchmarks/step_throughput.py --batch 512 --steps 20 --variants plain fast

In one process, on the same device and synthetic GPU-resident data (throughput does not depend on values):
  plain   the official step's operations (zhaoshiji123/MTARD): fp32 eager, PGD-10 on the student in eval
          mode, two student forwards, two teacher forwards, ANL read on the host (.item()), SGD
  eager   multiteach's trainer step, bf16 autocast + channels_last, no CUDA graphs (fast=False)
  fast    multiteach's trainer step with its CUDA fast path (fast=True: BN-folded bf16 teachers,
          CUDA-graph PGD and teacher forwards), the default on CUDA
  compile as fast, with the student's training forward under torch.compile
Student ResNet-18, adversarial teacher WRN-34-10, natural teacher ResNet-56 (or WRN-34-10, as the official
CIFAR-10 script loads it). Prints img/s, the ratio to plain, peak GPU memory and the implied epoch time.
Also checks the fast path against fp32 on one batch (losses, gradients, PGD's adversarial loss).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.data import Arrays, TensorLoader


def synthetic_arrays(n: int, seed: int = 0) -> Arrays:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Arrays(x.numpy(), y.numpy())


def official_kl(s, t):
    p = F.softmax(t, 1)
    return (-F.log_softmax(s, 1) * p + torch.log(p + 1e-5) * p).mean()


def plain_steps(student, adv, nat, x, y, steps: int) -> float:
    """The official step, op for op (fp32 eager; ANL on the host as in the script); returns seconds/step."""
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    w = {"adv": 0.5, "nat": 0.5}
    init = {}

    def step():
        student.train()
        opt.zero_grad()
        with torch.no_grad():
            t_nat = nat(x)
        student.eval()
        x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device)
        for _ in range(10):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_ce = F.cross_entropy(student(x_adv), y)
            grad = torch.autograd.grad(loss_ce, [x_adv])[0]
            x_adv = x_adv.detach() + 2 / 255 * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - 8 / 255), x + 8 / 255).clamp(0, 1)
        student.train()
        s_adv = student(x_adv)
        with torch.no_grad():
            t_adv = adv(x_adv)
        s_nat = student(x)
        l1, l2 = official_kl(s_adv, t_adv), official_kl(s_nat, t_nat)
        init.setdefault("adv", l1.item())
        init.setdefault("nat", l2.item())
        a, n = l1.item() / init["adv"], l2.item() / init["nat"]
        w["nat"] = w["nat"] - 0.025 * (w["nat"] - n / (a + n))
        w["adv"] = 1 - w["nat"]
        (w["adv"] * l1 + w["nat"] * l2).backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def make_recipe(nat_name: str) -> mt.Recipe:
    torch.manual_seed(0)
    adv = mt.Teacher("cifar_wrn34_10", name="adv")
    nat = mt.Teacher(nat_name, name="nat")
    return mt.presets.mtard("cifar_resnet18", adv, nat)


def profile_step(trainer, it, steps: int = 3, top: int = 15) -> None:
    """Where the GPU time of the trainer step goes: CUDA time by kernel family, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer._step(*next(it))
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    families: dict[str, float] = {}
    for e in events:
        n = e.key.lower()
        fam = ("conv/gemm" if any(k in n for k in ("conv", "xmma", "gemm", "sm90", "cudnn", "wgrad", "dgrad"))
               else "batchnorm" if "batch_norm" in n or "bn_" in n
               else "elementwise/other")
        families[fam] = families.get(fam, 0.0) + e.device_time_total
    print(f"profile: {total / steps / 1e3:.1f} ms GPU time per step; " +
          ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(families.items(), key=lambda kv: -kv[1])))
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"  {100 * e.device_time_total / total:5.1f}%  {e.count // steps:4d}x/step  {e.key[:100]}")


def trainer_steps(variant: str, nat_name: str, batch: int, steps: int, data: Arrays,
                  profile: bool = False) -> tuple[float, float]:
    """Seconds per step of multiteach's trainer step over its GPU loader; and the first-steps overhead."""
    recipe = make_recipe(nat_name)
    cfg = mt.TrainConfig(epochs=1, batch_size=batch, lr=0.1, device="cuda", precision="bf16", progress=False,
                         eval_every=0, log_every=10**9, fast=variant != "eager", compile=variant == "compile")
    loader = TensorLoader(data, batch, shuffle=True, augment=True, drop_last=True, device="cuda")
    trainer = mt.Trainer(recipe, loader, cfg)
    recipe.train()
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up: cuDNN autotuning, graph capture, compilation
        trainer._step(*next(it))
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer._step(*next(it))
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / steps
    if profile:
        profile_step(trainer, it)
    return sec, warm


def check_fast_path(batch: int = 256) -> dict[str, float]:
    """Fast path (bf16, folded teachers, CUDA graphs) vs fp32 eager on one batch and the same weights:
    the two branch losses, the student's gradient, and the CE that PGD-10 reaches (measured in fp32)."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda", generator=g)
    results = []
    for fast in (False, True):
        recipe = make_recipe("cifar_resnet56")  # same seed: same weights on both paths
        for t in recipe.teachers:  # random teachers are nearly uniform: sharpen them so the KLs are not ~0
            with torch.no_grad():
                t.model.get_classifier().weight.mul_(20)
        recipe.to(dev).to(memory_format=torch.channels_last).train()
        pgd = recipe.branches[0].transform
        pgd.start = "none"  # the same PGD start on both paths
        init = {k: v.clone() for k, v in recipe.student.state_dict().items()}
        precision = "bf16" if fast else "fp32"
        if fast:
            mt.fast.accelerate(recipe, "bf16")
            with mt.runtime.autocast(precision, dev):
                recipe(x, y)  # records the graphs (and moves BN statistics: restored below)
            recipe.student.load_state_dict(init)
        with mt.runtime.autocast(precision, dev):
            x_adv = recipe.branches[0].transform(recipe.student, x, y)  # the graphed attack on the fast path
        with torch.no_grad(), mt.transforms.module_mode(recipe.student, "eval"):
            adv_ce = F.cross_entropy(recipe.student(x_adv.float()), y).item()
        recipe.student.zero_grad(set_to_none=True)
        with mt.runtime.autocast(precision, dev):
            out = recipe(x, y)
        out.total.backward()
        grads = torch.cat([p.grad.flatten() for p in recipe.student.parameters()]).double()
        results.append((out.losses.double(), grads, adv_ce))
    (l0, g0, a0), (l1, g1, a1) = results
    return {"loss_rel_err": ((l1 - l0).norm() / l0.norm()).item(),
            "grad_rel_err": ((g1 - g0).norm() / g0.norm()).item(),
            "grad_cosine": F.cosine_similarity(g0, g1, dim=0).item(),
            "pgd_adv_ce_fp32": a0, "pgd_adv_ce_fast": a1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--nat", nargs="+", default=["cifar_resnet56", "cifar_wrn34_10"])
    p.add_argument("--variants", nargs="+", default=["plain", "eager", "fast"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--profile", action="store_true", help="profile the first non-plain variant of each size")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark measures the CUDA step: run it on a GPU machine")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    if not args.no_check:
        print("fast path vs fp32 on one batch:", json.dumps(check_fast_path()))
    data = synthetic_arrays(max(16384, 64 * max(args.batch)))
    rows = []
    for nat_name in args.nat:
        for batch in args.batch:
            base = None
            for variant in args.variants:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                warm = 0.0
                if variant == "plain":
                    torch.backends.cudnn.benchmark = False
                    recipe = make_recipe(nat_name).cuda()
                    x = torch.rand(batch, 3, 32, 32, device="cuda")
                    y = torch.randint(0, 10, (batch,), device="cuda")
                    adv, nat = (t.model for t in recipe.teachers)
                    sec = plain_steps(recipe.student, adv, nat, x, y, args.steps)
                    del recipe
                else:
                    first = variant == next(v for v in args.variants if v != "plain")
                    sec, warm = trainer_steps(variant, nat_name, batch, args.steps, data, args.profile and first)
                ips = batch / sec
                base = base or (ips if variant == "plain" else None)
                row = {"nat_teacher": nat_name, "batch": batch, "variant": variant, "img_s": ips,
                       "vs_plain": ips / base if base else float("nan"),
                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "epoch_s": 50000 / ips,
                       "warmup_s": warm}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| nat teacher | batch | variant | img/s | x plain | peak GiB | epoch (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nat_teacher']} | {r['batch']} | {r['variant']} | {r['img_s']:,.0f} | {r['vs_plain']:.2f} "
              f"| {r['peak_gib']:.1f} | {r['epoch_s']:.1f} |")


if __name__ == "__main__":
    main()
