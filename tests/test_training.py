"""Models and the training loop: shapes, learning, reproducibility, the checkpoint contract."""

from __future__ import annotations

import bz2
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_config
from meli.checkpoint import load_checkpoint, save_checkpoint
from meli.errors import InputError, MeliError, ModelFileError
from meli.contract import CNNConfig, MLPConfig
from meli.models import CNN, MLP, build_model
from meli.tokenizer import N_SPECIAL, Tokenizer
from meli.vocabulary import build_vocabulary
from meli.train.config import EmbeddingConfig, load_config
from meli.train.trainer import pick_device, train_model


@pytest.mark.parametrize("model", [MLP(MLPConfig(50, 7, embedding_dim=8, hidden=(16,))),
                                   CNN(CNNConfig(50, 7, embedding_dim=8, filters=4, kernel_sizes=(2, 5)))])
def test_models_take_any_length_and_empty_rows(model):
    model.eval()
    for length in (1, 2, 4, 5, 40):
        ids = torch.randint(2, 50, (3, length))
        ids[1] = 0  # an empty title: all padding
        out = model(ids)
        assert out.shape == (3, 7) and torch.isfinite(out).all()
    # padding never changes a row's scores
    ids = torch.randint(2, 50, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 9, dtype=torch.long)], dim=1)
    assert torch.allclose(model(ids), model(padded), atol=1e-6)


def test_dropout_is_off_in_eval_mode():
    model = build_model("mlp", MLPConfig(50, 7, embedding_dim=8, dropout=0.9, embedding_dropout=0.5)).eval()
    ids = torch.randint(2, 50, (4, 10))
    assert torch.equal(model(ids), model(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_masks_drawn_by_numpy_match_torchs_dropout(dtype):
    """A seeded `Dropout` (the trainer seeds them each epoch on the CPU) zeroes a p share of the
    values, scales the rest by 1/(1-p) in the input's type, passes gradients through the same
    mask, and draws the same masks again from the same seed."""
    from meli.models import Dropout, seed_dropout

    layer = Dropout(0.3).train()
    seed_dropout(layer, (4, 1))
    x = torch.ones(256, 512, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    kept = y != 0
    assert abs(1.0 - kept.float().mean().item() - 0.3) < 0.005
    assert torch.allclose(y[kept].float(), torch.full_like(y[kept].float(), 1 / 0.7), rtol=1e-2)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    seed_dropout(layer, (4, 1))
    assert torch.equal(layer(x) != 0, kept)  # the same seed, the same mask
    assert not torch.equal(layer(x) != 0, kept)  # the generator moves on
    seed_dropout(layer, (4, 2))
    assert not torch.equal(layer(x) != 0, kept)
    assert torch.equal(layer.eval()(x), x)


def test_word_dropout_drops_ids_only_in_training():
    from meli.models import _drop_tokens

    torch.manual_seed(0)
    ids = torch.randint(2, 50, (64, 100))
    ids[:, 80:] = 0  # padding
    dropped = _drop_tokens(ids, 0.3, training=True)
    kept = dropped[:, :80] != 0
    assert abs(1.0 - kept.float().mean().item() - 0.3) < 0.02  # about 30% of the real ids are dropped
    assert torch.equal(dropped[:, :80][kept], ids[:, :80][kept])  # the others are left as they were
    assert (dropped[:, 80:] == 0).all()  # padding stays padding
    assert torch.equal(_drop_tokens(ids, 0.3, training=False), ids)
    assert torch.equal(_drop_tokens(ids, 0.0, training=True), ids)


def test_training_learns_the_demo_data(trained):
    for kind in ("mlp", "cnn"):
        result = trained[kind]
        history = result.history
        assert history[-1].train_loss < history[0].train_loss, kind
        best = result.checkpoint.metrics["val_balanced_accuracy"]
        assert best == max(m.val_balanced_accuracy for m in history)
        assert best > 0.9, (kind, best)  # 30 categories: chance is 0.033; these small fits reach 0.93-0.95


def test_training_is_reproducible_on_cpu(demo_splits):
    train, validation = demo_splits
    config = small_config("mlp", epochs=1)
    a = train_model(config, train, validation, quiet=True)
    b = train_model(config, train, validation, quiet=True)
    for key, value in a.checkpoint.state_dict.items():
        assert torch.equal(value, b.checkpoint.state_dict[key]), key
    c = train_model(dataclasses.replace(config, seed=1), train, validation, quiet=True)
    assert not torch.equal(a.checkpoint.state_dict["embedding.weight"], c.checkpoint.state_dict["embedding.weight"])


def test_early_stopping_keeps_the_best_epoch(demo_splits):
    train, validation = demo_splits
    result = train_model(small_config("mlp", epochs=30, patience=1, lr=0.05, schedule="constant"), train, validation, quiet=True)
    assert result.stopped_early and len(result.history) < 30
    assert result.best_epoch == len(result.history) - 1


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(trained, tmp_path):
    ckpt = trained["cnn"].checkpoint
    path = save_checkpoint(ckpt, tmp_path / "best.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "meli-checkpoint" and raw["labels"] == list(ckpt.labels)
    loaded = load_checkpoint(path)
    ids = torch.from_numpy(loaded.tokenizer().encode_batch(["Taladro Bosch 650w", "casco moto"]).ids)
    assert torch.equal(loaded.build_model()(ids), ckpt.build_model()(ids))


def test_bad_checkpoints_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError) as e:
        load_checkpoint(corrupt)
    assert str(e.value) == f"{corrupt}: not a readable checkpoint (not a file torch.save wrote)"
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ModelFileError) as e:
        load_checkpoint(foreign)
    assert str(e.value) == f"{foreign}: not a meli-categorizer checkpoint (no 'meli-checkpoint' format marker)"
    with pytest.raises(ModelFileError) as e:
        load_checkpoint(tmp_path / "missing.pt")
    assert str(e.value) == f"{tmp_path / 'missing.pt'}: no such checkpoint file"


@pytest.mark.parametrize("init", ["word2vec", "fasttext"])
def test_gensim_embeddings_trained_on_titles(init, demo_splits, caplog):
    from meli.train.embeddings import init_embedding, word_vectors

    train, validation = demo_splits
    config = small_config("cnn", epochs=3, embeddings=EmbeddingConfig(init=init, epochs=2))
    # the vectors gensim trains on the titles land in the rows of the vocabulary's words
    tokenizer = Tokenizer(config.tokenizer, build_vocabulary(train.titles, config.tokenizer, config.vocabulary))
    vectors = word_vectors(config.embeddings, tokenizer, train.titles.to_pylist(), 32, seed=0)
    weight = torch.zeros(tokenizer.n_ids, 32)
    words = [t for t in tokenizer.vocabulary if " " not in t and "^" not in t]
    assert init_embedding(weight, vectors, tokenizer) >= 0.9 * len(words)
    row = tokenizer.vocabulary.index("taladro") + N_SPECIAL
    assert torch.equal(weight[row], torch.tensor(vectors["taladro"]))
    # and training starts from them
    with caplog.at_level(logging.INFO, logger="meli.train.embeddings"):
        result = train_model(config, train, validation, quiet=True)
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("initialised ")]
    assert loaded and int(loaded[0].split()[1]) >= 0.9 * len(words), loaded
    assert result.checkpoint.metrics["val_balanced_accuracy"] > 0.88  # these fits reach 0.91-0.94


def test_pretrained_word2vec_text_file(demo_splits, tmp_path, caplog):
    from meli.train.embeddings import init_embedding, load_pretrained

    train, validation = demo_splits
    rng = np.random.default_rng(0)
    words = ["taladro", "casco", "funda", "palabra_que_no_esta"]
    lines = [f"{len(words)} 32"] + [w + " " + " ".join(f"{x:.4f}" for x in rng.normal(size=32)) for w in words]
    path = tmp_path / "vectors.txt.bz2"  # the SBW file's layout: word2vec text, bz2
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    config = small_config("cnn", epochs=1, embeddings=EmbeddingConfig(init="pretrained", path=str(path)))
    tokenizer = Tokenizer(config.tokenizer, build_vocabulary(train.titles, config.tokenizer, config.vocabulary))
    weight = torch.randn(tokenizer.n_ids, 32)
    before = weight.clone()
    assert init_embedding(weight, load_pretrained(path), tokenizer) == 3  # the file's three vocabulary words
    for word, line in zip(words, lines[1:]):
        if word in tokenizer.vocabulary:
            row = tokenizer.vocabulary.index(word) + N_SPECIAL
            assert torch.equal(weight[row], torch.tensor([float(x) for x in line.split()[1:]]))
            weight[row] = before[row]
    assert torch.equal(weight, before)  # no other row moved
    with caplog.at_level(logging.INFO, logger="meli.train.embeddings"):
        assert train_model(config, train, validation, quiet=True).history
    assert any(r.getMessage().startswith("initialised 3 of ") for r in caplog.records)
    wrong_dim = dataclasses.replace(config, cnn=dataclasses.replace(config.cnn, embedding_dim=16))
    with pytest.raises(InputError, match="dimension 32 but the model's embedding_dim is 16"):
        train_model(wrong_dim, train, validation, quiet=True)
    with pytest.raises(InputError, match="no such embeddings file"):
        train_model(small_config("cnn", embeddings=EmbeddingConfig(init="pretrained", path=str(tmp_path / "x.txt"))),
                    train, validation, quiet=True)


def test_config_files_load_and_reject_typos(tmp_path):
    from conftest import ROOT

    assert load_config(ROOT / "train" / "configs" / "mlp.toml").model == "mlp"
    assert load_config("cnn").cnn.kernel_sizes == (1, 2, 3)
    assert load_config(None) == load_config("mlp") == load_config(ROOT / "train" / "configs" / "mlp.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[mlp]\nhiden = [64]\n")
    with pytest.raises(MeliError, match=r"\[mlp\]: unknown setting\(s\) hiden"):
        load_config(bad)


def test_the_student_trains_in_its_own_precision(tmp_path):
    """`distill.precision` is the student's arithmetic (and its refit's); the members keep the
    config's `precision`."""
    from meli.train.recipe import student_config

    path = tmp_path / "mixed.toml"
    path.write_text('precision = "bf16"\nmembers = 3\n[distill]\nenabled = true\nprecision = "fp32"\n')
    config = load_config(path)
    assert config.precision == "bf16" and student_config(config).precision == "fp32"
    assert student_config(config).members == 1
    path.write_text('[distill]\nprecision = "fp8"\n')
    with pytest.raises(MeliError, match="fp8"):
        load_config(path)


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MeliError, match="no CUDA GPU"):
            pick_device("cuda")


def test_refit_trains_on_train_and_validation_for_the_best_epoch_count(demo_splits):
    from meli.train.recipe import train_and_refit

    train, validation = demo_splits
    config = small_config("mlp", epochs=3, refit=True)
    selection = train_model(dataclasses.replace(config, refit=False), train, validation, quiet=True)
    result = train_and_refit(config, train, validation, quiet=True)
    # the reported metrics are the (honest) selection fit's; the model is the refit
    assert result.checkpoint.metrics["val_balanced_accuracy"] == selection.checkpoint.metrics["val_balanced_accuracy"]
    assert result.checkpoint.metrics["refit_epochs"] == selection.best_epoch
    assert result.checkpoint.provenance["refit"] == "train+validation"
    only_in_validation = set(result.checkpoint.vocabulary) - set(selection.checkpoint.vocabulary)
    assert only_in_validation, "the refit vocabulary must include words seen only in validation"
    assert not torch.equal(result.checkpoint.state_dict["head.1.weight"], selection.checkpoint.state_dict["head.1.weight"])


def test_ids_no_training_title_holds_keep_zero_rows(trained, demo_splits):
    train, _ = demo_splits
    for kind in ("mlp", "cnn"):
        ckpt = trained[kind].checkpoint
        seen = np.unique(ckpt.tokenizer().encode_batch(train.titles).ids)
        weight = ckpt.state_dict["embedding.weight"]
        nonzero = weight.ne(0).any(dim=1).numpy()
        assert set(np.flatnonzero(nonzero)) == set(seen) - {0}, kind
        assert nonzero.sum() < len(nonzero), kind  # most hash buckets are never hit


def test_an_ensemble_averages_its_members_probabilities(trained, tmp_path):
    result = trained["ensemble"]
    ckpt = result.checkpoint
    assert ckpt.members == 2
    metrics = ckpt.metrics
    assert {"member1_val_balanced_accuracy", "member2_val_balanced_accuracy"} <= set(metrics)
    assert metrics["val_balanced_accuracy"] == pytest.approx(float(np.mean(
        [np.mean(result.val_pred[result.val_true == c] == c) for c in np.unique(result.val_true)])))
    assert {m.member for m in result.history} == {0, 1}
    model = ckpt.build_model()
    first, second = model.members
    # members are trained with seeds seed and seed + 1: two different models
    assert not torch.equal(first.embedding.weight, second.embedding.weight)
    ids = torch.from_numpy(ckpt.tokenizer().encode_batch(["Taladro Bosch 650w", "casco moto", ""]).ids)
    with torch.no_grad():
        mean = (torch.softmax(first(ids), -1) + torch.softmax(second(ids), -1)) / 2
        assert torch.allclose(torch.softmax(model(ids), -1), mean, atol=1e-6)
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "ensemble.pt"))
    assert loaded.members == 2
    with torch.no_grad():
        assert torch.equal(loaded.build_model()(ids), model(ids))


def test_an_ensemble_refits_every_member(demo_splits):
    from meli.train.recipe import train_and_refit

    train, validation = demo_splits
    result = train_and_refit(small_config("mlp", epochs=2, members=2, refit=True), train, validation, quiet=True)
    ckpt = result.checkpoint
    assert ckpt.members == 2 and ckpt.provenance["refit"] == "train+validation"
    config = small_config("mlp")
    train_only = build_vocabulary(train.titles, config.tokenizer, config.vocabulary)
    assert set(ckpt.vocabulary) - set(train_only), "the refit vocabulary must include words seen only in validation"
    a, b = (ckpt.state_dict[f"members.{i}.head.1.weight"] for i in range(2))
    assert a.shape == b.shape and not torch.equal(a, b)
    with pytest.raises(MeliError, match="members: 0: must be at least 1"):
        load_config(None, members=0)


def test_row_adam_takes_sparse_adams_steps():
    """The row-wise optimizer is SparseAdam's arithmetic without sparse tensors: same weights
    after steps with repeated ids, padding and a one-cycle schedule that moves lr and beta1."""
    from torch import nn

    from meli.train.row_adam import RowAdam, RowSparseEmbedding

    weights = {}
    for kind in ("sparse", "rows"):
        torch.manual_seed(0)
        emb = nn.Embedding(60, 5, padding_idx=0)
        if kind == "sparse":
            emb.sparse = True
            module, opt = emb, torch.optim.SparseAdam(emb.parameters(), lr=0.05)
        else:
            module = RowSparseEmbedding(emb)
            opt = RowAdam(module, lr=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            ids = torch.randint(0, 60, (8, 7), generator=g)
            ids[:, 5:] = 0  # padding
            loss = (module(ids).sum(1) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        weights[kind] = emb.weight.detach()
    assert torch.allclose(weights["sparse"], weights["rows"], atol=1e-6)
    assert not torch.equal(weights["rows"], torch.zeros_like(weights["rows"]))
    assert torch.equal(weights["rows"][0], torch.zeros(5))  # padding never moves


def test_compiled_mean_pooling_takes_the_same_steps():
    """`PooledRows` (the CPU training path of a mean-pooling MLP: compiled mean, backward and
    row-wise Adam over flat ids with a word-dropout mask) moves the table as SparseAdam does
    under the MLP's own mean over the kept ids, with titles of every length, empty ones too."""
    from torch import nn

    from meli.train.row_adam import PooledRows, RowAdam

    rng = np.random.default_rng(3)
    batches = []
    for _ in range(10):
        lengths = rng.integers(0, 12, 9)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = rng.integers(0, 60, offsets[-1]).astype(np.int64)  # id 0 (padding) included
        batches.append((values, offsets, rng.random(len(values)) >= 0.3, torch.from_numpy(rng.normal(size=(9, 5)).astype(np.float32))))
    weights = {}
    for kind in ("sparse", "pooled"):
        torch.manual_seed(0)
        emb = nn.Embedding(60, 5, padding_idx=0)
        if kind == "sparse":
            emb.sparse = True
            opt = torch.optim.SparseAdam(emb.parameters(), lr=0.05)
        else:
            table = PooledRows(emb.weight)
            opt = RowAdam(table, lr=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=len(batches))
        for values, offsets, kept, target in batches:
            if kind == "sparse":  # the MLP's forward: dropped ids read as padding, mean over the rest
                ids = torch.zeros(9, max(1, int(np.diff(offsets).max())), dtype=torch.int64)
                for t in range(9):
                    row = values[offsets[t]:offsets[t + 1]] * kept[offsets[t]:offsets[t + 1]]
                    ids[t, : len(row)] = torch.from_numpy(row)
                pooled = emb(ids).sum(1) / (ids != 0).sum(1, keepdim=True).clamp(min=1)
            else:
                pooled = table.pool(values, offsets, kept)
            loss = ((pooled - target) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        weights[kind] = emb.weight.detach()
    assert torch.allclose(weights["sparse"], weights["pooled"], atol=1e-5)
    assert torch.equal(weights["pooled"][0], torch.zeros(5))  # padding never moves


def test_recombined_titles_splice_two_training_titles():
    import pyarrow as pa

    from meli.train.distill import recombine_titles

    titles = pa.array(["funda iphone silicona", "taladro bosch 650w", "funda samsung cuero", None])
    labels = np.array([0, 1, 0, 2])
    out = recombine_titles(titles, labels, 200, seed=0).to_pylist()
    assert len(out) == 200 and out == recombine_titles(titles, labels, 200, seed=0).to_pylist()
    heads = {"funda iphone", "taladro bosch", "funda samsung", ""}
    tails = {"silicona", "650w", "cuero", ""}
    for t in out:
        words = t.split()
        assert " ".join(words[:2]) in heads or words[:1] == [] or " ".join(words[-1:]) in tails
    assert len(set(out)) > 4  # new titles, not copies


@pytest.mark.parametrize("top_k", [1, 3, 6, 50])
def test_sparse_targets_stand_for_the_dense_ones(top_k):
    """Real titles the teachers never saw mix their probabilities with the smoothed label;
    titles they trained on, and recombined ones, keep the teachers' probabilities. Kept as the
    top k plus an even share of the rest, the targets sum to 1, keep the top k exactly, and the
    loss against them is the dense cross-entropy against the targets they stand for (all of
    the teachers' probabilities when k covers every category)."""
    import torch.nn.functional as F

    from meli.train.distill import SparseTargets, soft_cross_entropy

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(6, 0.3), size=40).astype(np.float32)
    labels = rng.integers(0, 6, 40)
    unseen = rng.random(40) < 0.5
    t = SparseTargets.of(probs, labels, unseen, teacher_weight=0.5, smoothing=0.2, top_k=top_k)
    dense = t.dense(6)
    assert np.allclose(dense.sum(1), 1.0, atol=1e-5)
    hard = np.full((40, 6), 0.2 / 6, np.float32)
    hard[np.arange(40), labels] += 0.8
    exact = np.where(unseen[:, None], 0.5 * probs + 0.5 * hard, probs)
    if top_k >= 6:
        assert np.allclose(dense, exact, atol=1e-6)
    else:  # the k largest of each row as they are; the rest share what is left
        top = np.argsort(-probs, axis=1)[:, :top_k]
        assert np.allclose(np.take_along_axis(dense, top, 1), np.take_along_axis(exact, top, 1), atol=1e-6)
    logits = torch.from_numpy(rng.normal(size=(40, 6)).astype(np.float32))
    sparse_loss = soft_cross_entropy(logits, torch.from_numpy(t.idx), torch.from_numpy(t.val), torch.from_numpy(t.base))
    assert torch.allclose(sparse_loss, F.cross_entropy(logits, torch.from_numpy(dense)), atol=1e-5)


def test_a_distilled_student_learns_from_the_ensemble(demo_splits):
    """members > 1 with distillation ships one model of the members' shape, refit like them,
    and reports the student's validation figures beside the ensemble's."""
    from meli.train.distill import DistillConfig
    from meli.train.recipe import train_and_refit
    from meli.train.trainer import STUDENT

    train, validation = demo_splits
    config = small_config("mlp", epochs=4, members=2, refit=True, distill=DistillConfig(enabled=True, recombined=0.5))
    result = train_and_refit(config, train, validation, quiet=True)
    ckpt = result.checkpoint
    assert ckpt.members == 1 and "head.1.weight" in ckpt.state_dict
    metrics = ckpt.metrics
    assert {"member1_val_balanced_accuracy", "member2_val_balanced_accuracy", "teachers_val_balanced_accuracy"} <= set(metrics)
    # two 4-epoch teachers and a 4-epoch student: 0.73-0.88 over seeds 0-2 (the 600 demo
    # validation titles are few); a student that learnt nothing stays near 0.3
    assert metrics["val_balanced_accuracy"] > 0.7
    assert {m.member for m in result.history} == {0, 1, STUDENT}
    assert ckpt.provenance["refit"] == "train+validation"
    assert set(ckpt.vocabulary) - set(build_vocabulary(train.titles, config.tokenizer, config.vocabulary))


def test_fresh_distillation_draws_new_recombined_titles_every_epoch(trained, demo_splits, monkeypatch, tmp_path):
    """distill.fresh: set 0 is the one a plain distillation trains on; set k is another draw,
    labelled by the teachers; the real titles and their targets stay the same in every set."""
    from meli.train.distill import DistillConfig, SparseTargets, TransferSet, recombine_titles
    from meli.train.shards import concat_windows
    from meli.train.trainer import label_indices

    train, _ = demo_splits
    teachers = trained["ensemble"].checkpoint
    config = small_config("mlp", members=2, distill=DistillConfig(enabled=True, recombined=0.5, fresh=True, top_k=5))
    y = label_indices(train.categories, teachers.labels)
    tokenizer = teachers.tokenizer()
    transfer = TransferSet(tmp_path, train, y, len(teachers.labels), tokenizer, teachers, len(train), config,
                           torch.device("cpu"), compact=True, chunk_rows=1000)

    def rows(corpus):
        return [concat_windows(list(shard.chunks(777))) for shard in corpus.shards]

    (real0, set0), (real1, set1) = rows(transfer.corpus(0)), rows(transfer.corpus(1))
    n = len(train)
    assert len(real0) == n and len(set0) == len(set1) == round(0.5 * n)
    assert np.array_equal(real0.encoded.values, real1.encoded.values) and np.array_equal(real0.target_val, real1.target_val)
    assert not np.array_equal(set0.target_val, set1.target_val)  # new titles, labelled anew
    assert not (tmp_path / "recombined-0").exists()  # an old set's files go when a new one is made
    again = rows(transfer.corpus(0))[1]
    assert np.array_equal(again.encoded.values, set0.encoded.values) and np.array_equal(again.target_val, set0.target_val)
    # the titles are stored compact; the recombined rows' targets are the teachers' own probabilities, top 5 kept
    extra = recombine_titles(train.titles, y, round(0.5 * n), seed=config.seed)
    assert np.array_equal(set0.encoded.values, tokenizer.encode_batch(extra, compact=True).values)
    expected = SparseTargets.of(transfer.teach(extra), set0.labels, np.zeros(len(extra), bool),
                                0.5, config.label_smoothing, 5)
    assert np.allclose(np.sort(set0.target_val[:, :5], 1), np.sort(expected.val[:, :5], 1), rtol=1e-3, atol=1e-7)  # float16
    assert np.allclose(set0.target_base, expected.base, atol=1e-7)
    # a fit labels the real titles once, then one recombined set (or, fresh, one per epoch)
    calls = []
    original = TransferSet.teach
    monkeypatch.setattr(TransferSet, "teach", lambda self, titles: calls.append(len(titles)) or original(self, titles))
    for fresh, sets in ((True, config.epochs), (False, 1)):
        calls.clear()
        fit_config = dataclasses.replace(config, members=1, distill=dataclasses.replace(config.distill, fresh=fresh))
        student = train_model(fit_config, train, demo_splits[1], quiet=True, teacher=teachers, teacher_saw=len(train))
        assert sum(calls) == n + round(0.5 * n) * sets
        assert student.checkpoint.metrics["val_balanced_accuracy"] > 0.7  # 0.73-0.88 over seeds; untrained: 0.3


def test_targets_keep_more_categories_while_they_fit_their_budget(trained, demo_splits, tmp_path):
    """distill.target_gib widens each title's kept probabilities past top_k while the student's
    target files fit it: the shipped config keeps every category at today's size (the student's
    3 x 38,205 rows, the refit's 3 x 44,576), some more at 500,000 titles and top_k from
    2,000,000; a TransferSet writes that many slots, and with all of them kept the targets are
    the teachers' probabilities exactly (no even share of a rest)."""
    from meli.train.distill import DistillConfig, TransferSet
    from meli.train.shards import concat_windows
    from meli.train.trainer import label_indices

    shipped = load_config(None).distill
    assert shipped.target_gib > 0
    for rows in (3 * 38_205, 3 * 44_576):
        assert shipped.k_for(rows, 632) == 632
    assert shipped.top_k < shipped.k_for(3 * 500_000, 632) < 632
    assert shipped.k_for(3 * 2_000_000, 632) == shipped.k_for(3 * 20_000_000, 1588) == shipped.top_k
    budget = DistillConfig(top_k=5, target_gib=1e-3)
    k = budget.k_for(1000, 10_000)
    assert k > 5 and 1000 * 4 * (k + 1) <= 2**30 * 1e-3 < 1000 * 4 * (k + 2)
    assert DistillConfig(top_k=5).k_for(10, 30) == 5 and budget.k_for(10**9, 30) == 5

    train, _ = demo_splits
    teachers = trained["ensemble"].checkpoint
    n_labels = len(teachers.labels)
    config = small_config("mlp", members=2, distill=DistillConfig(enabled=True, recombined=0.5, top_k=5, target_gib=0.01))
    y = label_indices(train.categories, teachers.labels)
    transfer = TransferSet(tmp_path, train, y, n_labels, teachers.tokenizer(), teachers, len(train), config,
                           torch.device("cpu"), compact=True, chunk_rows=1000)
    assert transfer.k == n_labels
    real, recombined = (concat_windows(list(shard.chunks())) for shard in transfer.corpus(0).shards)
    for part in (real, recombined):
        assert part.target_idx.shape[1] == n_labels + 1
        assert (part.target_base == 0).all()
        assert np.allclose(part.target_val[:, :-1].astype(np.float32).sum(1), 1.0, atol=2e-3)


def test_titles_past_those_the_teachers_saw_also_get_their_true_label(trained, demo_splits, tmp_path):
    """A refit's real titles are the training titles (which the teachers trained on), then the
    validation titles (which they never saw): only the latter mix the smoothed true label into
    their targets, in the slot after the top k."""
    from meli.train.distill import DistillConfig, TransferSet
    from meli.train.shards import concat_windows, scattered_chunks
    from meli.train.trainer import label_indices

    train, _ = demo_splits
    teachers = trained["ensemble"].checkpoint
    config = small_config("mlp", members=2, distill=DistillConfig(enabled=True, recombined=0.0, top_k=5, teacher_weight=0.5))
    y = label_indices(train.categories, teachers.labels)
    saw = len(train) - 300
    transfer = TransferSet(tmp_path, train, y, len(teachers.labels), teachers.tokenizer(), teachers, saw, config,
                           torch.device("cpu"), compact=True, chunk_rows=1000)
    real = concat_windows(list(transfer.corpus(0).shards[0].chunks()))
    label_share = real.target_val[:, -1].astype(np.float32)
    source = np.concatenate(list(scattered_chunks(len(train), 1000, config.seed)))  # the order they were written in
    assert np.array_equal(real.target_idx[:, -1], y[source])
    assert (label_share[source < saw] == 0).all()
    assert np.allclose(label_share[source >= saw], 0.5 * (1 - config.label_smoothing), rtol=1e-3)


def test_a_student_learns_from_teachers_of_any_kind_mixed_by_weight(trained, demo_splits):
    """A teacher need not be a checkpoint: anything with `members` and `probabilities(titles,
    device)` teaches (the bench's BiGRU), and `WeightedTeachers` averages several with weights."""
    from meli.train.distill import CheckpointTeacher, DistillConfig, WeightedTeachers

    train, validation = demo_splits
    labels = trained["ensemble"].checkpoint.labels

    class Always:  # one category for every title, whatever it says
        members = 1

        def __init__(self, label: int):
            self.label = label

        def probabilities(self, titles, device):
            p = np.zeros((len(titles), len(labels)), np.float32)
            p[:, self.label] = 1.0
            return p

    mlps = CheckpointTeacher(trained["ensemble"].checkpoint)
    titles = validation.titles.slice(0, 50)
    panel = WeightedTeachers((mlps, Always(3)), (0.75, 0.25))
    assert panel.members == trained["ensemble"].checkpoint.members + 1
    expected = 0.75 * mlps.probabilities(titles, torch.device("cpu"))
    expected[:, 3] += 0.25
    assert np.allclose(panel.probabilities(titles, torch.device("cpu")), expected, atol=1e-6)
    with pytest.raises(ValueError, match="one weight per teacher"):
        WeightedTeachers((mlps,), (0.5, 0.5))
    # a student of a teacher that always answers category 7 answers 7, on titles it never saw
    config = small_config("mlp", epochs=3, distill=DistillConfig(enabled=True, recombined=0.5))
    student = train_model(config, train, validation, quiet=True, teacher=Always(7), teacher_saw=len(train))
    model = student.checkpoint.build_model()
    scores = model(torch.from_numpy(student.checkpoint.tokenizer().encode_batch(validation.titles).rows(np.arange(100))))
    assert (scores.argmax(1) == 7).all()


def test_refit_teachers_refits_the_members_and_teaches_with_them(demo_splits, monkeypatch):
    """distill.refit_teachers: the refit fits every member again on train + validation before
    the student's refit; without it, the refit fits the student alone."""
    from meli.train.distill import DistillConfig, as_teacher
    from meli.train.recipe import train_and_refit
    from meli.train.trainer import STUDENT

    import meli.train.recipe as recipe

    train, validation = demo_splits
    taught = []  # (titles the teachers are said to have seen, their vocabulary) of each distillation
    kinds = []  # what each distillation got as its teachers
    original = recipe.train_model
    monkeypatch.setattr(recipe, "train_model", lambda *a, teacher=None, teacher_saw=None, **kw: (
        teacher is not None and kinds.append(type(teacher)) is None
        and taught.append((teacher_saw, set(as_teacher(teacher).checkpoint.vocabulary)))
    ) or original(*a, teacher=teacher, teacher_saw=teacher_saw, **kw))
    config = small_config("mlp")
    train_only = set(build_vocabulary(train.titles, config.tokenizer, config.vocabulary))
    for refit_teachers, refitted in ((True, {0, 1, STUDENT}), (False, {STUDENT})):
        seen, taught[:], kinds[:] = [], [], []
        config = small_config("mlp", epochs=2, members=2, refit=True,
                              distill=DistillConfig(enabled=True, recombined=0.5, refit_teachers=refit_teachers))
        result = train_and_refit(config, train, validation, quiet=True, on_refit_epoch=seen.append)
        assert {m.member for m in seen} == refitted
        assert result.checkpoint.members == 1 and result.checkpoint.provenance["refit"] == "train+validation"
        assert ("refit_fit_s" in result.timings) == refit_teachers
        (selection_titles, selection_vocabulary), (refit_titles, refit_vocabulary) = taught
        assert selection_titles == len(train) and selection_vocabulary == train_only
        if refit_teachers:  # the refit members know the validation titles' words
            assert refit_titles == len(train) + len(validation) and refit_vocabulary - train_only
        else:
            assert refit_titles == len(train) and refit_vocabulary == train_only
            # the selection fits' weights wait on disk while the students train, read back for each one's targets
            assert all(issubclass(kind, Path) for kind in kinds)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_each_optimizer_learns(optimizer, demo_splits):
    """Every allowed optimizer trains the dense layers (the embedding table always takes
    the row-wise Adam): the loss falls and validation beats chance by far."""
    train, validation = demo_splits
    lr = 2.0 if optimizer == "sgd" else 0.01  # plain SGD needs a far larger step
    config = small_config(optimizer=optimizer, lr=lr, epochs=4)
    # without word or hidden dropout, so that the training loss follows the optimizer alone
    config = dataclasses.replace(config, mlp=dataclasses.replace(config.mlp, embedding_dropout=0.0, dropout=0.0))
    result = train_model(config, train, validation, quiet=True)
    losses = [m.train_loss for m in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    # 30 categories: chance is 0.03; AdamW and Adam reach 0.94 here, plain SGD 0.94-0.95 (seeds 0-2; its loss
    # falls to about half in 4 epochs)
    assert result.checkpoint.metrics["val_balanced_accuracy"] > (0.75 if optimizer == "sgd" else 0.9)


def test_the_batch_grows_with_the_rows_an_epoch_reads():
    """The shipped config keeps its batch of 128 at today's size (38,205 titles, three times
    that for a student) and doubles it, rates by the square root, while an epoch would take
    more than `steps_per_epoch` steps, up to `max_batch_size`."""
    config = load_config(None)
    # today's size: a student reads 3 x 38,205 rows, its refit 3 x (38,205 + 6,371)
    assert config.batch_for(3 * 38_205) == config.batch_for(3 * 44_576) == (config.batch_size, 1.0)
    for rows in (1, 130_000, 131_073, 500_000, 2_000_000, 20_000_000):
        batch, scale = config.batch_for(rows)
        doublings = batch // config.batch_size
        assert batch == config.batch_size * doublings and doublings & (doublings - 1) == 0  # a power of two
        assert scale == pytest.approx(doublings ** 0.5)
        assert batch <= config.max_batch_size
        steps = -(-rows // batch)
        assert steps <= config.steps_per_epoch or batch == config.max_batch_size, rows
        if batch > config.batch_size:  # no smaller batch would have done
            assert -(-rows // (batch // 2)) > config.steps_per_epoch, rows
    assert config.batch_for(2_000_000)[0] == 2048 and config.batch_for(20_000_000)[0] == config.max_batch_size
    assert dataclasses.replace(config, max_batch_size=None).batch_for(20_000_000) == (config.batch_size, 1.0)


def test_auto_precision_stays_float32_until_the_batch_is_large():
    """precision = "auto" runs bfloat16 only from `bf16_min_batch` titles a batch: the shipped
    config trains in float32 at today's size (members and student) and up to about 393,000
    titles an epoch, whatever the CPU, and may go bfloat16 from 500,000; "fp32" and "bf16"
    hold at any batch."""
    config = load_config(None)
    assert config.precision == "auto"
    for rows in (38_205, 3 * 38_205, 3 * 44_576, 390_000):
        assert config.precision_for(config.batch_for(rows)[0]) == "fp32", rows
    for rows in (500_000, 2_000_000, 20_000_000):
        assert config.precision_for(config.batch_for(rows)[0]) == "auto", rows
    assert config.precision_for(config.bf16_min_batch) == "auto" and config.precision_for(config.bf16_min_batch - 1) == "fp32"
    for fixed in ("fp32", "bf16"):
        assert dataclasses.replace(config, precision=fixed).precision_for(1) == fixed
        assert dataclasses.replace(config, precision=fixed).precision_for(1 << 20) == fixed


def test_a_fit_over_many_rows_takes_larger_batches(demo_splits, caplog):
    train, validation = demo_splits
    # precision "auto" below bf16_min_batch: float32 whatever the CPU
    config = small_config(epochs=8, steps_per_epoch=4, max_batch_size=512, precision="auto", bf16_min_batch=1024)
    batch, scale = config.batch_for(len(train))
    assert batch == 512 and scale == 2.0  # 3,000 demo titles: more than 4 steps even at 256
    with caplog.at_level(logging.INFO, logger="meli.train.trainer"):
        result = train_model(config, train, validation, quiet=True)
    assert "batches of 512 titles (learning rates x2.00), float32 arithmetic" in caplog.text
    # 30 categories, 3,000 titles: 6 steps an epoch; it reaches 0.96 here
    assert result.checkpoint.metrics["val_balanced_accuracy"] > 0.9


def test_bfloat16_arithmetic_trains_a_float32_model(demo_splits):
    """precision = "bf16" runs the hidden and output layers in bfloat16 while training: the fit
    differs from the float32 one, learns as well, and its weights stay float32."""
    from meli.train.trainer import autocast_dtype

    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) in (None, torch.bfloat16)
    train, validation = demo_splits
    results = {p: train_model(small_config(precision=p), train, validation, quiet=True) for p in ("fp32", "bf16")}
    low, full = results["bf16"].checkpoint, results["fp32"].checkpoint
    assert all(v.dtype == torch.float32 for v in low.state_dict.values() if v.is_floating_point())
    assert not torch.equal(low.state_dict["head.1.weight"], full.state_dict["head.1.weight"])
    # 30 categories: both reach 0.93-0.95 here
    assert low.metrics["val_balanced_accuracy"] > full.metrics["val_balanced_accuracy"] - 0.03 > 0.87


def test_attention_pooling_trains_exports_and_keeps_parity(demo_splits, tmp_path):
    from meli.export.onnx_export import to_onnx
    from meli.export.parity import check_parity
    from meli.onnx_model import load_onnx_model

    train, validation = demo_splits
    config = small_config()
    config = dataclasses.replace(config, mlp=dataclasses.replace(config.mlp, pooling="attention"))
    result = train_model(config, train, validation, quiet=True)
    assert result.checkpoint.metrics["val_balanced_accuracy"] > 0.9  # reaches 0.93
    path = tmp_path / "attention.onnx"
    path.write_bytes(to_onnx(result.checkpoint).SerializeToString())
    model = load_onnx_model(path, "cpu")
    assert model.card.encoding == "full"  # attention weighs each id: no fused rows
    report = check_parity(result.checkpoint, model, validation.titles)
    assert report.passed and report.top1_agreement == 1.0 and report.max_abs_diff <= 1e-5


def test_a_fit_stopped_after_an_epoch_carries_on_exactly(demo_splits, tmp_path):
    """A fit killed after epoch 2 of 4, rerun over the same work folder, carries on from its
    saved state and ends with the very weights and curves of a fit never stopped."""
    train, validation = demo_splits
    config = small_config("mlp", epochs=4, patience=4)
    whole = train_model(config, train, validation, quiet=True, work=tmp_path / "whole", save_every_s=0)

    class Killed(Exception):
        pass

    def kill_after_two(m):
        if m.epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_model(config, train, validation, quiet=True, work=tmp_path / "stopped", save_every_s=0, on_epoch=kill_after_two)
    assert (tmp_path / "stopped" / "state.pt").exists()  # killed before epoch 2 was saved: epoch 1 was
    seen = []
    resumed = train_model(config, train, validation, quiet=True, work=tmp_path / "stopped", save_every_s=0,
                          on_epoch=lambda m: seen.append(m.epoch))
    assert seen == [2, 3, 4]  # epoch 1 came from the saved state
    assert [m.val_balanced_accuracy for m in resumed.history] == [m.val_balanced_accuracy for m in whole.history]
    for key, value in whole.checkpoint.state_dict.items():
        assert torch.equal(value, resumed.checkpoint.state_dict[key]), key


def test_meli_train_resume_carries_on_the_same_mlflow_run(tmp_path):
    """`meli-train` killed mid-run exits with one Error line naming --resume; `meli-train
    --resume RUN_ID` finishes that very run (same id, every epoch's curve, a checkpoint), and
    refuses changed settings, a finished run or an unknown id with one Error line."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    from conftest import ROOT

    config = tmp_path / "resumable.toml"
    config.write_text("save_every_s = 0\n" + (ROOT / "train" / "configs" / "mlp.toml").read_text()
                      .replace("members = 5", "members = 2").replace("epochs = 15", "epochs = 6")
                      .replace("refit = true", "refit = false").replace("patience = 5", "patience = 6"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MELI_WORK_DIR": str(tmp_path / "work")}
    cmd = [str(Path(sys.executable).parent / "meli-train"), "--config", str(config), "--experiment", "resume"]

    def meli_train(*args):
        return subprocess.run(cmd + list(args), cwd=tmp_path, env=env, capture_output=True, text=True)

    def one_error(done):
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        assert done.returncode != 0 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        return errors[0]

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # stopped in its second member, after that member's second epoch
        seen.append(line)
        if "member 2 epoch   2" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    errors = [line for line in rest.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--resume RUN_ID" in errors[0]
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name("resume").experiment_id
    (run,) = client.search_runs([experiment_id])
    run_id = run.info.run_id
    assert run.info.status != "FINISHED" and (tmp_path / "work" / run_id / "member-1" / "result.pt").is_file()

    assert one_error(meli_train("--resume", run_id, "--epochs", "3")) == (
        f"Error: --resume: run {run_id} was started with other settings: epochs = 6 (now 3); "
        "resume it with the settings it was started with")
    done = meli_train("--resume", run_id)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"run {run_id} ") and "member 1: already fitted" in done.stderr
    assert client.get_run(run_id).info.status == "FINISHED" and len(client.search_runs([experiment_id])) == 1
    for name in ("member1_val_balanced_accuracy", "member2_val_balanced_accuracy", "student_val_balanced_accuracy"):
        assert {m.step for m in client.get_metric_history(run_id, name)} == set(range(1, 7)), name
    assert not (tmp_path / "work" / run_id).exists()  # finished: nothing left to resume
    assert one_error(meli_train("--resume", run_id)) == f"Error: --resume: run {run_id} has finished; there is nothing to resume"
    assert one_error(meli_train("--resume", "0" * 32)).startswith(f"Error: --resume: no MLflow run {'0' * 32} in ")


def test_an_ensemble_of_mean_pooling_mlps_teaches_through_the_compiled_mean(trained, demo_splits):
    """The fast way a teacher labels titles (compact ids, compiled mean, heads) gives the
    ensemble's own probabilities: those of its padded forward pass."""
    from meli.train.distill import CheckpointTeacher, teacher_probabilities

    _, validation = demo_splits
    teacher = CheckpointTeacher(trained["ensemble"].checkpoint)
    titles = validation.titles.slice(0, 300)
    fast = teacher.probabilities(titles, torch.device("cpu"))
    slow = teacher_probabilities(teacher._model, teacher._tokenizer.encode_batch(titles), torch.device("cpu"))
    assert fast.shape == slow.shape and np.allclose(fast, slow, atol=1e-6)
    assert np.allclose(fast.sum(1), 1.0, atol=1e-5)
