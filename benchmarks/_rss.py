"""Peak memory of a benchmark process, shared by the benchmarks that run cases in children.

Example:
    >>> peak_rss_mb() > 0
    True
"""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM``, which starts afresh at exec.

    ``ru_maxrss`` does not: a child started by a large parent reports at least
    the parent's RSS at the fork (Linux keeps it across exec).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
