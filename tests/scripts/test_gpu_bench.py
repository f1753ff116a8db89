"""scripts/gpu_bench.py, run small on CPU: the script a GPU session runs as its one prepared device check must
get through every phase (model-only, decode-only, the data path, the comparison) and print its JSON, so the
lent minutes go to measuring, not to fixing the script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.py"


def test_every_phase_runs_on_cpu_and_reports_its_figures():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--images", "24", "--batch", "8", "--repeats", "1",
         "--compare", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["autocast"] == "fp32"  # no bf16/fp16 autocast off CUDA
    assert figures["batch"] == 8 and figures["images"] == 24 and figures["jpeg_side"] == 256
    assert figures["batchnorm_folded"] > 40
    for key in ("model_only_img_s", "decode_only_img_s", "data_path_img_s"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert 0.0 <= figures["max_probability_difference_vs_cpu_path"] < 1.0
