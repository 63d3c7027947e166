"""prepare.json (bench_prepare.py) -> the tables of prepare.md.

    python benchmarks/data/report.py > /tmp/tables.md
"""
import json
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    r = json.loads((HERE / "prepare.json").read_text())
    runs = r["runs"]
    print(f"Machine: {r['machine']}; planted in the synthetic set: {r['planted']}\n")
    print("| run | records | kept | wall s | records/s (wall) | CPU s | records/CPU-s | peak RSS MB | above imports MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        n = run["report"]["records_read"]
        rep = run["report"]
        print(f"| {name} | {n:,} | {rep['records_kept']:,} | {run['wall_s']:.1f} | {n / run['wall_s']:,.0f} | "
              f"{run['cpu_s']:.1f} | {n / run['cpu_s']:,.0f} | {rep['peak_rss_mb']:.0f} | "
              f"{rep['peak_rss_mb'] - run['base_rss_mb']:.0f} |")
    for name, run in runs.items():
        print(f"\n**{name}** per step (seconds are wall time inside the step):\n")
        print("| step | records in | dropped | seconds | records/s |")
        print("|---|---:|---:|---:|---:|")
        for s in run["report"]["steps"]:
            rate = f"{s['records_per_s']:,}" if s["records_per_s"] else "-"
            print(f"| {s['step']} | {s['records_in']:,} | {s['dropped']:,} | {s['seconds']:.1f} | {rate} |")
    rec = r["recall"]
    print(f"\nNear-duplicate recall, {rec['base']:,} distinct texts + {rec['planted']:,} planted edited copies, "
          f"threshold {rec['threshold']}:\n")
    print("| true Jaccard of the planted pair | planted | removed | recall |")
    print("|---|---:|---:|---:|")
    for bucket, b in rec["by_jaccard"].items():
        print(f"| {bucket} | {b['planted']:,} | {b['removed']:,} | {b['recall']:.3f} |")
    print(f"\nDistinct texts removed (false positives): {rec['false_positives']}")


if __name__ == "__main__":
    main()
