"""Deployment: TorchScript / ONNX exports and onnxruntime sliding-window inference."""
