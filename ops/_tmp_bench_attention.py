"""Temporary benchmark (helper scratch, deleted before hand-back)."""
import torch, triton
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph
import ops.triton_decode_attention as dmod
import ops.triton_prefill_attention as pmod

H, KVH, D, BS = 32, 8, 128, 16
dev = "cuda"
def caches(num_blocks):
    k = torch.randn(num_blocks, BS, KVH, D, device=dev, dtype=torch.bfloat16)
    return k, torch.randn_like(k)

def graph_time(fn):
    fn(); torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50)

shapes = [(4, 2048, 0), (1, 8192, 0), (16, 512, 0), (4, 512, 3584), (64, 16, 1024), (64, 4, 1024), (16, 64, 2048)]
ref = {}
for cfg in [None, (128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)]:
    if cfg is not None:
        pmod._launch_config = lambda mq, hd, cfg=cfg: (min(cfg[0], max(16, triton.next_power_of_2(mq))),) + cfg[1:]
    line = []
    for B, L, ctx in shapes:
        T = B * L
        kvlen = L + ctx
        nbs = kvlen // BS
        kc, vc = caches(B * nbs + 8)
        bt = torch.randperm(B * nbs, device=dev).int().view(B, nbs)
        kvl = torch.full((B,), kvlen, dtype=torch.int32, device=dev)
        cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * L
        q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        try:
            ms = graph_time(lambda: pmod.prefill_attention_triton(q, kc, vc, bt, cu, kvl, 0.1, L, out=out))
        except Exception as e:
            line.append(f"ERR {type(e).__name__}"); continue
        flops = B * H * D * 4 * (L * ctx + L * L / 2)
        if cfg is None:
            qd = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16)
            kd = torch.randn(B, H, kvlen, D, device=dev, dtype=torch.bfloat16)
            ref[(B, L, ctx)] = graph_time(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=(ctx == 0)))
        line.append(f"B{B}L{L}c{ctx}: {ms*1e3:.0f}us {flops/ms/1e9:.0f}TF (sdpa {ref[(B, L, ctx)]*1e3:.0f}us)")
    print("prefill", cfg, " ; ".join(line), flush=True)
