"""Robustness evaluation: the MTARD paper's white-box (Table 2) and black-box (Table 4) rows, W-Robust.

Everything runs in fp32 with the model in eval mode, TF32 off unless asked for (``tf32=True``: cuDNN's
default on Ampere and later GPUs, faster; labelled so in every table). Each row reports clean and
robust accuracy on the same images and W-Robust = (clean + robust) / 2. A row's robust accuracy is the accuracy
on the attacked images, as the official TRADES, RSLAD and MTARD evaluations count it (an image misclassified
clean but classified right after the attack counts; AutoAttack leaves such images unattacked); the worst case
counts an image robust only if it is right clean and every attack run failed on it. AutoAttack and Square come
from the AutoAttack authors' package (pyautoattack).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import atomic_write_json
from .data import Images
from .registry import ATTACKS
from .runtime import tf32 as tf32_mode
from .signals import DeadlinePassed, deadline
from .transforms import PGD, module_mode

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


@ATTACKS.register("pgd_sat", "PGD-20, step 2/255, uniform start, CE (the SAT/MTARD evaluation)")
def pgd_sat(eps: float = 8 / 255, steps: int = 20) -> PGD:
    return PGD(eps, 2 / 255, steps, start="uniform")


@ATTACKS.register("pgd_trades", "PGD-20, step 0.003, uniform start, CE (the TRADES evaluation; its eps is 0.031)")
def pgd_trades(eps: float = 8 / 255, steps: int = 20) -> PGD:
    """The TRADES repository's pgd_attack_cifar10.py: 20 steps of 0.003 from a uniform start in the ball, CE.
    Its eps is 0.031; the table's eps (8/255 = 0.0314 by default) is used for every row."""
    return PGD(eps, 0.003, steps, start="uniform")


@ATTACKS.register("cw_inf", "CW-inf: PGD-30 on the CW margin (kappa 50), step 0.003, uniform start")
def cw_inf(eps: float = 8 / 255, steps: int = 30) -> PGD:
    return PGD(eps, 0.003, steps, start="uniform", objective="cw")


STANDARD = ("fgsm", "pgd_sat", "pgd_trades", "cw_inf")


def standard_attacks(eps: float = 8 / 255) -> dict[str, Attack]:
    """The white-box rows of the paper's Table 2 (RSLAD/MTARD evaluation convention)."""
    return attacks_by_name(STANDARD, eps)


def accuracy_table(rows: dict[str, float], title: str, caption: str = "") -> Any:
    """A rich table of clean accuracy (%) per model, for the examples' last lines."""
    from rich.table import Table

    table = Table(title=title, caption=caption or None)
    table.add_column("model")
    table.add_column("clean %", justify="right")
    for name, acc in rows.items():
        table.add_row(name, f"{100 * acc:.2f}")
    return table


def attacks_by_name(specs: Iterable[str | dict[str, Any]], eps: float = 8 / 255) -> dict[str, Attack]:
    """Registered attacks (``ATTACKS``) by name or ``{name = ..., **options}``, each at radius ``eps`` where it
    takes one; a row is named by the name (with its options, if any). An unknown name is a one-line error
    listing the choices."""
    import inspect

    from .registry import parse_spec

    out: dict[str, Attack] = {}
    for spec in specs:
        name, options = parse_spec(spec, "attack")
        takes_eps = "eps" in inspect.signature(ATTACKS.get_entry(name).fn).parameters
        key = name if not options else f"{name}({', '.join(f'{k}={v}' for k, v in options.items())})"
        out[key] = ATTACKS.build(spec, **({"eps": eps} if takes_eps else {}))
    return out


def _require_autoattack() -> Any:
    try:
        import pyautoattack
    except ImportError:
        raise ImportError("AutoAttack and Square need the AutoAttack authors' package: "
                          "pip install 'multiteach[autoattack]'") from None
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    return pyautoattack


@ATTACKS.register("autoattack", "standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), the reference code")
class AutoAttack:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein 2020), the reference code."""

    def __init__(self, eps: float = 8 / 255, norm: str = "Linf", version: str = "standard", seed: int = 0) -> None:
        self.eps, self.norm, self.version, self.seed = eps, norm, version, seed

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        aa = _require_autoattack().AutoAttack(model, eps=self.eps, norm=self.norm, version=self.version,
                                              device=x.device, seed=self.seed)
        aa.verbose = False
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv

    def __repr__(self) -> str:
        return f"AutoAttack(version={self.version!r}, norm={self.norm!r}, eps={self.eps:.5g})"


@ATTACKS.register("square", "Square: score-based black-box attack, 5,000 queries per image")
class Square:
    """Square attack (Andriushchenko et al. 2020): score-based black-box, ``queries`` per image."""

    def __init__(self, eps: float = 8 / 255, queries: int = 5000, p_init: float = 0.8, seed: int = 0) -> None:
        self.eps, self.queries, self.p_init, self.seed = eps, queries, p_init, seed

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from pyautoattack.square import SquareAttack

        _require_autoattack()
        attack = SquareAttack(model, p_init=self.p_init, n_queries=self.queries, eps=self.eps, norm="Linf",
                              n_restarts=1, seed=self.seed, verbose=False, device=x.device, resc_schedule=False)
        return attack.perturb(x, y)

    def __repr__(self) -> str:
        return f"Square(eps={self.eps:.5g}, queries={self.queries}, p_init={self.p_init})"


class Transfer:
    """A transfer (black-box) attack: ``attack`` is crafted on ``surrogate``, then shown to the model."""

    def __init__(self, attack: Attack, surrogate: nn.Module) -> None:
        self.attack, self.surrogate = attack, surrogate

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with module_mode(self.surrogate, "eval"):
            return self.attack(self.surrogate, x, y)

    def __repr__(self) -> str:
        return f"Transfer({self.attack!r}, surrogate={type(self.surrogate).__name__})"

    def describe(self) -> str:
        inner = self.attack.describe() if hasattr(self.attack, "describe") else repr(self.attack)
        return f"from {type(self.surrogate).__name__}: {inner}"


SLOW_ROWS = ("autoattack", "transfer_pgd", "transfer_cw", "square")


def slow_subsets(n: int | None) -> dict[str, int] | None:
    """``evaluate(subsets=...)`` running the slow rows (AutoAttack, black-box) on the first ``n`` images."""
    return {k: n for k in SLOW_ROWS} if n else None


def black_box_attacks(surrogate: nn.Module | None, eps: float = 8 / 255, queries: int = 5000) -> dict[str, Attack]:
    """Table 4: transfer PGD-20 and CW-inf from a surrogate, and the Square attack."""
    white = standard_attacks(eps)
    out: dict[str, Attack] = {}
    if surrogate is not None:
        out["transfer_pgd"] = Transfer(white["pgd_sat"], surrogate)
        out["transfer_cw"] = Transfer(white["cw_inf"], surrogate)
    out["square"] = Square(eps, queries)
    return out


@dataclass
class Row:
    attack: str
    settings: str
    clean: float
    robust: float
    w_robust: float
    seconds: float
    n: int = 0


@dataclass
class Report:
    n: int
    rows: list[Row] = field(default_factory=list)
    worst: Row | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "rows": [asdict(r) for r in self.rows],
                "worst": asdict(self.worst) if self.worst else None, "meta": self.meta}

    def save_json(self, path: str | Path) -> Path:
        """Written atomically: a kill mid-write leaves the previous table, never a torn one."""
        return atomic_write_json(self.to_dict(), path)

    @property
    def precision(self) -> str:
        return precision_label(self.meta.get("tf32", False))

    def table(self, title: str = "Robustness") -> Any:
        from rich.table import Table

        t = Table(title=f"{title}: test set, n = {self.n} ({self.precision}, eval mode)")
        for col in ("attack", "clean %", "robust %", "W-Robust %", "s", "settings"):
            t.add_column(col, justify="left" if col in ("attack", "settings") else "right")
        for r in self.rows + ([self.worst] if self.worst else []):
            note = f" (first {r.n} images)" if r.n and r.n != self.n else ""
            t.add_row(r.attack, f"{100 * r.clean:.2f}", f"{100 * r.robust:.2f}", f"{100 * r.w_robust:.2f}",
                      f"{r.seconds:.1f}", r.settings + note)
        return t


def describe(attack: Attack) -> str:
    return attack.describe() if hasattr(attack, "describe") else repr(attack)


def _batches(x: Tensor | Images, y: Tensor, batch_size: int) -> Iterable[tuple[Tensor | Images, Tensor]]:
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def precision_label(tf32: bool) -> str:
    return "fp32, TF32 allowed" if tf32 else "fp32"


def correct_mask(model: nn.Module, x: Tensor | Images, y: Tensor, attack: Attack | None = None,
                 batch_size: int = 256, device: torch.device | str | None = None, tf32: bool = False) -> Tensor:
    """Per-image correctness (bool) of ``model`` on ``attack(model, x, y)`` (clean when ``attack`` is None),
    in fp32 (``tf32``: TF32 convolutions and matmuls allowed)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    with module_mode(model, "eval"), torch.autocast(device.type, enabled=False), tf32_mode(tf32):
        for xb, yb in _batches(x, y, batch_size):
            xb, yb = xb.to(device).float().contiguous(), yb.to(device)  # AutoAttack views its gradients
            if attack is not None:
                xb = attack(model, xb, yb)
            with torch.no_grad():
                out.append((model(xb).argmax(1) == yb).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@contextmanager
def row_rng(seed: int | None, stream: str) -> Iterator[None]:
    """One row's random starts from a stream of its own, named by the seed and ``stream`` (the attack's settings):
    a checkpoint's figure for an attack does not depend on what ran before it (H200 runs 4 and 5 read one
    teacher's PGD_TRADES 0.15 apart, the student's AutoAttack, which reseeds the global stream, having run before
    it in run 4 only). The CPU and the initialized CUDA generators are forked, seeded and given back as they
    were; others (a CUDA not yet initialized, MPS) are left alone. ``None`` draws from the global streams."""
    if seed is None:
        yield
        return
    cuda = torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        s = zlib.crc32(f"{seed}/{re.sub(' at 0x[0-9a-fA-F]+', '', stream)}".encode())  # no address in a name
        torch.default_generator.manual_seed(s)  # not torch.manual_seed: it also queues a lazy CUDA seed
        if cuda:
            torch.cuda.manual_seed_all(s)
        yield


def evaluate(model: nn.Module, x: Tensor | Images, y: Tensor, attacks: dict[str, Attack], batch_size: int = 256,
             device: torch.device | str | None = None, on_row: Callable[[Row], None] | None = None,
             subsets: dict[str, int] | None = None, tf32: bool = False, seed: int | None = None) -> Report:
    """Clean accuracy and one row per attack, W-Robust each, and the per-image worst case over all rows.

    ``subsets`` runs the named (slow) attacks on the first k images only; their rows report clean and
    robust accuracy on those k images, and the worst case then covers those k images. ``seed``: each row's
    random starts from its own stream, named by the attack's settings (:func:`row_rng`).
    """
    t0 = time.perf_counter()
    clean = correct_mask(model, x, y, None, batch_size, device, tf32)
    report = Report(n=len(y), meta={"clean_seconds": time.perf_counter() - t0, "tf32": tf32})
    all_robust = clean.clone()
    worst_n = len(y)
    for name, attack in attacks.items():
        k = min((subsets or {}).get(name, len(y)), len(y))
        worst_n = min(worst_n, k)
        t0 = time.perf_counter()
        with row_rng(seed, describe(attack)):
            mask = correct_mask(model, x[:k], y[:k], attack, batch_size, device, tf32)
        clean_acc, robust = clean[:k].float().mean().item(), mask.float().mean().item()
        all_robust[:k] &= mask
        row = Row(name, describe(attack), clean_acc, robust, (clean_acc + robust) / 2, time.perf_counter() - t0, k)
        report.rows.append(row)
        if on_row is not None:
            on_row(row)
    if attacks:
        clean_acc, robust = clean[:worst_n].float().mean().item(), all_robust[:worst_n].float().mean().item()
        report.worst = Row("worst case", "per image, over all rows", clean_acc, robust, (clean_acc + robust) / 2,
                           sum(r.seconds for r in report.rows), worst_n)
    return report


def attack_cost(attack: Attack) -> float:
    """Gradient passes per image (its arithmetic), for time estimates: a PGD's steps; a transfer attack's on its
    surrogate; Square's 5,000 queries, each a forward (a third of a pass), on the ~45% of images still robust;
    standard AutoAttack about 2,000 (APGD-CE's 100 on every image, then APGD-T's 9 x 100, FAB-T's 9 x 100 and
    Square on those still robust). Rough for the black-box and AutoAttack rows: see
    :func:`attack_latency_steps` for their other, fixed part, and a row's own chunks correct both."""
    if isinstance(attack, AutoAttack):
        return 2000.0
    if isinstance(attack, Square):
        return 0.45 * attack.queries / 3
    if isinstance(attack, Transfer):
        return attack_cost(attack.attack) + 1 / 3
    return float(getattr(attack, "steps", 1))


def attack_latency_steps(attack: Attack) -> float:
    """Sequential steps one run of the attack costs whatever its batch, in units of one single-image gradient
    pass: the part bound by launch latency, not arithmetic. Standard AutoAttack runs ~6,900 iterations one
    after another (100 + 900 + 900 + 5,000), each about one such pass: on an H200 a call cost ~44 s plus ~42 ms
    an image (three runs), and the single-image pass measured 6.6 ms (6,900 x 6.6 ms = 45 s). Square: its
    queries, about one each. PGD's large batches are arithmetic-bound: 0."""
    if isinstance(attack, AutoAttack):
        return 6900.0
    if isinstance(attack, Square):
        return float(attack.queries)
    return attack_latency_steps(attack.attack) if isinstance(attack, Transfer) else 0.0


class TimedEvaluation:
    """Rows of several models' tables, run in the order asked while the time ``left()`` allows.

    The time of a row is predicted as arithmetic (its gradient passes per image, at the rate measured on that
    model's rows so far) plus latency (its sequential steps, at that model's single-image gradient pass
    latency, measured once), then scaled by how far the attack's own earlier chunks on that model ran from that
    prediction. A row that would not fit is skipped (``required=True`` runs it regardless). ``chunk`` runs a
    slow row in slices of the first ``n`` images (a sequence: the largest size that still fits, then smaller
    ones), so it may stop early and report the images it covered; a latency-bound attack runs each slice as
    one call. A chunk that runs past the time left (a prediction too low) is cut there (:func:`deadline`) and
    dropped, the chunks before it kept. fp32 (``tf32``: TF32 allowed, labelled so), eval mode. ``seed``: each
    row's random starts from its own stream (:func:`row_rng`), whatever rows ran or were skipped before it.
    """

    def __init__(self, x: Tensor | Images, y: Tensor, left: Callable[[], float], batch_size: int = 500,
                 device: torch.device | str | None = None, margin_s: float = 5.0, tf32: bool = False,
                 seed: int | None = None) -> None:
        self.x, self.y, self.left, self.batch_size, self.margin_s = x, y, left, batch_size, margin_s
        self.device, self.tf32, self.seed = device, tf32, seed
        self.reports: dict[str, Report] = {}
        self.skipped: list[str] = []
        self._clean: dict[str, Tensor] = {}
        self._guess_s: dict[str, float] = {}  # per model: seconds per image and gradient pass, from its clean pass
        self._passes: dict[str, list[float]] = {}  # per model: seconds, image-passes of its gradient attacks so far
        self._latency_s: dict[str, float] = {}  # per model: one single-image gradient pass
        # (model, id(attack)) -> (the attack, kept alive; [seconds, predicted seconds] of its chunks so far)
        self._per_attack: dict[tuple[str | None, int], tuple[Attack, list[float]]] = {}

    def _model_time(self, attack: Attack, n: int, model_name: str | None = None) -> float:
        """The cost model: arithmetic + latency, at this model's measured rates; before its first gradient row,
        the larger of its clean-pass guess and the other models' measured rate (a larger model after a small
        one is not priced at the small one's rate)."""
        seconds, passes = self._passes.get(model_name) or (0.0, 0.0)
        if passes:
            per_pass = seconds / passes
        else:
            seconds, passes = (sum(v[i] for v in self._passes.values()) for i in (0, 1))
            pooled = seconds / passes if passes else None
            guess = self._guess_s.get(model_name)
            if guess is not None:
                per_pass = max(guess, pooled or 0.0)
            else:  # a model without a clean pass: the measured rate, else any model's guess
                per_pass = pooled if pooled is not None else next(iter(self._guess_s.values()), 0.0)
        latency = self._latency_s.get(model_name, next(iter(self._latency_s.values()), 0.0))
        return n * attack_cost(attack) * per_pass + attack_latency_steps(attack) * latency

    def predict(self, attack: Attack, n: int, model_name: str | None = None) -> float:
        """Seconds for ``attack`` on ``n`` images of ``model_name``: the cost model, scaled by the attack's own
        measured chunks on that model."""
        guess = self._model_time(attack, n, model_name)
        own = self._per_attack.get((model_name, id(attack)))
        if own is not None and own[1][1] > 0:
            return guess * own[1][0] / own[1][1]
        return guess

    def latency(self, model_name: str, model: nn.Module) -> float:
        """Seconds of one gradient pass on a single image (the median of five, after two warm-ups)."""
        if model_name not in self._latency_s:
            device = torch.device(self.device) if self.device is not None else next(model.parameters()).device
            x = self.x[:1].to(device).float().requires_grad_(True)
            times = []
            with module_mode(model, "eval"), torch.autocast(device.type, enabled=False), tf32_mode(self.tf32):
                for i in range(7):
                    t0 = time.perf_counter()
                    torch.autograd.grad(model(x).sum(), x)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
            self._latency_s[model_name] = sorted(times)[len(times) // 2]
        return self._latency_s[model_name]

    def clean(self, model_name: str, model: nn.Module) -> float:
        """Clean accuracy on all images (and the report the model's rows go into)."""
        t0 = time.perf_counter()
        mask = correct_mask(model, self.x, self.y, None, self.batch_size, self.device, self.tf32)
        seconds = time.perf_counter() - t0
        self._guess_s[model_name] = 3 * seconds / max(len(self.y), 1)  # a gradient pass: about three forwards
        self._clean[model_name] = mask
        acc = mask.float().mean().item()
        self.reports[model_name] = Report(n=len(self.y), meta={"clean_seconds": seconds, "clean": acc,
                                                               "tf32": self.tf32})
        return acc

    def row(self, model_name: str, model: nn.Module, name: str, attack: Attack, n: int | None = None,
            chunk: int | Sequence[int] | None = None, required: bool = False, tf32: bool | None = None) -> Row | None:
        """One row; ``tf32`` overrides the evaluation's setting for this row (e.g. an fp32 check of a TF32
        table), and the row's settings then say so."""
        n = min(n or len(self.y), len(self.y))
        tf32 = self.tf32 if tf32 is None else tf32
        sizes = sorted({chunk} if isinstance(chunk, int) else set(chunk or [n]), reverse=True)
        latency_bound = attack_latency_steps(attack) > 0
        if latency_bound:  # recorded beside the model's rows: what the prediction's fixed part was made of
            latency = self.latency(model_name, model)
            if model_name in self.reports:
                self.reports[model_name].meta["latency_s"] = latency
        done: list[Tensor] = []
        clean: list[Tensor] = []  # a row in the table's precision: its clean pass
        lo, t0 = 0, time.perf_counter()
        with row_rng(self.seed, describe(attack)):  # the row's chunks, one stream; a check row of the same attack
            # in another precision draws the same starts, so it differs by its precision alone
            while lo < n:
                predicted = {c: self.predict(attack, min(c, n - lo), model_name) for c in sizes}
                spare = self.left() - self.margin_s
                fits = [c for c in sizes if required or predicted[c] <= spare]
                if not fits:  # the images left, listed as not run (the row reports those done)
                    if lo:
                        self.skipped.append(f"{model_name}/{name}: images {lo}-{n} (no time left)")
                    break
                hi = min(lo + fits[0], n)
                call = {"images": hi - lo, "predicted_s": round(predicted[fits[0]], 3)}
                if model_name in self.reports:  # each call beside the prediction it ran on, cut ones too
                    self.reports[model_name].meta.setdefault("calls", {}).setdefault(name, []).append(call)
                t1 = time.perf_counter()
                try:  # a latency-bound attack pays its fixed part per call: the whole chunk in one
                    # the modes, precision and grad mode entered outside the deadline: restored whatever a cut left
                    with module_mode(model, "eval"), tf32_mode(tf32), torch.set_grad_enabled(torch.is_grad_enabled()), \
                            deadline(None if required else self.left() - self.margin_s):  # a prediction that ran short
                        chunk_mask = correct_mask(model, self.x[lo:hi], self.y[lo:hi], attack,
                                                  hi - lo if latency_bound else self.batch_size, self.device, tf32)
                        # a row in another precision than the table: its clean half in that one too
                        chunk_clean = None if tf32 == self.tf32 else correct_mask(
                            model, self.x[lo:hi], self.y[lo:hi], None, self.batch_size, self.device, tf32)
                except DeadlinePassed:  # the chunk is dropped, the chunks before it stand
                    call.update(seconds=round(time.perf_counter() - t1, 3), cut=True)
                    self.skipped.append(f"{model_name}/{name}" + (f": images {lo}-{n}" if lo else "")
                                        + " (cut at the time budget)")
                    if lo == 0:
                        return None
                    break
                except Exception as e:  # an optional row that breaks must not take the table with it
                    if required:
                        raise
                    self.skipped.append(f"{model_name}/{name} ({type(e).__name__}: {e})")
                    return None
                done.append(chunk_mask)
                if chunk_clean is not None:
                    clean.append(chunk_clean)
                seconds = time.perf_counter() - t1
                call["seconds"] = round(seconds, 3)
                if getattr(attack, "steps", None) is not None and not latency_bound and tf32 == self.tf32:
                    rate = self._passes.setdefault(model_name, [0.0, 0.0])  # a known count of passes, this precision
                    rate[0] += seconds
                    rate[1] += (hi - lo) * attack_cost(attack)
                # the attack's own correction: measured against the cost model at the rates now known (this chunk's
                # included), so a row that feeds the rate is not corrected twice
                own = self._per_attack.setdefault((model_name, id(attack)), (attack, [0.0, 0.0]))[1]
                own[0], own[1] = own[0] + seconds, own[1] + self._model_time(attack, hi - lo, model_name)
                lo = hi
        if lo == 0:
            self.skipped.append(f"{model_name}/{name} (no time left)")
            return None
        k = lo
        mask = torch.cat(done)
        clean_acc = (torch.cat(clean) if clean else self._clean[model_name][:k]).float().mean().item()
        robust = mask.float().mean().item()
        settings = describe(attack) + (f" ({precision_label(tf32)})" if tf32 != self.tf32 else "")
        row = Row(name, settings, clean_acc, robust, (clean_acc + robust) / 2, time.perf_counter() - t0, k)
        self.reports[model_name].rows.append(row)
        return row


def clean_and_pgd(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], steps: int = 20,
                  eps: float = 8 / 255, dist: Any = None, tf32: bool = True, norm: str = "Linf") -> dict[str, float]:
    """The training hook's check: clean and PGD-``steps`` accuracy (step eps/4 from a uniform start: PGD_SAT at
    L-inf 8/255) over a loader (all ranks summed); ``steps=0``: clean accuracy only. It selects models, it
    reports no figure: TF32 allowed by default."""
    attack = PGD(eps, eps / 4, steps, start="uniform", norm=norm) if steps > 0 else None
    counts = torch.zeros(3, dtype=torch.float64)
    for xb, yb in loader:
        if len(yb):  # a rank's share of the last global batch can be empty
            c = correct_mask(model, xb, yb, None, len(yb), xb.device, tf32).sum().item()
            r = correct_mask(model, xb, yb, attack, len(yb), xb.device, tf32).sum().item() if attack else 0
            counts += torch.tensor([c, r, len(yb)], dtype=torch.float64)
    if dist is not None and dist.enabled:  # every rank takes part, whatever its share
        device = next(model.parameters()).device
        counts = dist.sum(counts.to(device)).cpu()
    c, r, n = counts.tolist()
    if n == 0:
        return {}
    return {"clean": c / n, "robust": r / n} if attack is not None else {"clean": c / n}


def eps_sweep(model: nn.Module, x: Tensor, y: Tensor, eps_values: Iterable[float], steps: int = 20,
              batch_size: int = 256) -> dict[float, float]:
    """PGD accuracy against eps: it must fall as eps grows and reach ~0 at a large eps (no masking)."""
    out = {}
    for eps in eps_values:
        attack = PGD(eps, max(eps / 4, 1e-6), steps, start="uniform")
        out[eps] = correct_mask(model, x, y, attack, batch_size).float().mean().item()
    return out


__all__ = ["SLOW_ROWS", "AutoAttack", "Report", "Row", "Square", "TimedEvaluation", "Transfer", "attack_cost",
           "attack_latency_steps", "black_box_attacks", "clean_and_pgd", "correct_mask", "describe", "eps_sweep",
           "evaluate", "precision_label", "slow_subsets", "standard_attacks"]
