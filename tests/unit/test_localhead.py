"""The local cluster's GCS port is read from `ray start`'s own banner (launch/localhead.py)."""

from __future__ import annotations

from opsd.launch.localhead import started_port

# As `ray start --head --port=0` writes it (colours included), cut before and after the join line.
BANNER = (
    "2026-12-05 01:04:10,008\tINFO scripts.py:1043 -- \x1b[37mLocal node IP\x1b[39m: \x1b[1m192.0.2.2\x1b[22m\n"
    "2026-12-05 01:04:12,422\tSUCC scripts.py:1085 -- \x1b[32mRay runtime started.\x1b[39m\n"
    "2026-12-05 01:04:12,422\tINFO scripts.py:1092 -- To add another node to this Ray cluster, run\n"
    "2026-12-05 01:04:12,422\tINFO scripts.py:1095 -- \x1b[1m  ray start --address='192.0.2.2:60509'\x1b[22m\n"
    "2026-12-05 01:04:12,423\tINFO utils.py:88 -- Overwriting previous Ray address (192.0.2.2:49775).\n"
)


def test_the_port_is_the_one_in_the_join_line_once_the_runtime_has_started():
    assert started_port(BANNER) == 60509
    # Before the banner, or with the banner half written, there is no port yet.
    assert started_port(BANNER.split("\n")[0]) is None
    assert started_port("\n".join(BANNER.split("\n")[:3])) is None
    # The join line alone (say, quoted in an earlier error) is not a started runtime.
    assert started_port(BANNER.split("\n")[3]) is None
