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


BUILD = r"""
import sys, torch, deepspeed
from vlforge.config import TrainRunConfig, from_dict
from vlforge.train.engine import MUON_MODULE, build_engine, prepare_env
prepare_env(on_gpu=False)
deepspeed.initialize = lambda **kw: ("engine", None, None, None)  # what build_engine asks of it is not tested here
cfg = from_dict(TrainRunConfig, {"model": "vlmo_debug", "stages": [{"name": "itc", "objectives": {"itc": 1.0}}]})
assert MUON_MODULE not in sys.modules
engine = build_engine(torch.nn.Linear(2, 2), cfg.stages[0], cfg.deepspeed, micro_batch=1, world_size=1, on_gpu=False)
assert engine == "engine"
from deepspeed.runtime.zero.muon import original_muon as m
names = ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz", "muon_update")
lazy = [f for f in names if "compiled" in getattr(m, f).__code__.co_freevars]  # the deferring wrapper's cell
print("lazy", len(lazy))
"""


def test_build_engine_imports_muon_with_every_compile_deferred():
    done = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "lazy 3" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
