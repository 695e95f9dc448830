"""`auto` precision: bfloat16 only where the CPU (or GPU) computes it natively, float32 elsewhere."""

from __future__ import annotations

import logging

import pytest

from actors import precision
from actors.config import RolloutConfig
from actors.precision import cpu_bf16_flags, resolve_dtype
from learner.config import LearnerConfig

# Trimmed /proc/cpuinfo texts: an AVX-512 AMD EPYC with bf16, an AVX2-only AMD EPYC, a Sapphire Rapids with AMX,
# and an Arm Neoverse V1 (its flags are called Features).
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 fma avx2 bmi2\n\nprocessor\t: 1\nflags\t\t: fpu sse2 fma avx2 bmi2\n"
SAPPHIRE = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8 avx512_bf16\n"
NEOVERSE = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "flags"),
    [(ZEN4, ["avx512_bf16"]), (AVX2_ONLY, []), (SAPPHIRE, ["amx_bf16", "avx512_bf16"]), (NEOVERSE, ["bf16"]), ("", [])],
)
def test_cpu_bf16_flags(cpuinfo: str, flags: list[str]) -> None:
    assert cpu_bf16_flags(cpuinfo) == flags


def test_a_flag_name_in_another_field_does_not_count() -> None:
    assert cpu_bf16_flags("model name\t: bf16 avx512_bf16 marketing name\nflags\t\t: avx2\n") == []


@pytest.fixture
def cpu_flags(monkeypatch: pytest.MonkeyPatch):
    def use(cpuinfo: str) -> None:
        monkeypatch.setattr(precision, "_this_cpu_bf16_flags", lambda: tuple(cpu_bf16_flags(cpuinfo)))

    return use


@pytest.mark.parametrize(("cpuinfo", "expected"), [(ZEN4, "bfloat16"), (SAPPHIRE, "bfloat16"), (AVX2_ONLY, "float32")])
def test_auto_picks_bfloat16_only_where_native(cpu_flags, cpuinfo: str, expected: str, caplog: pytest.LogCaptureFixture) -> None:
    cpu_flags(cpuinfo)
    with caplog.at_level(logging.INFO, logger="actors.precision"):
        assert resolve_dtype("auto", what="rollout engine", device="cpu") == expected
    # The choice and its reason are said once, in words.
    assert f"rollout engine dtype auto -> {expected}" in caplog.text
    assert ("no native bfloat16" in caplog.text) == (expected == "float32")


@pytest.mark.parametrize("explicit", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept(cpu_flags, explicit: str) -> None:
    cpu_flags(AVX2_ONLY)
    assert resolve_dtype(explicit, what="rollout engine", device="cpu") == explicit


def test_this_process_device_is_the_default(cpu_flags) -> None:
    cpu_flags(AVX2_ONLY)
    assert resolve_dtype("auto", what="learner") == "float32"  # no GPU here: this CPU's flags decide


def test_auto_is_the_default_of_engine_and_learner() -> None:
    assert RolloutConfig().dtype == "auto"
    assert LearnerConfig().mixed_precision == "auto"


@pytest.mark.skipif(not precision.Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo on this system")
def test_this_machine_is_read_from_proc_cpuinfo() -> None:
    flags = cpu_bf16_flags(precision.Path("/proc/cpuinfo").read_text())
    native, why = precision.native_bf16("cpu")
    assert native == bool(flags)
    assert all(flag in why for flag in flags)


@pytest.mark.parametrize(
    ("cpuinfo", "words"),
    [(ZEN4, "AVX-512, native bfloat16 (avx512_bf16)"), (AVX2_ONLY, "AVX2 without AVX-512, no native bfloat16"),
     (NEOVERSE, "native bfloat16 (bf16)")],
)
def test_the_cpu_is_described_for_timing_headers(cpuinfo: str, words: str) -> None:
    assert precision.cpu_vector_units(cpuinfo) == words
