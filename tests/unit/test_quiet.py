"""gpt3d imports transformers and torchao without their start-up noise (torchao's "Failed to load ..._C_*.so"
lines and torch's Enum deprecation lines in the [dev] environment), and leaves gpt3d's own warnings and anything
the libraries say later alone (issue 26)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import ROOT


def test_gpt3d_imports_transformers_without_their_noise():
    pytest.importorskip("transformers")
    code = ("from gpt3d.config import Config\n"
            "from gpt3d.perf.bench import _hf_model\n"
            "c = Config()\n"
            "c.model.vocab_size = 50257\n"
            "_hf_model(c)\n"                              # imports transformers (and, through it, torchao)
            "from gpt3d.errors import warn\n"
            "warn('ours')\n"
            "import logging\n"
            "logging.getLogger('torchao').warning('said after the import')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["gpt3d: warning: ours", "said after the import"], r.stderr
