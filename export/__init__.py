"""The export stage: best checkpoint → one self-sufficient ONNX file, with proven parity."""
