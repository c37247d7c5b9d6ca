"""Redraw a profile chart from a committed profile.json (the GPU machine draws one too; this one can be made
anywhere, e.g. after a run that ended before its chart stage).   usage: python benchmarks/draw_profile.py DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from replayllm.bench.chart import draw
from replayllm.bench.profiler import ProfileRow

folder = Path(sys.argv[1])
data = json.loads((folder / "profile.json").read_text())
rows = [ProfileRow(**row) for row in data["profiles"]]
draw(rows, str(folder / "profile.png"),
     f"replayllm per-token critical path, {data['device']}, commit {data['commit']}, {data['date'][:10]}")
print(f"wrote {folder / 'profile.png'} ({len(rows)} bars)")
