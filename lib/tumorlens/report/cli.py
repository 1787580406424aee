"""``tumorlens report FINDINGS.json --out DIR`` and ``tumorlens evaluate-reports DATA_DIR``."""

from __future__ import annotations

from pathlib import Path

BACKEND_HELP = "local | openai | ollama | template (default: configs/report.yaml)"


def register(sub) -> None:
    p = sub.add_parser("report", help="verified radiology-style report (report.json + report.md) from a findings.json")
    p.add_argument("findings", help="findings.json written by `tumorlens explain`")
    p.add_argument("--backend", default=None, help=BACKEND_HELP)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_report)

    q = sub.add_parser("evaluate-reports",
                       help="findings -> report for N images: supported share, conflicts, fallback, speed, readability")
    q.add_argument("data_dir", help="a manifest folder (images) or a folder of *findings.json files")
    q.add_argument("--backend", default=None, help=BACKEND_HELP)
    q.add_argument("--n", type=int, default=10, help="number of images (spread over the classes)")
    q.add_argument("--model", default=None, help="image model for findings (default: the shipped model)")
    q.add_argument("--json", dest="json_out", default=None, help="write per-report rows and the summary here")
    q.set_defaults(func=run_evaluate_reports)


def run_report(args) -> int:
    from tumorlens.report import generate_report

    res = generate_report(Path(args.findings), backend=args.backend)
    here = Path(args.findings).parent  # `tumorlens explain` writes its pictures beside findings.json
    paths = res.write(args.out, pictures=[here / "overlay.png", here / "mni.png"])
    v = res.verification
    status = "FLAGGED (template fallback)" if v["fell_back"] else ("FLAGGED" if v["flagged"] else "verified")
    print(f"report: {status}; backend={v['backend']} repaired={v['repaired']} claims checked="
          f"{v['checked']['claims']} unsupported={len(v['unsupported_claims'])} "
          f"negation conflicts={len(v['negation_conflicts'])} ({res.seconds:.2f} s)")
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def run_evaluate_reports(args) -> int:
    from tumorlens.report.evaluate import evaluate_reports, format_summary, write_json

    res = evaluate_reports(args.data_dir, backend=args.backend, n=args.n, model=args.model)
    print(format_summary(res))
    if args.json_out:
        print(f"wrote {write_json(res, args.json_out)}")
    return 0
