"""Portable CPU kernels: the same model bytes whatever instruction sets and vendor the CPU presents.

Two machines in one: the environment caps what numpy, ATen, oneDNN and MKL may use (a CPU with
fewer instruction sets, as far as each library can tell), and QEMU's user-mode emulator runs
the same interpreter on an emulated Intel CPU (another vendor for MKL, other cache sizes for
oneDNN's blocking) on this machine's AMD or Intel one. Each comparison runs in native mode too,
where it must find different bytes: proof that the caps and the emulated CPU really change the
kernels here, so that the portable mode's equal bytes mean something.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import kernels
from tests.conftest import REPO, need_service, tiny_params

# What a machine with fewer instruction sets looks like to each library.
CAPPED = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "AUTO",
          "NPY_DISABLE_CPU_FEATURES": "X86_V3", "OPENBLAS_CORETYPE": "Nehalem"}
# QEMU 7.2's AVX2 emulation gets grid_sample's bilinear gathers wrong (off by up to 0.8, where
# the real CPU agrees with a float64 reference to 1e-6): the emulated runs train without the
# augmentation that uses it. Everything else a training step runs is emulated exactly.
EMULATED = {"data.phantom.image_size": 16, "data.phantom.n_train": 64, "data.phantom.n_val": 16,
            "data.phantom.n_test": 8, "train.epochs": 1, "train.aug_rotate": 0.0, "train.aug_scale": 0.0,
            "train.threads": 2}
TRAIN = """
from pathlib import Path
from pipeline import train
from pipeline.core.config import load_params
train.run(load_params("params.yaml"), Path("prepared"), Path("balanced"), Path("{out}/model.pt"), Path("{out}"), None)
"""


def has_avx2() -> bool:
    return kernels.supported(kernels.cpu())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A prepared and balanced tiny phantom in ``tmp_path``, its params in params.yaml."""
    from pipeline import balance, prepare

    params = tiny_params(tmp_path, **EMULATED)
    prepare.run(params, tmp_path / "prepared", tmp_path / "summary.json")
    balance.run(params, tmp_path / "prepared", tmp_path / "balanced", tmp_path / "balance.json")
    return tmp_path


def train_bytes(root: Path, out: str, mode: str, env: dict[str, str] | None = None,
                emulate: str | None = None) -> str:
    """md5 of the network trained by ``pipeline.train`` in a fresh interpreter, in ``mode``."""
    command = [sys.executable, "-c", TRAIN.format(out=out)]
    if emulate:
        command = ["qemu-x86_64", "-cpu", emulate, *command]
    # Without the switches this test process has set on itself (it imported pipeline): native is native.
    inherited = {k: v for k, v in os.environ.items() if k not in kernels.PORTABLE_ENV}
    environment = {**inherited, **(env or {}), kernels.MODE_VARIABLE: mode, "PYTHONPATH": str(REPO),
                   "MEDCNN_LOG_LEVEL": "WARNING"}
    done = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return hashlib.md5((root / out / "model.pt").read_bytes()).hexdigest()


def test_portable_mode_sets_every_switch_before_numpy_and_torch_load():
    code = ("import pipeline, numpy, torch, json; from pipeline.core import kernels; "
            "print(json.dumps(kernels.record(2)))")
    env = {k: v for k, v in os.environ.items() if k not in kernels.PORTABLE_ENV}
    found = __import__("json").loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                    text=True, check=True).stdout)
    assert found["mode"] == "portable" and found["pinned_before_import"]
    assert found["onednn_max_cpu_isa"] == "AVX2" and found["mkl_cbwr"] == "COMPATIBLE"
    assert "X86_V4" not in found["numpy_simd"].split()
    if has_avx2():
        assert found["aten_capability"] == "AVX2" and found["numpy_simd"] == "X86_V3"
        assert found["openblas"].startswith("Haswell")
        assert "any x86-64 CPU with AVX2" in kernels.scope(found)


def test_a_library_loaded_before_the_switches_makes_the_scope_this_cpu_only():
    code = ("import numpy, pipeline, json; from pipeline.core import kernels; "
            "r = kernels.record(1); print(r['pinned_before_import']); print(kernels.scope(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    pinned, scope = out.splitlines()
    assert pinned == "False" and scope.startswith("CPUs like this one only")


def test_an_unknown_mode_is_one_clear_error():
    done = subprocess.run([sys.executable, "-c", "import pipeline"], capture_output=True, text=True,
                          env={**os.environ, kernels.MODE_VARIABLE: "fastest"})
    assert done.returncode == 1
    assert done.stderr.strip() == "error: $MEDCNN_KERNELS is 'fastest': choose one of portable, native"


def test_scope_names_what_breaks_it():
    base = {"mode": "portable", "pinned_before_import": True, "cpu_supported": True, "cpu_flags": "avx avx2 fma",
            "aten_capability": "AVX2", "threads": 2}
    assert kernels.scope(base) == "any x86-64 CPU with AVX2 and FMA, Intel or AMD, with or without AVX-512"
    old = {**base, "cpu_supported": False, "cpu_flags": "avx sse4_2", "aten_capability": "DEFAULT"}
    assert "it lacks avx2, fma" in kernels.scope(old)
    assert kernels.scope({**base, "mode": "native"}).startswith("CPUs with the same instruction sets as this one")


def test_portable_bytes_do_not_depend_on_the_instruction_sets_a_cpu_offers(data):
    if not has_avx2():
        pytest.skip("this CPU lacks AVX2: it cannot run the portable kernels beside capped ones")
    if train_bytes(data, "n-full", "native") == train_bytes(data, "n-capped", "native", CAPPED):
        pytest.skip("the caps change no kernel on this CPU: the comparison could not detect a difference")
    assert train_bytes(data, "p-full", "portable") == train_bytes(data, "p-capped", "portable", CAPPED)


def other_vendor() -> str:
    """A QEMU CPU model of the other vendor than this machine's: MKL's code paths differ by vendor."""
    return "EPYC-Rome" if kernels.cpu()["vendor"] == "GenuineIntel" else "Haswell-v4"


@pytest.mark.slow
def test_portable_bytes_are_the_same_on_an_emulated_cpu_of_the_other_vendor(data):
    need_service(shutil.which("qemu-x86_64") is not None, "QEMU user-mode emulation (Debian package qemu-user)")
    if not has_avx2():
        pytest.skip("this CPU lacks AVX2: its own bytes are not the portable ones")
    model = other_vendor()
    if train_bytes(data, "native-here", "native") == train_bytes(data, "native-emulated", "native", emulate=model):
        pytest.skip(f"an emulated {model} changes no kernel here: the comparison could not detect a difference")
    assert train_bytes(data, "here", "portable") == train_bytes(data, "emulated", "portable", emulate=model)
