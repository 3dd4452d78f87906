"""Which CPU kernels the numeric libraries may pick, so that every x86-64 machine gives the same bytes.

torch, numpy and the BLAS libraries behind them choose their kernels by the CPU they run on:
ATen's precompiled kernels by instruction set (AVX2, AVX-512), oneDNN's generated convolutions
by instruction set, MKL by vendor and instruction set (and its vector math, VML, uses
different code on Intel and AMD), numpy's loops by instruction set, OpenBLAS by CPU model.
Each choice sums in another order or rounds another way in the last bit, and training
amplifies one different bit into a different model.

The ``portable`` mode (the default) pins every one of those choices to what any x86-64 CPU
with AVX2 and FMA (Intel or AMD, from 2013 on) runs, through each library's own switch:

========================  ==========================  =============================================
library                   switch                      pinned to
========================  ==========================  =============================================
ATen (torch's kernels)    ``ATEN_CPU_CAPABILITY``     its AVX2 build, also on AVX-512 CPUs
oneDNN (convolutions)     ``ONEDNN_MAX_CPU_ISA``      AVX2 code (no AVX-512, AMX or AVX-VNNI)
MKL (GEMM, LAPACK, VML)   ``MKL_CBWR``                MKL's vendor-independent code path
MKL threads               ``MKL_DYNAMIC``             exactly the threads asked for
numpy's SIMD loops        ``NPY_DISABLE_CPU_FEATURES`` x86-64-v3 (AVX2) loops, not the AVX-512 ones
OpenBLAS (numpy, scipy)   ``OPENBLAS_CORETYPE``       its Haswell (AVX2) kernels
========================  ==========================  =============================================

Thread counts are the other half (a reduction split over N threads sums in N pieces): the
stages set them from ``train.threads`` (:func:`pipeline.core.runtime.configure_torch`).
Two operations the libraries run in VML, the only MKL path whose results still differ between
vendors, are avoided by the training code itself: AdamW's square root (the fused optimiser
uses ATen's own) and the augmentation's sines and cosines (computed in float64 by libm).

Every switch is an environment variable read once, when the library loads, so :func:`pin`
must run before numpy or torch is imported: ``pipeline/__init__.py`` calls it, which is the
first thing ``python -m pipeline.<stage>`` executes. ``MEDCNN_KERNELS=native`` leaves the
libraries free (faster on some AVX-512 machines, reproducible only on the same kind of CPU).
:func:`record` says what was in effect, for ``timing.json``, MLflow and the report.

This module imports nothing beyond the standard library: it runs before everything else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

MODE_VARIABLE = "MEDCNN_KERNELS"
MODES = ("portable", "native")

PORTABLE_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
}
# What a CPU needs for the portable kernels to be the ones above: without AVX2, ATen and oneDNN
# fall back to older code and the bytes differ from every AVX2 machine's.
REQUIRED_FLAGS = ("avx2", "fma")
# The libraries whose kernels the switches choose; imported before pin(), they keep their own choice.
PINNED_LIBRARIES = ("numpy", "torch")

_state: dict[str, Any] = {"mode": None, "late": ()}


def mode() -> str:
    """``portable`` unless ``$MEDCNN_KERNELS`` says ``native``; anything else ends the process
    with one line (this runs on import, before a stage can catch errors)."""
    value = os.environ.get(MODE_VARIABLE, "portable").strip().lower() or "portable"
    if value not in MODES:
        raise SystemExit(f"error: ${MODE_VARIABLE} is {value!r}: choose one of {', '.join(MODES)}")
    return value


def pin() -> None:
    """Set the portable switches in this process's environment (and so its children's), unless
    ``$MEDCNN_KERNELS`` is ``native``. Idempotent; notes which libraries were imported too early
    for the switches to reach them (:func:`record` reports it)."""
    chosen = mode()
    if chosen == "portable":
        os.environ.update(PORTABLE_ENV)
    if _state["mode"] is None:
        _state["late"] = tuple(name for name in PINNED_LIBRARIES if name in sys.modules)
    _state["mode"] = chosen


def cpu() -> dict[str, Any]:
    """The CPU as Linux describes it: model name, vendor and the instruction sets that decide kernels."""
    info: dict[str, Any] = {"model": None, "vendor": None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(model=fields.get("model name"), vendor=fields.get("vendor_id"),
                flags=sorted(f for f in flags if f in ("sse4_2", "avx", "avx2", "fma") or f.startswith(("avx512", "amx"))))
    return info


def supported(cpu_info: dict[str, Any]) -> bool:
    """Whether the portable kernels are the ones this CPU runs (it has AVX2 and FMA)."""
    return all(flag in cpu_info["flags"] for flag in REQUIRED_FLAGS)


def record(threads: int | None = None) -> dict[str, Any]:
    """What picked this process's kernels: the mode and whether it could take effect, the CPU,
    the instruction set or code path each library used, threads and library versions."""
    import numpy

    chosen = _state["mode"] or mode()
    cpu_info = cpu()
    found: dict[str, Any] = {
        "mode": chosen,
        "pinned_before_import": chosen == "portable" and not _state["late"],
        "cpu": cpu_info["model"], "cpu_vendor": cpu_info["vendor"], "cpu_flags": " ".join(cpu_info["flags"]),
        "cpu_supported": supported(cpu_info),
        "numpy": numpy.__version__,
        "numpy_simd": " ".join(_numpy_simd()),
        "openblas": _openblas(),
    }
    for name in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        found[name.lower()] = os.environ.get(name, "unset (the CPU's best)")
    if "torch" in sys.modules:
        import torch

        config = torch.__config__.show()
        found.update(torch=torch.__version__, aten_capability=torch.backends.cpu.get_cpu_capability(),
                     mkl=_line(config, "Math Kernel Library"), onednn=_line(config, "MKL-DNN"),
                     threads=torch.get_num_threads() if threads is None else threads)
    return found


def scope(found: dict[str, Any]) -> str:
    """The machines on which a rerun (same params, seed, requirements.lock and thread count) gives
    the same bytes, from a :func:`record`."""
    if found["mode"] == "portable" and found["pinned_before_import"] and found["cpu_supported"] \
            and found.get("aten_capability") == "AVX2":
        return "any x86-64 CPU with AVX2 and FMA, Intel or AMD, with or without AVX-512"
    if found["mode"] == "portable" and not found["cpu_supported"]:
        return (f"CPUs like this one only: it lacks {', '.join(f for f in REQUIRED_FLAGS if f not in found['cpu_flags'])}, "
                "so the libraries ran older code than the portable kernels of AVX2 machines")
    if found["mode"] == "portable":
        return ("CPUs like this one only: the portable switches were set after numpy or torch had loaded, so the "
                "libraries kept the kernels this CPU offers (run the stages with python -m pipeline.<stage>)")
    return (f"CPUs with the same instruction sets as this one ({found['cpu_flags']}) only: "
            f"{MODE_VARIABLE}=native let each library choose the kernels this CPU offers")


def _numpy_simd() -> list[str]:
    """numpy's dispatched SIMD targets that are on in this process (a disabled one reads as off)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy < 2
        return []
    return [target for target in __cpu_dispatch__ if __cpu_features__.get(target)]


def _openblas() -> str | None:
    """OpenBLAS's kernel family (its ``architecture``) in numpy, as threadpoolctl reads it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return next((f"{lib.get('architecture')} ({lib.get('version')})" for lib in threadpool_info()
                 if lib.get("internal_api") == "openblas"), None)


def _line(config: str, needle: str) -> str | None:
    return next((line.strip(" -") for line in config.splitlines() if needle in line), None)
