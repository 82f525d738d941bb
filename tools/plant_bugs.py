"""Plant known bugs in the kernels, one at a time, and check that the emulator tests of
the default test run catch each one: the measure of the tests' power.

    python tools/plant_bugs.py                 # the tests and kernels of HEAD
    python tools/plant_bugs.py --rev b7ed1a6   # the same bugs against an older tree
    python tools/plant_bugs.py --only tail     # the mutations whose name contains "tail"

The revision is checked out into a throwaway git worktree (under --workdir, kept for
incremental rebuilds between runs), whose own Python package, tests and emulator build
are used (PYTHONPATH and CUEMU_BUILD_DIR point into it). Its emulator tests must pass as
they are; then for each mutation the one line it names is changed in csrc/ (the text must
occur exactly once, wherever a rename moved it), the emulated module rebuilt (ninja: the
changed translation units only) and `pytest tests -m cuemu -x` run (the traffic ceiling
left out: it counts bytes, not results). A mutation is caught when that run fails.
Exit 0 when every mutation was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    find: str      # must occur exactly once in csrc/**
    replace: str
    why: str


# Each is a bug a plausible edit could make; together they touch every op's kernels.
MUTATIONS = (
    Mutation("hc_post_skips_last_stream", "    for (int k = 0; k < n; ++k) {\n      acc o[kVec];\n      hc_post_mix<",
             "    for (int k = 0; k < n - 1; ++k) {\n      acc o[kVec];\n      hc_post_mix<",
             "hc_post forward: a loop bound off by one (the last output stream never written)"),
    Mutation("hc_tile_missing_barrier", "    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < n_part; i += blockDim.x * blockDim.y) part_s[i] = acc(0);\n  }\n  __syncthreads();",
             "    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < n_part; i += blockDim.x * blockDim.y) part_s[i] = acc(0);\n  }",
             "HC tile kernels: the barrier after staging the coefficients in shared memory removed"),
    Mutation("hc_pre_mean_over_d_plus_1", "acc_rsqrt(ss / static_cast<acc>(p.d) + static_cast<acc>(p.eps))",
             "acc_rsqrt(ss / static_cast<acc>(p.d + 1) + static_cast<acc>(p.eps))",
             "hc_pre: the rms of a stream averaged over d + 1"),
    Mutation("slot_aggregate_drops_first_slot",
             "  for (int j0 = 0; j0 < l; j0 += kBatch) {\n    Vec<T, kVec> s[kBatch];\n    slot_batch_load<T, kVec, kWhole>(s_rows, j0,",
             "  for (int j0 = 1; j0 < l; j0 += kBatch) {\n    Vec<T, kVec> s[kBatch];\n    slot_batch_load<T, kVec, kWhole>(s_rows, j0,",
             "depth_aggregate / depth_aggregate_qkv_norm (shared slot phase): slot 0 never read"),
    Mutation("depth_bwd_batch_partials_to_first_slot",
             "if (lane % kLanesPerDot == 0 && j0 + b < l) part[(i % kWays) * l + j0 + b] += sum;",
             "if (lane % kLanesPerDot == 0 && j0 + b < l) part[(i % kWays) * l + j0] += sum;",
             "depth_aggregate backward: a slot batch's dA partials all added to its first slot"),
    Mutation("qkv_norm_stage_read_slot0",
             "sb[b] = (j0 + b < l && in_row) ? stage[(j0 + b) * stage_stride] : Vec<T, kVec>{};",
             "sb[b] = (j0 + b < l && in_row) ? stage[j0 * stage_stride] : Vec<T, kVec>{};",
             "depth_aggregate_qkv_norm backward: the dot passes read the batch's first staged slot for all"),
    Mutation("qkv_norm_mean_over_d_plus_1",
             "acc_rsqrt(qkv_norm_row_total(row.red, c) / static_cast<acc>(p.d) + static_cast<acc>(p.eps))",
             "acc_rsqrt(qkv_norm_row_total(row.red, c) / static_cast<acc>(p.d + 1) + static_cast<acc>(p.eps))",
             "depth_aggregate_qkv_norm: the rms averaged over d + 1"),
    Mutation("sinkhorn_one_step_short", "  const int steps = 2 * iters - 1;\n  for (int k = 0; k < steps; ++k) {",
             "  const int steps = 2 * iters - 1;\n  for (int k = 1; k < steps; ++k) {",
             "mhc_coeffs: the first Sinkhorn normalisation skipped"),
    Mutation("gelu_erf_constant", "return acc(0.5) * u * (acc(1) + acc_erf(u * acc(0.7071067811865476)));",
             "return acc(0.5) * u * (acc(1) + acc_erf(u * acc(0.7071)));",
             "mudd_weights: exact GELU with a truncated 1/sqrt(2)"),
    Mutation("mudd_tail_element_dropped", "v.v[k] = (e + k < d) ? row[e + k] : T(0.0f);",
             "v.v[k] = (e + k < d - 1) ? row[e + k] : T(0.0f);",
             "mudd_weights: the last feature of a row not a multiple of 8 read as zero"),
    Mutation("hc_boundary_drops_later_grad",
             "gn[g0 + k].v[s + v] = from_acc<T>(dh[k][v] + to_acc(gn[g0 + k].v[s + v]));",
             "gn[g0 + k].v[s + v] = from_acc<T>(dh[k][v]);",
             "DHC boundary backward: the later gradient of H' dropped, only hc_pre's term kept"),
    Mutation("hc_boundary_mix_drops_pre_grad",
             "gn[k].v[v] = from_acc<T>(to_acc(gn[k].v[v]) + w * g);",
             "gn[k].v[v] = from_acc<T>(to_acc(gn[k].v[v]));",
             "SHC boundary backward: the static pre's term w_k·dx' missing from dH'"),
    Mutation("mhc_dh_drops_prior_grad",
             "const float before = prior != nullptr ? to_acc(pv[2 * j + q]) : 0.f;",
             "const float before = 0.f;",
             "mhc_coeffs dH pass (+= or prior +): the other ops' dH contribution overwritten instead of added"),
    Mutation("mhc_dh_drops_mix_term",
             "const float extra = y != nullptr ? c * to_acc(yv[2 * j + q]) : 0.f;",
             "const float extra = 0.f;",
             "mhc_coeffs dH pass: the pre mix's alpha[:, i, 0]·dx term missing"),
    Mutation("token_sums_drops_column_group",
             "for (int64_t w = 0; w < g.width; ++w) sum += static_cast<double>(rows[t * g.cols + w]);",
             "for (int64_t w = 0; w < 1; ++w) sum += static_cast<double>(rows[t * g.cols + w]);",
             "token_sums: only the first column of a group summed (mHC's da_pre, da_post, da_res)"),
    Mutation("mhc_dphi_reset_per_tile",
             "    mma_xt_g_tile<T, kDT>(dphi, xa, xb, DU, p.ldu, t0, N, col0, p.M, stage, grp, tig);",
             "#pragma unroll\n    for (int mt = 0; mt < 2; ++mt) mma_zero(dphi[mt]);\n"
             "    mma_xt_g_tile<T, kDT>(dphi, xa, xb, DU, p.ldu, t0, N, col0, p.M, stage, grp, tig);",
             "mhc_coeffs dH pass: the dphi accumulators cleared every tile (only a group's last tile counted)"),
    Mutation("mhc_post_chunk_drops_y",
             "  for (int v = 0; v < 8; ++v) o[v] = b * to_acc(yv[v]);",
             "  for (int v = 0; v < 8; ++v) o[v] = 0.f * to_acc(yv[v]);",
             "mhc_boundary forward: the post's beta_i·y term missing from H'"),
    Mutation("mhc_fwd_x_skips_last_stream",
             "        for (int i = 0; i < n; ++i) {\n          // kPost: H'_i mixed again",
             "        for (int i = 0; i < n - 1; ++i) {\n          // kPost: H'_i mixed again",
             "fused mHC pre forward: x = Σ_i alpha[:, i, 0]·H_i without the last stream"),
    Mutation("mhc_boundary_bwd_drops_later_grad",
             "+ wk * to_acc(xv.v[v]) + to_acc(nv.v[v]);",
             "+ wk * to_acc(xv.v[v]);",
             "mHC boundary fused backward: the later gradient of H' (dH_next) missing from dH'"),
    Mutation("mhc_boundary_bwd_half_warp_sum_short",
             "      for (int j = 0; j < kN; ++j) da[j][k] = group_sum<16>(da[j][k]);",
             "      for (int j = 0; j < kN; ++j) da[j][k] = group_sum<8>(da[j][k]);",
             "mHC boundary fused backward: a token's <H_j, dH'_k> summed over 8 of its 16 lanes"),
    Mutation("mhc_boundary_bwd_round_skips_pair",
             "      for (int q = warp; q < kChunks * n; q += kMhcBoundaryBwdWarps) {",
             "      for (int q = warp; q < kChunks * n - 1; q += kMhcBoundaryBwdWarps) {",
             "mHC boundary fused backward: the last (chunk, stream) pair of a round's du·phiᵀ never "
             "computed (stale shared memory read)"),
    Mutation("mma_g_w32_b1_k_swapped",
             "split_bf16x2(w.z, w.w, bh1, bl1);",
             "split_bf16x2(w.w, w.z, bh1, bl1);",
             "fp32 W fragments of G·Wᵀ (mudd dx, mHC dH): the two k's of b1 swapped against G's "
             "permuted k order"),
    Mutation("mudd_head_dbias_dropped",
             "v += (k < K ? hs[t * K + k] : acc(1)) * das[t * Cl + o];",
             "v += (k < K ? hs[t * K + k] : acc(0)) * das[t * Cl + o];",
             "mudd_weights backward head: the dbias row of the in-head [dW2; dbias] sums left at zero"),
    Mutation("slot_table_first_slot_only",
             "return reinterpret_cast<const T*>(static_cast<const char*>(table->ptr[j]) + byte_offset);",
             "return reinterpret_cast<const T*>(static_cast<const char*>(table->ptr[0]) + byte_offset);",
             "depth kernels: every slot read through slot 0's pointer"),
    Mutation("mudd_dx_accumulate_ignored",
             "store_g_wt_minus_sx<T, kVec>(acc, 0, xa, S[ta], nullptr, 0.f, p.accumulate_dx ? dst : nullptr, dst, e, d);",
             "store_g_wt_minus_sx<T, kVec>(acc, 0, xa, S[ta], nullptr, 0.f, nullptr, dst, e, d);",
             "mudd_weights dx kernel: the depth stack's prior gradient overwritten for the tile's rows a "
             "(dx = instead of +=)"),
    Mutation("mudd_dw1_groups_overwrite",
             "mma_xt_g_store<kMuddWeightsDw1Tiles>(p.dw1_ptr, dw, 0, f0, d, col0, p.K, grp, tig, turn > 0);",
             "mma_xt_g_store<kMuddWeightsDw1Tiles>(p.dw1_ptr, dw, 0, f0, d, col0, p.K, grp, tig, false);",
             "mudd_weights dx kernel: each token group overwrites dW1 instead of adding to the earlier ones"),
    Mutation("mudd_dw2_blocks_overwrite",
             "DW2[i] = blockIdx.x == 0 ? dw2_s[i] : __ldcg(DW2 + i) + dw2_s[i];",
             "DW2[i] = dw2_s[i];",
             "mudd_weights backward head: each block overwrites [dW2; dbias] instead of adding to the earlier ones"),
)


def run(cmd, cwd, env=None, log=None) -> int:
    with open(log or os.devnull, "w") as out:
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def worktree(rev: str, workdir: str) -> str:
    sha = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True).strip()
    path = os.path.join(workdir, f"crosslayer-plant-{sha}")
    if not os.path.isdir(path):
        subprocess.check_call(["git", "worktree", "add", "--detach", path, sha], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
    return path


def locate(tree: str, text: str) -> str:
    hits = []
    for path in glob.glob(os.path.join(tree, "csrc", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                hits += [path] * f.read().count(text)
    if len(hits) != 1:
        raise SystemExit(f"plant_bugs: {text!r} occurs {len(hits)} times under {tree}/csrc (need exactly 1)")
    return hits[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="HEAD")
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--only", default="", help="run the mutations whose name contains this")
    args = p.parse_args(argv)
    tree = worktree(args.rev, args.workdir)
    env = dict(os.environ, PYTHONPATH=os.path.join(tree, "python"),
               CUEMU_BUILD_DIR=os.path.join(tree, "build", "cuemu"), CROSSLAYER_DISABLE_EXTENSION="1")
    tests = [sys.executable, "-m", "pytest", "tests", "-q", "-x", "-m", "cuemu", "-p", "no:cacheprovider",
             "--deselect", "tests/test_traffic_ceiling.py"]
    chosen = [m for m in MUTATIONS if args.only in m.name]
    targets = {m.name: locate(tree, m.find) for m in chosen}  # fail early on a stale pattern
    t0 = time.time()
    if run(tests, tree, env, os.path.join(tree, "plant-baseline.log")) != 0:
        raise SystemExit(f"plant_bugs: the tests fail without a planted bug; see {tree}/plant-baseline.log")
    print(f"{args.rev}: baseline passes ({time.time() - t0:.0f} s)")
    missed = []
    for m in chosen:
        path = targets[m.name]
        with open(path, encoding="utf-8") as f:
            original = f.read()
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(original.replace(m.find, m.replace))
            t = time.time()
            log = os.path.join(tree, f"plant-{m.name}.log")
            caught = run(tests, tree, env, log) != 0
        finally:
            with open(path, "w", encoding="utf-8") as f:
                f.write(original)
        first = ""
        if caught:
            with open(log, encoding="utf-8") as f:
                first = next((line.split(" - ")[0].strip() for line in f if line.startswith("FAILED")), "build failed")
        else:
            missed.append(m.name)
        print(f"  {m.name:<32} {'caught' if caught else 'MISSED':<7} {time.time() - t:5.0f} s  "
              f"{os.path.relpath(path, tree)}  {first}")
    print(f"{len(chosen) - len(missed)} of {len(chosen)} caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
