"""--precision auto, GPU x TensorRT support checks and build modes (no TensorRT needed)."""

from __future__ import annotations

import pytest

from export.tensorrt.precision import (
    FP16_CONSTRAINED,
    FP16_STRONG,
    FP32,
    PrecisionError,
    check_trt_supports,
    choose_precision,
    parse_version,
    plan_build,
    resolve_build,
)

GTX_1080_TI, P100, V100, T4, A100 = (6, 1), (6, 0), (7, 0), (7, 5), (8, 0)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("8.6.1.post1", (8, 6, 1)),
        ("10.4.0", (10, 4, 0)),
        ("11.4.0.106", (11, 4, 0)),
        ("8.5", (8, 5, 0)),
        ("10.0.1+cuda12", (10, 0, 1)),
    ],
)
def test_parse_version(text, version):
    assert parse_version(text) == version


def test_parse_version_refuses_garbage():
    with pytest.raises(PrecisionError):
        parse_version("dev")


def test_auto_is_fp32_on_pascal_with_a_one_line_reason():
    precision, reason = choose_precision("auto", GTX_1080_TI)
    assert precision == "fp32"
    assert "1/64" in reason and "sm_61" in reason and "\n" not in reason
    assert choose_precision("auto", P100)[0] == "fp32"  # the brief's rule; the reason says how to try fp16
    assert "--precision fp16" in choose_precision("auto", P100)[1]
    assert choose_precision("auto", (5, 2))[0] == "fp32"


@pytest.mark.parametrize("cc", [V100, T4, A100, (8, 9), (9, 0)])
def test_auto_is_fp16_from_volta_on(cc):
    assert choose_precision("auto", cc)[0] == "fp16"


def test_explicit_choices_are_respected_with_a_warning_on_pascal():
    assert choose_precision("fp32", V100) == ("fp32", "fp32 as requested")
    precision, reason = choose_precision("fp16", GTX_1080_TI)
    assert precision == "fp16" and "slower" in reason
    with pytest.raises(PrecisionError, match="unknown precision 'int8'"):
        choose_precision("int8", V100)


@pytest.mark.parametrize(
    ("cc", "trt", "ok"),
    [
        (GTX_1080_TI, (8, 6, 1), True),
        (GTX_1080_TI, (8, 5, 3), False),  # its parser cannot read opset-17 LayerNormalization
        (GTX_1080_TI, (10, 0, 1), False),
        (GTX_1080_TI, (11, 4, 0), False),
        (V100, (8, 6, 1), True),
        (V100, (10, 4, 0), True),
        (V100, (10, 5, 0), False),
        (V100, (11, 0, 0), False),
        (T4, (10, 13, 0), True),
        (A100, (11, 4, 0), True),
        (A100, (8, 4, 3), False),  # no named-tensor API
    ],
)
def test_support_matrix(cc, trt, ok):
    if ok:
        check_trt_supports("GPU", cc, trt)
    else:
        with pytest.raises(PrecisionError) as info:
            check_trt_supports("GPU", cc, trt)
        assert "\n" not in str(info.value)


def test_refusals_say_what_to_install():
    with pytest.raises(PrecisionError, match=r"Volta support was removed in TensorRT 10.5.*tensorrt<10.5"):
        check_trt_supports("Tesla V100-SXM2-32GB", V100, (10, 5, 0))
    with pytest.raises(PrecisionError, match=r"8.6 is the last release for Pascal.*tensorrt==8.6"):
        check_trt_supports("NVIDIA GeForce GTX 1080 Ti", GTX_1080_TI, (10, 0, 1))
    with pytest.raises(PrecisionError, match=r"cannot read the exported LayerNormalization.*TensorRT >= 8.6"):
        check_trt_supports("A100", A100, (8, 5, 3))


def test_build_modes():
    assert plan_build("fp32", "float32", (8, 6, 1)).mode == FP32
    assert plan_build("fp32", "float32", (11, 4, 0)).kv_dtype == "float32"
    weak = plan_build("fp16", "float32", (10, 4, 0))
    assert (weak.mode, weak.kv_dtype) == (FP16_CONSTRAINED, "float16")
    assert "deprecated" in plan_build("fp16", "float32", (10, 13, 0)).note
    assert plan_build("fp16", "float16", (8, 6, 1)).mode == FP16_CONSTRAINED  # no strong typing before 10
    assert plan_build("fp16", "float16", (10, 0, 1)).mode == FP16_STRONG
    assert plan_build("fp16", "float16", (11, 4, 0)).mode == FP16_STRONG


def test_build_mode_refusals():
    with pytest.raises(PrecisionError, match="cpm export onnx --fp16"):
        plan_build("fp16", "float32", (11, 0, 0))  # weak typing is gone in 11
    with pytest.raises(PrecisionError, match="needs a float32 ONNX artifact"):
        plan_build("fp32", "float16", (8, 6, 1))
    with pytest.raises(PrecisionError):
        plan_build("fp16", "bfloat16", (10, 4, 0))
    with pytest.raises(PrecisionError):
        plan_build("auto", "float32", (10, 4, 0))  # must be resolved first


def test_auto_builds_what_the_artifact_and_tensorrt_allow():
    """TensorRT 11 has no FP16 builder flag: auto on a float32 artifact is FP32 there, with the way to FP16."""
    plan, reason = resolve_build("auto", A100, "float32", (11, 4, 0))
    assert (plan.precision, plan.mode) == ("fp32", FP32)
    assert "strongly typed" in reason and "cpm export onnx --fp16" in reason and "\n" not in reason
    plan, _ = resolve_build("auto", A100, "float16", (11, 4, 0))
    assert (plan.precision, plan.mode) == ("fp16", FP16_STRONG)
    plan, _ = resolve_build("auto", T4, "float32", (10, 13, 0))
    assert (plan.precision, plan.mode) == ("fp16", FP16_CONSTRAINED)  # weak typing still there (deprecated)
    plan, reason = resolve_build("auto", GTX_1080_TI, "float16", (8, 6, 1))  # Pascal: fp32 wanted, fp16 given
    assert plan.precision == "fp16" and "artifact is float16" in reason and "1/64" in reason
    assert resolve_build("auto", GTX_1080_TI, "float32", (8, 6, 1))[0].precision == "fp32"
    with pytest.raises(PrecisionError, match="cpm export onnx --fp16"):
        resolve_build("fp16", A100, "float32", (11, 4, 0))  # an explicit choice is never changed
