import importlib.util
import json
import sys
import time
from pathlib import Path

from tests.conftest import SHARED

EXAMPLES = Path(__file__).parents[1] / "examples"


def load(name: str):
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_example_then_three_teachers_reusing_the_cached_teachers(cifar_slice, tmp_path):
    """examples/mtard_cifar.py --tiny on a slice of CIFAR-10 (teachers, student, table), then the N = 3
    example, which must reuse the two cached teachers and train only the third."""
    cache = tmp_path / "teachers"
    common = ["--tiny", "--data-dir", str(cifar_slice), "--teacher-cache", str(cache), "--quiet"]
    t0 = time.perf_counter()
    report = load("mtard_cifar").main([*common, "--run-dir", str(tmp_path / "mtard_run")])
    assert time.perf_counter() - t0 < 150
    rows = {r["attack"]: r for r in report["rows"]}
    assert set(rows) == {"fgsm", "pgd_sat", "pgd_trades", "cw_inf"}
    for r in rows.values():
        assert 0 <= r["robust"] <= r["clean"] <= 1  # on the same images, an attack never helps
    assert (tmp_path / "mtard_run" / "mtard" / "best.pt").is_file()
    assert (tmp_path / "mtard_run" / "mtard" / "eval.json").is_file()
    entries = sorted(cache.iterdir())
    assert [e.name.split("-")[0] for e in entries] == ["natural", "sat"]
    stamps = {e: (e / "done.json").stat().st_mtime_ns for e in entries}
    if SHARED.is_dir():
        assert rows["fgsm"]["clean"] > 0.15  # better than chance on the real slice

    report3 = load("three_teachers").main([*common, "--run-dir", str(tmp_path / "three"), "--epochs", "1",
                                           "--eval-n", "100"])
    assert {e: (e / "done.json").stat().st_mtime_ns for e in entries} == stamps  # reused, not retrained
    assert len(list(cache.iterdir())) == 3  # + the L2 teacher
    rows3 = {r["attack"]: r for r in report3["rows"]}
    assert "pgd_l2" in rows3 and rows3["pgd_l2"]["settings"].startswith("L2 eps 0.5")
    metrics = [json.loads(line) for line in (tmp_path / "three" / "mtard3" / "metrics.jsonl").read_text().split("\n")
               if line]
    last = [m for m in metrics if m["type"] == "step"][-1]
    assert len(last["w"]) == 3 and abs(sum(last["w"]) - 1) < 1e-5
