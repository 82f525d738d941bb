"""CrossLayerLM under DDP and FSDP2 (fully_shard): 2 CPU processes, gloo backend.

For each wrapper one 2-process run trains every scheme in turn: a few SGD steps where
rank r sees its half of a global batch must give the parameters (FSDP2: the full,
gathered state_dict) that single-process training on the whole batch gives from the
same init. Each rank also trains that single-process reference itself, so the
comparison needs no communication beyond the wrapper's own. Per-scheme tests then read
the ranks' reports.

The DepthStack's gradient buffer travels along its autograd chain while DDP's hooks
all-reduce buckets and FSDP2's hooks unshard and reduce-scatter inside the same
backward pass; equal parameters here mean those hooks neither reorder nor cut that
chain. FSDP2 goes through CrossLayerLM.fully_shard (its units, and its all-reduce of
the 0-dim parameters that fully_shard refuses).

A hang fails instead of blocking: the process group has a 60 s timeout and the parent
kills the workers after JOIN_TIMEOUT_S.
"""

import copy
import json
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from crosslayer.models import CrossLayerLM, LMConfig

SCHEMES = ("residual", "dhc", "mhc", "dwa", "mudd")
WORLD = 2
STEPS = 3
PER_RANK = 2  # sequences per rank and step
JOIN_TIMEOUT_S = 150
TOL = dict(atol=2e-5, rtol=1e-4)

def tiny(connection):
    return LMConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                    connection=connection, mhc_iters=5)


def _loss(model, idx):
    return F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())


def _train(model, wrapped, batches, rank):
    """STEPS SGD steps of `wrapped` (model or its wrapper); rank None = the whole batch."""
    opt = torch.optim.SGD(model.param_groups(0.01), lr=0.1, momentum=0.9)
    for idx in batches:
        if rank is not None:
            idx = idx[rank * PER_RANK:(rank + 1) * PER_RANK]
        opt.zero_grad()
        _loss(wrapped, idx).backward()
        opt.step()


def _max_rel_err(got, want):
    return ((got - want).abs() / (TOL["atol"] + TOL["rtol"] * want.abs())).max().item()


def _run_scheme(scheme, wrapper, rank):
    torch.manual_seed(0)
    ref = CrossLayerLM(tiny(scheme))
    with torch.no_grad():  # off the identity start, so every connection parameter matters
        for p in ref.connections.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model = copy.deepcopy(ref)
    init = copy.deepcopy(ref.state_dict())
    batches = [torch.randint(0, 61, (WORLD * PER_RANK, 17)) for _ in range(STEPS)]

    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model)
        _train(model, wrapped, batches, rank)
        state = model.state_dict()
        sharded = False
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        model.fully_shard()
        _train(model, model, batches, rank)
        from torch.distributed.tensor import DTensor
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    _train(ref, ref, batches, None)

    want = ref.state_dict()
    return {
        "keys_match": sorted(state) == sorted(want),
        "sharded": sharded,
        "moved": {k: (want[k] - v).abs().max().item() for k, v in init.items()},
        "err": {k: _max_rel_err(state[k].detach().cpu(), want[k]) for k in want if k in state},
    }


def _worker(rank, init_file, wrapper, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        report = {}
        for scheme in SCHEMES:
            t0 = time.perf_counter()
            try:
                report[scheme] = _run_scheme(scheme, wrapper, rank)
            except Exception:
                report[scheme] = {"error": traceback.format_exc()}
                dist.barrier()  # the other rank may still be inside a collective of this scheme
            report[scheme]["seconds"] = time.perf_counter() - t0
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def _launch(wrapper, tmp_path):
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "store"), wrapper, str(tmp_path)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{wrapper}: workers still running after {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def reports(request, tmp_path_factory):
    return request.param, _launch(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_single_process_training(reports, scheme):
    wrapper, per_rank = reports
    for rank, report in enumerate(per_rank):
        r = report[scheme]
        assert "error" not in r, f"{wrapper} {scheme} rank {rank}:\n{r.get('error')}"
        assert r["keys_match"], f"{wrapper} {scheme}: state_dict keys differ from the model's"
        if wrapper == "fsdp2":
            assert r["sharded"], "fully_shard left the parameters unsharded"
        # the steps really trained the connections (the whole model for residual)
        moved = [m for k, m in r["moved"].items() if k.startswith("connections.") or scheme == "residual"]
        assert max(moved) > 1e-4, f"{wrapper} {scheme}: training left the parameters unchanged"
        bad = {k: e for k, e in r["err"].items() if not e <= 1.0}
        assert not bad, f"{wrapper} {scheme} rank {rank}: parameters off (error / tolerance): {bad}"
