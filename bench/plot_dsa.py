"""Plots cuda_bench's context sweep (dsa_sweep.csv): decode cost against context length, dense MLA
vs DSA (indexer + top-k + sparse MLA), each next to its memory floor.
  python3 bench/plot_dsa.py dsa_sweep.csv docs/dsa-vs-dense.png"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    rows = list(csv.DictReader(open(src)))
    x = [int(r["context"]) for r in rows]
    col = lambda k: [float(r[k]) for r in rows]  # noqa: E731
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    ax.plot(x, col("dense_ms"), "o-", color="tab:red", label="dense MLA decode (all positions)")
    ax.plot(x, col("dense_floor_ms"), ":", color="tab:red", label="dense: memory floor (656 B/token)")
    if "dsa_fp8idx_queued_ms" in rows[0]:
        ax.plot(x, col("dsa_fp8idx_queued_ms"), "o-", color="tab:blue",
                label="DSA decode, fast mode (FP8 indexer + top-2048 + sparse MLA), calls queued")
        ax.plot(x, col("dsa_fp8idx_ms"), "^--", color="tab:blue", alpha=0.6,
                label="the same, each call from an idle GPU")
        ax.plot(x, col("dsa_ms"), "s--", color="tab:cyan", label="DSA decode, f16 indexer (the exact mode's)")
    elif "dsa_fp8idx_ms" in rows[0]:
        ax.plot(x, col("dsa_fp8idx_ms"), "o-", color="tab:blue",
                label="DSA decode, fast mode (FP8 indexer + top-2048 + sparse MLA)")
        ax.plot(x, col("dsa_ms"), "s--", color="tab:cyan", label="DSA decode, f16 indexer (the exact mode's)")
    else:
        ax.plot(x, col("dsa_ms"), "o-", color="tab:blue", label="DSA decode (indexer + top-2048 + sparse MLA)")
    ax.plot(x, col("dsa_floor_ms"), ":", color="tab:blue", label="DSA: memory floor (132 B/token + 656 B/selected)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v // 1024}K" for v in x])
    ax.set_xlabel("context length per sequence (tokens)")
    ax.set_ylabel("time per decode step, one layer (ms)")
    ax.set_title("DeepSeek-V3.2 attention decode on H200, batch 64")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below the axes
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main()
