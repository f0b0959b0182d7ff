"""The libguestfs reader's container check against a stand-in for the appliance, whose answers are the ones
libguestfs 1.48 gave (recorded with LIBGUESTFS_TRACE=1): a good PV is matched to its volume group by UUID,
whatever the appliance's kernel named the disk; corrupt metadata is still refused naming the PV; a failing
LVM query is reported as that call's failure, with what it said."""

from __future__ import annotations

from typing import Any

import pytest

from hostguard.errors import ImageError
from hostguard.imagefs.guestfs_reader import GuestfsReader

UUID = "F5cCeU-my3k-rRBH-eqf1-BCWe-3Iyh-Q9WijZ"
JUNK = "Retrying metadata scan."  # LVM prints this on stdout when a PV's metadata cannot be read


class Appliance:
    """Our disk is /dev/sda to the caller (libguestfs translates Device arguments and results); structs keep
    the kernel's name, /dev/sdb2 when the appliance's own disk was probed first."""

    def __init__(self, **answers: Any) -> None:
        self.answers = {
            "vgs": ["hgi1"],
            "vgpvuuids": [UUID],
            "pvuuid": UUID,
            "pvs_full": [{"pv_name": "/dev/sdb2", "pv_uuid": UUID.replace("-", "")}],
            "lvs": ["/dev/hgi1/home", "/dev/hgi1/root"],
            "list_md_devices": [],
            "list_devices": ["/dev/sda"],
            "list_partitions": ["/dev/sda1", "/dev/sda2"],
            **answers,
        }
        self.types = {"/dev/sda": "", "/dev/sda1": "ext4", "/dev/sda2": "LVM2_member"}

    def vfs_type(self, dev: str) -> str:
        return self.types.get(dev, "xfs")

    def __getattr__(self, name: str) -> Any:
        answer = self.answers[name]

        def call(*_args: Any) -> Any:
            if isinstance(answer, Exception):
                raise answer
            return answer

        return call


def check(g: Appliance) -> None:
    reader = GuestfsReader.__new__(GuestfsReader)
    reader._g = g
    reader._label = "disk.raw"
    reader._check_containers()


def test_a_good_pv_is_found_in_its_group_when_the_appliance_named_the_disk_sdb() -> None:
    check(Appliance())


def test_corrupt_lvm_metadata_is_still_refused_naming_the_physical_volume() -> None:
    g = Appliance(vgs=[JUNK], vgpvuuids=RuntimeError("Volume group not found"), pvuuid=JUNK, lvs=[f"/dev/{JUNK}"])
    with pytest.raises(ImageError, match=r"^disk.raw: /dev/sda2: an LVM2 physical volume \(LVM2_member\) whose"):
        check(g)


def test_a_pv_outside_every_listed_group_is_refused() -> None:
    with pytest.raises(ImageError, match="whose volume group could not be read"):
        check(Appliance(vgpvuuids=["AAAAAA-my3k-rRBH-eqf1-BCWe-3Iyh-Q9WijZ"]))


@pytest.mark.parametrize("method", ["vgs", "vgpvuuids", "pvuuid", "lvs"])
def test_a_failing_lvm_query_is_reported_as_that_call_not_as_corrupt_metadata(method: str) -> None:
    g = Appliance(**{method: RuntimeError(f"{method}: lvm: some failure\n  second line")})
    with pytest.raises(ImageError) as err:
        check(g)
    assert f"libguestfs {method}" in str(err.value)
    assert "some failure second line" in str(err.value)
    assert "corrupt" not in str(err.value)
