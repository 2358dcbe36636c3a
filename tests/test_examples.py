"""Every script in examples/ runs in the tests with --smoke; a script missing from EXAMPLES
fails test_coverage."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [
    "vae_fashion_mnist.py --smoke --num-epochs 2 --num-samples 20 --out {tmp}",
    "custom_model.py --smoke --num-epochs 3 --num-samples 20",
    "cvae_fashion_mnist.py --smoke --num-epochs 2 --num-samples 10 --num-test 50 "
    "--impute-samples 20 --samples-per-class 5 --out {tmp}",
    "iwae_vs_vae.py --smoke --num-epochs 2 --num-samples 20 --num-test 50 --num-estimates 10 "
    "--out {tmp}",
    "autoencoders_fashion_mnist.py --smoke --num-epochs 1 --linear-epochs 5 --out {tmp}",
    "model_zoo.py --smoke --num-train 300 --num-epochs 2 --num-samples 20 --num-test 50 "
    "--out {tmp}",
]
#: What a script prints when it worked ("IW log" unless listed here).
EXPECTED = {"autoencoders_fashion_mnist.py": "[linear AE vs PCA]"}


def test_coverage():
    tested = {e.split()[0] for e in EXAMPLES}
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert scripts == tested, f"untested examples: {sorted(scripts - tested)}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example, tmp_path):
    script, *args = example.format(tmp=tmp_path).split()
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args,
                             "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED.get(script, "IW log") in result.stdout
