"""detector_core must not need Ray: it imports with Ray made unimportable."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules['ray'] = None  # any 'import ray' now raises ImportError
import importlib, pkgutil, detector_core
names = [m.name for m in pkgutil.walk_packages(detector_core.__path__, 'detector_core.')]  # the wings' modules too
for name in names:
    importlib.import_module(name)
assert not any(k == 'ray' or k.startswith('ray.') for k, v in sys.modules.items() if v is not None)
print('OK', len(names))
"""


def test_detector_core_imports_without_ray():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr
    assert int(out.stdout.split()[1]) >= 40  # every module of every wing
