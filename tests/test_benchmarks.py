"""Every benchmark script still imports and parses its flags (`--help`): they are run by hand, often
hours after the library changed under them. One subprocess for all of them (torch imports once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

PROBE = """
import contextlib, io, runpy, sys
sys.path.insert(0, {bench!r})
failed = []
for path in {paths!r}:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        failed.append(path + ": --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append(f"{{path}}: exit {{e.code}}")
        elif "usage:" not in out.getvalue():
            failed.append(path + ": no usage text")
    except Exception as e:
        failed.append(f"{{path}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
"""


def test_every_benchmark_script_imports_and_shows_its_help():
    paths = sorted(str(p) for p in BENCH.glob("*.py") if not p.name.startswith("_"))
    assert len(paths) >= 10
    code = PROBE.format(bench=str(BENCH), paths=paths)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", r.stdout
