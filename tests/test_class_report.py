"""Per-class results as files: CSVs a spreadsheet reads and a labelled confusion plot."""

import csv

import torch
from PIL import Image

from xception.class_report import format_table, write_class_report
from xception.evaluation import per_class


def test_report_files_carry_the_counts_and_the_class_names(tmp_path):
    confusion = torch.tensor([[5, 1], [2, 7]])
    write_class_report(tmp_path, confusion, ["cat", "dog"])
    rows = list(csv.reader((tmp_path / "confusion.csv").open()))
    assert rows == [["true \\ predicted", "cat", "dog"], ["cat", "5", "1"], ["dog", "2", "7"]]
    per = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [r["class"] for r in per] == ["cat", "dog"] and per[1]["images"] == "9"
    assert float(per[0]["precision"]) == 5 / 7 and float(per[1]["recall"]) == 7 / 9
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.width > 300
    table = format_table(per_class(confusion, ["cat", "dog"]))
    assert table.splitlines()[0].split() == ["class", "images", "precision", "recall", "f1"]
    assert "0.7143" in table
