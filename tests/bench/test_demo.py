"""`make demo`'s choices that need no server: the dtype it picks from the CPU's flags."""

from __future__ import annotations

from kvshelf.demo import CHAT_TYPES, SYSTEMS, cpu_flags, cpu_name, pick_dtype
from kvshelf.testing.reference_models import PAGE_CHAT_TYPE

_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
_SAPPHIRE = (
    "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
    "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
)


def test_bf16_only_where_the_cpu_multiplies_it_natively():
    dtype, why = pick_dtype(cpu_flags(_SAPPHIRE))
    assert dtype == "bfloat16" and "amx_bf16" in why and "avx512_bf16" in why
    # AVX2 only (the EPYC a newcomer tried): bf16 would be emulated, so float32.
    dtype, why = pick_dtype(cpu_flags(_EPYC))
    assert dtype == "float32" and "emulate" in why
    assert pick_dtype(set())[0] == "float32"  # flags unknown
    assert pick_dtype({"avx512_bf16"})[0] == "bfloat16"
    assert cpu_name(_EPYC) == "AMD EPYC 7B12"


def test_the_demo_serves_the_pages_four_systems():
    assert [s.family for s in SYSTEMS] == list(PAGE_CHAT_TYPE)
    for system in SYSTEMS:
        assert PAGE_CHAT_TYPE[system.family] in system.chat_types
    assert set(CHAT_TYPES) == {"text-only", "single-image", "multi-image", "video", "audio"}
