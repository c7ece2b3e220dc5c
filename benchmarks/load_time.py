"""Embedded model load time: converting the GGUF (first use) against loading the safetensors cache.

Usage: .venv/bin/python benchmarks/load_time.py   ->  results/bench/load_time.json
Both are measured in this one run, on a fresh cache folder, three cached loads after the conversion.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_search import models  # noqa: E402
from lora_search.config.compose import load_config  # noqa: E402
from lora_search.core import hardware


def main() -> None:
    """Measure and write results/bench/load_time.json."""
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config([f"cache_dir={cache}"])
        t0 = time.perf_counter()
        models.local_copy(cfg.model, cfg.cache_dir)
        convert_s = time.perf_counter() - t0
        cached = []
        for _ in range(3):
            t0 = time.perf_counter()
            base = models.load_base(cfg.model, cfg.quant, cfg.cache_dir)
            cached.append(time.perf_counter() - t0)
            del base
    result = {
        "name": "load_time",
        "model": cfg.model.name,
        "gguf_convert_s": round(convert_s, 3),
        "cached_load_s": [round(s, 3) for s in cached],
        "cached_load_median_s": round(statistics.median(cached), 3),
        "speedup": round(convert_s / statistics.median(cached), 1),
        "provenance": hardware.provenance(),
    }
    out = ROOT / "results" / "bench" / "load_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))


if __name__ == "__main__":
    main()
