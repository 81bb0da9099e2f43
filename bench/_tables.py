"""Tables the quality benchmarks print."""

import statistics


def accuracy_table(rows, criteria, sparsities):
    """Markdown: per criterion and sparsity, one-shot / fine-tuned accuracy, mean ± std over seeds."""
    lines = ["| criterion | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for c in criteria:
        cells = []
        for s in sparsities:
            one = [r["one_shot"] for r in rows if r["criterion"] == c and r["sparsity"] == s]
            tun = [r["tuned"] for r in rows if r["criterion"] == c and r["sparsity"] == s]
            cells.append(f"{statistics.mean(one):.3f}±{statistics.pstdev(one):.3f} / "
                         f"{statistics.mean(tun):.3f}±{statistics.pstdev(tun):.3f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
