"""One device parser (cpu, cuda, cuda:N, auto) for torch, onnxruntime, TensorRT and the CLI."""

from __future__ import annotations

import logging

import pytest

from cpm_infer import devices
from cpm_infer.devices import CPU, Device, DeviceError, parse_device, resolve_device, resolve_for_all


def test_parse_device():
    assert parse_device("cpu") == CPU and str(CPU) == "cpu"
    assert parse_device("cuda") == Device("cuda", 0) and str(parse_device("cuda")) == "cuda:0"
    assert parse_device("cuda:3") == Device("cuda", 3) and parse_device(" CUDA:1 ") == Device("cuda", 1)
    assert parse_device(Device("cuda", 2)) == Device("cuda", 2)
    for bad in ("cpu:0", "cuda:x", "cuda:-1", "rocm", "gpu", ""):
        with pytest.raises(DeviceError, match="not a CUDA device, cpu or auto"):
            parse_device(bad)
    with pytest.raises(DeviceError, match="resolve_device"):
        parse_device("auto")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend each runtime sees the given number of GPUs."""
    counts = {"torch": 0, "ort": 0, "trt": 0}
    monkeypatch.setattr(devices, "gpu_count", lambda runtime: counts[runtime])
    return counts


def test_auto_is_the_gpu_when_the_runtime_has_one(gpus):
    assert resolve_device("auto", "torch") == CPU and resolve_device("auto", "ort") == CPU
    assert resolve_device("auto", "trt") == Device("cuda", 0)  # an engine only runs on a GPU
    gpus["torch"] = 2
    assert resolve_device("auto", "torch") == Device("cuda", 0)
    assert resolve_device("AUTO", "ort") == CPU  # torch's GPU does not help onnxruntime's CPU package
    gpus["ort"] = 1
    assert resolve_device("auto", "ort") == Device("cuda", 0)


def test_explicit_devices_are_checked_against_the_runtime(gpus, monkeypatch):
    assert resolve_device("cpu", "torch") == CPU and resolve_device("cpu", "ort") == CPU
    with pytest.raises(DeviceError, match="--device cuda:0 was asked for but torch sees no CUDA GPU"):
        resolve_device("cuda", "torch")
    gpus["torch"] = 2
    assert resolve_device("cuda:1", "torch") == Device("cuda", 1)
    with pytest.raises(DeviceError, match="torch sees only 2 GPU"):
        resolve_device("cuda:2", "torch")
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="has no CUDA provider"):
        resolve_device("cuda", "ort")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="the NVIDIA driver reports none"):
        resolve_device("cuda", "ort")


def test_tensorrt_devices(gpus, caplog):
    assert resolve_device("cuda", "trt") == Device("cuda", 0) and resolve_device("cuda:3", "trt").index == 3
    with caplog.at_level(logging.WARNING, logger="cpm_infer.devices"):
        assert resolve_device("cpu", "trt") == Device("cuda", 0)  # an engine only runs on a GPU
    assert "using cuda:0 instead of --device cpu" in caplog.text
    with pytest.raises(DeviceError, match="not a CUDA device"):
        resolve_device("cuda:x", "trt")
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_device("cpu", "tpu")


def test_one_device_for_several_runtimes(gpus):
    gpus["torch"] = 1
    assert resolve_for_all("auto", ("torch", "ort")) == CPU  # onnxruntime cannot follow torch onto the GPU
    gpus["ort"] = 1
    assert resolve_for_all("auto", ("torch", "ort")) == Device("cuda", 0)
    assert resolve_for_all("cpu", ("torch", "ort")) == CPU


def test_gpu_count_without_a_gpu_package():
    """The CPU packages of torch and onnxruntime (CI) report no GPU; a missing package is no GPU either."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    if torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a GPU runtime")
    assert devices.gpu_count("torch") == 0 and devices.gpu_count("ort") == 0
    assert devices.driver_gpu_count() >= 0  # never raises, with or without a driver


def test_loaders_resolve_auto(gpus, tiny_checkpoint):
    from cpm_infer.backends import load_backend

    backend, _ = load_backend("torch", tiny_checkpoint, device="auto")
    assert str(backend.device) == "cpu"
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        load_backend("torch", tiny_checkpoint, device="cuda:0")
