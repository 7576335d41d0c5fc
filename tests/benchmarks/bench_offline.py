"""How `promptune tune` fails without a network (issue 10): wall time, stderr lines and the last line, with
HF_HUB_OFFLINE unset and the default pretrained tag (ViT-B-16 / openai) not in the Hugging Face cache.

Each `--code` folder (a promptune checkout; default: this one) runs the README's first command in a fresh child
process, from an empty working folder, with that folder first on PYTHONPATH: give an older checkout and this one to
compare them in one run. Run it only on a machine without internet (otherwise it starts a real 600 MB download).
Prints one JSON object.

    python tests/benchmarks/bench_offline.py --code /path/to/old/checkout --code .
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_one(code: Path, example: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "promptune", "tune", str(example)], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
    lines = result.stderr.strip().splitlines()
    return {"code": str(code), "seconds": round(seconds, 2), "exit_code": result.returncode,
            "stderr_lines": len(lines), "last_line": lines[-1] if lines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", type=Path, help="a promptune checkout (repeatable; default: this one)")
    parser.add_argument("--example", type=Path, default=ROOT / "examples" / "fashion-mnist" / "train")
    args = parser.parse_args()
    import torch

    runs = [run_one(code.resolve(), args.example.resolve()) for code in (args.code or [ROOT])]
    print(json.dumps({"benchmark": "offline_failure", "command": "promptune tune examples/fashion-mnist/train",
                      "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
