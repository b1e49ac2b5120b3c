import torch, triton
from triton.testing import do_bench_cudagraph
from ops.lora import build_lora_batch_info, apply_lora, lora_shrink, lora_expand, apply_lora_triton, _shrink_partials, lora_expand_triton
torch.manual_seed(0)
GROUPS = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}
def layout(T, na):
    if T < na: return [i % na for i in range(T)] if T > 1 else [0]
    per = T // na
    return [s for s in range(na) for _ in range(per)] + [na - 1] * (T - per * na)
for name, (K, widths) in GROUPS.items():
  for R in (16, 64):
    n = len(widths); N = sum(widths); offs = tuple([0] + list(torch.tensor(widths).cumsum(0).tolist()))
    A = torch.randn(8, n * R, K, device="cuda", dtype=torch.bfloat16) * 0.02
    B = torch.randn(8, N, R, device="cuda", dtype=torch.bfloat16) * 0.02
    sc = torch.ones(8, n, device="cuda"); ranks = torch.full((8,), R, dtype=torch.int32, device="cuda")
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    for T in (1, 32, 512):
      x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16); y = torch.zeros(T, N, device="cuda", dtype=torch.bfloat16)
      slots = layout(T, 8)
      row = []
      for be in ("csgmv", "triton"):
        info = build_lora_batch_info(slots, ranks, be, 16, "cuda")
        t_fused = do_bench_cudagraph(lambda: apply_lora(x, A, B, y, offs, sc, info))
        t_nosplit = do_bench_cudagraph(lambda: apply_lora_triton(x, A, B, y, offs, sc, info, split_k=1))
        t_shr = do_bench_cudagraph(lambda: _shrink_partials(x, A, info, n, None))
        tt = torch.zeros(T, n * R, device="cuda", dtype=torch.bfloat16)
        t_exp = do_bench_cudagraph(lambda: lora_expand_triton(tt, B, y, offs, sc, info))
        row.append(f"{be}: all {t_fused*1000:5.1f} nosplit {t_nosplit*1000:5.1f} shrink {t_shr*1000:5.1f} expand {t_exp*1000:5.1f}")
      t_base = do_bench_cudagraph(lambda: torch.mm(x, W.t()))
      lora_bytes = min(T, 8) * (n * R * K + N * R) * 2
      print(f"{name:8s} R={R:3d} T={T:4d} base {t_base*1000:6.1f}us | " + " | ".join(row) + f" | lora weight MB {lora_bytes/1e6:.1f}", flush=True)
