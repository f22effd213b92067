"""Dependencies point one way: the runtime (``cpm_infer``) never imports ``export`` or ``trainer``.

Every ``cpm_infer`` module is imported in a fresh interpreter where ``export`` and ``trainer`` cannot
be imported; only the CLI (``cpm_infer.cli``) and the benchmark setup, which drive all three, may
reach them (lazily, inside commands).
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import cpm_infer

ALLOWED = ("cpm_infer.cli", "cpm_infer.bench.setup")

PROBE = """
import importlib, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("export", "trainer"):
            raise ImportError(f"runtime module imported {name}")
        return None

sys.meta_path.insert(0, Refuse())
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if "runtime module imported" in str(exc):
            failed.append(f"{name}: {exc}")
    except Exception:
        pass  # an optional dependency missing here is not a layering problem
print("\\n".join(failed))
"""


def _runtime_modules() -> list[str]:
    names = [
        info.name
        for info in pkgutil.walk_packages(cpm_infer.__path__, "cpm_infer.")
        if not info.name.startswith(ALLOWED)
    ]
    assert "cpm_infer.backends.trt.backend" in names and "cpm_infer.serve.app" in names
    return names


def test_runtime_never_imports_export_or_trainer() -> None:
    names = _runtime_modules()
    out = subprocess.run([sys.executable, "-c", PROBE, *names], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_probe_catches_a_violation() -> None:
    """The probe itself works: a module importing the exporter is reported."""
    out = subprocess.run([sys.executable, "-c", PROBE, "cpm_infer.bench.setup"], capture_output=True, text=True)
    # bench.setup imports export lazily (inside a function), so importing the module is clean ...
    assert out.returncode == 0
    code = PROBE.replace("failed = []", "failed = []\nimport importlib\n") + "\nimport export.onnx_export\n"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bad.returncode != 0 and "runtime module imported export" in bad.stderr
