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
