"""The CUDA paths: training on the GPU, onnxruntime's CUDA provider, parity there.

They run where torch or onnxruntime sees a GPU and are skipped elsewhere (CI has none); the CPU
paths they are compared with are tested everywhere."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import small_config

torch_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
ort_cuda = pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
                              reason="this onnxruntime has no CUDA provider")


@torch_cuda
def test_a_fit_on_the_gpu_learns_what_the_cpu_fit_learns(demo_splits):
    """Same settings on both devices: the GPU reads the table through `RowSparseEmbedding`, the
    CPU through the compiled pooling; float sums in another order, nearly the same answers."""
    from meli.metrics import balanced_accuracy
    from meli.train.trainer import train_model

    train, validation = demo_splits
    fits = {device: train_model(small_config("mlp", device=device, epochs=3), train, validation, quiet=True)
            for device in ("cpu", "cuda")}
    assert fits["cuda"].device.startswith("cuda") and fits["cpu"].device == "cpu"
    cpu, gpu = fits["cpu"], fits["cuda"]
    assert np.mean(cpu.val_pred == gpu.val_pred) > 0.95
    assert abs(balanced_accuracy(cpu.val_true, cpu.val_pred) - balanced_accuracy(gpu.val_true, gpu.val_pred)) < 0.02


@torch_cuda
def test_row_sparse_adam_on_the_gpu_is_sparse_adam():
    from meli.train.row_adam import RowAdam, RowSparseEmbedding

    torch.manual_seed(0)
    weights = {}
    for kind in ("sparse", "rows"):
        emb = torch.nn.Embedding(50, 8, padding_idx=0, sparse=kind == "sparse").cuda()
        with torch.no_grad():
            emb.weight.copy_(torch.arange(400, dtype=torch.float32, device="cuda").reshape(50, 8) / 400)
        module = emb if kind == "sparse" else RowSparseEmbedding(emb)
        opt = torch.optim.SparseAdam([emb.weight], lr=0.01) if kind == "sparse" else RowAdam(module, lr=0.01)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            ids = torch.randint(0, 50, (4, 6), generator=gen).cuda()
            loss = (module(ids).sum(1) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights[kind] = emb.weight.detach().cpu()
    assert torch.allclose(weights["sparse"], weights["rows"], atol=1e-6)


@ort_cuda
@pytest.mark.parametrize("kind", ["mlp", "ensemble", "cnn"])
def test_the_cuda_provider_gives_the_cpus_answers(exported_float, demo_splits, kind):
    """A float graph on CUDA: every title's probabilities within float rounding of the CPU's,
    the same category, in any batch."""
    from meli.onnx_model import load_onnx_model

    cpu = load_onnx_model(exported_float[kind], provider="cpu")
    gpu = load_onnx_model(exported_float[kind], provider="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    titles = demo_splits[1].titles.slice(0, 500)
    ids = cpu.card.tokenizer().encode_batch(titles, compact=cpu.card.compact).ids
    on_cpu, on_gpu = cpu.predict(ids), gpu.predict(ids)
    assert np.abs(on_cpu - on_gpu).max() < 1e-5
    assert np.array_equal(on_cpu.argmax(1), on_gpu.argmax(1))
    one = np.concatenate([gpu.predict(ids[i:i + 1]) for i in range(0, 50)])
    assert np.abs(one - on_gpu[:50]).max() < 1e-5
