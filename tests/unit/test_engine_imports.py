"""What a training process imports to build its DeepSpeed engine: DeepSpeed's Muon optimizer module is
imported with its ``torch.compile`` deferred to the first call (``train.engine.defer_muon_compile``),
so building an engine does not load inductor; Muon itself still compiles, once, when called."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

CHECK = r"""
import sys, torch
from vlforge.train.engine import defer_muon_compile, prepare_env
prepare_env(on_gpu=False)
from deepspeed.runtime import compiler
eager = compiler.compile
assert defer_muon_compile() is True
assert compiler.compile is eager, "DeepSpeed's compile decorator was not put back"
assert not [m for m in sys.modules if m.startswith("torch._inductor")], "inductor was loaded"
from deepspeed.runtime.zero.muon import original_muon
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
fn = original_muon.zeropower_via_newtonschulz5
compiled = []
torch.compile = lambda f, **kw: compiled.append(f) or f
G = torch.randn(8, 4)
first, second = fn(G, 2), fn(G, 2)
assert compiled == [fn.__wrapped__], compiled
assert torch.equal(first, second) and first.shape == G.shape
assert defer_muon_compile() is False
print("ok", MuonWithAuxAdam.__name__)
"""


def test_building_an_engine_does_not_load_inductor_and_muon_compiles_on_first_call():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok MuonWithAuxAdam" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
