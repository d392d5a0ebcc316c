"""The scoring stage: titles in any supported file → categories, with onnxruntime."""
