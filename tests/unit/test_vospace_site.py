"""The VOSpace site's own behaviour over the in-test stub service (``tests/vospacestub.py``):
what the contract suite does not reach (503s and Retry-After, a wrong Digest, a cut read,
token rotation, listing pages, images written by another client, a service without MoveNode,
crash leftovers). The real checks run against the lab's service (tests/integration)."""

from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagesync import hashing, transfer
from imagesync.config.types import VOSpaceConfig
from imagesync.errors import AuthError, TransientError
from imagesync.hashing import MultiHasher, new_hash
from imagesync.model import PROP_ORIGIN, NewImage
from imagesync.retry import RetryPolicy
from imagesync.sites import vospace, vospace_transfer
from imagesync.sites.memory import MemorySite
from imagesync.sites.vospace import VOSpaceSite
from imagesync.sites.vosproto import digest_header
from imagesync.transfer import CopyResult, ErrorKind, copy_image, new_image_for
from tests.vospacestub import StubNode, StubServer, StubVOSpace

DATA = os.urandom(200_000)
ROOT = "vos://example.org~store/images"


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def service() -> StubVOSpace:
    svc = StubVOSpace()
    svc.nodes["images"] = StubNode("ContainerNode", date="2024-01-01T00:00:00.000")
    return svc


@pytest.fixture
def server(service: StubVOSpace) -> Iterator[StubServer]:
    srv = StubServer(service)
    yield srv
    srv.close()


def make_site(
    server: StubServer, sleeps: Sleeps | None = None, token_file: Path | None = None
) -> VOSpaceSite:
    cfg = VOSpaceConfig(
        container=ROOT, capabilities_url=server.capabilities_url, token_file=token_file
    )
    return VOSpaceSite("vo", cfg, sleep=sleeps if sleeps is not None else Sleeps())


def new(name: str = "sl6", size: int = len(DATA)) -> NewImage:
    return NewImage(
        name, "qcow2", "bare", 1, 256, {"os_distro": "centos", PROP_ORIGIN: "x:1"}, size
    )


def upload(site: VOSpaceSite, data: bytes = DATA, name: str = "sl6") -> str:
    w = site.create(new(name, len(data)))
    for i in range(0, len(data), 65536):
        w.write(data[i : i + 65536])
    return w.finish().id


def copy_in(site: VOSpaceSite, hashes: dict[str, str] | None = None) -> CopyResult:
    """``DATA`` copied as ``sl6`` from a memory site into ``site`` (imagesync's own copy);
    ``hashes``: what the source says of it (default: its own sha512 and md5, as Glance's)."""
    source = MemorySite("src")
    image = source.add("sl6", DATA, hashes=hashes)
    target = new_image_for(image, image.version, "private")
    return copy_image(source, image, [(site, target)], sleep=Sleeps())


def data_nodes(service: StubVOSpace) -> list[str]:
    return sorted(p for p, n in service.nodes.items() if n.kind == "DataNode")


def test_a_503_storm_is_waited_out_as_its_retry_after_says(
    service: StubVOSpace, server: StubServer
) -> None:
    sleeps = Sleeps()
    site = make_site(server, sleeps)
    site.service()
    service.faults.unavailable, service.faults.retry_after = 2, "7"
    assert site.list_images() == []
    assert sleeps == [7.0, 7.0]  # the server's hint, not our backoff


def test_a_burst_longer_than_the_shared_policy_is_still_waited_out(
    service: StubVOSpace, server: StubServer
) -> None:
    sleeps = Sleeps()
    site = make_site(server, sleeps)
    service.faults.unavailable, service.faults.retry_after = 6, "1"  # as CADC's clients wait
    assert site.list_images() == []
    assert sleeps == [1.0] * 6


def test_a_503_that_outlasts_the_retries_is_transient_with_the_hint(
    service: StubVOSpace, server: StubServer
) -> None:
    site = VOSpaceSite(
        "vo",
        VOSpaceConfig(container=ROOT, capabilities_url=server.capabilities_url),
        policy=RetryPolicy(attempts=2),
        sleep=Sleeps(),
    )
    site.service()
    service.faults.unavailable, service.faults.retry_after = 5, "9"
    with pytest.raises(TransientError) as caught:
        site.list_images()
    assert caught.value.retry_after == 9.0 and caught.value.site == "vo"


@pytest.mark.parametrize(
    "fault",
    [
        # bytes damaged on the way up: the service's Digest then differs from what was sent
        pytest.param("flip_upload", id="bytes-damaged-on-the-way-up"),
        # the service says it stored other bytes: its md5 is claimed as answered, and wrong
        pytest.param("wrong_digest", id="the-service-md5-is-wrong"),
    ],
)
def test_a_digest_unlike_the_bytes_sent_is_an_integrity_failure_that_leaves_nothing(
    service: StubVOSpace, server: StubServer, fault: str
) -> None:
    setattr(service.faults, fault, True)
    (target,) = copy_in(make_site(server)).targets
    assert not target.ok and target.error_kind is ErrorKind.INTEGRITY
    assert data_nodes(service) == []


def count_transfer_hashing(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many chunks the transfer's own hasher took, per algorithm (the sites hash apart)."""
    updates: Counter[str] = Counter()

    class Counting:
        def __init__(self, algo: str) -> None:
            self.algo, self.h = algo, new_hash(algo)

        def update(self, data: bytes, /) -> None:
            updates[self.algo] += 1
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(transfer, "MultiHasher", functools.partial(MultiHasher, new=Counting))
    return updates


def test_glances_own_md5_is_sent_as_the_digest_and_the_copy_computes_no_md5(
    service: StubVOSpace, server: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The source computed md5 and sha512 together (Glance: checksum and os_hash_value; the
    # memory site alike). The copy checks every byte read against that sha512, so the source's
    # md5 is the md5 of the bytes read: sent as the upload's Digest, which the service checks
    # against what it received (412 otherwise), and compared with the md5 it answers.
    updates = count_transfer_hashing(monkeypatch)
    result = copy_in(make_site(server))
    assert result.ok
    assert updates["md5"] == 0 and updates["sha512"] > 0
    assert service.put_digests == [digest_header(hashlib.md5(DATA).hexdigest())]


def test_a_source_md5_unlike_its_bytes_is_refused_by_the_service_and_leaves_nothing(
    service: StubVOSpace, server: StubServer
) -> None:
    # sha512 right (the bytes read are the source's), md5 of other bytes: the service refuses
    # the upload (412), an integrity failure (not retried), and the node is deleted
    sha = hashlib.sha512(DATA).hexdigest()
    (target,) = copy_in(
        make_site(server), hashes={"sha512": sha, "md5": hashlib.md5(b"other").hexdigest()}
    ).targets
    assert not target.ok and target.error_kind is ErrorKind.INTEGRITY and target.attempts == 1
    assert "412" in (target.error or "")
    assert data_nodes(service) == []


def test_a_compressed_upload_sends_no_digest_of_the_image(
    service: StubVOSpace, server: StubServer
) -> None:
    # the node holds a zstd frame: the service's md5 is the frame's, never the image's
    site = make_site(server)
    site.compress = "zstd"
    assert copy_in(site).ok
    assert service.put_digests == [None]


def test_without_the_sources_own_sha512_and_md5_the_copy_computes_md5(
    service: StubVOSpace, server: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a legacy image (md5 only): the copy computes sha512 and md5 and sends no Digest
    updates = count_transfer_hashing(monkeypatch)
    assert copy_in(make_site(server), hashes={"md5": hashlib.md5(DATA).hexdigest()}).ok
    assert updates["md5"] == updates["sha512"] > 0 and service.put_digests == [None]
    # a VOSpace node as the source (its sha512 is a property, not the service's): reads verify
    # both, so copying it to another store computes md5 again
    service.nodes["other"] = StubNode("ContainerNode", date="2024-01-01T00:00:00.000")
    source = make_site(server)
    (image,) = source.list_images("sl6")
    assert set(image.hashes) == {"md5", "sha512"} and not source.capabilities.joint_hashes
    other = VOSpaceSite(
        "vo2",
        VOSpaceConfig(
            container="vos://example.org~store/other", capabilities_url=server.capabilities_url
        ),
        sleep=Sleeps(),
    )
    updates.clear()
    new = new_image_for(image, image.version, "private")
    assert copy_image(source, image, [(other, new)], sleep=Sleeps()).ok
    assert updates["md5"] == updates["sha512"] > 0


class CountingHashlib:
    """``hashlib`` as the site module sees it, counting the hashes it starts."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def md5(self, *args: Any, **kw: Any) -> Any:
        self.started.append("md5")
        return hashlib.md5(*args, **kw)

    def sha512(self, *args: Any, **kw: Any) -> Any:
        self.started.append("sha512")
        return hashlib.sha512(*args, **kw)

    def new(self, name: str, *args: Any, **kw: Any) -> Any:
        self.started.append(name)
        return hashlib.new(name, *args, **kw)


def test_a_plain_upload_claims_the_services_md5_and_hashes_nothing_itself(
    service: StubVOSpace, server: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The transfer hashes what it reads (sha512 + md5) and compares its md5 with the one the
    # service computed of what it stored: a second sha512 here (~1.2 CPU s/GiB) checked nothing.
    counting = CountingHashlib()
    # the upload hashes through imagesync.hashing (its worker threads), the reads
    # (vospace_transfer) with hashlib itself
    monkeypatch.setattr(hashing, "hashlib", counting)
    monkeypatch.setattr(vospace_transfer, "hashlib", counting)
    site = make_site(server)
    assert site.capabilities.hashes == {"md5"}
    w = site.create(new())
    for i in range(0, len(DATA), 65536):
        w.write(DATA[i : i + 65536])
    rec = w.finish()
    assert counting.started == []
    assert rec.hashes == {"md5": hashlib.md5(DATA).hexdigest()}
    (listed,) = site.list_images("sl6")
    assert listed.in_progress and listed.status == "active"  # finished, not yet published


def test_without_a_digest_the_nodes_md5_is_claimed(
    service: StubVOSpace, server: StubServer
) -> None:
    site = make_site(server)
    service.faults.no_digest = True
    w = site.create(new())
    w.write(DATA)
    assert w.finish().hashes == {"md5": hashlib.md5(DATA).hexdigest()}
    w.abort()


def test_a_copy_stores_the_transfers_sha512_on_the_node_at_publish(
    service: StubVOSpace, server: StubServer
) -> None:
    site = make_site(server)
    assert copy_in(site).ok
    (rec,) = site.list_images("sl6")
    assert rec.counts and rec.hashes == {
        "md5": hashlib.md5(DATA).hexdigest(),
        "sha512": hashlib.sha512(DATA).hexdigest(),
    }
    (path,) = data_nodes(service)
    props = service.nodes[path].props
    assert props["ivo://imagesync/image#sha512"] == hashlib.sha512(DATA).hexdigest()


def test_a_cut_read_is_resumed_with_range(service: StubVOSpace, server: StubServer) -> None:
    site = make_site(server)
    rec = site.publish(upload(site))
    service.faults.cut_read_after, service.faults.cut_reads = 70_000, 2
    service.requests.clear()
    assert b"".join(site.open(rec)) == DATA
    assert [m for m, p in service.requests if p.startswith("/files/")] == ["GET"] * 3


def test_a_read_cut_again_and_again_is_transient(service: StubVOSpace, server: StubServer) -> None:
    site = make_site(server)
    rec = site.publish(upload(site))
    service.faults.cut_read_after, service.faults.cut_reads = 70_000, 10
    with pytest.raises(TransientError):
        b"".join(site.open(rec))


def test_the_token_file_is_reread_when_it_changes_and_never_shown(
    service: StubVOSpace, server: StubServer, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("first-Secret-1\n")
    service.token = "first-Secret-1"
    site = make_site(server, token_file=token)
    assert site.list_images() == []
    service.token = "second-Secret-2"
    token.write_text("second-Secret-2\n")
    os.utime(token, ns=(1, 1))  # a rotation, whatever the file system's clock resolution
    assert site.list_images() == []
    service.token = "third"
    with pytest.raises(AuthError) as caught:
        site.list_images()
    assert "Secret" not in str(caught.value)


def test_listings_are_read_page_by_page(
    service: StubVOSpace, server: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vospace, "PAGE", 2)
    site = make_site(server)
    ids = {site.publish(upload(site, b"x" * 10, name=f"n{i}")).id for i in range(5)}
    service.requests.clear()
    assert {r.id for r in site.list_images()} == ids
    root_reads = [p for m, p in service.requests if m == "GET" and p == "/nodes/images"]
    assert len(root_reads) == 3  # 5 names, 2 a page (each page starts at the last one seen)


def test_an_image_written_by_another_client_is_a_source(
    service: StubVOSpace, server: StubServer
) -> None:
    # what CANFAR's vmsave or vcp leaves: a data node in a name's container, no imagesync marks
    service.nodes["images/sl6"] = StubNode("ContainerNode", date="2024-01-01T00:00:00.000")
    service.nodes["images/sl6/sl6-2024.img"] = StubNode(
        "DataNode", data=bytearray(DATA), date="2024-02-01T00:00:00.000"
    )
    site = make_site(server)
    (rec,) = site.list_images("sl6")
    assert rec.counts and not rec.hidden and rec.id == "sl6/sl6-2024.img"
    assert rec.hashes == {"md5": hashlib.md5(DATA).hexdigest()} and rec.disk_format == "raw"
    target = MemorySite("cloud")
    result = copy_image(site, rec, [(target, new_image_for(rec, rec.version, "private"))])
    assert result.ok
    (copy,) = target.list_images("sl6")
    assert target.data(copy.id) == DATA and copy.properties[PROP_ORIGIN] == "vo:sl6/sl6-2024.img"


def test_without_movenode_an_upload_is_marked_at_its_name_until_published(
    server: StubServer, service: StubVOSpace
) -> None:
    service.transfers = False
    site = make_site(server)
    image_id = upload(site)
    (path,) = data_nodes(service)
    assert path == f"images/{image_id}"  # never a dot-name that would stay after publish
    (rec,) = site.list_images("sl6")
    assert rec.in_progress and rec.hidden and not rec.counts
    pub = site.publish(image_id)
    assert pub.counts and not pub.hidden and data_nodes(service) == [path]


def test_with_movenode_an_upload_hides_under_a_dot_name_until_published(
    server: StubServer, service: StubVOSpace
) -> None:
    site = make_site(server)
    image_id = upload(site)
    name, leaf = image_id.split("/")
    assert data_nodes(service) == [f"images/{name}/.{leaf}.uploading"]
    site.publish(image_id)
    assert data_nodes(service) == [f"images/{image_id}"]


def test_a_crash_leftover_is_in_progress_and_delete_removes_it_and_its_container(
    server: StubServer, service: StubVOSpace
) -> None:
    site = make_site(server)
    w = site.create(new())
    w.write(DATA[:1000])  # the process dies here: no finish, no abort
    (left,) = make_site(server).list_images()
    assert left.in_progress and left.hidden
    site.delete(left.id)
    assert data_nodes(service) == [] and "images/sl6" not in service.nodes
    w.abort()
