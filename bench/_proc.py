"""Process facts read from /proc, shared by the run drivers of both sides (standard library only:
bench/_trl_side.py imports it from the TRL virtual environment)."""


def proc_status_kb(key: str) -> int:
    """A ``/proc/self/status`` value in kB (``VmRSS``, ``VmHWM``, ...); 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_facts(t_start: float, t_imported: float, t_end: float, rss_after_imports_kb: int, reports, lengths) -> dict:
    """What both sides' run drivers record about their process: memory, import and total time, the
    first report's delay (``reports``: the perf_counter times of the per-step reports), and the
    generated tokens per completion (``lengths``)."""
    return {
        "rss_after_imports_mb": rss_after_imports_kb / 1024,
        "peak_rss_mb": proc_status_kb("VmHWM") / 1024,
        "import_seconds": t_imported - t_start,
        "total_seconds": t_end - t_start,
        "first_report_after_seconds": (reports[0] - t_imported) if reports else None,
        "completion_tokens": {
            "n": len(lengths),
            "max": max(lengths) if lengths else None,
            "mean": sum(lengths) / len(lengths) if lengths else None,
        },
    }
