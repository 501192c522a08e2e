"""Jobs: the Ray programs built on detector_core (embed, train, scan, demo).

Each is ``python -m jobs.<verb>`` with one dataclass config parsed by ``main(argv)``,
and the same module runs under ``ray job submit``.
"""
