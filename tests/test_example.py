import time

from tests.conftest import SHARED


def test_reference_example_tiny_mode_runs(cifar_slice, tmp_path):
    """examples/mtard_cifar.py --tiny on a slice of CIFAR-10: teachers, student, evaluation table."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("mtard_cifar", Path(__file__).parents[1] / "examples/mtard_cifar.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t0 = time.perf_counter()
    report = mod.main(["--tiny", "--data-dir", str(cifar_slice), "--run-dir", str(tmp_path), "--quiet"])
    assert time.perf_counter() - t0 < 120
    rows = {r["attack"]: r for r in report["rows"]}
    assert set(rows) == {"fgsm", "pgd_sat", "pgd_trades", "cw_inf"}
    for r in rows.values():
        assert 0 <= r["robust"] <= r["clean"] <= 1  # on the same images, an attack never helps
    for stage in ("nat_teacher", "adv_teacher", "mtard"):
        assert (tmp_path / stage / "best.pt").is_file()
    assert (tmp_path / "eval.json").is_file()
    if SHARED.is_dir():
        assert rows["fgsm"]["clean"] > 0.15  # better than chance on the real slice
