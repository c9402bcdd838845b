"""The pending-connection caps (pistreaming.admission) and the Host names
the daemon answers to (pistreaming.hosts)."""

import pytest

from pistreaming.admission import PendingConnections, address_key
from pistreaming.hosts import HostPolicy, parse_allowed_host


@pytest.mark.parametrize("host,key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not an address", "not an address"),
])
def test_addresses_are_counted_one_by_one_and_ipv6_by_its_64(host, key):
    assert address_key(host) == key


class Connection:
    """What a protocol hands the caps: its key, and how to close it."""

    def __init__(self, caps, key):
        self.caps, self.key, self.closed = caps, key, False
        self.admitted = caps.admit(key, self.evict)

    def evict(self):
        self.closed = True
        self.lost()  # as connectionLost would

    def lost(self):
        if self.admitted:
            self.admitted = False
            self.caps.release(self.key, self.evict)


def test_an_address_past_its_cap_is_refused_and_gets_its_slot_back():
    caps = PendingConnections(per_address=2, total=10)
    first, second = Connection(caps, "a"), Connection(caps, "a")
    third = Connection(caps, "a")
    assert (first.admitted, second.admitted, third.admitted) == (True, True, False)
    assert caps.refused == 1 and Connection(caps, "b").admitted
    first.lost()
    assert Connection(caps, "a").admitted
    assert caps.count == 3 and caps.by_address == {"a": 2, "b": 1}


def test_with_the_overall_cap_reached_the_oldest_makes_room_for_a_newcomer():
    caps = PendingConnections(per_address=5, total=3)
    waiting = [Connection(caps, f"attacker{i}") for i in range(3)]
    viewer = Connection(caps, "viewer")
    assert viewer.admitted and not viewer.closed
    assert [c.closed for c in waiting] == [True, False, False]
    assert caps.evicted == 1 and caps.refused == 0 and caps.count == 3
    # The evicted one's own release (from its connectionLost) counts nothing twice.
    waiting[0].caps.release("attacker0", waiting[0].evict)
    assert caps.count == 3
    viewer.lost()
    assert caps.count == 2 and "viewer" not in caps.by_address


def test_without_anything_to_evict_the_overall_cap_refuses():
    caps = PendingConnections(per_address=5, total=2)
    assert caps.admit("a") and caps.admit("b")
    assert not caps.admit("c") and caps.refused == 1
    caps.release("a")
    assert caps.admit("c") and caps.count == 2


@pytest.mark.parametrize("host", [
    "127.0.0.1:8082", "[::1]:8082", "192.168.1.20", "[fe80::1%25eth0]:8082", "localhost:8082",
    "LocalHost.", "app.localhost", "campi", "campi.local:8082", "CAMPI.LOCAL.",
    "camera.example", "camera.example:443", "deep.cams.example", None,
])
def test_the_camera_answers_to_its_own_names(host):
    policy = HostPolicy(["camera.example", "*.cams.example"], hostname="campi")
    assert policy.allows(host)


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:8082", "camera.example.evil.example", "cams.example",
    "campi.evil", "", "a b", "x\x00y", "[::1", "[nothost]:80", "evil.example:80:80",
    b"\xff\xfe", "a" * 300,
])
def test_other_names_are_refused(host):
    policy = HostPolicy(["camera.example", "*.cams.example"], hostname="campi")
    assert not policy.allows(host)


def test_a_star_allows_any_name():
    assert HostPolicy(["*"]).allows("anything.example")


@pytest.mark.parametrize("text,name", [
    ("Camera.Example.", "camera.example"), ("*.Example.com", "*.example.com"), ("*", "*"),
])
def test_allowed_names_are_normalised(text, name):
    assert parse_allowed_host(text) == name


@pytest.mark.parametrize("text", ["evil example", "evil.example:8082", "[::1]", "", "*.", "x/y"])
def test_what_is_not_a_host_name_is_refused(text):
    with pytest.raises(ValueError):
        parse_allowed_host(text)
