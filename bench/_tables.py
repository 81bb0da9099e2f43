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


def method_table(rows, methods, targets, key, fmt, dense):
    """Markdown: per method and target, ``key`` of the row (``fmt``) with its wall time; a dense line first."""
    lines = ["| method | " + " | ".join(str(t) for t in targets) + " |", "|---|" + "---|" * len(targets),
             "| dense | " + " | ".join(fmt.format(dense) for _ in targets) + " |"]
    for label in methods:
        cells = []
        for t in targets:
            hit = [r for r in rows if r["method"] == label and r["target"] == str(t)]
            cells.append(f"{fmt.format(hit[0][key])} ({hit[0]['seconds']:.1f} s)" if hit else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
