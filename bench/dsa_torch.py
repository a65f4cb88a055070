"""PyTorch baseline of DSA decode attention at DeepSeek-V3.2's dimensions, the same computation as
cuda_bench's "DSA decode" table, written the straightforward way with PyTorch ops on the same GPU:
the lightning indexer (FP8 q.k logits over every cached token, ReLU, per-head weights, head sum,
key scale), top-2048 per query, gather of the selected FP8 latents, absorbed MLA over them.
Caches are contiguous per sequence here (no paging): a simplification in PyTorch's favour.
  python3 bench/dsa_torch.py [--batch 64] [--ctx 131072] [--iters 10]"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    B, L, H, IH, C, R, K = a.batch, a.ctx, 128, 64, 512, 64, 2048
    dev = "cuda"
    f8 = torch.float8_e4m3fn
    g = torch.Generator(device=dev).manual_seed(0)
    # indexer cache: e4m3 keys (B, L, 128) + f32 scale per key; queries (B, IH, 128) e4m3 + scales
    keys = (torch.randn(B, L, 128, device=dev, generator=g) * 64).clamp(-448, 448).to(f8)
    kscale = torch.rand(B, L, device=dev, generator=g) / 64
    q8 = (torch.randn(B, IH, 128, device=dev, generator=g) * 64).clamp(-448, 448).to(f8)
    qscale = torch.rand(B, IH, device=dev, generator=g) * 0.01
    wraw = torch.randn(B, IH, device=dev, generator=g)
    # MLA cache: e4m3 latent (B, L, 512) + 4 block scales + bf16 rope (B, L, 64)
    lat = (torch.randn(B, L, C, device=dev, generator=g) * 64).clamp(-448, 448).to(f8)
    lscale = torch.full((B, L, C // 128), 2.0 ** -7, device=dev)
    rope = torch.randn(B, L, R, device=dev, generator=g).to(torch.bfloat16)
    q_lat = torch.randn(B, H, C, device=dev, generator=g).to(torch.bfloat16)
    q_pe = torch.randn(B, H, R, device=dev, generator=g).to(torch.bfloat16)
    scale = 192 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2

    def dsa():
        # indexer: logits (B, IH, L) = q . k in bf16 (e4m3 is exact in bf16), f32 accumulation
        logits = torch.bmm(q8.to(torch.bfloat16), keys.to(torch.bfloat16).transpose(1, 2)).float()
        w = wraw * IH ** -0.5 * qscale * 128 ** -0.5
        score = (logits.relu() * w[:, :, None]).sum(1) * kscale
        idx = score.topk(K, dim=-1).indices.sort(dim=-1).values  # (B, K)
        # gather the selected latents and dequantize
        sel_lat = torch.gather(lat.view(torch.uint8), 1, idx[:, :, None].expand(B, K, C)).view(f8)
        sel_sc = torch.gather(lscale, 1, idx[:, :, None].expand(B, K, C // 128))
        c = (sel_lat.float().view(B, K, C // 128, 128) * sel_sc[..., None]).view(B, K, C).to(torch.bfloat16)
        pe = torch.gather(rope, 1, idx[:, :, None].expand(B, K, R))
        s = (torch.bmm(q_lat, c.transpose(1, 2)) + torch.bmm(q_pe, pe.transpose(1, 2))).float() * scale
        p = s.softmax(-1).to(torch.bfloat16)
        return torch.bmm(p, c)  # (B, H, C)

    for _ in range(2):
        dsa()
    torch.cuda.synchronize()
    ts = []
    for _ in range(a.iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dsa()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    ts.sort()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}: DSA decode batch {B}, "
          f"context {L}, top-{K}: {ts[len(ts) // 2]:.3f} ms (median of {a.iters})")


if __name__ == "__main__":
    main()
