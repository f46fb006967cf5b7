"""examples/pretrained_teachers.py in its tiny mode: three pretrained timm teachers (weights from local files,
no download) fine-tuned on a synthetic ImageFolder, then students distilled from them, and the last table."""

import importlib.util
from pathlib import Path

import timm
import torch

from tests.test_data_layer import write_image_folder

EXAMPLE = Path(__file__).parents[1] / "examples" / "pretrained_teachers.py"
TEACHERS = ("test_resnet", "test_efficientnet", "test_convnext")  # timm's tiny test models, 1000-class heads


def test_pretrained_teachers_example_end_to_end(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=3, train=8, val=4)
    specs = []
    for name in TEACHERS:  # "ImageNet weights": written here, read through timm's local-file path
        torch.save(timm.create_model(name).state_dict(), tmp_path / f"{name}.pth")
        specs.append(f"{name}={tmp_path / name}.pth")
    spec = importlib.util.spec_from_file_location("pretrained_teachers", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--data-dir", str(data), "--tiny", "--quiet", "--teachers", *specs, "--methods", "avg_kd",
                         "ebkd", "--run-dir", str(tmp_path / "run"), "--workers", "0", "--device", "cpu"])
    assert list(rows) == ["avg_kd student (test_resnet)", "ebkd student (test_resnet)",
                          *(f"t{k} teacher ({n})" for k, n in enumerate(TEACHERS, 1))]
    assert all(0.0 <= acc <= 1.0 for acc in rows.values())
    cache = sorted((tmp_path / "run" / "teachers").iterdir())
    assert [e.name.split("-")[1] for e in cache] == sorted(TEACHERS) and all((e / "done.json").is_file() for e in cache)
    from multiteach.build import build_model

    entry = next(e for e in cache if e.name.split("-")[1] == TEACHERS[0])
    teacher = build_model(example.teacher_table(specs[0], str(entry / "best.pt")), 3)
    assert teacher.preprocess.mean is not None and teacher.num_classes == 3  # normalised, with its new head
