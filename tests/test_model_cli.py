"""`ola export`, `ola generate`, `ola bench heads` through the CLI."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from olavlm.cli.app import app
from olavlm.trainer.student.build import save_student
from tests._student import tiny_model

runner = CliRunner()


def test_export_and_generate_commands(tmp_path):
    ckpt = save_student(tiny_model(), tmp_path / "ckpt")
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(image)

    result = runner.invoke(app, ["export", str(ckpt), str(tmp_path / "llava")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "llava" / "config.json").exists()

    for folder in (ckpt, tmp_path / "llava"):
        result = runner.invoke(
            app,
            [
                "generate",
                str(folder),
                "--image",
                str(image),
                "--prompt",
                "What is it?",
                "--max-new-tokens",
                "3",
            ],
        )
        assert result.exit_code == 0, result.output


def test_missing_paths_are_one_line_errors(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_bench_heads_param_counts():
    result = runner.invoke(app, ["bench", "heads", "--json", "--sizes", ""])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    llama = report["params"]["llama3_8b"]
    assert llama["task_tokens"] == 24 * 4096
    assert len(llama["per_head"]) == 6 and llama["logit_scales"] == 3
    assert 8.0e9 < llama["student"] < 8.5e9
    assert report["params"]["phi3_mini"]["task_tokens"] == 24 * 3072
