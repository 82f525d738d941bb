"""CrossLayerLM (crosslayer.models) and the demo (crosslayer.demo) on the CPU."""

import json

import pytest
import torch
import torch.nn.functional as F

from crosslayer import demo
from crosslayer.models import CONNECTIONS, CrossLayerLM, LMConfig


def tiny(connection="residual", **kw):
    return LMConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=2, max_seq_len=16,
                    connection=connection, **kw)


def perturb_connections(model, scale=0.2):
    with torch.no_grad():
        for p in model.connections.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_every_scheme_starts_as_the_residual_network(connection):
    torch.manual_seed(0)
    base = CrossLayerLM(tiny())
    model = CrossLayerLM(tiny(connection))
    trunk = base.state_dict()
    if connection == "mudd":  # blocks 1.. take q/k/v through qkv_norm (3, d), ones like attn_norm
        for i in range(1, 3):
            trunk[f"blocks.{i}.qkv_norm"] = trunk.pop(f"blocks.{i}.attn_norm.weight").expand(3, -1).clone()
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    assert not unexpected and all(k.startswith("connections.") for k in missing)
    idx = torch.randint(0, 61, (2, 16))
    # HC exits with the sum of n equal streams: the final RMSNorm sees n·h (eps differs)
    tol = dict(atol=5e-3, rtol=0) if connection in ("shc", "dhc", "mhc") else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model(idx), base(idx), **tol)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_every_parameter_gets_a_finite_gradient(connection):
    model = CrossLayerLM(tiny(connection))
    perturb_connections(model)
    idx = torch.randint(0, 61, (2, 16))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
    if connection != "residual":
        assert any(p.grad.abs().sum() > 0 for p in model.connections.parameters())


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_activation_checkpointing_gives_the_same_gradients(connection):
    torch.manual_seed(1)
    plain = CrossLayerLM(tiny(connection))
    perturb_connections(plain)
    ckpt = CrossLayerLM(tiny(connection, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 61, (2, 16))
    grads = []
    for m in (plain, ckpt):
        F.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("connection", ["residual", "dhc", "mudd"])
def test_a_few_steps_fit_one_batch(connection):
    torch.manual_seed(2)
    model = CrossLayerLM(tiny(connection))
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    idx = torch.randint(0, 61, (4, 16))
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_config_and_input_errors():
    with pytest.raises(ValueError, match=r"LMConfig\.connection = 'dense': expected one of \('residual'"):
        LMConfig(connection="dense")
    with pytest.raises(ValueError, match=r"LMConfig\.d_model = 30: expected n_heads \(4\) times an even head size"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=r"LMConfig\.mudd_ways = 'qk': expected one of \('qkvr', 'r'\)"):
        LMConfig(mudd_ways="qk")
    model = CrossLayerLM(tiny())
    with pytest.raises(ValueError, match="sequence length 17 > max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be \(batch, seq\) int64"):
        model(torch.zeros(16))
    assert LMConfig(d_model=96).ffn_hidden == 256  # 8/3·96 = 256, a multiple of 64


def test_mudd_ways_r_and_tied_embeddings():
    model = CrossLayerLM(tiny("mudd", mudd_ways="r", tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    assert all(not b.multiway for b in model.blocks)
    assert [c.n_ways for c in model.connections] == [1, 1, 1]
    idx = torch.randint(0, 61, (2, 16))
    assert model(idx).shape == (2, 16, 61)


# ------------------------------------------------------------------------ the demo


def test_stdlib_data_is_deterministic_and_split_by_file():
    train, valid = demo.stdlib_bytes(1 << 20, 1 << 18)
    assert train.numel() == 1 << 20 and valid.numel() == 1 << 18
    train2, valid2 = demo.stdlib_bytes(1 << 20, 1 << 18)
    assert torch.equal(train, train2) and torch.equal(valid, valid2)
    files = demo.stdlib_files()
    first_valid = files[0].read_bytes()[:1000]
    assert bytes(valid[: len(first_valid)].tolist()) == first_valid
    want_train = b"".join(f.read_bytes() + b"\0" for f in files[1:10])[:1000]
    assert bytes(train[:1000].tolist()) == want_train
    x, y = next(demo.batches(train, 1, 3, 8, seed=0))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])


def test_lr_schedule():
    lrs = [demo.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the [demo] extra; CI installs it
    pytest.importorskip("tqdm")
    rc = demo.main(["--schemes", "residual,mudd", "--steps", "3", "--d-model", "32", "--n-layers", "2",
                    "--seq-len", "16", "--batch-size", "2", "--max-train-mib", "0.25",
                    "--max-valid-mib", "0.05", "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "scheme" in out and "residual" in out and "mudd" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["scheme"] for r in res["results"]] == ["residual", "mudd"]
    for r in res["results"]:
        assert len(r["train_curve"]) == 3 and r["val_loss"] > 0 and r["tokens_per_s"] > 0
    # same seed, same data, identical trunk init: the first step's loss is the same
    first = [r["train_curve"][0] for r in res["results"]]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.parse_args(["--schemes", "residual,bogus"])
