"""Using a trained model: the retrieval embedder read from any checkpoint (embedder.py), ONNX (onnx.py),
features of an image folder as Parquet (parquet.py), and a checkpoint's mAP/CMC on any dataset (evaluate.py)."""
