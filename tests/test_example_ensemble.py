"""examples/ensemble_kd.py --tiny: three teachers of different architectures, then one student per method
(ca_mkd, avg_kd, ebkd), then the table of clean accuracies, printed last."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "ensemble_kd.py"


def test_tiny_run_trains_the_teachers_then_each_student_and_prints_the_table_last(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--tiny", "--quiet", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("Clean test accuracy")[-1]
    rows = re.findall(r"│ (\S+ (?:student|teacher) \(\S+\)) +│ +(\d+\.\d\d) │", table)
    assert [name for name, _ in rows] == [
        "ca_mkd student (cifar_resnet8)", "avg_kd student (cifar_resnet8)", "ebkd student (cifar_resnet8)",
        "t1 teacher (cifar_wrn16_4)", "t2 teacher (cifar_resnet20)", "t3 teacher (cifar_mobilenetv2)"]
    assert all(0.0 <= float(acc) <= 100.0 for _, acc in rows)
    assert table.rstrip().endswith("s")  # nothing after the table but its caption
    assert len(list((tmp_path / "run" / "teachers").iterdir())) == 3  # cached, keyed by recipe and seed
    for method in ("ca_mkd", "avg_kd", "ebkd"):
        assert (tmp_path / "run" / method / "best.pt").is_file()
    again = subprocess.run([sys.executable, str(EXAMPLE), "--tiny", "--quiet", "--run-dir", str(tmp_path / "run"),
                            "--methods", "avg_kd"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "finished earlier" in again.stderr  # teachers and student reused
