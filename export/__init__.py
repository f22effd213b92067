"""Exporters: checkpoint -> ONNX artifact (``export.onnx_export``), validation, ORT fusions;
TensorRT in ``export.tensorrt``."""
